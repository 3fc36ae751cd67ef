"""The training recipe: data -> embeddings -> base + LoRA + fusion -> Accelerate loop -> adapter dir.

Accelerate does device placement, mixed precision, gradient accumulation, multi-process runs and
experiment trackers (train.report_to), so the same code runs under `python` and `accelerate launch`.
Each epoch ends with an evaluation on the validation split (its loss, and with train.eval_generate
the metrics of generated outputs); the epoch that is best by train.eval_metric is the one saved.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, is_tensorboard_available, is_wandb_available, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from lexlora.adapters import (
    DTYPES,
    check_output_dir,
    file_sha256,
    make_staging_dir,
    publish,
    write_adapter_files,
)
from lexlora.base import FP16_UNSAFE, fingerprint, load_base_model, load_tokenizer
from lexlora.config import Config, config_to_dict, config_to_yaml
from lexlora.data import EncodedSplit, LexicalCollator, encode_split, load_splits
from lexlora.embeddings import LexicalEncoder
from lexlora.errors import ConfigError, LexloraError
from lexlora.metrics import detect_task, higher_is_better, scalar_metrics, score
from lexlora.model import AdapterSpec, LexLoraModel, build_lora_config

logger = logging.getLogger(__name__)

SAMPLES_IN_CARD = 3
LOSS_CURVE_NAME = "loss_curve.png"
TRACKER_AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}


class NonFiniteLossError(LexloraError):
    pass


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class MetricsLog:
    """Appends one JSON object per line; only the main process writes."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def describe_counts(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


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
class PreparedData:
    splits: dict[str, EncodedSplit]
    lexical_field: str | None
    encoder: LexicalEncoder | None
    dataset_info: dict[str, Any]

    @property
    def embedding_dim(self) -> int | None:
        vectors = self.splits["train"].lexical_embeds
        return int(vectors.shape[-1]) if vectors is not None else None


def prepare_data(cfg: Config, tokenizer, device) -> PreparedData:
    """Read + validate records (before any model work), embed, tokenize."""
    splits, template, lexical_field = load_splits(cfg.data, cfg.fusion.enabled)
    encoder = None
    vectors: dict[str, torch.Tensor] = {}
    if cfg.fusion.enabled:
        encoder = LexicalEncoder(
            cfg.fusion.embedding_model, cfg.fusion.cache_dir, cfg.fusion.embedding_batch_size, device
        )
        started = time.perf_counter()
        for name, records in splits.items():
            vectors[name] = encoder.encode([r.fields[lexical_field] for r in records])
        logger.info(
            "lexical embeddings (%s): %d texts encoded, the rest from the cache, in %.1fs",
            cfg.fusion.embedding_model, encoder.encoded_count, time.perf_counter() - started,
        )
    encoded = {
        name: encode_split(records, template, cfg.data.target_field, tokenizer, cfg.data, vectors.get(name), name)
        for name, records in splits.items()
    }
    path = Path(cfg.data.path)
    dataset_info = {
        "path": str(cfg.data.path),
        "sha256": file_sha256(path) if path.is_file() else None,
        "splits": {name: len(records) for name, records in splits.items()},
    }
    return PreparedData(encoded, lexical_field, encoder, dataset_info)


def set_cpu_threads(requested: int | None, num_processes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested or max(1, cores // num_processes)
    torch.set_num_threads(threads)
    logger.info("CPU training: %d torch thread(s) per process", threads)
    return threads


def refuse_fp16_for_t5(cfg: Config) -> None:
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(cfg.model.name_or_path).model_type
    if model_type in FP16_UNSAFE:
        raise ConfigError(
            f"train.mixed_precision=fp16 is refused for {model_type}: T5-family models overflow to inf/NaN "
            "in fp16 (they were trained in bf16). Use bf16 (GPUs since Ampere) or no."
        )


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


@dataclass
class EvalPlan:
    """What each epoch's evaluation does, fixed (and checked) before any model work."""

    metric: str = "val_loss"
    task: str | None = None  # None: no generation, validation loss only
    inputs: list[dict[str, str]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)


def plan_evaluation(cfg: Config, data: PreparedData) -> EvalPlan:
    metric = cfg.train.eval_metric
    validation = data.splits.get("validation")
    if not cfg.train.generates:
        return EvalPlan(metric)
    if validation is None or len(validation) == 0:
        raise ConfigError(f"train.eval_metric={metric} / train.eval_generate need a non-empty validation split")
    target = cfg.data.target_field
    task = cfg.data.task
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
    return EvalPlan(metric, task, [r.fields for r in rows], [r.fields[target] for r in rows])


class Evaluator:
    """The end-of-epoch evaluation (validation loss on all processes and, when planned, the metrics
    of generated outputs), and the best epoch so far by eval_metric, with a copy of its weights."""

    def __init__(self, cfg: Config, plan: EvalPlan, model, unwrapped: LexLoraModel, loader: DataLoader, accelerator: Accelerator):
        self.cfg, self.plan, self.model, self.unwrapped = cfg, plan, model, unwrapped
        self.loader, self.accelerator = loader, accelerator
        self.best: dict[str, Any] | None = None  # the kept epoch's evaluation
        self.best_state: dict[str, torch.Tensor] | None = None
        self.seconds = 0.0

    def end_of_epoch(self, epoch: int, step: int, log: MetricsLog) -> None:
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


def write_loss_curve(directory: Path, metric: str, title: str) -> None:
    # The plot is a convenience and the adapter beside it took the whole run to train, so any
    # plotting failure (matplotlib missing or broken, an odd log) is a warning, not a lost run.
    try:
        from lexlora.plots import loss_curve_png

        loss_curve_png(directory / "metrics.jsonl", directory / LOSS_CURVE_NAME, metric, title=title)
    except Exception as exc:
        logger.warning("%s not written (%s: %s); the adapter is saved without it", LOSS_CURVE_NAME, type(exc).__name__, exc)


def train(cfg: Config) -> TrainResult:
    cfg.check()
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
    if mixed_precision == "fp16":
        refuse_fp16_for_t5(cfg)
    trackers = resolve_trackers(cfg)
    try:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=trackers or None,
            project_dir=str(tracker_dir(cfg).parent) if trackers else None,
        )
    except ValueError as exc:  # e.g. fp16 without a GPU
        raise ConfigError(f"train.mixed_precision={mixed_precision}: {exc}") from None
    main = accelerator.is_main_process
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.train.cpu_threads, accelerator.num_processes)
    set_seed(cfg.train.seed)
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)

    tokenizer = load_tokenizer(cfg.model)
    # The main process fills the embedding cache first; the others then read it.
    with accelerator.main_process_first():
        data = prepare_data(cfg, tokenizer, accelerator.device)
    plan = plan_evaluation(cfg, data)

    base = load_base_model(cfg.model)
    base_fp = fingerprint(base, cfg.model)
    spec = AdapterSpec(
        input_template=cfg.data.input_template,
        target_field=cfg.data.target_field,
        lexical_field=data.lexical_field,
        fusion_mode=cfg.fusion.mode if cfg.fusion.enabled else None,
        embedding_model=cfg.fusion.embedding_model if cfg.fusion.enabled else None,
        embedding_dim=data.embedding_dim,
    )
    lora_config = build_lora_config(cfg.lora, base.config.model_type, cfg.model.name_or_path)
    model = LexLoraModel.create(base, tokenizer, lora_config, spec)
    model.lexical_encoder = data.encoder
    trainable, total = model.parameter_counts()
    accelerator.print(describe_counts(trainable, total))

    collator = LexicalCollator(tokenizer, cfg.data.pad_to_multiple_of)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    train_loader = DataLoader(
        data.splits["train"], batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collator,
        generator=generator, num_workers=cfg.train.num_workers,
    )
    val_split = data.splits.get("validation")
    val_loader = (
        DataLoader(val_split, batch_size=cfg.train.eval_batch_size, collate_fn=collator, num_workers=cfg.train.num_workers)
        if val_split is not None
        else None
    )
    train_loader = accelerator.prepare(train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.train.gradient_accumulation_steps))
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    # Accelerate steps a prepared scheduler once per process, so its horizon is scaled to match.
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(cfg.train.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped: LexLoraModel = accelerator.unwrap_model(model)
    evaluator = Evaluator(cfg, plan, model, unwrapped, val_loader, accelerator) if val_loader is not None else None

    staging = make_staging_dir(cfg.output_dir) if main else None
    log = MetricsLog(staging / "metrics.jsonl" if staging else None)
    try:
        if staging is not None:
            (staging / "config.yaml").write_text(config_to_yaml(cfg))
            logger.info("training log: %s (moved to %s at the end)", staging / "metrics.jsonl", cfg.output_dir)
        if trackers:
            if main:
                tracker_dir(cfg).mkdir(parents=True, exist_ok=True)
            # TensorBoard writes to project_dir/<name>, i.e. into logging_dir itself.
            accelerator.init_trackers(
                tracker_dir(cfg).name, config=flat_config(cfg), init_kwargs={"wandb": {"dir": str(tracker_dir(cfg))}}
            )
        metrics = _loop(cfg, accelerator, model, params, optimizer, scheduler, train_loader, evaluator, total_steps, log)
        metrics.update(
            {"trainable_params": trainable, "total_params": total, "trainable_pct": 100 * trainable / total,
             "mixed_precision": mixed_precision, "num_processes": accelerator.num_processes}
        )
        # Round to the save dtype before the final evaluation, so the recorded metrics are exactly
        # those of the saved adapter.
        unwrapped.round_trainables_(DTYPES[cfg.save_dtype])
        if evaluator is not None:
            final = {f"final_{name}": value for name, value in evaluator().items()}
            metrics.update(final)
            accelerator.log({name.replace("final_", "final/"): value for name, value in final.items()}, step=metrics["steps"])
        accelerator.wait_for_everyone()
        output_dir = Path(cfg.output_dir)
        if main:
            resolved = config_to_dict(cfg)
            metadata = {
                "base": base_fp,
                "lora": asdict(cfg.lora),
                "dataset": data.dataset_info,
                "training": resolved["train"],
                "generation": resolved["generation"],
                "data": {k: v for k, v in resolved["data"].items() if k != "path"},
                "metrics": metrics,
                "samples": _samples(unwrapped, val_split, cfg) if val_split is not None else [],
            }
            size = write_adapter_files(unwrapped, staging, metadata, cfg.save_dtype)
            write_loss_curve(staging, plan.metric, title=output_dir.name)
            publish(staging, output_dir, cfg.overwrite_output_dir)
            staging = None
            metrics["adapter_bytes"] = size
            accelerator.print(f"adapter saved to {output_dir} ({size / 1e6:.2f} MB of weights, {cfg.save_dtype})")
        accelerator.wait_for_everyone()
        return TrainResult(output_dir, metrics)
    finally:
        accelerator.end_training()
        if staging is not None and staging.exists():
            # Keep the log of a failed run for inspection, under a name that is not an adapter.
            failed = staging.with_name(staging.name.replace(".tmp-", ".failed-"))
            shutil.move(str(staging), str(failed))
            logger.warning("run did not finish; its log is in %s", failed)


def _loop(cfg, accelerator, model, params, optimizer, scheduler, train_loader, evaluator, total_steps, log) -> dict[str, Any]:
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_local_main_process)
    step = epoch = 0
    running = torch.zeros((), device=accelerator.device)
    micro_batches = 0
    last_loss = math.nan
    started = time.perf_counter()
    model.train()
    while step < total_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += loss.detach()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            # Host sync (.item) only at log intervals.
            if step % cfg.train.log_every == 0 or step == total_steps:
                last_loss = accelerator.gather(running / micro_batches).mean().item()
                running.zero_()
                micro_batches = 0
                if not math.isfinite(last_loss):
                    raise NonFiniteLossError(
                        f"training loss became {last_loss} by step {step}; nothing was saved. "
                        "Try a lower train.learning_rate, train.mixed_precision=bf16 or no instead of fp16, "
                        "or a smaller train.max_grad_norm."
                    )
                lr = scheduler.get_last_lr()[0]
                progress.set_postfix(loss=f"{last_loss:.4f}")
                log.write(step=step, epoch=epoch, loss=last_loss, lr=lr, seconds=time.perf_counter() - started)
                accelerator.log({"train/loss": last_loss, "train/lr": lr}, step=step)
            if step >= total_steps:
                break
        epoch += 1
        if evaluator is not None:
            evaluator.end_of_epoch(epoch, step, log)
    progress.close()
    eval_seconds = evaluator.seconds if evaluator is not None else 0.0
    seconds = time.perf_counter() - started - eval_seconds
    metrics: dict[str, Any] = {
        "steps": step,
        "epochs": epoch,
        "train_loss": last_loss,
        "train_seconds": round(seconds, 3),  # excluding evaluation
        "eval_seconds": round(eval_seconds, 3),
        "seconds_per_step": round(seconds / max(step, 1), 4),
    }
    metrics.update(evaluator.keep_best() if evaluator is not None else {"best_val_loss": None})
    log.write(summary=metrics)
    return metrics


def _samples(model: LexLoraModel, split: EncodedSplit, cfg: Config) -> list[dict[str, str]]:
    """A few validation rows with the final adapter's output, for the model card."""
    records = [r.fields for r in split.records[:SAMPLES_IN_CARD]]
    outputs = model.generate_text(
        records, max_source_length=cfg.data.max_source_length,
        max_new_tokens=cfg.generation.max_new_tokens, num_beams=cfg.generation.num_beams,
    )
    shown = model.spec.lexical_field or model.template.fields[0]
    return [
        {"input": r[shown], "reference": r[cfg.data.target_field], "output": o}
        for r, o in zip(records, outputs)
    ]
