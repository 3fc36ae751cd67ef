"""`SlotCache`: the decoder's key/value cache for rows that join and leave a running batch.

Each active row owns a slot (a row index) in preallocated per-layer tensors:

    self-attention   (slots, heads, T, head_dim)  one new column per decode step, for every slot at once
    cross-attention  (slots, heads, S, head_dim)  written once, when the row is admitted (from the
                                                  encoder outputs, by the decoder's own projections)

All rows write their newest token into the same column `hi`, so a row admitted later simply has its
earlier columns masked: it is left-padded, and its first token (the decoder start) runs in the same
step as every other row's next token, so admitting costs no decoder step of its own. For T5's relative attention bias this is exact, since the
bias depends only on the distance between query and key, which left-padding keeps. Admitting a row
writes only that row's cross-attention keys/values into its slot; retiring a row frees its slot and copies nothing;
a decode step writes one column in place (transformers' DynamicCache would `torch.cat` every row's
cache each step). The model reads views of the occupied window through transformers' own cache
classes (`Cache`, `EncoderDecoderCache`), so its attention code runs unchanged.

Columns before the oldest active row's start are dead; when `hi` reaches the capacity the window is
shifted to the front (once per `capacity - window` steps), or the capacity doubles.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache


class _SelfLayer(CacheLayerMixin):
    """One decoder layer's self-attention cache, a view of the pool's window."""

    is_sliding = False

    def __init__(self, pool: "SlotCache", index: int):
        super().__init__()
        self.pool, self.index = pool, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool allocates
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.pool._write_step(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.pool.hi - self.pool.lo

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class _CrossLayer(CacheLayerMixin):
    """One decoder layer's cross-attention keys/values: set by the pool before each step, never updated."""

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("the cross-attention cache is written when a row is admitted, not during a step")

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length(), 0

    def get_max_length(self) -> int:
        return -1


class SlotCache:
    """Per-layer key/value tensors for up to `capacity` rows; see the module docstring."""

    def __init__(self, capacity: int, initial_length: int = 64):
        self.capacity = capacity
        self.length = initial_length  # columns allocated in the self-attention tensors
        self.lo = 0  # first live column
        self.hi = 0  # the column the next step writes
        self.start: dict[int, int] = {}  # slot -> its first column
        self.source: dict[int, int] = {}  # slot -> its encoder length
        self._self_k: list[torch.Tensor] = []
        self._self_v: list[torch.Tensor] = []
        self._cross_k: list[torch.Tensor] = []
        self._cross_v: list[torch.Tensor] = []
        self._self_valid: torch.Tensor | None = None  # (capacity, length) bool
        self._cross_valid: torch.Tensor | None = None  # (capacity, S) bool
        self._rows = 0  # slots the current step runs (the highest occupied + 1)
        self._self_cache: Cache | None = None
        self._cross_layers: list[_CrossLayer] = []

    # ---- occupancy ---------------------------------------------------------------------------------
    @property
    def active(self) -> list[int]:
        return sorted(self.start)

    def free_slots(self) -> list[int]:
        return [slot for slot in range(self.capacity) if slot not in self.start]

    @property
    def extent(self) -> int:
        """How many slots a step runs: up to the highest occupied one (free ones below it run idle)."""
        return max(self.start) + 1 if self.start else 0

    # ---- admitting and retiring ------------------------------------------------------------------
    def admit(self, slots: list[int], cross_keys: list[torch.Tensor], cross_values: list[torch.Tensor],
              encoder_mask: torch.Tensor) -> None:
        """Give len(slots) new rows their cross-attention keys/values (per layer, (rows, heads, S,
        head_dim)) over encoder positions `encoder_mask` (rows, S). Their self-attention starts empty:
        the next step writes their first token, in the same column as every other row's."""
        if not self._self_k:
            self._allocate(cross_keys)
        if not self.start:
            self.lo = self.hi = 0  # an idle pool starts over at its first column
        index = torch.tensor(slots, device=self._self_valid.device)
        source = encoder_mask.shape[1]
        self._reserve_source(source)
        for layer, (keys, values) in enumerate(zip(cross_keys, cross_values)):
            self._cross_k[layer][index, :, :source] = keys
            self._cross_v[layer][index, :, :source] = values
        self._self_valid[index] = False
        self._cross_valid[index] = False
        self._cross_valid[index, :source] = encoder_mask.to(torch.bool)
        for row, slot in enumerate(slots):
            self.start[slot] = self.hi
            positions = encoder_mask[row].nonzero()
            # How far a step must look into the encoder positions (each row's own mask does the rest).
            self.source[slot] = int(positions.max()) + 1 if len(positions) else 1
        self.lo = min(self.start.values())

    def retire(self, slot: int) -> None:
        """Free a row's slot (nothing is copied; the slot is reused by the next row admitted)."""
        del self.start[slot]
        del self.source[slot]
        self.lo = min(self.start.values()) if self.start else 0

    def compact(self) -> dict[int, int]:
        """Move the highest rows into free slots below them so a step runs no idle slots; copies only
        the moved rows. Returns old slot -> new slot."""
        moves: dict[int, int] = {}
        while self.start and len(self.start) < self.extent:
            src = max(self.start)
            dst = min(slot for slot in range(self.capacity) if slot not in self.start)
            for tensors in (self._self_k, self._self_v, self._cross_k, self._cross_v):
                for t in tensors:
                    t[dst] = t[src]
            self._self_valid[dst] = self._self_valid[src]
            self._cross_valid[dst] = self._cross_valid[src]
            self.start[dst], self.source[dst] = self.start.pop(src), self.source.pop(src)
            moves[src] = dst
        return moves

    # ---- one decode step -------------------------------------------------------------------------
    def step(self) -> tuple[EncoderDecoderCache, torch.Tensor, torch.Tensor]:
        """The cache the model reads in the next step for slots [0, extent), and the 2-D masks of that
        step: self-attention over columns [lo, hi] and cross-attention over encoder positions."""
        self._reserve_columns()
        rows = self._rows = self.extent
        self._self_valid[:rows, self.hi] = True  # every slot's new token (idle slots too: no empty rows)
        source = max(self.source.values())
        for layer, cross in enumerate(self._cross_layers):
            cross.keys = self._cross_k[layer][:rows, :, :source]
            cross.values = self._cross_v[layer][:rows, :, :source]
        cache = EncoderDecoderCache(self._self_cache, Cache(layers=self._cross_layers))
        for layer in range(len(self._cross_layers)):
            cache.is_updated[layer] = True
        self_mask = self._self_valid[:rows, self.lo : self.hi + 1]
        cross_mask = self._cross_valid[:rows, :source]
        idle = [slot for slot in range(rows) if slot not in self.start]
        if idle:  # an idle slot reads one encoder position, so its (unused) attention stays finite
            cross_mask = cross_mask.clone()
            cross_mask[idle, 0] = True
        return cache, self_mask, cross_mask

    def advance(self) -> None:
        """After a step: its column is written for every row."""
        self.hi += 1

    def _write_step(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        rows = self._rows
        self._self_k[layer][:rows, :, self.hi] = keys[:, :, -1]
        self._self_v[layer][:rows, :, self.hi] = values[:, :, -1]
        window = slice(self.lo, self.hi + 1)
        return self._self_k[layer][:rows, :, window], self._self_v[layer][:rows, :, window]

    # ---- storage -----------------------------------------------------------------------------------
    def _allocate(self, cross_keys: list[torch.Tensor]) -> None:
        sample = cross_keys[0]  # self-attention has the same heads and head size as cross-attention
        heads, dim, source = sample.shape[1], sample.shape[3], sample.shape[2]
        make = lambda *shape: torch.zeros(shape, dtype=sample.dtype, device=sample.device)  # noqa: E731
        layers = len(cross_keys)
        self._self_k = [make(self.capacity, heads, self.length, dim) for _ in range(layers)]
        self._self_v = [make(self.capacity, heads, self.length, dim) for _ in range(layers)]
        self._cross_k = [make(self.capacity, heads, source, dim) for _ in range(layers)]
        self._cross_v = [make(self.capacity, heads, source, dim) for _ in range(layers)]
        self._self_valid = torch.zeros(self.capacity, self.length, dtype=torch.bool, device=sample.device)
        self._cross_valid = torch.zeros(self.capacity, source, dtype=torch.bool, device=sample.device)
        self._self_cache = Cache(layers=[_SelfLayer(self, i) for i in range(layers)])
        self._cross_layers = [_CrossLayer() for _ in range(layers)]

    def _reserve_columns(self) -> None:
        """Make room for column `hi`: shift the live window to the front, or double the capacity."""
        if self.hi < self.length:
            return
        live = self.hi - self.lo
        if live + 1 > self.length // 2:
            self.length *= 2
        window = slice(self.lo, self.hi)

        def moved(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(*t.shape[:-2], self.length, t.shape[-1]) if t.dim() == 4 else t.new_zeros(t.shape[0], self.length)
            if t.dim() == 4:
                out[:, :, :live] = t[:, :, window]
            else:
                out[:, :live] = t[:, window]
            return out

        self._self_k = [moved(t) for t in self._self_k]
        self._self_v = [moved(t) for t in self._self_v]
        self._self_valid = moved(self._self_valid)
        for slot in self.start:
            self.start[slot] -= self.lo
        self.hi -= self.lo
        self.lo = 0

    def _reserve_source(self, source: int) -> None:
        have = self._cross_valid.shape[1]
        if source <= have:
            return

        def grown(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 4:
                out = t.new_zeros(t.shape[0], t.shape[1], source, t.shape[3])
                out[:, :, :have] = t
            else:
                out = t.new_zeros(t.shape[0], source)
                out[:, :have] = t
            return out

        self._cross_k = [grown(t) for t in self._cross_k]
        self._cross_v = [grown(t) for t in self._cross_v]
        self._cross_valid = grown(self._cross_valid)
