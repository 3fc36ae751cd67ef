"""The publish phase's parts: the adapter metadata a run records (lexlora.json), the sample outputs
shown in its model card, and the loss curve beside it."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lexlora.config import Config, config_to_dict
from lexlora.data.tokenization import EncodedSplit
from lexlora.evaluation.metrics import detect_task
from lexlora.model.lora_model import LexLoraModel
from lexlora.training.tracking import LOG_NAME

logger = logging.getLogger(__name__)

SAMPLES_IN_CARD = 3
LOSS_CURVE_NAME = "loss_curve.png"


def adapter_metadata(
    cfg: Config,
    *,
    base_fingerprint: dict[str, Any],
    dataset_info: dict[str, Any],
    metrics: dict[str, Any],
    samples: list[dict[str, str]],
    labels: list[str] | None = None,
) -> dict[str, Any]:
    """What a trained adapter records of its run, besides its weights and spec: the base it was
    trained on, the LoRA settings, the data and training settings as resolved, the run's metrics
    and a few sample outputs; for a label task its label set (`recorded_labels`)."""
    resolved = config_to_dict(cfg)
    return {
        "base": base_fingerprint,
        "lora": asdict(cfg.lora),
        "dataset": dataset_info,
        "training": resolved["train"],
        "generation": resolved["generation"],
        "data": {k: v for k, v in resolved["data"].items() if k != "path"},
        "metrics": metrics,
        "samples": samples,
        "labels": labels,
    }


def recorded_labels(cfg: Config, splits: dict[str, EncodedSplit]) -> list[str] | None:
    """The label set a seq2seq adapter records when its task is labels (data.task=labels, or auto and
    `detect_task` says so over all the targets, as the per-epoch evaluation decides): the sorted
    distinct stripped targets of the train split. None for a text task, or a classifier (whose
    label map is its head's)."""
    if cfg.classifies or cfg.data.task == "text" or "train" not in splits:
        return None
    target = cfg.data.target_field
    if cfg.data.task == "auto":
        references = [r.fields[target] for split in splits.values() for r in split.records]
        if not references or detect_task(references) != "labels":
            return None
    return sorted({r.fields[target].strip() for r in splits["train"].records}) or None


def card_samples(model: LexLoraModel, split: EncodedSplit | None, cfg: Config) -> list[dict[str, str]]:
    """A few validation rows with the final adapter's output, for the model card (none without a
    validation split)."""
    if split is None:
        return []
    records = [r.fields for r in split.records[:SAMPLES_IN_CARD]]
    outputs = model.generate_text(
        records, max_source_length=cfg.data.max_source_length,
        max_new_tokens=cfg.generation.max_new_tokens, num_beams=cfg.generation.num_beams,
    )
    shown = model.spec.lexical_field or model.spec.template.fields[0]
    return [
        {"input": r[shown], "reference": r[cfg.data.target_field], "output": o}
        for r, o in zip(records, outputs)
    ]


def write_loss_curve(directory: Path, metric: str, title: str) -> None:
    # The plot is a convenience and the adapter beside it took the whole run to train, so any
    # plotting failure (matplotlib missing or broken, an odd log) is a warning, not a lost run.
    try:
        from lexlora.evaluation.plots import loss_curve_png

        loss_curve_png(directory / LOG_NAME, directory / LOSS_CURVE_NAME, metric, title=title)
    except Exception as exc:
        logger.warning("%s not written (%s: %s); the adapter is saved without it", LOSS_CURVE_NAME, type(exc).__name__, exc)
