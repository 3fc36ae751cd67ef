"""`Engine`: iteration-level (continuous) batching of many adapters on one seq2seq base.

    submit()      a request joins a bounded queue (QueueFull at once when it is full)
    prep thread   formats, tokenizes and embeds the lexical fields of what was submitted (prep.py),
                  batched and cached by the registry's encoders, off the decode loop's critical path
    engine loop   owns the model; each iteration it
                    1. drops rows whose client went away or whose adapter was unloaded
                    2. admits prepared rows into free slots (a row and token budget): the encoder once
                       for the newcomers, then their first decoder step (RunningBatch.admit)
                    3. runs one decoder step for every active row, each with its own adapter
                    4. retires rows that finished (end token, max_new_tokens, a stop string) and
                       answers a request as soon as its last row is done

A request never waits for a whole batch: it joins at the next iteration. Beam search
(num_beams > 1) keeps the static path: its rows run as one `generate` call between two steps.
Per-token callbacks (`on_token`) let a request stream its text as it is produced.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from lexlora.errors import AdapterError, ConfigError
from lexlora.model.generation import generate_from_embeds
from lexlora.serving.decoding import SamplingParams
from lexlora.serving.prep import GenerationFailed, prepare
from lexlora.serving.registry import LexLoRA
from lexlora.serving.running import Row, RunningBatch, engine_supports

logger = logging.getLogger(__name__)

TokenCallback = Callable[[int, int, str], None]  # (input index, token id, new text); may get "" mid-word


class ShuttingDown(RuntimeError):
    """The engine is closed: the request was not run (HTTP 503)."""


class QueueFull(RuntimeError):
    """Too many requests are waiting; retry after `retry_after_s` (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class EngineRequest:
    adapter: str
    inputs: list[Any]
    params: SamplingParams
    on_token: TokenCallback | None = None
    loaded: Any = None  # the LoadedAdapter to run on (an adapter store's pick); None: the registry's, at prep
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # its first row got a slot
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    outputs: list[str | None] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)  # "stop" (end token, stop string) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    remaining: int = 0
    waiting: bool = True  # counts against the queue bound until its first row runs or it ends

    def cancel(self) -> None:
        """The client went away: its rows are dropped at the next step, freeing their slots."""
        self.cancelled = True
        self.future.cancel()


class Engine:
    """One loop owning the model, `max_rows` rows decoding at once, at most `max_queue` requests waiting."""

    name = "continuous"

    def __init__(self, registry: LexLoRA, *, max_rows: int = 32, max_queue: int = 256, max_prefill_tokens: int = 2048,
                 admit_delay_factor: float = 2.0):
        why = engine_supports(registry)
        if why:
            raise ConfigError(why)
        self.registry = registry
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        # Admitting runs the encoder, whose cost barely grows with the rows it takes (it streams the
        # encoder's weights either way: 1 row costs ~40 ms, 8 rows ~55 ms on 2 CPU cores), so while
        # rows are decoding, newcomers are admitted in groups: at once when a quarter of the slots
        # are free and as many rows wait, else once factor * (the last admission's time) has passed
        # since it ended (vLLM's scheduler_delay_factor). Nothing decoding: at once.
        self.admit_delay_factor = admit_delay_factor
        self.admit_group = max(1, max_rows // 4)
        self._last_admit = (0.0, 0.0)  # (when it ended, how long it took)
        self.batch = RunningBatch(registry, max_rows)
        self.stats = {"batches": 0, "rows": 0, "mixed_batches": 0, "admitted": 0, "row_steps": 0}
        self._cond = threading.Condition()
        self._incoming: collections.deque[EngineRequest] = collections.deque()
        self._ready: collections.deque[Row] = collections.deque()
        self._waiting = 0  # requests submitted and not yet admitted (the queue bound)
        self._pauses = 0
        self._busy = False
        self._closed = False
        self._abort = False
        self._prep = threading.Thread(target=self._prepare_loop, name="lexlora-engine-prep", daemon=True)
        self._loop = threading.Thread(target=self._engine_loop, name="lexlora-engine", daemon=True)
        self._prep.start()
        self._loop.start()

    # ---- the public side ------------------------------------------------------------------------------
    def submit(self, adapter: str, inputs: Sequence[Any], params: SamplingParams | None = None,
               on_token: TokenCallback | None = None, loaded: Any = None) -> EngineRequest:
        """Queue a request; its `future` gets the outputs (one per input). `loaded` pins the adapter
        object it runs on (else the registry's adapter of that name when it is prepared). QueueFull
        when `max_queue` requests are already waiting, ShuttingDown once closed."""
        request = EngineRequest(adapter, list(inputs), params or SamplingParams(), on_token, loaded)
        request.outputs, request.remaining = [None] * len(request.inputs), len(request.inputs)
        request.finish_reasons = [None] * len(request.inputs)
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting (at most {self.max_queue}); retry shortly",
                                retry_after_s=1)
            self._waiting += 1
            self._incoming.append(request)
            self._cond.notify_all()
        if not request.inputs:
            self._finish(request)
        return request

    def generate(self, adapter: str, inputs: Sequence[Any], params: SamplingParams | None = None,
                 timeout: float | None = None) -> list[str]:
        """Submit and wait (for callers in other threads than the engine's)."""
        return self.submit(adapter, inputs, params).future.result(timeout)

    @property
    def pending(self) -> int:
        """Requests submitted and not yet decoding."""
        with self._cond:
            return self._waiting

    @property
    def active_rows(self) -> int:
        return len(self.batch.rows)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No step runs within this block (it starts once the current step ends): for loading and
        unloading adapters, and for tests that need requests to pile up."""
        with self._cond:
            self._pauses += 1
            while self._busy:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking requests; finish what was queued or is decoding within `timeout`, then fail the
        rest with ShuttingDown."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._prep.join(timeout)
        self._loop.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        if self._loop.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            self._loop.join(5)

    # ---- the prep thread ----------------------------------------------------------------------------
    def _prepare_loop(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self._closed:
                    self._cond.wait()
                if not self._incoming:
                    return
                requests = list(self._incoming)
                self._incoming.clear()
            rows = prepare(self.registry, requests, self._fail)
            with self._cond:
                self._ready.extend(rows)
                self._cond.notify_all()

    # ---- the engine loop ----------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        while self._next_iteration():
            try:
                self._iterate()
            except Exception:  # the loop outlives anything one iteration does
                logger.exception("engine iteration failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        self._fail_everything(ShuttingDown("the server is shutting down"))

    def _next_iteration(self) -> bool:
        """Wait until there is work and no pause; False once closed and drained (or aborted)."""
        with self._cond:
            while not self._abort:
                work = bool(self._ready or self.batch.rows)
                if work and not self._pauses:
                    self._busy = True
                    return True
                if self._closed and not work and not self._incoming and not self._prep.is_alive():
                    return False
                self._cond.wait(0.05 if self._closed else None)
            return False

    def _iterate(self) -> None:
        self._drop_stale()
        self._admit()
        if not self.batch.rows:
            return
        rows = list(self.batch.rows.values())
        try:
            self.batch.step()
        except Exception as exc:
            logger.exception("a decode step failed for %d rows", len(rows))
            self.batch.reset()
            for row in rows:
                self._fail(row.request, GenerationFailed(f"generation failed ({type(exc).__name__}: {exc})"))
            return
        self.stats["batches"] += 1
        self.stats["row_steps"] += len(rows)
        self.stats["mixed_batches"] += int(len({id(r.plan.adapter) for r in rows}) > 1)
        self._settle(rows)

    def _drop_stale(self) -> None:
        for row in list(self.batch.rows.values()):
            request = row.request
            if request.cancelled or request.future.done():
                self.batch.retire(row)
            elif row.plan.adapter.unloaded:
                self.batch.retire(row)
                self._fail(request, AdapterError(f"adapter {request.adapter!r} was unloaded while generating"))

    def _admit_now(self) -> bool:
        free = self.batch.free
        if not self._ready or not free:
            return False
        if not self.batch.rows:
            return True  # nothing decoding: nothing to stall
        if free >= self.admit_group and len(self._ready) >= self.admit_group:
            return True  # a whole group: the encoder's cost is shared by enough rows
        ended, took = self._last_admit
        return time.monotonic() - ended >= self.admit_delay_factor * took

    def _admit(self) -> None:
        if not self._admit_now():
            return
        take: list[Row] = []
        static: list[Row] = []
        tokens = 0
        with self._cond:
            while self._ready:
                row = self._ready[0]
                request = row.request
                if request.cancelled or request.future.done():
                    self._ready.popleft()
                    self._unwait(request)
                    continue
                if row.plan.adapter.unloaded:
                    self._ready.popleft()
                    self._fail(request, AdapterError(f"adapter {request.adapter!r} was unloaded while queued"))
                    continue
                if row.plan.num_beams > 1:  # beam search: its request alone, on the static path
                    if not take:
                        static = self._take_static()
                    break
                if len(take) >= self.batch.free or (take and tokens + len(row.ids) > self.max_prefill_tokens):
                    break
                take.append(self._ready.popleft())
                tokens += len(row.ids)
                self._unwait(request)
        if static:
            self._run_static(static)
        if take:
            self._prefill(take)

    def _unwait(self, request: EngineRequest) -> None:
        with self._cond:
            if request.waiting:
                request.admitted_at = time.monotonic()
                request.waiting = False
                self._waiting -= 1

    def _take_static(self) -> list[Row]:
        first = self._ready.popleft()
        rows = [first]
        while self._ready and self._ready[0].request is first.request:
            rows.append(self._ready.popleft())
        self._unwait(first.request)
        return rows

    def _prefill(self, rows: list[Row]) -> None:
        started = time.monotonic()
        try:
            self.batch.admit(rows)
        except Exception as exc:
            requests = list({id(r.request): r.request for r in rows}.values())
            if len(requests) > 1:
                # One request's rows may be what failed: each alone, so only it gets the error.
                for request in requests:
                    self._prefill([r for r in rows if r.request is request])
                return
            logger.exception("admitting %d rows failed", len(rows))
            self._fail(requests[0], GenerationFailed(f"generation failed ({type(exc).__name__}: {exc})"))
            return
        self.stats["admitted"] += len(rows)
        self._last_admit = (time.monotonic(), time.monotonic() - started)

    def _run_static(self, rows: list[Row]) -> None:
        """Beam search: the request's rows as one generate() call, as registry.generate runs it."""
        registry, request = self.registry, rows[0].request
        plans = [r.plan for r in rows]
        try:
            with torch.no_grad():
                embeds, mask = registry.pipeline.embed_ids(registry, plans, [r.ids for r in rows], [r.lexical for r in rows])
                with registry.routed(plans):
                    params = rows[0].params
                    options = {"repetition_penalty": params.repetition_penalty} if params.repetition_penalty != 1.0 else {}
                    if params.min_new_tokens:
                        options["min_new_tokens"] = params.min_new_tokens
                    ids = generate_from_embeds(registry.base, embeds, mask, max_new_tokens=plans[0].max_new_tokens,
                                               num_beams=plans[0].num_beams, **options)
        except Exception as exc:
            logger.exception("beam search failed")
            self._fail(request, GenerationFailed(f"generation failed ({type(exc).__name__}: {exc})"))
            return
        pad = registry.tokenizer.pad_token_id
        for row, sequence in zip(rows, ids.tolist()):
            while len(sequence) > 1 and sequence[-1] == pad:  # beams that ended early are padded
                sequence.pop()
            row.tokens, row.finished = sequence, True
        self._settle(rows)

    def _settle(self, rows: list[Row]) -> None:
        """After rows got a token: stream it, and answer what finished."""
        now = time.monotonic()
        for row in rows:
            request = row.request
            if request.future.done():
                self.batch.retire(row)
                continue
            if row.error is not None:
                self.batch.retire(row)
                self._fail(request, GenerationFailed(str(row.error)))
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            if request.on_token is not None or row.params.stop or row.finished:
                delta = row.tracker.update(row.generated, final=row.finished)
                row.finished = row.finished or row.tracker.stopped
                if request.on_token is not None and row.generated:
                    try:
                        request.on_token(row.index, row.generated[-1], delta)
                    except Exception:  # a broken stream is a client gone away
                        logger.exception("a token callback failed; cancelling its request")
                        request.cancel()
            if row.finished:
                self.batch.retire(row)
                request.outputs[row.index] = row.tracker.output
                request.finish_reasons[row.index] = self._finish_reason(row)
                request.prompt_tokens += len(row.ids)
                request.completion_tokens += len(row.generated)
                request.remaining -= 1
                self.stats["rows"] += 1
                if request.remaining == 0:
                    self._finish(request)

    def _finish_reason(self, row: Row) -> str:
        ended = row.tracker.stopped or (row.generated and row.generated[-1] == self.batch.eos_id)
        return "stop" if ended or len(row.generated) < row.plan.max_new_tokens else "length"

    def _finish(self, request: EngineRequest) -> None:
        self._unwait(request)
        request.finished_at = time.monotonic()
        if not request.future.done() and request.future.set_running_or_notify_cancel():
            request.future.set_result(list(request.outputs))

    def _fail(self, request: EngineRequest, exc: Exception) -> None:
        self._unwait(request)
        if not request.future.done() and request.future.set_running_or_notify_cancel():
            request.future.set_exception(exc)

    def _fail_everything(self, exc: Exception) -> None:
        with self._cond:
            waiting = list(self._incoming) + [r.request for r in self._ready]
            self._incoming.clear()
            self._ready.clear()
        for request in waiting + [r.request for r in self.batch.rows.values()]:
            self._fail(request, exc)
        self.batch.reset()
