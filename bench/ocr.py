"""Real pretrained models: PP-OCR's classifier, detector and recognizer, with rendered, labelled sets.

No model hub is touched: ``rapidocr-onnxruntime`` 1.4.4 on PyPI carries the three
ONNX files inside its wheel. ``fetch`` downloads that wheel with pip (no
dependencies; its sha256 is pinned here) and extracts only the models.
``make models`` runs it, so the test suite and the demo never download.

The sets are drawn with Pillow, deterministically from a seed, in several fonts,
sizes, contrasts, noise and blur, and carry what each task needs as truth:

    cls  input x float32 [N,3,48,192]   labels int64 [N]   0 = upright, 1 = turned 180 degrees
    rec  input x float32 [N,3,48,320]   texts  int64 [N,L] class indices of the true string, -1 padded;
                                        ignore int64 [1] the space class, which the metric leaves out
    det  input x float32 [N,3,H,W]      boxes  float32 [N,K,4] true line boxes x0,y0,x1,y1 in pixels, -1 padded:
                                        the ink's width and the font's line height (ascenders to descenders),
                                        with a margin of a tenth of that height

    python -m bench.ocr fetch CACHE       # download and extract the models (make models)
    python -m bench.ocr sets CACHE        # also render the full evaluation and calibration sets
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .models import _atomic_write, _save_npz

WHEEL = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
WHEEL_REQUIREMENT = "rapidocr-onnxruntime==1.4.4"
WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
MODEL_DIR = "rapidocr-1.4.4"
MODELS = {
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
}
INPUT = "x"  # every PP-OCR export names its input x
SETS_VERSION = "ocr-sets-v3"  # bump when the renderer changes: cached sets under the old name are ignored
SEED = 20261130

CLS_SHAPE = (48, 192)
REC_SHAPE = (48, 320)
DET_SHAPE = (320, 320)
# Counts of the full sets the benchmark uses; tests ask for fewer.
FULL = {"cls": (400, 64), "rec": (200, 32), "det": (48, 12)}  # (eval, calibration)

LABEL_MARGIN = 0.1  # a labelled box leaves this share of the line height around the text, as annotators do
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
    "LiberationSans-Regular.ttf", "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf",
)
WORDS = (
    "invoice", "total", "order", "serial", "batch", "model", "station", "gate", "north", "south",
    "exit", "parking", "level", "motor", "sensor", "camera", "delivery", "label", "price", "weight",
    "Pump", "Valve", "Line", "Zone", "Bay", "Dock", "Unit", "Cell", "Rack", "Bin",
)


class FetchError(Exception):
    """The models could not be fetched; one line says why and what to do."""


@dataclass(frozen=True)
class TaskSet:
    """One task's files: the model, the held-out set with truth, the calibration set."""

    model: Path
    eval_data: Path
    calibration_data: Path


# --- the models -----------------------------------------------------------------


def model_paths(cache: Path) -> dict[str, Path]:
    return {task: Path(cache) / MODEL_DIR / name for task, name in MODELS.items()}


def fetch(cache: Path) -> dict[str, Path]:
    """The three models under CACHE, downloaded from PyPI with pip when missing."""
    paths = model_paths(cache)
    if all(p.is_file() for p in paths.values()):
        return paths
    wheels = Path(cache) / "wheels"
    wheel = wheels / WHEEL
    if not wheel.is_file():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", str(wheels), WHEEL_REQUIREMENT],
            capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"pip download {WHEEL_REQUIREMENT} failed: {last}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise FetchError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it and fetch again")
    with zipfile.ZipFile(wheel) as archive:
        for task, path in paths.items():
            _extract(archive, f"rapidocr_onnxruntime/models/{MODELS[task]}", path)
    return paths


def _extract(archive: zipfile.ZipFile, member: str, path: Path) -> None:
    data = archive.read(member)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    _atomic_write(path, write)


def charset(rec_model: Path) -> list[str]:
    """The recognizer's classes: CTC blank, its dictionary (model metadata ``character``), then space."""
    import onnx

    model = onnx.load(str(rec_model), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


# --- rendering ------------------------------------------------------------------


def fonts() -> list[Path]:
    """The TrueType fonts used, in a fixed order; Pillow's own font when the machine has none."""
    return [d / f for f in FONT_FILES for d in FONT_DIRS if (d / f).is_file()]


class _Renderer:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self._files = fonts()

    def _font(self, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        if not self._files:
            return ImageFont.load_default(size)
        return ImageFont.truetype(str(self._files[self.rng.integers(len(self._files))]), size)

    def text(self) -> str:
        r = self.rng
        kind = r.integers(4)
        word = str(WORDS[r.integers(len(WORDS))])
        if kind == 0:
            return f"{word.upper()} {r.integers(10, 9999)}"
        if kind == 1:
            return f"{word} {r.integers(1, 99)}.{r.integers(0, 99):02d}"
        if kind == 2:
            return f"{chr(65 + r.integers(26))}{chr(65 + r.integers(26))}-{r.integers(100, 99999)}"
        return f"{word.capitalize()} {WORDS[r.integers(len(WORDS))]}"

    def line(self, text: str, height: int) -> np.ndarray:
        """A grey image [h, w] of one text line, cropped to the text with a small margin."""
        return self._line(text, height)[0]

    def _line(self, text: str, height: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The line image, and the rows (top, bottom) of the font's full line: ascenders to descenders,
        as a person labelling a text line draws its box whichever letters it holds."""
        r = self.rng
        font = self._font(int(height * r.uniform(0.55, 0.8)))
        ink, paper = self._contrast()
        measure = ImageDraw.Draw(Image.new("L", (1, 1)))
        x0, y0, x1, y1 = measure.textbbox((0, 0), text, font=font)
        _, top, _, bottom = measure.textbbox((0, 0), "Agjy", font=font)
        pad = int(r.integers(2, 8))
        image = Image.new("L", (int(x1 - x0) + 2 * pad, int(y1 - y0) + 2 * pad), paper)
        ImageDraw.Draw(image).text((pad - x0, pad - y0), text, fill=ink, font=font)
        return self._degrade(image), (int(pad - y0 + top), int(pad - y0 + bottom))

    def _contrast(self) -> tuple[int, int]:
        ink, paper = int(self.rng.integers(0, 90)), int(self.rng.integers(170, 256))
        return (paper, ink) if self.rng.random() < 0.15 else (ink, paper)  # some light-on-dark text

    def _degrade(self, image: Image.Image) -> np.ndarray:
        r = self.rng
        radius = float(r.choice([0.0, 0.0, 0.6, 1.0]))
        if radius:
            image = image.filter(ImageFilter.GaussianBlur(radius))
        pixels = np.asarray(image, dtype=np.float32) + r.normal(0.0, r.uniform(0.0, 12.0), image.size[::-1])
        return np.clip(pixels, 0, 255).astype(np.float32)

    def page(self, shape: tuple[int, int], lines: int) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
        """A grey page with up to ``lines`` text lines placed without overlap, and their boxes."""
        r = self.rng
        h, w = shape
        paper = float(r.integers(180, 256))
        page = np.full((h, w), paper, dtype=np.float32)
        boxes: list[tuple[float, float, float, float]] = []
        y = int(r.integers(4, 24))
        for _ in range(lines):
            crop, (top, bottom) = self._line(self.text(), int(r.integers(22, 40)))
            ch, cw = crop.shape
            if cw > w - 8:
                crop = crop[:, : w - 8]
                ch, cw = crop.shape
            if y + ch > h - 4:
                break
            x = int(r.integers(4, w - cw - 3))
            # lines are drawn on their own paper; blend it into the page's so only the ink shows
            ink = crop < crop.mean()
            region = page[y:y + ch, x:x + cw]
            region[ink] = crop[ink]
            cols = np.flatnonzero(ink.any(axis=0))
            margin = LABEL_MARGIN * (bottom - top)
            boxes.append((max(0.0, x + cols[0] - margin), max(0.0, y + top - margin),
                          min(float(w), x + cols[-1] + 1 + margin), min(float(h), y + bottom + margin)))
            y += ch + int(r.integers(6, 30))
        return page, boxes


def _normalize(grey: np.ndarray) -> np.ndarray:
    """PP-OCR's input: three equal channels scaled to [-1, 1] (grey, so BGR and RGB are the same)."""
    scaled = grey.astype(np.float32) / 127.5 - 1.0
    return np.repeat(scaled[np.newaxis], 3, axis=0)


def _fit(line: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a line to the model's height keeping its aspect, pad on the right as PP-OCR does."""
    h, w = shape
    width = min(w, max(1, int(np.ceil(h * line.shape[1] / line.shape[0]))))
    resized = np.asarray(Image.fromarray(line.astype(np.uint8)).resize((width, h), Image.Resampling.BILINEAR))
    out = np.zeros((3, h, w), dtype=np.float32)  # zero after normalization, as rapidocr pads
    out[:, :, :width] = _normalize(resized)
    return out


def render_cls(count: int, seed: int) -> dict[str, np.ndarray]:
    """Text lines, half of them turned 180 degrees; ``labels`` 0 upright, 1 turned."""
    r = _Renderer(seed)
    images, labels = [], []
    for i in range(count):
        line = r.line(r.text(), int(r.rng.integers(28, 64)))
        turned = i % 2
        images.append(_fit(line[::-1, ::-1] if turned else line, CLS_SHAPE))
        labels.append(turned)
    return {INPUT: np.stack(images), "labels": np.array(labels, dtype=np.int64)}


def render_rec(count: int, seed: int, classes: list[str]) -> dict[str, np.ndarray]:
    """Upright text lines; ``texts`` the class index of each true character, -1 padded."""
    index = {c: i for i, c in enumerate(classes)}
    r = _Renderer(seed)
    images, texts = [], []
    for _ in range(count):
        text = r.text()
        images.append(_fit(r.line(text, int(r.rng.integers(28, 64))), REC_SHAPE))
        texts.append([index[c] for c in text])
    width = max(len(t) for t in texts)
    padded = np.full((count, width), -1, dtype=np.int64)
    for i, t in enumerate(texts):
        padded[i, : len(t)] = t
    # PaddleOCR's own metric ignores spaces, which its Chinese recognizer seldom emits
    return {INPUT: np.stack(images), "texts": padded, "ignore": np.array([index[" "]], dtype=np.int64)}


def render_det(count: int, seed: int) -> dict[str, np.ndarray]:
    """Pages of one to four lines; ``boxes`` each line's ink box, -1 padded."""
    r = _Renderer(seed)
    pages, all_boxes = [], []
    for _ in range(count):
        page, boxes = r.page(DET_SHAPE, int(r.rng.integers(1, 5)))
        pages.append(_normalize(page))
        all_boxes.append(boxes)
    padded = np.full((count, max(len(b) for b in all_boxes), 4), -1.0, dtype=np.float32)
    for i, boxes in enumerate(all_boxes):
        padded[i, : len(boxes)] = boxes
    return {INPUT: np.stack(pages), "boxes": padded}


def task_set(cache: Path, task: str, eval_count: int, calibration_count: int) -> TaskSet:
    """The model and rendered sets of one task (cls, rec or det), cached by their counts.

    Evaluation and calibration sets come from different seeds: the variants are
    never scored on the samples they were calibrated on.
    """
    cache = Path(cache)
    model = fetch(cache)[task]
    stem = cache / f"{SETS_VERSION}-{task}"
    files = TaskSet(model, Path(f"{stem}-eval{eval_count}.npz"), Path(f"{stem}-calib{calibration_count}.npz"))
    wanted = ((files.eval_data, eval_count, SEED), (files.calibration_data, calibration_count, SEED + 1))
    for path, count, seed in wanted:
        if path.exists():
            continue
        if task == "cls":
            arrays = render_cls(count, seed)
        elif task == "rec":
            arrays = render_rec(count, seed, charset(model))
        else:
            arrays = render_det(count, seed)
        if path == files.calibration_data:
            arrays = {INPUT: arrays[INPUT]}
        _save_npz(arrays, path)
    return files


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("fetch", "sets"):
        print("usage: python -m bench.ocr fetch|sets CACHE", file=sys.stderr)
        return 2
    cache = Path(argv[1])
    try:
        paths = fetch(cache)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    made = list(paths.values())
    if argv[0] == "sets":
        for task, (eval_count, calibration_count) in FULL.items():
            made += [*vars(task_set(cache, task, eval_count, calibration_count)).values()][1:]
    for path in made:
        print(f"{path}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
