"""End-of-epoch evaluation during training: the validation loss on all processes and, when
train.eval_metric asks for it, the metrics of generated outputs; and the best epoch so far."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader

from lexlora.config import Config
from lexlora.errors import ConfigError
from lexlora.evaluation.metrics import (
    detect_task,
    higher_is_better,
    scalar_metrics,
    score,
)
from lexlora.model.lora_model import LexLoraModel


@torch.no_grad()
def validation_loss(model, loader: DataLoader, accelerator: Accelerator) -> float:
    """Token-weighted mean cross-entropy over the whole split (all processes)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        loss = model(**batch).loss
        count = (batch["labels"] != -100).sum()
        pair = accelerator.gather_for_metrics(torch.stack([loss.double() * count, count.double()]).unsqueeze(0))
        total += pair[:, 0].sum()
        tokens += pair[:, 1].sum()
    model.train(was_training)
    return float(total / tokens.clamp(min=1))


@dataclass
class EvalPlan:
    """What each epoch's evaluation does, fixed (and checked) before any model work."""

    metric: str = "val_loss"
    task: str | None = None  # None: no generation, validation loss only
    inputs: list[dict[str, str]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)


def plan_evaluation(cfg: Config, data) -> EvalPlan:
    """`data`: training's PreparedData (its splits)."""
    metric = cfg.train.eval_metric
    validation = data.splits.get("validation")
    if not cfg.train.generates:
        return EvalPlan(metric)
    if validation is None or len(validation) == 0:
        raise ConfigError(f"train.eval_metric={metric} / train.eval_generate need a non-empty validation split")
    target = cfg.data.target_field
    task = "labels" if cfg.classifies else cfg.data.task  # a classifier's outputs are its labels
    if task == "auto":  # from all the targets: more repeats to see than in a capped validation slice
        task = detect_task([r.fields[target] for split in data.splits.values() for r in split.records])
    if metric != "val_loss":
        # The names a task produces, from scoring one trivial pair (no static list to drift).
        available = sorted(scalar_metrics(score(task, ["x"], ["x"])))
        if metric not in available:
            how = "detected from the data" if cfg.data.task == "auto" else "data.task"
            raise ConfigError(
                f"train.eval_metric={metric} is not a metric of the {task!r} task ({how}); "
                f"choose val_loss or one of: {', '.join(available)}"
            )
    rows = validation.records[: cfg.train.eval_max_rows]
    references = [r.fields[target].strip() if cfg.classifies else r.fields[target] for r in rows]
    return EvalPlan(metric, task, [r.fields for r in rows], references)


class Evaluator:
    """The end-of-epoch evaluation (validation loss on all processes and, when planned, the metrics
    of generated outputs), and the best epoch so far by eval_metric, with a copy of its weights."""

    def __init__(self, cfg: Config, plan: EvalPlan, model, unwrapped: LexLoraModel, loader: DataLoader, accelerator: Accelerator):
        self.cfg, self.plan, self.model, self.unwrapped = cfg, plan, model, unwrapped
        self.loader, self.accelerator = loader, accelerator
        self.best: dict[str, Any] | None = None  # the kept epoch's evaluation
        self.best_state: dict[str, torch.Tensor] | None = None
        self.seconds = 0.0

    def end_of_epoch(self, epoch: int, step: int, log) -> None:
        started = time.perf_counter()
        values = self()
        self.seconds += time.perf_counter() - started
        improved = self.is_better(values, self.best)
        if improved:
            self.best = {"epoch": epoch, **values}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.unwrapped.trainable_state_dict().items()}
        log.write(step=step, epoch=epoch, **values, best=improved)
        self.accelerator.log({f"val/{name.removeprefix('val_')}": value for name, value in values.items()}, step=step)
        shown = ", ".join(f"{name} {value:.4f}" for name, value in values.items())
        self.accelerator.print(f"epoch {epoch} step {step}: {shown}{' (best)' if improved else ''}")

    def keep_best(self) -> dict[str, Any]:
        """Load the best epoch's weights back; returns the best_* figures for the run's metrics."""
        if self.best_state is not None:
            self.unwrapped.load_trainable_state_dict(self.best_state, source="best checkpoint")
        best, metric = self.best or {}, self.plan.metric
        summary = {"eval_metric": metric, "best_epoch": best.get("epoch"), "best_val_loss": best.get("val_loss")}
        if metric != "val_loss":
            summary[f"best_{metric}"] = best.get(metric)
        if self.plan.task is not None:
            summary.update({"eval_task": self.plan.task, "eval_rows": len(self.plan.inputs)})
        return summary

    def __call__(self) -> dict[str, float]:
        values = {"val_loss": validation_loss(self.model, self.loader, self.accelerator)}
        if self.plan.task is not None:
            values.update(self.generated_metrics())
        return values

    def generated_metrics(self) -> dict[str, float]:
        # The main process generates and scores; the others get its figures, so every process
        # takes the same best-epoch decision (each keeps its own copy of the best weights).
        # Generating through the unwrapped model makes no collective calls, so the others simply
        # wait in the broadcast (sharded setups such as FSDP would need all ranks to generate).
        figures: list[Any] = [None]
        if self.accelerator.is_main_process:
            generation = self.cfg.generation
            predictions = self.unwrapped.generate_text(
                self.plan.inputs, max_source_length=self.cfg.data.max_source_length,
                max_new_tokens=generation.max_new_tokens, num_beams=generation.num_beams,
                batch_size=generation.batch_size,
            )
            figures[0] = scalar_metrics(score(self.plan.task, predictions, self.plan.references))
        if self.accelerator.num_processes > 1:
            broadcast_object_list(figures)
        return figures[0]

    def is_better(self, new: dict[str, float], best: dict[str, float] | None) -> bool:
        """By eval_metric (NaN is worst); a tie on a generated metric goes to the lower validation loss."""
        if best is None:
            return True
        metric = self.plan.metric
        value, kept = new[metric], best[metric]
        if value != kept:
            if math.isnan(value) or math.isnan(kept):
                return math.isnan(kept) and not math.isnan(value)
            return (value > kept) == higher_is_better(metric)
        return new["val_loss"] < best["val_loss"]
