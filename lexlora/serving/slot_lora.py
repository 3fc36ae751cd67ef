"""`SlotLoRA`: each engine slot's LoRA weights, stacked per targeted Linear, for the decode step.

`Route` (routing.py) concatenates the distinct adapters of a call along the rank dimension and masks
each row to its own columns: right for `generate`, where one call runs many steps over the same rows.
In the engine the rows change at almost every step, so a Route would be rebuilt (weights cast and
concatenated) each step, and with 32 distinct adapters each row would multiply through 32 adapters'
ranks to keep one. Here every slot holds its adapter's A and B in the compute dtype, written once when
the row is admitted (as its KV cache is), and a step applies them as two batched matmuls,

    h = bmm(x, A_T[slots])                       x: (rows, 1, in), A_T: (slots, in, r), scaling folded in
    baddbmm(output, h, B_T[slots])               B_T: (slots, r, out)

the per-row gathered LoRA of Punica / S-LoRA (BGMV), whose cost does not grow with the number of
distinct adapters. Adapters of lower rank are zero-padded to the largest rank seen for a Linear.
Layers an adapter trains in full (modules_to_save) still go through `Route.replace`.
"""

from __future__ import annotations

import torch
from torch import nn

from lexlora.serving.routing import LoraWeights, Route


class SlotLoRA:
    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device):
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.slots: list[LoraWeights | None] = [None] * capacity
        self._banks: dict[str, list[torch.Tensor]] = {}  # path -> [A_T (scaled), B_T]
        self._replacing: Route | None = None
        self._replacing_key: tuple | None = None

    # ---- slots ---------------------------------------------------------------------------------------
    def assign(self, slot: int, weights: LoraWeights | None) -> None:
        """The adapter `slot` uses from now on: its weights are copied into that slot of each bank."""
        self.slots[slot] = weights
        for path in self._banks:
            self._write(path, slot)

    def move(self, src: int, dst: int) -> None:
        self.slots[dst], self.slots[src] = self.slots[src], None
        for bank in self._banks.values():
            for tensor in bank:
                tensor[dst] = tensor[src]

    def release(self, slot: int) -> None:
        """The slot's weights stay until it is reassigned; an idle slot's output is never read."""
        self.slots[slot] = None

    # ---- what LoraRouter's hooks call during a step ----------------------------------------------------
    def apply(self, path: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        bank = self._banks.get(path)
        if bank is None:
            bank = self._build(path, x.shape[-1], output.shape[-1])
        A_T, B_T = bank
        rows = x.shape[0]
        if x.dtype != self.dtype:  # e.g. an fp32 LayerNorm output into an fp16 base
            return output + torch.bmm(torch.bmm(x.to(self.dtype), A_T[:rows]), B_T[:rows]).to(output.dtype)
        # As few ops as possible: a small model's step is dominated by per-op overhead on CPU.
        return torch.baddbmm(output, torch.bmm(x, A_T[:rows]), B_T[:rows])

    def replace(self, path: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Layers some slot's adapter trains in full: recomputed for those rows, as Route does."""
        rows = self.slots[: x.shape[0]]
        if not any(w is not None and w.modules for w in rows):
            return output
        key = tuple(id(w) for w in rows)
        if key != self._replacing_key:
            self._replacing, self._replacing_key = Route(rows), key
        return self._replacing.replace(path, module, x, output)

    # ---- storage -------------------------------------------------------------------------------------
    def _build(self, path: str, fan_in: int, fan_out: int) -> list[torch.Tensor]:
        """A Linear's bank, the first time a step runs it: every occupied slot's weights written."""
        ranks = [w.deltas[path].A.shape[0] for w in self.slots if w is not None and path in w.deltas]
        self._banks[path] = self._zeros(max(ranks, default=1), fan_in, fan_out)
        for slot in range(self.capacity):
            if self.slots[slot] is not None:
                self._write(path, slot)
        return self._banks[path]

    def _zeros(self, rank: int, fan_in: int, fan_out: int) -> list[torch.Tensor]:
        make = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return [make(self.capacity, fan_in, rank), make(self.capacity, rank, fan_out)]

    def _write(self, path: str, slot: int) -> None:
        A_T, B_T = self._banks[path]
        weights = self.slots[slot]
        delta = weights.deltas.get(path) if weights is not None else None
        if delta is None:
            A_T[slot].zero_()
            return
        rank = delta.A.shape[0]
        if rank > A_T.shape[2]:  # a higher rank than any before on this Linear: pad the bank
            grown = self._zeros(rank, A_T.shape[1], B_T.shape[2])
            grown[0][:, :, : A_T.shape[2]] = A_T
            grown[1][:, : B_T.shape[1]] = B_T
            self._banks[path] = grown
            A_T, B_T = grown
        A_T[slot].zero_()
        B_T[slot].zero_()
        A_T[slot, :, :rank] = delta.A.T.to(self.device, self.dtype) * delta.scaling
        B_T[slot, :rank] = delta.B.T.to(self.device, self.dtype)
