"""Sampled production data as a training set: decode uploaded sample shards, write
``.npz`` shards plus an ``index.jsonl``, and summarize confidence and predictions.

An uploaded shard is an ``.npz`` whose row arrays share the first axis: the agent
writes ``input/<name>``, ``output/<name>`` and a 0-d JSON ``meta`` (its
SampleMeta); ``top1`` and ``low_confidence`` arrays are honoured when present.
The top-1 confidence per row comes from a ``top1`` array, else from an output that
holds class probabilities, else from the top-1 the agent measured (``meta.top1``,
the lowest over the request's rows).
Untrusted bytes: sizes are bounded before anything is expanded, no pickles.
"""
from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.common.errors import GoldenFormatError
from edgefleet.common.fs import atomic_write
from edgefleet.common.golden import read_npz

from .errors import InvalidInput

MAX_SHARD_BYTES = 64 * 1024 * 1024       # one uploaded shard, compressed or expanded
ROWS_PER_SHARD = 4096                    # rows per exported shard
LOW_REASONS = frozenset({"low_confidence", "low_margin"})
RESERVED = frozenset({"meta", "top1", "low_confidence"})
# An int8 model's softmax dequantizes to values a little above 1 and rows summing to 1 +- ~1%.
PROBABILITY_SLACK = 0.02
CONFIDENCE_BINS = np.linspace(0.0, 1.0, 11)


@dataclass(frozen=True)
class SampleRecord:
    """One row of the samples index (as the API lists it)."""

    id: int
    key: str
    device: str
    model: str
    version: str
    variant: str
    hardware_class: str | None = None
    ts: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class DecodedShard:
    tensors: dict[str, np.ndarray]       # each with the rows on axis 0
    rows: int
    meta: dict[str, Any]
    top1: np.ndarray | None              # per row: highest probability
    predicted: np.ndarray | None         # per row: arg max class
    low: np.ndarray                      # per row: kept for low confidence


def decode_shard(data: bytes, max_bytes: int = MAX_SHARD_BYTES) -> DecodedShard:
    """Validate and decode one uploaded shard; InvalidInput says what is wrong."""
    if len(data) > max_bytes:
        raise InvalidInput(f"sample shard is {len(data)} bytes, above the {max_bytes}-byte limit")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            expanded = sum(m.file_size for m in archive.infolist())
        if expanded > max_bytes:
            raise InvalidInput(f"sample shard expands to {expanded} bytes, above the {max_bytes}-byte limit")
        arrays = read_npz(data, max_bytes, max_bytes, name="sample shard")
    except zipfile.BadZipFile as e:
        raise InvalidInput(f"sample shard is not a readable npz: {e}") from None
    except GoldenFormatError as e:
        raise InvalidInput(str(e)) from None
    meta = _meta(arrays.get("meta"))
    tensors = {k: v for k, v in arrays.items() if k not in RESERVED and v.ndim >= 1}
    lengths = {v.shape[0] for v in tensors.values()}
    if len(lengths) != 1:
        raise InvalidInput(f"sample shard arrays must share their first axis, got {sorted(lengths)}")
    rows = lengths.pop()
    top1, predicted = predictions(tensors, rows)
    if "top1" in arrays and arrays["top1"].shape == (rows,):
        top1 = arrays["top1"].astype(np.float64)
    elif top1 is None and _probability(meta.get("top1")):
        top1 = np.full(rows, float(meta["top1"]))
    if "low_confidence" in arrays and arrays["low_confidence"].shape == (rows,):
        low = arrays["low_confidence"].astype(bool)
    else:
        low = np.full(rows, meta.get("reason") in LOW_REASONS)
    return DecodedShard(tensors, rows, meta, top1, predicted, low)


def _meta(value: np.ndarray | None) -> dict[str, Any]:
    if value is None or value.ndim != 0 or value.dtype.kind != "U":
        return {}
    try:
        meta = json.loads(str(value))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def predictions(tensors: dict[str, np.ndarray], rows: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Top-1 probability and predicted class per row, from the first output that looks
    like class probabilities (float, >= 2 classes, rows summing to 1)."""
    outputs = sorted((k, v) for k, v in tensors.items() if k.startswith("output/")) or sorted(tensors.items())
    for _, value in outputs:
        if value.dtype.kind != "f" or value.ndim < 2 or value.shape[-1] < 2 or value.size == 0:
            continue
        scores = value.reshape(rows, -1, value.shape[-1])[:, 0, :].astype(np.float64)
        probabilities = (scores.min() >= -PROBABILITY_SLACK and scores.max() <= 1 + PROBABILITY_SLACK
                         and np.allclose(scores.sum(axis=1), 1, atol=PROBABILITY_SLACK))
        return (np.clip(scores.max(axis=1), 0, 1) if probabilities else None), scores.argmax(axis=1)
    return None, None


# --- export ---------------------------------------------------------------------------


@dataclass
class ExportResult:
    samples: int = 0      # uploaded shards read
    rows: int = 0         # rows written
    shards: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # unreadable shards, one line each


class ShardWriter:
    """Buffers rows with one tensor signature and writes ``shard-NNNNN.npz`` files;
    a new signature (other names, dtypes or shapes) starts a new shard."""

    def __init__(self, out: Path, rows_per_shard: int = ROWS_PER_SHARD) -> None:
        self.out = out
        self.rows_per_shard = rows_per_shard
        self.result = ExportResult()
        self.index: list[dict[str, Any]] = []
        self._pending: list[tuple[dict[str, np.ndarray], list[dict[str, Any]]]] = []
        self._signature: tuple | None = None

    def add(self, tensors: dict[str, np.ndarray], entries: list[dict[str, Any]]) -> None:
        signature = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in tensors.items()))
        if signature != self._signature or self._rows() + len(entries) > self.rows_per_shard:
            self.flush()
            self._signature = signature
        self._pending.append((tensors, entries))

    def _rows(self) -> int:
        return sum(len(entries) for _, entries in self._pending)

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self.result.shards):05d}.npz"
        names = [k for k, _ in self._pending[0][0].items()]
        stacked: dict[str, Any] = {k: np.concatenate([t[k] for t, _ in self._pending]) for k in names}
        atomic_write(self.out / name, b"", lambda f, _: np.savez_compressed(f, **stacked))
        row = 0
        for _, entries in self._pending:
            for entry in entries:
                self.index.append({"shard": name, "row": row, **entry})
                row += 1
        self.result.shards.append(name)
        self.result.rows += row
        self._pending = []

    def close(self) -> ExportResult:
        self.flush()
        lines = "".join(json.dumps(e, sort_keys=True, default=str) + "\n" for e in self.index)
        atomic_write(self.out / "index.jsonl", lines.encode())
        return self.result


def export(
    records: Iterable[SampleRecord], fetch: Callable[[SampleRecord], bytes], out: Path,
    low_confidence_only: bool = False, rows_per_shard: int = ROWS_PER_SHARD,
) -> ExportResult:
    """Write a dataset a training job reads directly: ``shard-*.npz`` (tensor name -> rows)
    and ``index.jsonl`` (one line per row: shard, row, sample metadata, top-1, prediction)."""
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, rows_per_shard)
    for record in records:
        try:
            shard = decode_shard(fetch(record))
        except InvalidInput as e:
            writer.result.skipped.append(f"{record.key}: {e}")
            continue
        writer.result.samples += 1
        keep = np.flatnonzero(shard.low) if low_confidence_only else np.arange(shard.rows)
        if keep.size == 0:
            continue
        entries = [{
            "sample": record.id, "key": record.key, "device": record.device, "hardware_class": record.hardware_class,
            "model": record.model, "version": record.version, "variant": record.variant, "ts": record.ts,
            "reason": shard.meta.get("reason"), "low_confidence": bool(shard.low[i]),
            "top1": None if shard.top1 is None else float(shard.top1[i]),
            "predicted": None if shard.predicted is None else int(shard.predicted[i]),
        } for i in keep]
        writer.add({k: v[keep] for k, v in shard.tensors.items()}, entries)
    return writer.close()


# --- stats ------------------------------------------------------------------------------


@dataclass
class GroupStats:
    model: str
    version: str
    hardware_class: str
    shards: int = 0
    rows: int = 0
    low_confidence: int = 0
    confidence: list[int] = field(default_factory=lambda: [0] * (len(CONFIDENCE_BINS) - 1))
    classes: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "version": self.version, "hardware_class": self.hardware_class,
            "shards": self.shards, "samples": self.rows, "low_confidence": self.low_confidence,
            "confidence_bins": [round(float(b), 2) for b in CONFIDENCE_BINS],
            "confidence_histogram": self.confidence,
            "class_histogram": {str(k): v for k, v in sorted(self.classes.items())},
        }


def summarize(shards: Iterable[tuple[SampleRecord, DecodedShard]]) -> list[dict[str, Any]]:
    """Per model, version and hardware class: samples, top-1 confidence histogram,
    histogram of predicted classes."""
    groups: dict[tuple[str, str, str], GroupStats] = {}
    for record, shard in shards:
        key = (record.model, record.version, record.hardware_class or "unknown")
        group = groups.setdefault(key, GroupStats(*key))
        group.shards += 1
        group.rows += shard.rows
        group.low_confidence += int(shard.low.sum())
        if shard.top1 is not None:
            counts, _ = np.histogram(np.clip(shard.top1, 0, 1), bins=CONFIDENCE_BINS)
            group.confidence = [a + int(b) for a, b in zip(group.confidence, counts, strict=True)]
        if shard.predicted is not None:
            group.classes.update(int(c) for c in shard.predicted)
        del record, shard  # the next shard is decoded while this one would still be held
    return [groups[k].to_dict() for k in sorted(groups)]

