"""Where a run's figures go: its own log (metrics.jsonl, `MetricsLog`) and the experiment trackers
through Accelerate (train.report_to): which, where, and the config they log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate.utils import is_tensorboard_available, is_wandb_available

from lexlora.config import Config, config_to_dict
from lexlora.errors import ConfigError

TRACKER_AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
LOG_NAME = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per line; only the main process writes (`path` None elsewhere)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def resolve_trackers(cfg: Config) -> list[str]:
    """train.report_to as Accelerate tracker names; a requested tracker must be installed."""
    names = cfg.train.trackers()
    if cfg.train.report_to.strip() == "all":
        names = [name for name in names if TRACKER_AVAILABLE[name]()]
        if not names:
            raise ConfigError("train.report_to=all: no tracker is installed; pip install tensorboard (or wandb)")
    for name in names:
        if not TRACKER_AVAILABLE[name]():
            raise ConfigError(f"train.report_to={name}: the {name} package is not installed; pip install {name}")
    return names


def tracker_dir(cfg: Config) -> Path:
    # Beside, not inside, the adapter dir: that is a staging dir renamed (or replaced) at the end.
    return Path(cfg.train.logging_dir or Path("runs") / Path(cfg.output_dir).name)


def dotted_keys(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys ({"train": {"seed": 1}} -> {"train.seed": 1});
    the leaves (an empty dict included) are kept as they are."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(dotted_keys(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as dotted keys with scalar values (all TensorBoard's hparams accept):
    None, lists and empty dicts as JSON text."""
    return {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for key, value in dotted_keys(config_to_dict(cfg)).items()
    }
