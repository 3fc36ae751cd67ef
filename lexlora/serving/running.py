"""`RunningBatch`: the rows the engine is decoding, one step at a time, each with its own adapter.

    admit(rows)  the encoder once for the newcomers (each row's fusion and LoRA), then each decoder
                 layer's cross-attention keys/values for them, written into free slots of the
                 `SlotCache`; their first token comes from the next step
    step()       one decoder step for every active row, each routed through its own adapter
    the caller   retires rows that finished (end token, max_new_tokens, stop string)

A step builds the same tensors `generate` would for these rows (the model's own attention, masks
made by transformers' mask functions), so greedy outputs match `registry.generate` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput

from lexlora.model.generation import RowPlan
from lexlora.serving.decoding import SamplingParams, TextTracker, make_generator, pick_tokens
from lexlora.serving.registry import LexLoRA
from lexlora.serving.slot_lora import SlotLoRA
from lexlora.serving.slots import SlotCache

# Decoders whose position information is relative (T5's attention bias): left-padding a row that
# joins a running batch leaves its attention exactly as if it ran alone.
ENGINE_FAMILIES = ("t5", "mt5")


class NonFiniteLogits(RuntimeError):
    """The model produced NaN or infinite logits for a row."""


def cross_attention_kv(base, states: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each T5 decoder layer's cross-attention keys and values for encoder outputs `states`, computed
    as T5Attention computes them on its first step (so routed LoRA on k/v applies the same way)."""
    keys, values = [], []
    for block in base.get_decoder().block:
        attention = block.layer[1].EncDecAttention
        shape = (*states.shape[:-1], -1, attention.key_value_proj_dim)
        keys.append(attention.k(states).view(shape).transpose(1, 2))
        values.append(attention.v(states).view(shape).transpose(1, 2))
    return keys, values


def engine_supports(registry: LexLoRA) -> str | None:
    """None if the engine can serve this base; else why not."""
    if registry.classifies:
        return "a classifier base (model.task=classification) has no decoder: its adapters score each request whole"
    model_type = registry.base.config.model_type
    if model_type not in ENGINE_FAMILIES:
        return (f"continuous batching needs a decoder with relative positions ({', '.join(ENGINE_FAMILIES)}); "
                f"this base is {model_type!r}")
    return None


@dataclass(eq=False)
class Row:
    """One input of a request, from prepared (prompt ids, lexical vector) to its output text."""

    request: Any  # the engine's request this row belongs to
    index: int  # its position in the request's inputs
    plan: RowPlan
    ids: list[int]
    lexical: torch.Tensor | None
    params: SamplingParams
    tracker: TextTracker
    record: dict[str, str] | None = None  # the input as its adapter's fields
    tokens: list[int] = field(default_factory=list)  # the decoder's tokens: start token, then generated
    generator: torch.Generator | None = None
    slot: int = -1
    finished: bool = False
    error: Exception | None = None  # why the row failed, if it did

    @property
    def generated(self) -> list[int]:
        return self.tokens[1:]


class RunningBatch:
    def __init__(self, registry: LexLoRA, capacity: int):
        self.registry = registry
        self.base = registry.base
        self.capacity = capacity
        config = self.base.config
        self.start_id = config.decoder_start_token_id
        self.eos_id = self.base.generation_config.eos_token_id
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0]
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.width = config.d_model
        self.cache = SlotCache(capacity)
        self.rows: dict[int, Row] = {}  # slot -> row
        weights = self.base.get_input_embeddings().weight
        self.lora = SlotLoRA(capacity, weights.dtype, weights.device)

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    def reset(self) -> None:
        """Drop every row and the cache (after a step failed part-way)."""
        self.rows.clear()
        self.cache = SlotCache(self.capacity)
        self.lora = SlotLoRA(self.capacity, self.lora.dtype, self.lora.device)

    # ---- admitting --------------------------------------------------------------------------------
    @torch.no_grad()
    def admit(self, rows: Sequence[Row]) -> None:
        """Encode the newcomers once (each row's fusion and LoRA), project their encoder outputs to
        each decoder layer's cross-attention keys/values (through their LoRA too), and give each a
        slot; their first token comes from the next step, with every other row's."""
        registry = self.registry
        plans = [r.plan for r in rows]
        embeds, mask = registry.pipeline.embed_ids(registry, plans, [r.ids for r in rows], [r.lexical for r in rows])
        with registry.routed(plans):
            states = self.base.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True).last_hidden_state
            keys, values = cross_attention_kv(self.base, states)
        slots = self.cache.free_slots()[: len(rows)]
        self.cache.admit(slots, keys, values, mask)
        for row, slot in zip(rows, slots):
            row.slot = slot
            row.tokens = [self.start_id]
            row.generator = make_generator(row.params, row.index, embeds.device)
            self.rows[slot] = row
            self.lora.assign(slot, row.plan.adapter.lora)

    # ---- one step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """One decoder step for every active row; each gets its next token."""
        moves = self.cache.compact() if len(self.rows) < self.cache.extent else {}
        for src, dst in moves.items():
            row = self.rows.pop(src)
            row.slot = dst
            self.rows[dst] = row
            self.lora.move(src, dst)
        cache, self_mask, cross_mask = self.cache.step()
        extent = self_mask.shape[0]
        device = self_mask.device
        tokens = torch.full((extent, 1), self.pad_id, dtype=torch.long)
        for slot, row in self.rows.items():
            tokens[slot, 0] = row.tokens[-1]
        tokens = tokens.to(device)
        dtype = self.base.get_input_embeddings().weight.dtype
        like = torch.empty(extent, 1, 1, dtype=dtype, device=device)
        encoder_states = torch.zeros(1, 1, 1, dtype=dtype, device=device).expand(extent, cross_mask.shape[1], self.width)
        config = self.base.get_decoder().config
        self_mask4 = create_bidirectional_mask(config, like, self_mask, allow_is_bidirectional_skip=False)
        cross_mask4 = create_bidirectional_mask(config, like, cross_mask, encoder_hidden_states=encoder_states,
                                                allow_is_bidirectional_skip=False)
        with self.registry.router.route(self.lora):
            out = self.base(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states), attention_mask=cross_mask4,
                            decoder_input_ids=tokens, decoder_attention_mask=self_mask4, cache=cache, use_cache=True)
        self.cache.advance()
        self._pick([(row, slot) for slot, row in self.rows.items()], out.logits[:, -1])

    def retire(self, row: Row) -> None:
        if self.rows.get(row.slot) is row:
            del self.rows[row.slot]
            self.cache.retire(row.slot)
            self.lora.release(row.slot)

    def _pick(self, rows: list[tuple[Row, int]], logits: torch.Tensor) -> None:
        """Append each row's next token (logits row `i` for row); rows with non-finite logits raise
        NonFiniteLogits on their own (`row.finished` with `row.error`)."""
        order = [i for _, i in rows]
        if order != list(range(logits.shape[0])):
            logits = logits[order]
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()  # one reduction: NaN or inf anywhere makes it so
        blocked = [self.eos_id if len(r.generated) < r.params.min_new_tokens else None for r, _ in rows]
        picked = pick_tokens(logits, [r.params for r, _ in rows], [r.tokens for r, _ in rows],
                             [r.generator for r, _ in rows], blocked)
        for (row, _), token, ok in zip(rows, picked, finite):
            if not ok:
                row.finished, row.error = True, NonFiniteLogits(
                    f"input {row.index}: the model produced non-finite logits at token {len(row.generated)}")
                continue
            row.tokens.append(token)
            row.finished = token == self.eos_id or len(row.generated) >= row.plan.max_new_tokens
