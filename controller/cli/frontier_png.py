"""``fleetctl models frontier --png``: the frontier drawn with Pillow, one panel per hardware class.

Pillow is optional (``pip install 'edgefleet[plot]'``): the table and JSON need nothing.
x is the devices' median p99 (ms), y the build's task metric; frontier points are
joined, the planner's pick is ringed, the floor is a dashed line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InvalidInput

PANEL_W, PANEL_H, MARGIN = 420, 300, 48


def draw(frontier: dict[str, Any], path: Path) -> None:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise InvalidInput("--png needs Pillow: pip install 'edgefleet[plot]'") from None
    classes = frontier["classes"]
    image = Image.new("RGB", (PANEL_W * max(1, len(classes)), PANEL_H + 24), "white")
    pen = ImageDraw.Draw(image)
    pen.text((8, 4), f"{frontier['model']}:{frontier['version']} latency/accuracy frontier", fill="black")
    for i, (cls, points) in enumerate(sorted(classes.items())):
        _panel(pen, i * PANEL_W, 24, cls, points, frontier.get("min_accuracy"))
    try:
        image.save(path, format="PNG")
    except OSError as e:
        raise InvalidInput(f"cannot write {path}: {e.strerror or e}") from None


def _panel(pen: Any, x0: int, y0: int, cls: str, points: list[dict[str, Any]], floor: float | None) -> None:
    timed = [p for p in points if p["p99_ms"] is not None and p["accuracy"] is not None]
    left, top, right, bottom = x0 + MARGIN, y0 + 20, x0 + PANEL_W - 16, y0 + PANEL_H - MARGIN
    pen.rectangle((left, top, right, bottom), outline="black")
    pen.text((x0 + MARGIN, y0 + 2), f"{cls}: p99 ms (x) vs accuracy (y)", fill="black")
    if not timed:
        pen.text((left + 8, top + 8), "no on-device evidence yet", fill="gray")
        return
    xs = [p["p99_ms"] for p in timed]
    ys = [p["accuracy"] for p in timed] + ([floor] if floor is not None else [])
    x_lo, x_hi = 0.0, max(xs) * 1.15
    y_lo, y_hi = min(ys) - 0.02, min(1.0, max(ys)) + 0.01

    def at(px: float, py: float) -> tuple[float, float]:
        return (left + (px - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (py - y_lo) / max(y_hi - y_lo, 1e-9) * (bottom - top))

    for label, value in (("0", x_lo), (f"{x_hi:.3g}", x_hi)):
        pen.text((at(value, y_lo)[0] - 6, bottom + 4), label, fill="black")
    for value in (y_lo, y_hi):
        pen.text((x0 + 4, at(x_lo, value)[1] - 6), f"{value:.3f}", fill="black")
    if floor is not None:
        _, fy = at(x_lo, floor)
        for fx in range(left, right, 10):
            pen.line((fx, fy, fx + 5, fy), fill="red")
    edge = sorted((p for p in timed if p["on_frontier"]), key=lambda p: p["p99_ms"])
    if len(edge) > 1:
        pen.line([at(p["p99_ms"], p["accuracy"]) for p in edge], fill="blue", width=2)
    for p in timed:
        cx, cy = at(p["p99_ms"], p["accuracy"])
        pen.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill="blue" if p["on_frontier"] else "gray")
        if p["picked"]:
            pen.ellipse((cx - 8, cy - 8, cx + 8, cy + 8), outline="green", width=2)
        pen.text((cx + 8, cy - 12), p["variant"] + (" (pick)" if p["picked"] else ""), fill="black")
