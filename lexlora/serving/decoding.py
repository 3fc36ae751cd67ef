"""How the engine picks each row's next token and knows a row is done, per row.

`SamplingParams` are one request's decoding settings (greedy by default, as `registry.generate`).
`pick_tokens` applies them to a step's logits: rows that share settings are processed together by
transformers' own logits processors (repetition penalty, temperature, top-k, top-p: the same
arithmetic and order as `generate`), then each sampling row draws with its own seeded generator, so a
request's sample does not depend on what else shares the step. `TextTracker` turns a row's tokens into
text as they come: the new text to stream, and where a stop string ends the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lexlora.errors import DataError


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings; None means the adapter's own (max_new_tokens, num_beams)."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0  # the end token is blocked until this many tokens (as transformers' min_new_tokens)
    num_beams: int | None = None  # >1: beam search, which runs on the static path (one batch, not per step)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: no top-k cut (transformers' default would be 50)
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # a sampling row's generator seed; None: drawn from torch's global generator
    stop: tuple[str, ...] = field(default=())  # the output ends before the first of these

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens is None or self.max_new_tokens >= 1, "at least 1"),
            ("min_new_tokens", self.min_new_tokens >= 0, "0 or more"),
            ("num_beams", self.num_beams is None or self.num_beams >= 1, "at least 1"),
            ("temperature", self.temperature > 0, "above 0 (use do_sample=false for greedy)"),
            ("top_k", self.top_k is None or self.top_k >= 0, "0 or more"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "above 0"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise DataError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if self.do_sample and (self.num_beams or 1) > 1:
            raise DataError("do_sample with num_beams > 1 (beam sampling) is not supported; use one of them")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise DataError(f"stop must be a list of non-empty strings, got {list(self.stop)!r}")

    def processors(self) -> LogitsProcessorList:
        """transformers' processors for these settings, in generate()'s order."""
        chain = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            chain.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                chain.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                chain.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                chain.append(TopPLogitsWarper(self.top_p))
        return chain

    @property
    def group(self) -> tuple:
        """Rows whose logits are processed the same way."""
        return (self.do_sample, self.temperature, self.top_k, self.top_p, self.repetition_penalty)


def pick_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    blocked: Sequence[int | None],
) -> list[int]:
    """The next token of each row of `logits` (rows, vocab), float32. `histories`: each row's decoder
    tokens so far (the start token first); `blocked`: a token each row may not pick yet (the end
    token under min_new_tokens), or None."""
    scores = logits.float()
    for row, token in enumerate(blocked):
        if token is not None:
            scores[row, token] = -float("inf")
    picked = [0] * len(params)
    groups: dict[tuple, list[int]] = {}
    for row, p in enumerate(params):
        groups.setdefault(p.group, []).append(row)
    for rows in groups.values():
        settings = params[rows[0]]
        chain = settings.processors()
        part = scores[rows] if len(rows) < len(params) else scores
        if chain:
            width = max(len(histories[r]) for r in rows)
            # Shorter histories are padded with their own first token, which each already holds
            # (the repetition penalty only looks at which tokens occur).
            ids = torch.tensor([list(histories[r]) + [histories[r][0]] * (width - len(histories[r])) for r in rows],
                               device=part.device)
            part = chain(ids, part)
        if not settings.do_sample:
            for r, token in zip(rows, part.argmax(dim=-1).tolist()):
                picked[r] = token
            continue
        probs = torch.softmax(part, dim=-1)
        for i, r in enumerate(rows):
            picked[r] = int(torch.multinomial(probs[i], 1, generator=generators[r]))
    return picked


def make_generator(params: SamplingParams, row: int, device: torch.device) -> torch.Generator | None:
    """A sampling row's own generator: seeded rows draw the same tokens whatever shares the batch
    (row i of a request uses seed + i, so a request's inputs differ from each other)."""
    if not params.do_sample:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed + row)
    return generator


class TextTracker:
    """A row's text as its tokens arrive: what is new since the last call, and whether a stop string
    has appeared (then the text ends before it)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # never stream part of a stop string
        self.text = ""
        self.streamed = ""
        self.stopped = False

    def update(self, tokens: Sequence[int], final: bool = False) -> str:
        """Decode `tokens` (the row's generated ids); returns the text to stream now. The pieces
        streamed add up to `output`."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self.stop:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, self.stopped, final = text[:cut], True, True
        self.text = text
        visible = text.strip()
        if not final:
            # Held back: what a later token may still turn into a stop string, and the spaces
            # before it (the output is stripped, so it would end without them if a stop came next).
            visible = visible[: max(len(visible) - self._hold, 0)].rstrip()
        if len(visible) <= len(self.streamed) or not visible.startswith(self.streamed):
            return ""
        delta, self.streamed = visible[len(self.streamed):], visible
        return delta

    @property
    def output(self) -> str:
        return self.text.strip()
