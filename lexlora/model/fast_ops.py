"""Cheaper drop-in modules for the frozen base, swapped in when it loads (model.fast_ops).

Profiling a CPU training step (benchmarks/profile_train.py) showed two costs that have nothing to do
with the useful FLOPs:

- dropout masks: torch draws CPU dropout masks with `bernoulli_`, one 64-bit draw per element; with
  the frozen base still in train mode (T5's dropout_rate 0.1) that was ~10% of a step. FastDropout
  draws 64 random bits once per *four* elements (16 bits each) on the CPU and keeps an element when
  its 16 bits clear a threshold, so p is honoured to 1/65536 and the kept values are rescaled by the
  exact keep rate. Same generator (torch's default CPU one: `torch.manual_seed` and saved RNG states
  still make runs reproducible), same bool mask saved for backward. Off the CPU it is nn.Dropout.
- transformers' NewGELUActivation ("gelu_new", T5's gated-gelu) is written as seven tensor ops;
  transformers' own GELUTanh is the same tanh approximation as one C kernel ("equivalent ... much
  faster ... not an exact numerical match due to rounding errors").
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation

_LEVELS = 1 << 16


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def keep_mask(shape: torch.Size, p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """A bool mask keeping each element with probability 1 - p (to 1/65536), and that exact rate."""
    drop_levels = round(p * _LEVELS)
    numel = math.prod(shape)
    # 64 random bits per draw (the full int64 range), read as four int16 values in [-32768, 32767].
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    levels = bits.view(torch.int16)[:numel].view(shape)
    return levels >= drop_levels - _LEVELS // 2, (_LEVELS - drop_levels) / _LEVELS


class FastDropout(nn.Dropout):
    """nn.Dropout whose CPU masks cost a quarter of the random draws (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p >= 1.0:
            return x * 0.0
        keep, rate = keep_mask(x.shape, self.p)
        return _MaskedScale.apply(x, keep, 1.0 / rate)


def use_fast_ops(model: nn.Module) -> dict[str, int]:
    """Swap nn.Dropout -> FastDropout and NewGELUActivation -> GELUTanh throughout `model`, in place.
    Returns how many of each were swapped."""
    swapped = {"dropout": 0, "gelu": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                replacement = FastDropout(child.p, child.inplace)
                swapped["dropout"] += 1
            elif type(child) is NewGELUActivation:
                replacement = GELUTanh()
                swapped["gelu"] += 1
            else:
                continue
            setattr(parent, name, replacement.train(child.training))  # a new module starts in train mode
    return swapped
