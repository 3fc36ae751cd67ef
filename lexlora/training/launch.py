"""The accelerator phase's parts: the resolved mixed precision, the Accelerator itself (checked
against how the run was launched), and the torch thread count of a CPU run."""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from lexlora.config import Config
from lexlora.errors import ConfigError
from lexlora.training.tracking import tracker_dir

logger = logging.getLogger(__name__)


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    # Native bf16 only (Ampere and newer): older GPUs emulate it, slower than fp32.
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "no"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_cpu_threads(requested: int | None, num_processes: int) -> int:
    """torch's intra-op threads: train.cpu_threads, else the usable cores shared among the processes."""
    threads = requested or max(1, usable_cores() // num_processes)
    torch.set_num_threads(threads)
    logger.info("CPU training: %d torch thread(s) per process", threads)
    return threads


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, HPU, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def make_accelerator(cfg: Config, mixed_precision: str, trackers: list[str], *, joint: bool = False) -> Accelerator:
    """The run's Accelerator; a ConfigError when it would not be one run of all launched processes.
    `joint`: a joint run's, whose DDP must allow parameters without gradients (a job that left the
    pass keeps its LoRA in the model)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        accelerator = Accelerator(
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if joint else None,
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
    return accelerator
