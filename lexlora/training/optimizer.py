"""The optimizer phase's parts: AdamW over the trainables, the number of optimizer steps, and the
linear warmup-then-decay schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_linear_schedule_with_warmup

from lexlora.config import TrainConfig


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused where torch has a fused kernel for them."""
    fused = train.fused_optimizer and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda", "xpu", "mps") for p in params
    )
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay, fused=fused or None)


def total_steps(train: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: train.max_steps, else whole epochs of accumulated batches."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / train.gradient_accumulation_steps))
    return train.max_steps or train.epochs * steps_per_epoch


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, steps: int, num_processes: int):
    # Accelerate steps a prepared scheduler once per process, so its horizon is scaled to match.
    return get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(train.warmup_ratio * steps) * num_processes,
        num_training_steps=steps * num_processes,
    )
