"""Experiment trackers through Accelerate (train.report_to): which, where, and the config they log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate.utils import is_tensorboard_available, is_wandb_available

from lexlora.config import Config, config_to_dict
from lexlora.errors import ConfigError

TRACKER_AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}


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


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as dotted keys with scalar values (all TensorBoard's hparams accept)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # None, lists, empty dicts
            flat[prefix] = json.dumps(value)

    walk("", config_to_dict(cfg))
    return flat
