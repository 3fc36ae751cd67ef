"""The static worker behind `POST /generate` (`lexlora serve --engine static`; the default is the
continuous engine, engine.py): requests queue up, and one thread that owns the model runs
whatever is queued when it is free as ONE mixed-adapter batch, so concurrent requests for different
adapters share a forward pass instead of waiting for each other. If a mixed batch fails, each of its
requests is retried alone, so only the one at fault gets the error."""

import collections
import concurrent.futures
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lexlora.errors import AdapterError, DataError
from lexlora.serving.engine import ShuttingDown
from lexlora.serving.registry import LexLoRA

logger = logging.getLogger(__name__)


@dataclass
class Job:
    adapter: str
    inputs: list[Any]
    max_new_tokens: int | None
    num_beams: int | None
    min_new_tokens: int = 0
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """One worker thread owns the model. It waits for a request, gives others `wait_s` (counted from
    the oldest queued request) to join, then takes the registry `lock`, drains the queue (up to
    `max_rows` rows), and runs one `registry.generate` per generation setting with a per-row adapter
    list. `lock` also guards loading and unloading, so those never run during a generation; holding
    it from outside makes requests pile up in the queue (`pending`), which is how tests get a
    deterministic batch."""

    def __init__(self, registry: LexLoRA, max_rows: int = 32, wait_s: float = 0.005):
        self.registry = registry
        self.max_rows = max_rows
        self.wait_s = wait_s
        self.lock = threading.Lock()
        self.stats = {"batches": 0, "rows": 0, "mixed_batches": 0}
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="lexlora-batcher", daemon=True)
        self._thread.start()

    name = "static"
    active_rows = 0  # reported by /health; rows run inside one call, never between calls

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    @contextmanager
    def paused(self):
        """No batch runs within this block (the same as holding `lock`)."""
        with self.lock:
            yield

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                deadline = self._queue[0].queued_at + self.wait_s
                while not self._closed and sum(len(j.inputs) for j in self._queue) < self.max_rows:
                    if (remaining := deadline - time.monotonic()) <= 0:
                        break
                    self._cond.wait(remaining)
            # Drain only once the lock is ours: whatever queued while we waited joins this batch.
            with self.lock:
                jobs = self._take()
                try:
                    self._run(jobs)
                except Exception as exc:  # the worker must outlive any batch
                    logger.exception("batch failed")
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
        with self._cond:
            for job in self._queue:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(ShuttingDown("the server is shutting down"))
            self._queue.clear()

    def _take(self) -> list[Job]:
        jobs: list[Job] = []
        rows = 0
        with self._cond:
            # Always at least one job, so a request larger than max_rows still runs (in chunks).
            while self._queue and (not jobs or rows + len(self._queue[0].inputs) <= self.max_rows):
                job = self._queue.popleft()
                if job.future.set_running_or_notify_cancel():  # False: the client gave up
                    jobs.append(job)
                    rows += len(job.inputs)
        return jobs

    def _run(self, jobs: list[Job]) -> None:
        # Re-checked under the lock: an adapter may have been unloaded (or replaced) since the
        # request was validated. Only that request fails; the rest of the batch proceeds.
        adapters = self.registry.adapters
        groups: dict[tuple[int, int, int], list[tuple[Job, list[dict[str, str]]]]] = {}
        for job in jobs:
            loaded = adapters.get(job.adapter)
            if loaded is None:
                job.future.set_exception(AdapterError(f"adapter {job.adapter!r} was unloaded"))
                continue
            try:
                records = [loaded.spec.format_input(item, i) for i, item in enumerate(job.inputs)]
            except DataError as exc:
                job.future.set_exception(exc)
                continue
            # Grouped by the settings each row will really get, so each group is one model call
            # (registry.generate would split rows whose adapters' defaults differ anyway).
            plan = loaded.plan(job.max_new_tokens, job.num_beams)
            key = (plan.max_new_tokens, plan.num_beams, job.min_new_tokens)
            groups.setdefault(key, []).append((job, records))

        for (max_new_tokens, num_beams, min_new_tokens), members in groups.items():
            self._generate(members, max_new_tokens, num_beams, min_new_tokens)

    def _generate(self, members: list[tuple[Job, list[dict[str, str]]]], max_new_tokens: int, num_beams: int,
                  min_new_tokens: int = 0) -> None:
        inputs = [record for _, records in members for record in records]
        names = [job.adapter for job, records in members for _ in records]
        try:
            outputs = self.registry.generate(
                inputs, adapter=names, max_new_tokens=max_new_tokens, num_beams=num_beams,
                batch_size=self.max_rows, constrain=False,  # constrained requests are scored by the service
                **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}),
            )
        except Exception as exc:
            if len(members) > 1:
                # One request's rows may be what failed: each alone, so only that one gets the error.
                logger.warning("a batch of %d requests failed (%s: %s); retrying each alone",
                               len(members), type(exc).__name__, exc)
                for member in members:
                    self._generate([member], max_new_tokens, num_beams, min_new_tokens)
                return
            logger.exception("generation failed for %d rows", len(inputs))
            members[0][0].future.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["rows"] += len(inputs)
        self.stats["mixed_batches"] += int(len(set(names)) > 1)
        start = 0
        for job, records in members:
            job.future.set_result(outputs[start : start + len(records)])
            start += len(records)
