"""The training recipe: data -> embeddings -> base + LoRA + fusion -> Accelerate loop -> adapter dir.

Accelerate does device placement, mixed precision, gradient accumulation, multi-process runs and
experiment trackers (train.report_to), so the same code runs under `python` and `accelerate launch`.
Each epoch ends with an evaluation on the validation split (its loss, and with train.eval_generate
the metrics of generated outputs); the epoch that is best by train.eval_metric is the one saved.

`train(cfg)` is the list of a run's phases (torchtune's recipe shape), each a `Recipe` method that
sets up what the next needs and keeps it in a small dataclass: accelerator (and every check that
needs no model), data, model, loaders, optimizer and schedule, then the run, which ends by
publishing the adapter.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lexlora.adapters.files import (
    DTYPES,
    check_output_dir,
    publish,
    write_adapter_files,
)
from lexlora.adapters.fingerprint import fingerprint
from lexlora.config import Config, config_to_yaml
from lexlora.data.prepare import PreparedData, prepare_data
from lexlora.data.tokenization import ClassificationCollator, LexicalCollator
from lexlora.errors import AdapterError
from lexlora.fileio import failed_name, make_staging_dir
from lexlora.model.factory import model_for_run
from lexlora.model.families import refuse_fp16
from lexlora.model.loading import check_quantization, load_base_model, load_tokenizer
from lexlora.model.lora_model import LexLoraModel
from lexlora.training.checkpoints import Checkpoints, StopSignals, TrainingInterrupted
from lexlora.training.evaluator import EvalPlan, Evaluator, plan_evaluation
from lexlora.training.launch import (
    make_accelerator,
    resolve_mixed_precision,
    set_cpu_threads,
)
from lexlora.training.loaders import train_data_loader, validation_loader
from lexlora.training.loop import NonFiniteLoss, TrainingRun
from lexlora.training.memory import describe_memory, max_peaks, peak_memory, reset_peak
from lexlora.training.optimizer import make_optimizer, make_scheduler, total_steps
from lexlora.training.publish import adapter_metadata, card_samples, recorded_labels, write_loss_curve
from lexlora.training.tracking import (
    LOG_NAME,
    MetricsLog,
    flat_config,
    resolve_trackers,
    tracker_dir,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]


@dataclass
class Launched:
    """The accelerator phase: Accelerate set up, the output dir and the resume point checked."""

    accelerator: Accelerator
    mixed_precision: str
    trackers: list[str]
    checkpoints: Checkpoints
    resume_from: Path | None  # the checkpoint to continue from (train.resume)


@dataclass
class RunData:
    """The data phase: the run's records tokenized and embedded, and each epoch's evaluation plan."""

    tokenizer: PreTrainedTokenizerBase
    prepared: PreparedData
    plan: EvalPlan


@dataclass
class RunModel:
    """The model phase: the fresh LoRA + fusion model, and the fingerprint of the base under it."""

    model: LexLoraModel
    base_fingerprint: dict[str, Any]
    trainable: int
    total: int


@dataclass
class Loaders:
    """The loaders phase, prepared by Accelerate (sharded over the processes)."""

    train: DataLoader
    validation: DataLoader | None
    generator: torch.Generator  # draws the train loader's shuffles (reseeded at each epoch)


@dataclass
class Optimization:
    """The optimizer phase: the model, optimizer and schedule as Accelerate prepared them."""

    model: nn.Module  # wrapped (DDP) in a multi-process run
    unwrapped: LexLoraModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int


def describe_counts(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def train(cfg: Config) -> TrainResult:
    """Train an adapter as `cfg` says and publish it to cfg.output_dir (every process calls it)."""
    recipe = Recipe(cfg)
    recipe.setup_accelerator()
    recipe.setup_data()
    recipe.setup_model()
    recipe.setup_loaders()
    recipe.setup_optimizer()
    return recipe.run()


class Recipe:
    """One training run, phase by phase (see `train`); each phase reads what the earlier ones kept."""

    launched: Launched
    data: RunData
    built: RunModel
    loaders: Loaders
    optim: Optimization

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def setup_accelerator(self) -> Launched:
        """Accelerate, and every check that needs no model, so that a bad setting fails fast."""
        cfg = self.cfg
        cfg.check()
        check_quantization(cfg.model)  # 8/4-bit without CUDA or bitsandbytes: refused before any work
        mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
        if mixed_precision == "fp16":
            refuse_fp16(cfg.model.name_or_path)
        trackers = resolve_trackers(cfg)
        accelerator = make_accelerator(cfg, mixed_precision, trackers)
        if accelerator.device.type == "cpu":
            set_cpu_threads(cfg.train.cpu_threads, accelerator.num_processes)
        set_seed(cfg.train.seed)
        check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
        checkpoints = Checkpoints(cfg, accelerator)
        resume_from = checkpoints.resume_point()  # before any model work: a bad resume fails fast
        self.launched = Launched(accelerator, mixed_precision, trackers, checkpoints, resume_from)
        return self.launched

    def setup_data(self) -> RunData:
        accelerator = self.launched.accelerator
        tokenizer = load_tokenizer(self.cfg.model)
        # The main process fills the embedding cache first; the others then read it.
        with accelerator.main_process_first():
            prepared = prepare_data(self.cfg, tokenizer, accelerator.device)
        self.data = RunData(tokenizer, prepared, plan_evaluation(self.cfg, prepared))
        return self.data

    def setup_model(self) -> RunModel:
        cfg, accelerator = self.cfg, self.launched.accelerator
        base = load_base_model(cfg.model, device=accelerator.device)
        base_fingerprint = fingerprint(base, cfg.model)  # of the base alone, before LoRA wraps it
        model = model_for_run(cfg, base, self.data.tokenizer, self.data.prepared)
        labels = recorded_labels(cfg, self.data.prepared.splits)
        if labels:  # a label task: evaluated (each epoch, finally, card samples) as it will be used, constrained
            model.labels = tuple(labels)
        trainable, total = model.parameter_counts()
        accelerator.print(describe_counts(trainable, total))
        self.built = RunModel(model, base_fingerprint, trainable, total)
        return self.built

    def setup_loaders(self) -> Loaders:
        cfg, accelerator, splits = self.cfg, self.launched.accelerator, self.data.prepared.splits
        collator = (ClassificationCollator if cfg.classifies else LexicalCollator)(self.data.tokenizer, cfg.data.pad_to_multiple_of)
        # Reseeded at each epoch (TrainingRun.epoch_batches), so an epoch's order depends on the seed alone.
        generator = torch.Generator().manual_seed(cfg.train.seed)
        train_loader = train_data_loader(splits["train"], cfg, collator, generator)
        val_split = splits.get("validation")
        val_loader = validation_loader(val_split, cfg, collator) if val_split is not None else None
        self.loaders = Loaders(
            accelerator.prepare(train_loader), accelerator.prepare(val_loader) if val_loader is not None else None, generator
        )
        return self.loaders

    def setup_optimizer(self) -> Optimization:
        cfg, accelerator, model = self.cfg, self.launched.accelerator, self.built.model
        steps = total_steps(cfg.train, len(self.loaders.train))  # the prepared loader: this process's batches
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train)
        scheduler = make_scheduler(optimizer, cfg.train, steps, accelerator.num_processes)
        prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        unwrapped: LexLoraModel = accelerator.unwrap_model(prepared)
        self.launched.checkpoints.attach(unwrapped)
        self.optim = Optimization(prepared, unwrapped, optimizer, scheduler, steps)
        return self.optim

    # ---- the run, then publish -----------------------------------------------------------------
    def run(self) -> TrainResult:
        """The loop (resumed from the checkpoint, if any), the memory report, then `publish`. The
        adapter is written into a staging dir; a run that does not finish leaves no adapter (its
        log kept under a `.failed-` name), an interrupted one its checkpoint."""
        cfg, launched, optim, loaders = self.cfg, self.launched, self.optim, self.loaders
        accelerator, checkpoints = launched.accelerator, launched.checkpoints
        evaluator = (
            Evaluator(cfg, self.data.plan, optim.model, optim.unwrapped, loaders.validation, accelerator)
            if loaders.validation is not None
            else None
        )
        staging = make_staging_dir(cfg.output_dir) if accelerator.is_main_process else None
        log = MetricsLog(staging / LOG_NAME if staging else None)
        try:
            if staging is not None:
                (staging / "config.yaml").write_text(config_to_yaml(cfg))
                logger.info("training log: %s (moved to %s at the end)", staging / LOG_NAME, cfg.output_dir)
            self._init_trackers()
            run = TrainingRun(
                cfg, accelerator, model=optim.model, optimizer=optim.optimizer, scheduler=optim.scheduler,
                loader=loaders.train, generator=loaders.generator, evaluator=evaluator,
                total_steps=optim.total_steps, log=log, checkpoints=checkpoints, staging=staging,
            )
            if launched.resume_from is not None:
                run.restore(launched.resume_from)
            stopped = None
            reset_peak(accelerator.device)
            try:
                with StopSignals(accelerator) as stop:
                    metrics = run.loop(stop)
            except NonFiniteLoss as bad:
                stopped, metrics = bad, run.keep_last_good(bad)
            metrics.update(self._run_figures())
            log.write(memory=metrics["memory"])
            accelerator.print(describe_memory(metrics["memory"]))
            try:
                self.publish(evaluator, staging, metrics)
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
                failed = failed_name(staging)
                shutil.move(str(staging), str(failed))
                logger.warning("run did not finish; its log is in %s", failed)

    def _init_trackers(self) -> None:
        cfg, accelerator = self.cfg, self.launched.accelerator
        if not self.launched.trackers:
            return
        if accelerator.is_main_process:
            tracker_dir(cfg).mkdir(parents=True, exist_ok=True)
        # TensorBoard writes to project_dir/<name>, i.e. into logging_dir itself.
        accelerator.init_trackers(
            tracker_dir(cfg).name, config=flat_config(cfg), init_kwargs={"wandb": {"dir": str(tracker_dir(cfg))}}
        )

    def _run_figures(self) -> dict[str, Any]:
        """The run's sizes and settings as recorded in its metrics, and its peak memory."""
        cfg, accelerator, built = self.cfg, self.launched.accelerator, self.built
        return {
            "trainable_params": built.trainable, "total_params": built.total,
            "trainable_pct": 100 * built.trainable / built.total,
            "mixed_precision": self.launched.mixed_precision, "num_processes": accelerator.num_processes,
            "quantization": cfg.model.quantization, "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "memory": memory_report(accelerator),
        }

    def publish(self, evaluator: Evaluator | None, staging: Path | None, metrics: dict[str, Any]) -> None:
        """Final evaluation of the weights as saved, then the adapter dir (written by the main process
        into its staging dir and renamed to output_dir)."""
        cfg, accelerator, unwrapped = self.cfg, self.launched.accelerator, self.optim.unwrapped
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
            prepared = self.data.prepared
            metadata = adapter_metadata(
                cfg, base_fingerprint=self.built.base_fingerprint, dataset_info=prepared.dataset_info,
                metrics=metrics, samples=card_samples(unwrapped, prepared.splits.get("validation"), cfg),
                labels=list(unwrapped.labels) if unwrapped.labels and not cfg.classifies else None,
            )
            size = write_adapter_files(unwrapped, staging, metadata, cfg.save_dtype)
            write_loss_curve(staging, self.data.plan.metric, title=output_dir.name)
            publish(staging, output_dir, cfg.overwrite_output_dir)
            metrics["adapter_bytes"] = size
            accelerator.print(f"adapter saved to {output_dir} ({size / 1e6:.2f} MB of weights, {cfg.save_dtype})")
        accelerator.wait_for_everyone()


def memory_report(accelerator: Accelerator) -> dict[str, Any]:
    """Peak CUDA memory allocated on a GPU, peak process RSS otherwise; the largest over processes."""
    memory = peak_memory(accelerator.device)
    if accelerator.num_processes > 1:
        memory = max_peaks(gather_object([memory]))  # collective: every process calls it
    return memory
