"""What the engine's prep thread does with submitted requests, off the decode loop: each input as a
`Row` (its adapter's record, prompt token ids, sampling settings), then the lexical fields of every
row that came in together embedded at once (one encode per embedding model, through the registry's
cached encoders). A request whose adapter is gone, whose input lacks a field, or whose text fails to
embed fails alone."""

from __future__ import annotations

import logging
from typing import Any, Callable

from lexlora.errors import AdapterError, DataError
from lexlora.serving.decoding import TextTracker
from lexlora.serving.registry import LexLoRA
from lexlora.serving.running import Row

logger = logging.getLogger(__name__)


class GenerationFailed(RuntimeError):
    """A step failed for this request's rows (HTTP 500 with the message)."""


def prepare(registry: LexLoRA, requests: list[Any], fail: Callable[[Any, Exception], None]) -> list[Row]:
    """The rows of `requests` ready to admit; `fail(request, error)` for each request that cannot run."""
    adapters = registry.adapters
    rows: list[Row] = []
    for request in requests:
        try:
            rows.extend(rows_of(registry, request, adapters))
        except (AdapterError, DataError) as exc:
            fail(request, exc)
    try:
        embed(registry, rows)
    except Exception:
        # One request's text may be what failed: embed each request alone so only it fails.
        kept = []
        for request in {id(r.request): r.request for r in rows}.values():
            own = [r for r in rows if r.request is request]
            try:
                embed(registry, own)
                kept.extend(own)
            except Exception as exc:
                logger.exception("embedding the lexical fields failed")
                fail(request, GenerationFailed(f"embedding the lexical field failed ({type(exc).__name__}: {exc})"))
        rows = kept
    return rows


def rows_of(registry: LexLoRA, request: Any, adapters: dict) -> list[Row]:
    """One row per input of `request` (an EngineRequest), formatted and tokenized for its adapter."""
    loaded = request.loaded or adapters.get(request.adapter)
    if loaded is None or loaded.unloaded:
        names = ", ".join(sorted(adapters)) or "none"
        raise AdapterError(f"no adapter named {request.adapter!r} is loaded (loaded: {names})")
    params = request.params
    plan = loaded.plan(params.max_new_tokens, params.num_beams)
    records = [loaded.spec.format_input(item, i) for i, item in enumerate(request.inputs)]
    ids = registry.pipeline.token_ids([plan] * len(records), records)
    return [
        Row(request, i, plan, row_ids, None, params, TextTracker(registry.tokenizer, params.stop), record=record)
        for i, (row_ids, record) in enumerate(zip(ids, records))
    ]


def embed(registry: LexLoRA, rows: list[Row]) -> None:
    vectors = registry.pipeline.lexical(registry, [r.plan for r in rows], [r.record for r in rows])
    for row, vector in zip(rows, vectors):
        row.lexical = vector
