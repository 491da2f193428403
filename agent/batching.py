"""Dynamic batching: requests that arrive together run as one call on the session.

Off unless a model's policy asks for it, and only for models whose every
input has a dynamic first dimension (a batch). Triton's dynamic batcher
without its scheduler thread: the session runs one batch at a time; while it
is busy, requests queue; when it is free, a waiting request takes the
compatible requests at the head of the queue (same dtypes and non-batch
dimensions, up to ``max_batch_size`` rows) and runs them as one call, unless
the oldest has waited less than ``max_queue_delay_us`` and the batch is not
full yet. With the delay at 0 a lone request runs at once and batches form
only from requests that queued behind a busy session: no latency is added
when there is nothing to batch with.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Feed = dict[str, np.ndarray]
_Key = tuple[tuple[str, tuple[int, ...], np.dtype], ...]


@dataclass(frozen=True)
class BatchPolicy:
    """How one model batches: up to ``max_batch_size`` rows; an unfilled batch waits for its oldest
    request to be ``max_queue_delay_us`` old."""

    max_batch_size: int
    max_queue_delay_us: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 2:
            raise ValueError(f"max_batch_size must be at least 2 to batch, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be 0 or more, got {self.max_queue_delay_us}")


class _Request:
    __slots__ = ("arrived", "error", "feed", "key", "outputs", "role", "rows", "wake")

    def __init__(self, feed: Feed, rows: int) -> None:
        self.feed = feed
        self.rows = rows
        self.key: _Key = tuple([(name, value.shape[1:], value.dtype) for name, value in feed.items()])
        self.arrived = time.monotonic()
        self.outputs: Feed = {}
        self.error: BaseException | None = None
        self.role = _WAIT
        self.wake = threading.Lock()  # held until another thread gives this request a role
        self.wake.acquire()


_WAIT, _RUN, _DONE = range(3)  # a request waits, runs the next batch, or has its answer


class Batcher:
    """Runs ``run`` (a validated feed -> outputs) on batches of concurrent requests.

    One request at a time holds the runner role; the others sleep on their own lock
    until the runner hands them their outputs, or the role: one wake-up per request.
    """

    def __init__(self, run: Callable[[Feed], Feed], policy: BatchPolicy) -> None:
        self._run = run
        self.policy = policy
        self._delay_s = policy.max_queue_delay_us / 1e6
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # the runner waits here for a batch to fill
        self._queue: list[_Request] = []
        self._busy = False     # some request holds the runner role
        self._filling = False  # the runner waits for its batch to fill (only with a queue delay)
        # session calls and the requests they answered (written by the runner only: one at a time)
        self.calls = 0
        self.requests = 0

    def infer(self, feed: Feed) -> Feed:
        rows = _rows(feed)
        if rows is None or rows >= self.policy.max_batch_size:
            return self._run(feed)  # nothing to stack it with
        with self._lock:
            # nobody to wait for: run at once, no queue entry (the queue is empty while no one runs)
            alone = not self._busy and not self._delay_s
            if alone:
                self._busy = True
            else:
                request = _Request(feed, rows)
                self._queue.append(request)
                if self._filling:
                    self._arrived.notify()
                elif not self._busy:
                    self._busy = True
                    request.role = _RUN
        if alone:
            self.calls += 1
            self.requests += 1
            try:
                return self._run(feed)
            finally:
                self._pass_on()
        while request.role != _DONE:
            if request.role == _RUN:
                self._lead(request)
            else:
                request.wake.acquire()
        if request.error is not None:
            raise request.error
        return request.outputs

    def _lead(self, me: _Request) -> None:
        """Run one batch from the head of the queue (``me`` is the head), then pass the role on."""
        with self._lock:
            batch = self._take()
        self._execute(batch)
        for request in batch:
            request.role = _DONE
            if request is not me:
                request.wake.release()
        self._pass_on()

    def _pass_on(self) -> None:
        """Give the runner role to the oldest waiting request, or give it up."""
        with self._lock:
            runner = self._queue[0] if self._queue else None
            if runner is None:
                self._busy = False
                return
            runner.role = _RUN
        runner.wake.release()

    def _take(self) -> list[_Request]:
        """Remove and return the batch to run (the lock held): compatible requests at the head of the
        queue, after waiting for the oldest to be max_queue_delay_us old unless the batch is full."""
        while True:
            head = self._queue[0]
            batch, rows = [], 0
            for request in self._queue:
                if request.key == head.key and rows + request.rows <= self.policy.max_batch_size:
                    batch.append(request)
                    rows += request.rows
            wait_s = head.arrived + self._delay_s - time.monotonic()
            if rows >= self.policy.max_batch_size or wait_s <= 0:
                break
            self._filling = True
            self._arrived.wait(wait_s)
            self._filling = False
        taken = set(map(id, batch))
        self._queue = [r for r in self._queue if id(r) not in taken]
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        self.calls += 1
        self.requests += len(batch)
        try:
            if len(batch) == 1:
                batch[0].outputs = self._run(batch[0].feed)
            else:
                joined = {name: np.concatenate([r.feed[name] for r in batch]) for name in batch[0].feed}
                for request, outputs in zip(batch, _split(self._run(joined), [r.rows for r in batch]), strict=True):
                    request.outputs = outputs
        except BaseException as e:  # noqa: BLE001 - every request of the batch gets the batch's failure
            for request in batch:
                request.error = e


def _rows(feed: Feed) -> int | None:
    """The batch dimension shared by every input; None when the inputs disagree (run alone)."""
    sizes = {value.shape[0] if value.ndim else None for value in feed.values()}
    if len(sizes) != 1:
        return None
    return sizes.pop()


def _split(outputs: Feed, rows: list[int]) -> list[Feed]:
    """Each request's rows of every batched output (outputs without the batch dimension go to all)."""
    total = sum(rows)
    batched = {name: value.ndim > 0 and value.shape[0] == total for name, value in outputs.items()}
    parts, start = [], 0
    for n in rows:
        parts.append({name: value[start:start + n] if batched[name] else value for name, value in outputs.items()})
        start += n
    return parts
