"""Checkpoints of the full training state, so that an interrupted run continues where it stopped and
ends with the same adapter as a run that was never interrupted; and the SIGINT/SIGTERM handling that
turns a stop request into a checkpoint and a clean exit.

A checkpoint is a directory in train.checkpoint_dir (default: `<output_dir>.checkpoints`, beside the
adapter dir), named after the position it holds: `step00000012-epoch001` is after optimizer step 12
with 1 epoch completed.

    model.safetensors          the trainable weights only (LoRA + fusion): the frozen base is not saved
    optimizer.bin              AdamW's moments              } written by Accelerate's save_state
    scheduler.bin              the learning-rate schedule   }
    random_states_<rank>.pkl   python/numpy/torch RNGs, one file per process }
    best.safetensors           the best epoch's trainables so far, when an epoch was evaluated
    metrics.jsonl              the training log so far
    lexlora_state.json         the loop's counters and the run's resolved config; written last

Every process writes into `.tmp-<name>` (`lexlora.fileio.shared_staging`); the main process renames it to `<name>` once all have
finished, so a kill during a save never leaves a checkpoint that looks complete (a leftover `.tmp-`
dir is ignored by resume and removed by the next save). The newest `train.keep_checkpoints` are
kept. A run that publishes its adapter removes its checkpoints: they cannot be resumed to a
different end (a changed config is refused), and a fresh run refuses a dir that still holds some,
so a forgotten --resume never throws away an interrupted run's progress.

Every process must see checkpoint_dir (one machine, or a filesystem shared by all). FSDP and
DeepSpeed save their models through their own engines (whole, sharded); the trainables-only hooks
apply to plain and DDP runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from lexlora.config import Config, config_to_dict
from lexlora.errors import ConfigError, LexloraError
from lexlora.fileio import file_sha256, is_shared_staging, shared_staging, unstaged_name
from lexlora.training.tracking import LOG_NAME, dotted_keys

logger = logging.getLogger(__name__)


STATE_NAME = "lexlora_state.json"
BEST_NAME = "best.safetensors"
NAME = re.compile(r"^step(\d+)-epoch(\d+)$")

# Settings a resumed run may change: where things go, how often it logs or saves, how many threads
# or workers feed it, and the dtype the adapter is stored in at the end. Anything else changes what
# is trained (data, model, LoRA, schedule, batches, seed, the kept epoch's metric...) and is refused.
RESUME_FREE = {
    "output_dir", "overwrite_output_dir", "save_dtype",
    "train.resume", "train.checkpoint_every", "train.checkpoint_dir", "train.keep_checkpoints",
    "train.log_every", "train.num_workers", "train.cpu_threads", "train.report_to", "train.logging_dir",
    "train.eval_batch_size", "train.gradient_checkpointing", "train.fused_optimizer", "generation.batch_size",
}


class CheckpointError(LexloraError):
    """A checkpoint could not be restored."""


class TrainingInterrupted(SystemExit):
    """SIGINT/SIGTERM stopped the run after a checkpoint was saved. A SystemExit with code
    128 + the signal number (130, 143), so the process ends as one killed by that signal would,
    without a traceback; no adapter is published."""

    def __init__(self, signum: int, checkpoint: Path, message: str):
        super().__init__(128 + signum)
        self.signum, self.checkpoint, self.message = signum, checkpoint, message

    def __str__(self) -> str:
        return self.message


@dataclass
class LoopState:
    """The training loop's own counters: what Accelerate's save_state does not know about."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # micro-batches of the current epoch already trained on
    micro_batches: int = 0  # since the last log line (each process's loss sum is saved beside)
    last_loss: float = float("nan")
    seconds: float = 0.0  # wall time of the earlier segments of a resumed run
    resumed_at: list[int] = field(default_factory=list)  # steps this run was resumed from


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.train.checkpoint_dir or f"{cfg.output_dir}.checkpoints")


def checkpoint_name(step: int, epoch: int) -> str:
    return f"step{step:08d}-epoch{epoch:03d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (`.tmp-` dirs and dirs without the state file are not)."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = NAME.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append(((int(match[1]), int(match[2])), path))
    return [path for _, path in sorted(found)]


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every setting that matters to the trained weights."""
    old, new = dotted_keys(saved), dotted_keys(current)
    keys = sorted(k for k in set(old) | set(new) if k not in RESUME_FREE and old.get(k) != new.get(k))
    return [f"{key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now" for key in keys]


def dataset_sha256(cfg: Config) -> str | None:
    path = Path(cfg.data.path)
    return file_sha256(path) if path.is_file() else None


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Accelerate logs each file it saves or loads at INFO; one line of ours says it instead."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _rng_fingerprint() -> str:
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    # The rename is what makes a checkpoint visible; flushing first means that even a power cut
    # cannot leave a visible checkpoint with missing contents.
    for item in path.rglob("*"):
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoints:
    """Saving, finding, restoring and pruning the checkpoints of one run (all processes call each
    method; the main process does the file work that is not per process)."""

    def __init__(self, cfg: Config, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.directory = checkpoint_dir(cfg)
        self.keep = cfg.train.keep_checkpoints
        self.dataset_sha256 = dataset_sha256(cfg)  # once: the data file can be large

    # ---- before any model work --------------------------------------------------------------
    def resume_point(self) -> Path | None:
        """The checkpoint to resume from (train.resume), checked against the current config; for a
        fresh run, None after making sure no earlier run's checkpoints would be mixed in."""
        found = list_checkpoints(self.directory)
        if not self.cfg.train.resume:
            if found:
                raise ConfigError(
                    f"{self.directory} holds checkpoints of an interrupted run (newest: {found[-1].name}); "
                    "add --resume (train.resume=true) to continue it, or delete that dir to start over"
                )
            return None
        if not found:
            raise ConfigError(
                f"train.resume: no checkpoint in {self.directory} (one is saved at each epoch end and every "
                "train.checkpoint_every steps); run without --resume to start from scratch"
            )
        latest = found[-1]
        saved = json.loads((latest / STATE_NAME).read_text())
        differences = self.differences(saved)
        if saved.get("num_processes") != self.accelerator.num_processes:
            differences.append(
                f"number of processes: {saved.get('num_processes')} in the checkpoint, {self.accelerator.num_processes} now"
            )
        if differences:
            raise ConfigError(
                f"train.resume: {latest} was saved by a run with other settings; resume with the same ones, "
                "or delete the checkpoint dir to start over:\n  " + "\n  ".join(differences)
            )
        return latest

    def config_dict(self) -> dict[str, Any]:
        """The run's settings as a checkpoint records them."""
        return config_to_dict(self.cfg)

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """What differs between a checkpoint's run (`saved`: its state file) and this one."""
        differences = config_differences(saved["config"], self.config_dict())
        if saved.get("dataset_sha256") != self.dataset_sha256:
            differences.append(f"the contents of data.path {self.cfg.data.path} changed since the checkpoint")
        return differences

    # ---- model weights: the trainables only -------------------------------------------------
    def attach(self, unwrapped) -> None:
        """Make save_state/load_state write and read only the trainable weights of the prepared
        model: Accelerate would otherwise store the whole frozen base in every checkpoint."""

        def save_hook(models, weights, output_dir):
            for i in range(len(weights)):
                weights[i] = {k: v.detach().contiguous() for k, v in unwrapped.trainable_state_dict().items()}

        def load_hook(models, input_dir):
            if models:  # empty under FSDP / DeepSpeed, whose engines load their own files
                state = load_file(str(Path(input_dir) / "model.safetensors"))  # copied onto the params' device
                unwrapped.load_trainable_state_dict(state, source=f"checkpoint {input_dir}")
                models.clear()  # loaded: Accelerate must not load them again

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    # ---- save / load ----------------------------------------------------------------------------
    def save(self, loop: LoopState, extra: dict[str, Any], best: dict[str, torch.Tensor] | None,
             log: Path | dict[str, Path | None] | None) -> Path:
        """`log`: the training log to keep with it, or {file name: log} for several."""
        accelerator, main = self.accelerator, self.accelerator.is_main_process
        name = checkpoint_name(loop.step, loop.epoch)
        final = self.directory / name
        tmp = shared_staging(final)  # every process writes into it: no random part
        if (final / STATE_NAME).is_file():  # the same position of a deterministic run: already saved
            return final
        if main:
            self._remove_tmp()
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with _quiet("accelerate.accelerator", "accelerate.checkpointing"):
            accelerator.save_state(str(tmp))  # every process writes its RNG states
        if main:
            if best is not None:
                save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / BEST_NAME))
            for name, path in (log.items() if isinstance(log, dict) else [(LOG_NAME, log)]):
                if path is not None and path.is_file():
                    shutil.copyfile(path, tmp / name)
            state = {
                "loop": asdict(loop), **extra, "config": self.config_dict(),
                "num_processes": accelerator.num_processes, "dataset_sha256": self.dataset_sha256,
                "torch_rng": _rng_fingerprint(),
            }
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")
        accelerator.wait_for_everyone()
        if main:
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._prune()
            size = sum(p.stat().st_size for p in final.iterdir())
            logger.info("checkpoint saved: %s (%.2f MB)", final, size / 1e6)
        accelerator.wait_for_everyone()
        return final

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """Restore model trainables, optimizer, scheduler and RNGs; returns the saved state (with
        "loop" as a LoopState) and the best epoch's trainables, if any."""
        with _quiet("accelerate.accelerator", "accelerate.checkpointing"):
            self.accelerator.load_state(str(path))
        state = json.loads((path / STATE_NAME).read_text())
        # Accelerate only logs when it cannot restore the RNGs; without them dropout would differ.
        if self.accelerator.is_main_process and state.get("torch_rng") != _rng_fingerprint():
            raise CheckpointError(f"{path}: the random number generators were not restored")
        state["loop"] = LoopState(**state["loop"])
        best = load_file(str(path / BEST_NAME)) if (path / BEST_NAME).is_file() else None
        return state, best

    # ---- housekeeping --------------------------------------------------------------------------
    def _remove_tmp(self) -> None:
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if is_shared_staging(path) and NAME.match(unstaged_name(path)):
                    shutil.rmtree(path, ignore_errors=True)

    def _prune(self) -> None:
        for path in list_checkpoints(self.directory)[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def remove_all(self) -> None:
        """After the adapter is published: the run's checkpoints (and the dir, if nothing else is there)."""
        if self.accelerator.is_main_process and self.directory.is_dir():
            for path in self.directory.iterdir():
                if NAME.match(unstaged_name(path)):
                    shutil.rmtree(path, ignore_errors=True)
            try:
                self.directory.rmdir()
            except OSError:
                pass  # someone else's files live there too
        self.accelerator.wait_for_everyone()


class StopSignals:
    """SIGINT / SIGTERM during the training loop: noted by a handler, acted on by the loop at its next
    optimizer step (checkpoint, then exit) rather than dying mid-step. A second Ctrl-C stops at once.
    Installed for the loop only (and only from the main thread, where Python allows handlers); the
    previous handlers are put back after."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signum = 0
        self._previous: dict[int, Any] = {}
        self._group = None
        if accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            # The stop flag is agreed on through a CPU (gloo) group: no GPU sync at every step.
            self._group = dist.new_group(backend="gloo")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.accelerator.is_main_process:
            sys.stderr.write(
                f"\nlexlora: {signal.Signals(signum).name} received; stopping after the current step with a "
                "checkpoint" + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "") + "\n"
            )

    def agreed(self) -> int:
        """The signal to stop for, the same on every process (0: go on). A collective in
        multi-process runs: every process calls it at the same step boundaries."""
        if self.accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())
