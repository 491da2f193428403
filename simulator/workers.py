"""A small pool of threads running devices' reconcile passes.

Level-triggered like the daemon's main loop: a device is woken by a new
desired state (at once) or by its own next due time (a retry backoff, or the
periodic tick). A device is never reconciled by two workers at once; a wake
that arrives during its pass runs one more pass right after.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)


class Reconcilable(Protocol):
    def reconcile(self) -> float | None: ...


class Workers:
    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("the worker pool needs at least one thread")
        self.count = count
        self._cond = threading.Condition()
        self._ready: collections.deque[Reconcilable] = collections.deque()
        self._queued: set[int] = set()
        self._running: set[int] = set()
        self._again: set[int] = set()
        self._due: dict[int, float] = {}     # device -> its one due time (later wakes replace it)
        self._timers: list[tuple[float, int, Reconcilable]] = []
        self._counter = itertools.count()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> None:
        for i in range(self.count - len(self._threads)):
            thread = threading.Thread(target=self._run, name=f"sim-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def wake(self, device: Reconcilable, delay: float = 0.0) -> None:
        """Run a pass for ``device`` now, or be due in ``delay`` seconds (replacing its earlier due time)."""
        with self._cond:
            if delay > 0:
                when = time.monotonic() + delay
                self._due[id(device)] = when
                heapq.heappush(self._timers, (when, next(self._counter), device))
            else:
                self._make_ready(device)
            self._cond.notify()

    def _make_ready(self, device: Reconcilable) -> None:
        key = id(device)
        if key in self._running:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(device)

    def _take(self) -> Reconcilable | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    when, _, device = heapq.heappop(self._timers)
                    if self._due.get(id(device)) == when:  # else superseded by a later wake
                        del self._due[id(device)]
                        self._make_ready(device)
                if self._ready:
                    device = self._ready.popleft()
                    self._queued.discard(id(device))
                    self._running.add(id(device))
                    return device
                wait = self._timers[0][0] - now if self._timers else 1.0
                self._cond.wait(min(wait, 1.0))
            return None

    def _run(self) -> None:
        while (device := self._take()) is not None:
            delay: float | None = None
            try:
                delay = device.reconcile()
            except Exception:  # a bug in one device's pass must not take a worker down
                log.exception("reconcile pass crashed")
            with self._cond:
                self._running.discard(id(device))
                again = id(device) in self._again
                self._again.discard(id(device))
            if again:
                self.wake(device)
            elif delay is not None:
                self.wake(device, delay)
