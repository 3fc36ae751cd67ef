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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from lexlora.adapters.files import (
    DTYPES,
    check_output_dir,
    publish,
    write_adapter_files,
)
from lexlora.adapters.fingerprint import fingerprint
from lexlora.config import Config, TrainConfig, config_to_dict, config_to_yaml
from lexlora.data.prepare import prepare_data
from lexlora.data.spec import AdapterSpec
from lexlora.data.tokenization import EncodedSplit, LexicalCollator
from lexlora.errors import AdapterError, ConfigError
from lexlora.fileio import make_staging_dir
from lexlora.model.families import FP16_UNSAFE
from lexlora.model.loading import check_quantization, load_base_model, load_tokenizer
from lexlora.model.lora_model import (
    LexLoraModel,
    build_lora_config,
    enable_gradient_checkpointing,
)
from lexlora.training.checkpoints import Checkpoints, StopSignals, TrainingInterrupted
from lexlora.training.evaluator import Evaluator, plan_evaluation
from lexlora.training.loop import NonFiniteLoss, TrainingRun
from lexlora.training.memory import describe_memory, max_peaks, peak_memory, reset_peak
from lexlora.training.tracking import flat_config, resolve_trackers, tracker_dir

logger = logging.getLogger(__name__)


SAMPLES_IN_CARD = 3
LOSS_CURVE_NAME = "loss_curve.png"



@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    # Native bf16 only (Ampere and newer): older GPUs emulate it, slower than fp32.
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
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


def set_cpu_threads(requested: int | None, num_processes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested or max(1, cores // num_processes)
    torch.set_num_threads(threads)
    logger.info("CPU training: %d torch thread(s) per process", threads)
    return threads


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused where torch has a fused kernel for them."""
    fused = train.fused_optimizer and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda", "xpu", "mps") for p in params
    )
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay, fused=fused or None)


def train_data_loader(split: EncodedSplit, cfg: Config, collator, generator: torch.Generator) -> DataLoader:
    """Shuffled batches drawn from `generator`; with train.group_by_length, of similar lengths."""
    sampler = (
        LengthGroupedSampler(cfg.train.batch_size, lengths=split.token_lengths(), generator=generator)
        if cfg.train.group_by_length
        else None
    )
    # The loader draws its worker base seed from `generator` too, not from the global RNG that
    # dropout uses, so that a resumed run's dropout masks match an uninterrupted run's.
    return DataLoader(split, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                      collate_fn=collator, generator=generator, num_workers=cfg.train.num_workers)


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, HPU, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def refuse_fp16_for_t5(cfg: Config) -> None:
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(cfg.model.name_or_path).model_type
    if model_type in FP16_UNSAFE:
        raise ConfigError(
            f"train.mixed_precision=fp16 is refused for {model_type}: T5-family models overflow to inf/NaN "
            "in fp16 (they were trained in bf16). Use bf16 (GPUs since Ampere) or no."
        )


def write_loss_curve(directory: Path, metric: str, title: str) -> None:
    # The plot is a convenience and the adapter beside it took the whole run to train, so any
    # plotting failure (matplotlib missing or broken, an odd log) is a warning, not a lost run.
    try:
        from lexlora.evaluation.plots import loss_curve_png

        loss_curve_png(directory / "metrics.jsonl", directory / LOSS_CURVE_NAME, metric, title=title)
    except Exception as exc:
        logger.warning("%s not written (%s: %s); the adapter is saved without it", LOSS_CURVE_NAME, type(exc).__name__, exc)


def train(cfg: Config) -> TrainResult:
    cfg.check()
    check_quantization(cfg.model)  # 8/4-bit without CUDA or bitsandbytes: refused before any work
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
    if mixed_precision == "fp16":
        refuse_fp16_for_t5(cfg)
    trackers = resolve_trackers(cfg)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=trackers or None,
            project_dir=str(tracker_dir(cfg).parent) if trackers else None,
            # Launched as several processes on a machine without GPUs (`accelerate launch --multi_gpu
            # --num_processes N` sets ACCELERATE_USE_CPU=false): Accelerate would run each process
            # alone, N copies of the same run; cpu=True makes them one gloo data-parallel run.
            cpu=launched > 1 and not _has_accelerator_device(),
        )
    except ValueError as exc:  # e.g. fp16 without a GPU
        raise ConfigError(f"train.mixed_precision={mixed_precision}: {exc}") from None
    if accelerator.num_processes != launched:
        raise ConfigError(
            f"started as {launched} processes (WORLD_SIZE), but Accelerate sees {accelerator.num_processes}: "
            "each would train the whole run alone; check the launcher's settings (accelerate config)"
        )
    main = accelerator.is_main_process
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.train.cpu_threads, accelerator.num_processes)
    set_seed(cfg.train.seed)
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    checkpoints = Checkpoints(cfg, accelerator)
    resume_from = checkpoints.resume_point()  # before any model work: a bad resume fails fast

    tokenizer = load_tokenizer(cfg.model)
    # The main process fills the embedding cache first; the others then read it.
    with accelerator.main_process_first():
        data = prepare_data(cfg, tokenizer, accelerator.device)
    plan = plan_evaluation(cfg, data)

    base = load_base_model(cfg.model, device=accelerator.device)
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
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.lexical_encoder = data.encoder
    trainable, total = model.parameter_counts()
    accelerator.print(describe_counts(trainable, total))

    collator = LexicalCollator(tokenizer, cfg.data.pad_to_multiple_of)
    # Reseeded at each epoch (TrainingRun.epoch_batches), so an epoch's order depends on the seed alone.
    generator = torch.Generator().manual_seed(cfg.train.seed)
    train_loader = train_data_loader(data.splits["train"], cfg, collator, generator)
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
    optimizer = make_optimizer(params, cfg.train)
    # Accelerate steps a prepared scheduler once per process, so its horizon is scaled to match.
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(cfg.train.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped: LexLoraModel = accelerator.unwrap_model(model)
    checkpoints.attach(unwrapped)
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
        run = TrainingRun(cfg, accelerator, model, optimizer, scheduler, train_loader, generator, evaluator,
                          total_steps, log, checkpoints, staging)
        if resume_from is not None:
            run.restore(resume_from)
        stopped = None
        reset_peak(accelerator.device)
        try:
            with StopSignals(accelerator) as stop:
                metrics = run.loop(stop)
        except NonFiniteLoss as bad:
            stopped, metrics = bad, run.keep_last_good(bad)
        metrics.update(
            {"trainable_params": trainable, "total_params": total, "trainable_pct": 100 * trainable / total,
             "mixed_precision": mixed_precision, "num_processes": accelerator.num_processes,
             "quantization": cfg.model.quantization, "gradient_checkpointing": cfg.train.gradient_checkpointing,
             "memory": memory_report(accelerator)}
        )
        log.write(memory=metrics["memory"])
        accelerator.print(describe_memory(metrics["memory"]))
        try:
            _publish(cfg, accelerator, unwrapped, evaluator, staging, metrics,
                     base_fp=base_fp, dataset_info=data.dataset_info, val_split=val_split, eval_metric=plan.metric)
        except AdapterError as exc:
            if stopped is None:
                raise
            raise stopped.error(cfg, run, f"they were not published ({exc})") from None
        staging = None
        checkpoints.remove_all()
        if stopped is not None:
            raise stopped.error(cfg, run, f"they were saved as the adapter {cfg.output_dir}")
        return TrainResult(Path(cfg.output_dir), metrics)
    except TrainingInterrupted:
        if staging is not None:  # the checkpoint holds the log; this dir holds nothing else
            shutil.rmtree(staging, ignore_errors=True)
            staging = None
        raise
    finally:
        accelerator.end_training()
        if staging is not None and staging.exists():
            # Keep the log of a failed run for inspection, under a name that is not an adapter.
            failed = staging.with_name(staging.name.replace(".tmp-", ".failed-"))
            shutil.move(str(staging), str(failed))
            logger.warning("run did not finish; its log is in %s", failed)


def memory_report(accelerator: Accelerator) -> dict[str, Any]:
    """Peak CUDA memory allocated on a GPU, peak process RSS otherwise; the largest over processes."""
    memory = peak_memory(accelerator.device)
    if accelerator.num_processes > 1:
        memory = max_peaks(gather_object([memory]))  # collective: every process calls it
    return memory


def _publish(cfg, accelerator, unwrapped: LexLoraModel, evaluator, staging: Path | None, metrics: dict[str, Any], *,
             base_fp: dict[str, Any], dataset_info: dict[str, Any], val_split: EncodedSplit | None, eval_metric: str) -> None:
    """Final evaluation of the weights as saved, then the adapter dir (written by the main process
    into its staging dir and renamed to output_dir)."""
    # Round to the save dtype before the final evaluation, so the recorded metrics are exactly
    # those of the saved adapter.
    unwrapped.round_trainables_(DTYPES[cfg.save_dtype])
    if evaluator is not None:
        final = {f"final_{name}": value for name, value in evaluator().items()}
        metrics.update(final)
        accelerator.log({name.replace("final_", "final/"): value for name, value in final.items()}, step=metrics["steps"])
    accelerator.wait_for_everyone()
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        resolved = config_to_dict(cfg)
        metadata = {
            "base": base_fp,
            "lora": asdict(cfg.lora),
            "dataset": dataset_info,
            "training": resolved["train"],
            "generation": resolved["generation"],
            "data": {k: v for k, v in resolved["data"].items() if k != "path"},
            "metrics": metrics,
            "samples": _samples(unwrapped, val_split, cfg) if val_split is not None else [],
        }
        size = write_adapter_files(unwrapped, staging, metadata, cfg.save_dtype)
        write_loss_curve(staging, eval_metric, title=output_dir.name)
        publish(staging, output_dir, cfg.overwrite_output_dir)
        metrics["adapter_bytes"] = size
        accelerator.print(f"adapter saved to {output_dir} ({size / 1e6:.2f} MB of weights, {cfg.save_dtype})")
    accelerator.wait_for_everyone()


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
