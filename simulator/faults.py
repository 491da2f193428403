"""Faults injectable per simulated device, and the seams that apply them.

Each fault acts where the real trouble would: a slow link slows the bytes the
TUF updater downloads, a bad model answers wrongly or slowly inside ONNX
Runtime's ``run``, and a power cut stops the device between two of its own
steps (or mid-download), leaving its disk exactly as it was.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.agent.fetch import RangeFetcher
from edgefleet.common.protocol import ModelRef


class PowerCut(BaseException):
    """Unwinds a reconcile pass with no cleanup (the Reconciler only catches AgentError)."""


@dataclass
class Faults:
    """What is wrong with one device. ``versions`` limits the model faults to those model versions."""

    download_bps: float | None = None        # throttle target downloads to this many bytes/s
    fail_golden: bool = False                # the model's outputs are wrong on this device
    extra_latency_ms: float = 0.0            # every inference takes this much longer
    fail_infer: float = 0.0                  # this fraction of production requests fails (not the golden check)
    versions: frozenset[str] = frozenset()   # empty: every version
    power_cut_at: str | None = None          # reconcile state (agent.state.State value) to die in
    power_cut_after_bytes: int | None = None  # die mid-download after this many bytes

    def applies_to(self, ref: ModelRef | None) -> bool:
        return not self.versions or (ref is not None and ref.version in self.versions)

    def model_faulty(self, ref: ModelRef | None) -> bool:
        return (self.fail_golden or self.extra_latency_ms > 0 or self.fail_infer > 0) and self.applies_to(ref)

    def clear_power_cut(self) -> None:
        self.power_cut_at = None
        self.power_cut_after_bytes = None


class FaultySession:
    """An ONNX Runtime session as a faulty device runs it: slower, wrong, and/or failing.

    ``fail_fraction`` is set only once the model is active (``SimRuntime.swap``): the
    model passes its golden check and then fails in production, where only the
    rollout's error-rate gate can see it.
    """

    def __init__(self, session: Any, extra_latency_s: float = 0.0, wrong: bool = False) -> None:
        self.session = session
        self.extra_latency_s = extra_latency_s
        self.wrong = wrong
        self.fail_fraction = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run(self, output_names: Any, feed: Any, *args: Any) -> list:
        if self.extra_latency_s:
            time.sleep(self.extra_latency_s)
        if self.fail_fraction and random.random() < self.fail_fraction:
            raise RuntimeError("simulated inference failure (fail-infer fault)")
        values = self.session.run(output_names, feed, *args)
        if self.wrong:  # shift every score one class over: top-1 and values both disagree
            values = [np.roll(v, 1, axis=-1) if isinstance(v, np.ndarray) and v.ndim else v for v in values]
        return values


class FaultyFetcher(RangeFetcher):
    """Wraps the fleet's shared fetcher; throttles or cuts one device's target downloads."""

    def __init__(self, inner: RangeFetcher, faults: Callable[[], Faults]) -> None:
        self._inner = inner
        self._faults = faults

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._inner.fetch(url)  # metadata: not slowed (a tiny share of the bytes)

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        start, chunks = self._inner.fetch_from(url, offset)
        faults = self._faults()
        if faults.download_bps is None and faults.power_cut_after_bytes is None:
            return start, chunks
        return start, self._faulty(chunks, faults)

    @staticmethod
    def _faulty(chunks: Iterator[bytes], faults: Faults) -> Iterator[bytes]:
        began = time.monotonic()
        sent = 0
        for chunk in chunks:
            if faults.power_cut_after_bytes is not None and sent + len(chunk) > faults.power_cut_after_bytes:
                yield chunk[: max(0, faults.power_cut_after_bytes - sent)]
                raise PowerCut(f"power cut after {faults.power_cut_after_bytes} bytes of a download")
            sent += len(chunk)
            if faults.download_bps:
                ahead = sent / faults.download_bps - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
            yield chunk
