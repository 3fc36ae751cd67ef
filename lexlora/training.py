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
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from lexlora.adapters import (
    DTYPES,
    check_output_dir,
    file_sha256,
    make_staging_dir,
    publish,
    write_adapter_files,
)
from lexlora.base import FP16_UNSAFE, check_quantization, fingerprint, load_base_model, load_tokenizer
from lexlora.checkpoints import LOG_NAME, Checkpoints, LoopState, StopSignals, TrainingInterrupted
from lexlora.config import Config, TrainConfig, config_to_dict, config_to_yaml
from lexlora.data import EncodedSplit, LexicalCollator, encode_split, load_splits
from lexlora.embeddings import LexicalEncoder
from lexlora.errors import AdapterError, ConfigError, LexloraError
from lexlora.memory import describe_memory, max_peaks, peak_memory, reset_peak
from lexlora.model import AdapterSpec, LexLoraModel, build_lora_config, enable_gradient_checkpointing
from lexlora.tracking import flat_config, resolve_trackers, tracker_dir
from lexlora.validation import Evaluator, plan_evaluation

logger = logging.getLogger(__name__)

SAMPLES_IN_CARD = 3
LOSS_CURVE_NAME = "loss_curve.png"


class NonFiniteLossError(LexloraError):
    pass


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
    """Read + validate records, tokenize (a refused long target stops here), then embed: all
    before any model work but the embedding model's."""
    splits, template, lexical_field = load_splits(cfg.data, cfg.fusion.enabled)
    encoded = {
        name: encode_split(records, template, cfg.data.target_field, tokenizer, cfg.data, None, name)
        for name, records in splits.items()
    }
    encoder = None
    if cfg.fusion.enabled:
        encoder = LexicalEncoder(
            cfg.fusion.embedding_model, cfg.fusion.cache_dir, cfg.fusion.embedding_batch_size, device
        )
        started = time.perf_counter()
        for name, records in splits.items():
            encoded[name].lexical_embeds = encoder.encode([r.fields[lexical_field] for r in records])
        logger.info(
            "lexical embeddings (%s): %d texts encoded, the rest from the cache, in %.1fs",
            cfg.fusion.embedding_model, encoder.encoded_count, time.perf_counter() - started,
        )
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
        from lexlora.plots import loss_curve_png

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


NO_STEP = torch.iinfo(torch.int64).max


class NonFiniteLoss(Exception):
    """Raised inside the loop at the first check that sees a non-finite loss (or weights)."""

    def __init__(self, step: int, what: str = "loss"):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what

    def error(self, cfg: Config, run: "TrainingRun", kept: str) -> NonFiniteLossError:
        if run.good_step is None:
            where = "no weights were verified finite before it, so nothing was saved"
        else:
            where = f"the last weights verified finite are from step {run.good_step}, and {kept}"
        return NonFiniteLossError(
            f"training stopped: {self}; {where}. Try a lower train.learning_rate (now {cfg.train.learning_rate}), "
            f"train.mixed_precision=bf16 (or no) instead of fp16, or a smaller train.max_grad_norm "
            f"(now {cfg.train.max_grad_norm})."
        )


def finite_cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A CPU copy of `state`, or None if a value is not finite; one check and one device-to-host
    copy for all the tensors (a copy per tensor costs a sync each)."""
    flat = torch.cat([value.detach().reshape(-1) for value in state.values()])
    if not torch.isfinite(flat).all():
        return None
    flat, copy, start = flat.cpu(), {}, 0
    for key, value in state.items():
        copy[key] = flat[start : start + value.numel()].view(value.shape)
        start += value.numel()
    return copy


class TrainingRun:
    """The optimizer-step loop, and what it must carry across an interruption: its counters
    (LoopState), the best epoch so far (the Evaluator's), the last weights verified finite, and when
    to save a checkpoint or stop."""

    def __init__(self, cfg, accelerator, model, optimizer, scheduler, loader, generator, evaluator,
                 total_steps, log, checkpoints, staging):
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.unwrapped: LexLoraModel = accelerator.unwrap_model(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler, self.loader, self.generator = optimizer, scheduler, loader, generator
        self.evaluator, self.total_steps, self.log, self.checkpoints = evaluator, total_steps, log, checkpoints
        self.staging = staging
        self.state = LoopState()
        self.running = torch.zeros((), device=accelerator.device)
        # The first optimizer step whose loss was not finite (NO_STEP: none yet), kept on the device
        # so that watching for it costs no host sync; it is read at log intervals and checkpoints.
        self.first_bad = torch.full((), NO_STEP, dtype=torch.long, device=accelerator.device)
        self.good_state: dict[str, torch.Tensor] | None = None
        self.good_step: int | None = None
        self.started = time.perf_counter()
        self.progress = None

    def elapsed(self) -> float:
        return self.state.seconds + time.perf_counter() - self.started

    # ---- the loop --------------------------------------------------------------------------------
    def loop(self, stop: StopSignals) -> dict[str, Any]:
        state = self.state
        self.progress = tqdm(total=self.total_steps, initial=state.step, desc="train",
                             disable=not self.accelerator.is_local_main_process)
        self.started = time.perf_counter()
        self.model.train()
        # batches_done > 0 at the last step: a stop came then, and that epoch's end is still due.
        while state.step < self.total_steps or state.batches_done:
            if state.step < self.total_steps:
                self.train_epoch(stop)
            self.end_epoch(stop)
        self.progress.close()
        return self.summary()

    def epoch_batches(self):
        # Each epoch's order is drawn from seed + epoch alone: a resumed run shuffles epoch k exactly
        # as an uninterrupted one does, then skips what the checkpoint had already trained on.
        self.generator.manual_seed(self.cfg.train.seed + self.state.epoch)
        if self.state.batches_done:
            return self.accelerator.skip_first_batches(self.loader, self.state.batches_done)
        return self.loader

    def train_epoch(self, stop: StopSignals) -> None:
        state = self.state
        for batch in self.epoch_batches():
            self.train_on(batch)
            if not self.accelerator.sync_gradients:
                continue
            state.step += 1
            self.progress.update(1)
            self.after_step(stop)
            if state.step >= self.total_steps:
                break

    def train_on(self, batch) -> None:
        accelerator, train = self.accelerator, self.cfg.train
        with accelerator.accumulate(self.model):
            loss = self.model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.params, train.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        # The optimizer step is not skipped on a non-finite loss: that would need a host sync per
        # step, the run stops at the next check anyway, and the weights kept are the last verified.
        loss = loss.detach()
        self.running += loss
        first = (self.first_bad == NO_STEP) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, self.state.step + 1, self.first_bad)
        self.state.micro_batches += 1
        self.state.batches_done += 1

    def after_step(self, stop: StopSignals) -> None:
        state, train = self.state, self.cfg.train
        if state.step % train.log_every == 0 or state.step == self.total_steps:
            self.log_loss()
        signum = stop.agreed()
        if signum:
            self.interrupt(signum, self.save())
        ends_epoch = state.batches_done == len(self.loader) or state.step >= self.total_steps
        if train.checkpoint_every and state.step % train.checkpoint_every == 0 and not ends_epoch:
            self.save()  # (at an epoch's end, its own checkpoint follows at once)

    def end_epoch(self, stop: StopSignals) -> None:
        state = self.state
        self.verify()
        state.epoch += 1
        state.batches_done = 0
        if self.evaluator is not None:
            self.evaluator.end_of_epoch(state.epoch, state.step, self.log)
        path = self.save()
        signum = stop.agreed()
        if signum:
            self.interrupt(signum, path)

    # ---- checks ----------------------------------------------------------------------------------
    def log_loss(self) -> None:
        state = self.state
        self.verify()
        state.last_loss = self.accelerator.gather(self.running / state.micro_batches).mean().item()
        self.running.zero_()
        state.micro_batches = 0
        lr = self.scheduler.get_last_lr()[0]
        self.progress.set_postfix(loss=f"{state.last_loss:.4f}")
        self.log.write(step=state.step, epoch=state.epoch, loss=state.last_loss, lr=lr, seconds=self.elapsed())
        self.accelerator.log({"train/loss": state.last_loss, "train/lr": lr}, step=state.step)

    def verify(self) -> None:
        """A host sync: stop at a non-finite loss so far; otherwise keep the weights, on the CPU, as
        the last good ones."""
        first = int(self.accelerator.gather(self.first_bad.reshape(1)).min().item())
        if first != NO_STEP:
            raise NonFiniteLoss(first)
        weights = finite_cpu_copy(self.unwrapped.trainable_state_dict())
        if weights is None:
            raise NonFiniteLoss(self.state.step, "weights")  # finite losses, overflowing gradients
        self.good_state, self.good_step = weights, self.state.step

    def keep_last_good(self, bad: NonFiniteLoss) -> dict[str, Any]:
        """After a non-finite loss: load the last good weights back; the metrics say the run stopped."""
        if self.progress is not None:
            self.progress.close()
        if self.good_state is None:
            raise bad.error(self.cfg, self, "") from None
        self.unwrapped.load_trainable_state_dict(self.good_state, source="last good weights")
        return self.summary(stopped=bad)

    def summary(self, stopped: NonFiniteLoss | None = None) -> dict[str, Any]:
        state = self.state
        eval_seconds = self.evaluator.seconds if self.evaluator is not None else 0.0
        seconds = self.elapsed() - eval_seconds
        metrics: dict[str, Any] = {
            "steps": state.step if stopped is None else self.good_step,
            "epochs": state.epoch,
            "train_loss": state.last_loss,
            "train_seconds": round(seconds, 3),  # excluding evaluation
            "eval_seconds": round(eval_seconds, 3),
            "seconds_per_step": round(seconds / max(state.step, 1), 4),
        }
        if state.resumed_at:
            metrics["resumed_at_steps"] = list(state.resumed_at)
        if stopped is None:
            metrics.update(self.evaluator.keep_best() if self.evaluator is not None else {"best_val_loss": None})
        else:  # the weights are the last verified, not the best epoch's
            metrics = {"stopped": str(stopped), "weights_step": self.good_step, **metrics}
        self.log.write(summary=metrics)
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self) -> Path:
        self.verify()  # a checkpoint only ever holds weights verified finite
        state = self.state
        # Each process's running loss (its own batches), so that each resumes with its own.
        sums = self.accelerator.gather(self.running.detach().reshape(1).float()).tolist()
        state.seconds = self.elapsed()
        self.started = time.perf_counter()
        extra: dict[str, Any] = {"loss_sums": sums, "staging": str(self.staging) if self.staging else None}
        best = None
        if self.evaluator is not None:
            extra["evaluator"] = {"best": self.evaluator.best, "seconds": self.evaluator.seconds}
            best = self.evaluator.best_state
        return self.checkpoints.save(state, extra, best, self.log.path)

    def restore(self, path: Path) -> None:
        saved, best = self.checkpoints.load(path)
        self.state = state = saved["loop"]
        state.resumed_at.append(state.step)
        self.running.fill_(saved["loss_sums"][self.accelerator.process_index])
        if self.evaluator is not None and "evaluator" in saved:
            self.evaluator.best, self.evaluator.seconds = saved["evaluator"]["best"], saved["evaluator"]["seconds"]
            self.evaluator.best_state = best
        if self.staging is not None:
            if (path / LOG_NAME).is_file():
                shutil.copyfile(path / LOG_NAME, self.staging / "metrics.jsonl")
            self._remove_old_staging(saved.get("staging"))
        self.verify()  # the restored weights are the last good ones
        self.log.write(resumed_from=str(path), step=state.step, epoch=state.epoch)
        self.accelerator.print(
            f"resumed from {path}: step {state.step} of {self.total_steps}, epoch {state.epoch + 1}, "
            f"{state.batches_done} of its {len(self.loader)} batches done"
        )

    def _remove_old_staging(self, old: str | None) -> None:
        # The staging dir of a killed run (a SIGKILL leaves it behind): its log is in the checkpoint.
        if old and old != str(self.staging):
            path = Path(old)
            if path.parent == self.staging.parent and path.name.startswith(f".{Path(self.cfg.output_dir).name}.tmp-"):
                shutil.rmtree(path, ignore_errors=True)

    def interrupt(self, signum: int, path: Path) -> None:
        state = self.state
        message = (
            f"lexlora: stopped by {signal.Signals(signum).name} after step {state.step} of {self.total_steps} "
            f"(epoch {state.epoch + (1 if state.batches_done else 0)}); the training state is saved in {path}. "
            "No adapter was written. To continue, run the same command with --resume (train.resume=true)."
        )
        if self.accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)
        raise TrainingInterrupted(signum, path, message)


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
