"""What a model is for, read from the truth its evaluation set carries, and the metric it is held to.

An evaluation DATA.npz names its task by the truth array it holds:

  labels  int   [N]       classification: ``top1`` of the first rank-2 float output
  texts   int   [N,L]     CTC text recognition: ``exact_match`` (and ``cer``) of the greedy decode
                          of the first rank-3 float output [N,T,C]; class 0 is the CTC blank, -1 pads;
                          an optional int array ``ignore`` lists classes left out of both sides
                          (PaddleOCR's own metric ignores the space)
  boxes   float [N,K,4]   text detection: ``box_f1`` at IoU 0.5 of the boxes a DB postprocess finds
                          in the first rank-4 float output [N,1,H,W]; x0,y0,x1,y1 pixels, -1 pads

Each task also measures a variant's agreement with the source model on the same
samples: same class, same decoded string, or the F1 of its boxes against the source's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import BuildError
from .source import TensorSpec

LABELS, TEXTS, BOXES, IGNORE = "labels", "texts", "boxes", "ignore"

# DB postprocess as PP-OCR's detector ships it (rapidocr's config.yaml): pixel threshold,
# mean-score threshold of a region, and how far the shrunk text kernel is grown back.
DB_THRESHOLD, DB_BOX_THRESHOLD, DB_UNCLIP = 0.3, 0.5, 1.6
DB_MIN_SIDE = 3  # pixels; smaller regions are noise
IOU_MATCH = 0.5


class Task(Protocol):
    @property
    def metric(self) -> str: ...

    @property
    def output(self) -> str:
        """The model output the task reads."""
        ...

    def score(self, outputs: np.ndarray) -> dict[str, float]:
        """The task metric (first) and any others, over the whole evaluation set."""
        ...

    def agreement(self, reference: np.ndarray, outputs: np.ndarray) -> float:
        """How often the variant answers what the source model answers, 0..1."""
        ...


def _output(outputs: tuple[TensorSpec, ...], rank: int, what: str) -> str:
    name = next((o.name for o in outputs if o.dtype.kind == "f" and len(o.shape) == rank), None)
    if name is None:
        raise BuildError(f"the eval data holds {what}, but the model has no float output of rank {rank} to score")
    return name


def task_of(truth: dict[str, np.ndarray], outputs: tuple[TensorSpec, ...]) -> Task | None:
    """The task the truth arrays name, bound to the model output it scores; None without truth."""
    if LABELS in truth:
        return Classification(_output(outputs, 2, "class 'labels'"), truth[LABELS])
    if TEXTS in truth:
        ignore = truth.get(IGNORE, np.zeros(0, np.int64))
        return Recognition(_output(outputs, 3, "CTC 'texts'"), truth[TEXTS], frozenset(int(i) for i in ignore))
    if BOXES in truth:
        return Detection(_output(outputs, 4, "text 'boxes'"), truth[BOXES])
    return None


# --- classification -------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    output: str
    labels: np.ndarray
    metric: str = "top1"

    def score(self, outputs: np.ndarray) -> dict[str, float]:
        return {self.metric: float(np.mean(outputs.argmax(axis=1) == self.labels))}

    def agreement(self, reference: np.ndarray, outputs: np.ndarray) -> float:
        return same_class(reference, outputs)


def same_class(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Share of samples whose top class is the reference's."""
    return float(np.mean(outputs.argmax(axis=1) == reference.argmax(axis=1)))


# --- CTC recognition -------------------------------------------------------------


@dataclass(frozen=True)
class Recognition:
    output: str
    texts: np.ndarray
    ignore: frozenset[int]
    metric: str = "exact_match"

    def decode(self, outputs: np.ndarray) -> list[tuple[int, ...]]:
        """Greedy CTC: the best class per step, repeats merged, blanks (class 0) and ignored classes dropped."""
        best = outputs.argmax(axis=2)
        decoded = []
        for row in best:
            keep = np.ones(len(row), dtype=bool)
            keep[1:] = row[1:] != row[:-1]
            decoded.append(tuple(int(c) for c in row[keep] if c != 0 and c not in self.ignore))
        return decoded

    def score(self, outputs: np.ndarray) -> dict[str, float]:
        truth = [tuple(int(c) for c in row if c >= 0 and c not in self.ignore) for row in self.texts]
        got = self.decode(outputs)
        errors = sum(edit_distance(g, t) for g, t in zip(got, truth, strict=True))
        return {
            self.metric: float(np.mean([g == t for g, t in zip(got, truth, strict=True)])),
            "cer": errors / max(1, sum(len(t) for t in truth)),
        }

    def agreement(self, reference: np.ndarray, outputs: np.ndarray) -> float:
        return float(np.mean([a == b for a, b in zip(self.decode(reference), self.decode(outputs), strict=True)]))


def edit_distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between two sequences."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


# --- text detection ---------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    output: str
    boxes: np.ndarray
    metric: str = "box_f1"

    def score(self, outputs: np.ndarray) -> dict[str, float]:
        truth = [b[b[:, 0] >= 0] for b in self.boxes]
        return {self.metric: box_f1([db_boxes(p[0]) for p in outputs], truth)}

    def agreement(self, reference: np.ndarray, outputs: np.ndarray) -> float:
        return box_f1([db_boxes(p[0]) for p in outputs], [db_boxes(p[0]) for p in reference])


def db_boxes(probability: np.ndarray) -> np.ndarray:
    """DBNet's postprocess, axis-aligned: threshold the map, take connected regions whose mean
    probability is high enough, and grow each box by the region's area x unclip / perimeter
    (DB predicts a shrunk text kernel). Returns [K,4] x0,y0,x1,y1."""
    from scipy import ndimage

    height, width = probability.shape
    regions, _ = ndimage.label(probability > DB_THRESHOLD)
    boxes = []
    for index, found in enumerate(ndimage.find_objects(regions), 1):
        if found is None:
            continue
        rows, cols = found
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if min(h, w) < DB_MIN_SIDE or probability[found][regions[found] == index].mean() < DB_BOX_THRESHOLD:
            continue
        grow = h * w * DB_UNCLIP / (2 * (h + w))
        boxes.append((max(0.0, cols.start - grow), max(0.0, rows.start - grow),
                      min(float(width), cols.stop + grow), min(float(height), rows.stop + grow)))
    return np.array(boxes, dtype=np.float32).reshape(-1, 4)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [K,4] with every box in b [M,4]."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / np.maximum(_area(a)[:, None] + _area(b)[None, :] - inter, 1e-9)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_f1(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """F1 over all images: boxes matched one-to-one, greedily by IoU, at IoU >= 0.5."""
    matched = predicted = expected = 0
    for got, want in zip(found, truth, strict=True):
        predicted, expected = predicted + len(got), expected + len(want)
        if not len(got) or not len(want):
            continue
        iou = _iou(got, want)
        while iou.size and iou.max() >= IOU_MATCH:
            i, j = np.unravel_index(iou.argmax(), iou.shape)
            matched += 1
            iou[i, :], iou[:, j] = 0, 0
    if predicted + expected == 0:
        return 1.0
    return 2 * matched / (predicted + expected)
