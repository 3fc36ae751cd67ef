"""`lexlora ablate`: train and evaluate a small grid of variants of one config (same seed, same
data, same split), then write one comparison table.

    lexlora ablate --config configs/file_description.yaml --grid fusion=off,add,first,prefix --grid lora.r=4,8

A grid axis is a config key with comma-separated values; `fusion=off|add|first|prefix` is short for
fusion.enabled / fusion.mode. Every run is a normal adapter dir under the output dir.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lexlora.config import FUSION_MODES, Config, load_config
from lexlora.errors import ConfigError
from lexlora.fileio import atomic_write_text

logger = logging.getLogger(__name__)


DEFAULT_GRID = ("fusion=off,add,first,prefix", "lora.r=4,8")
TABLE_NAME = "ablation.md"
RUN_COLUMNS = ["run", "fusion", "r", "trainable_params", "adapter_mb", "best_val_loss", "train_seconds"]
RESULTS_NAME = "ablation.json"


@dataclass
class Variant:
    name: str  # also its adapter dir's name
    overrides: list[str]  # dotted overrides applied after the user's


def parse_grid(axes: Sequence[str]) -> list[Variant]:
    """Every combination of the axes' values, in order."""
    parsed: list[tuple[str, list[str]]] = []
    for axis in axes:
        key, sep, values = axis.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise ConfigError(f"grid axis {axis!r}: expected KEY=VALUE[,VALUE...], e.g. lora.r=4,8")
        if key.strip() == "fusion":
            unknown = [c for c in choices if c != "off" and c not in FUSION_MODES]
            if unknown:
                raise ConfigError(f"grid axis {axis!r}: fusion takes off or one of {FUSION_MODES}, not {unknown}")
        parsed.append((key.strip(), choices))
    variants = []
    for combination in itertools.product(*(values for _, values in parsed)):
        overrides, name_parts = [], []
        for (key, _), value in zip(parsed, combination):
            name_parts.append(f"{key.rsplit('.', 1)[-1]}-{value}")
            if key == "fusion":
                overrides += ["fusion.enabled=false"] if value == "off" else ["fusion.enabled=true", f"fusion.mode={value}"]
            else:
                overrides.append(f"{key}={value}")
        variants.append(Variant("_".join(name_parts) or "default", overrides))
    return variants


def variant_configs(config_path: str | Path, overrides: Sequence[str], variants: Sequence[Variant], out_dir: Path) -> list[Config]:
    """Resolve every variant's config up front, so a bad axis fails before hours of training."""
    configs = []
    for variant in variants:
        config = load_config(config_path, [*overrides, *variant.overrides])
        config.output_dir = str(out_dir / variant.name)
        config.overwrite_output_dir = True
        configs.append(config)
    return configs


def run_ablation(
    config_path: str | Path,
    grid: Sequence[str] = DEFAULT_GRID,
    overrides: Sequence[str] = (),
    out_dir: str | Path = "runs/ablation",
    split: str = "validation",
    max_rows: int | None = None,
    task: str = "auto",
    **generate_kwargs: Any,
) -> tuple[list[dict[str, Any]], Path]:
    from lexlora.evaluation.metrics import scalar_metrics
    from lexlora.evaluation.runner import eval_rows, evaluate_adapter
    from lexlora.serving.registry import LexLoRA
    from lexlora.training.recipe import train

    out_dir = Path(out_dir)
    if split == "test":
        logger.warning("ablation scored on the test split: choosing a variant by these figures makes its test "
                       "score optimistic; choose on validation (the default) and score the chosen one on test")
    variants = parse_grid(grid)
    configs = variant_configs(config_path, overrides, variants, out_dir)
    rows: list[dict[str, Any]] = []
    registry = None
    for variant, config in zip(variants, configs):
        logger.info("ablation run %s: %s", variant.name, " ".join(variant.overrides))
        result = train(config)
        adapter_dir = Path(result.output_dir)
        if registry is None:  # every variant shares the base: load it once
            registry = LexLoRA.for_adapter(adapter_dir)
        registry.load_adapter(adapter_dir, name=variant.name)
        data = eval_rows(adapter_dir, split, max_rows=max_rows)
        with_base = not rows  # the base's figures do not depend on the variant: once is enough
        evaluated = evaluate_adapter(registry, variant.name, data, task=task, with_base=with_base, **generate_kwargs)
        if with_base and evaluated.base_scores:
            rows.append({"run": "base (no adapter)", **scalar_metrics(evaluated.base_scores)})
        registry.delete_adapter(variant.name)
        metrics = result.metrics
        rows.append({
            "run": variant.name,
            "fusion": config.fusion.mode if config.fusion.enabled else "off",
            "r": config.lora.r,
            "trainable_params": metrics.get("trainable_params"),
            "adapter_mb": round(metrics.get("adapter_bytes", 0) / 1e6, 3),
            "best_val_loss": metrics.get("best_val_loss"),
            "train_seconds": metrics.get("train_seconds"),
            **scalar_metrics(evaluated.adapter_scores),
        })
    table = _write_results(out_dir, rows, config_path, split, grid, overrides)
    return rows, table


def _write_results(out_dir: Path, rows: list[dict[str, Any]], config_path, split, grid, overrides) -> Path:
    from lexlora.evaluation.reports import markdown_table

    # The run's settings first, then its figures; the base row has only figures.
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = [c for c in RUN_COLUMNS if c in keys] + [k for k in keys if k not in RUN_COLUMNS]
    text = "\n".join([
        f"# Ablation of `{config_path}`",
        "",
        f"Grid: {' × '.join(f'`{axis}`' for axis in grid)}; overrides: {' '.join(overrides) or 'none'}; "
        f"scored on split `{split}`. Same seed and data for every run.",
        "",
        markdown_table(rows, columns),
        "",
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"config": str(config_path), "grid": list(grid), "overrides": list(overrides), "split": split, "rows": rows}
    atomic_write_text(out_dir / RESULTS_NAME, json.dumps(results, indent=2, default=str) + "\n")
    return atomic_write_text(out_dir / TABLE_NAME, text)

