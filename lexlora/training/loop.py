"""The optimizer-step loop (`TrainingRun`): counters that survive an interruption, the last weights
verified finite, checkpoints and stop signals."""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lexlora.config import Config
from lexlora.errors import LexloraError
from lexlora.fileio import is_staging_of
from lexlora.model.lora_model import LexLoraModel
from lexlora.training.checkpoints import (
    Checkpoints,
    LoopState,
    StopSignals,
    TrainingInterrupted,
)
from lexlora.training.tracking import LOG_NAME


class NonFiniteLossError(LexloraError):
    pass


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

    def __init__(self, cfg: Config, accelerator, *, model, optimizer, scheduler, loader, generator: torch.Generator,
                 evaluator, total_steps: int, log, checkpoints: Checkpoints, staging: Path | None):
        """`model`, `optimizer`, `scheduler` and `loader` as Accelerate prepared them; `generator`
        draws the loader's shuffles; `evaluator` is None without a validation split; `log` is the
        run's MetricsLog; `staging` the adapter's staging dir (None on the other processes)."""
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
        self.record(loss)

    def record(self, loss: torch.Tensor) -> None:
        """Count a trained micro-batch and its loss."""
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
        extra, best = self.checkpoint_entry()
        return self.checkpoints.save(self.state, extra, best, self.log.path)

    def checkpoint_entry(self) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """What a checkpoint keeps of this loop beside its LoopState, and the best epoch's trainables
        (a collective: every process calls it)."""
        # Each process's running loss (its own batches), so that each resumes with its own.
        sums = self.accelerator.gather(self.running.detach().reshape(1).float()).tolist()
        self.state.seconds = self.elapsed()
        self.started = time.perf_counter()
        extra: dict[str, Any] = {"loss_sums": sums, "staging": str(self.staging) if self.staging else None}
        best = None
        if self.evaluator is not None:
            extra["evaluator"] = {"best": self.evaluator.best, "seconds": self.evaluator.seconds}
            best = self.evaluator.best_state
        return extra, best

    def restore(self, path: Path) -> None:
        saved, best = self.checkpoints.load(path)
        self.apply_checkpoint(saved, best, path, path / LOG_NAME)

    def apply_checkpoint(self, saved: dict[str, Any], best, path: Path, log: Path) -> None:
        """Take the loop's state from a loaded checkpoint (`saved`: its state with "loop" a
        LoopState; `best`: the best epoch's trainables; `log`: the log to continue)."""
        self.state = state = saved["loop"]
        state.resumed_at.append(state.step)
        self.running.fill_(saved["loss_sums"][self.accelerator.process_index])
        if self.evaluator is not None and "evaluator" in saved:
            self.evaluator.best, self.evaluator.seconds = saved["evaluator"]["best"], saved["evaluator"]["seconds"]
            self.evaluator.best_state = best
        if self.staging is not None:
            if log.is_file():
                shutil.copyfile(log, self.staging / LOG_NAME)
            self._remove_old_staging(saved.get("staging"))
        self.verify()  # the restored weights are the last good ones
        self.log.write(resumed_from=str(path), step=state.step, epoch=state.epoch)
        self.accelerator.print(
            f"resumed from {path}: step {state.step} of {self.total_steps}, epoch {state.epoch + 1}, "
            f"{state.batches_done} of its {len(self.loader)} batches done"
        )

    def _remove_old_staging(self, old: str | None) -> None:
        # The staging dir of a killed run (a SIGKILL leaves it behind): its log is in the checkpoint.
        if old and old != str(self.staging) and is_staging_of(old, self.staging.parent / Path(self.cfg.output_dir).name):
            shutil.rmtree(old, ignore_errors=True)

    def interrupt(self, signum: int, path: Path) -> None:
        state = self.state
        message = (
            f"lexlora: stopped by {signal.Signals(signum).name} after step {state.step} of {self.total_steps} "
            f"(epoch {state.epoch + (1 if state.batches_done else 0)}); the training state is saved in {path}. "
            "No adapter was written. To continue, run the same command with --resume (train.resume=true)."
        )
        raise interrupted(self.accelerator, signum, path, message)


def interrupted(accelerator, signum: int, path: Path, message: str) -> TrainingInterrupted:
    """The exit of a run stopped by `signum` after saving `path`; the main process prints `message`."""
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)
    return TrainingInterrupted(signum, path, message)
