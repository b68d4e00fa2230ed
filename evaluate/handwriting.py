"""Handwritten digits for the synthetic world: pen strokes along a skeleton of each digit.

A digit is one or two strokes through a few points of the unit square (:func:`skeleton`, with the
variants people write: a 1 with or without its flag and foot, an open or closed 4, a crossed 7).
:func:`digit_mask` jitters the points, slants, squeezes and turns the whole digit, draws the strokes
as a smooth pen line of random width and centres the ink in a box it mostly fills, as a form's box
is filled. ``scan=True`` then does what the UCI optdigits forms went through (and so scikit-learn's
``digits``, which this project never draws from): a 32x32 bitmap counted in 4x4 blocks into an 8x8
grid of 0..16, shown enlarged with bicubic interpolation.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Point = tuple[float, float]


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, turn: float, n: int) -> list[Point]:
    """``n + 1`` points along an ellipse from angle ``start`` through ``turn`` radians (y points down)."""
    return [(cx + rx * math.cos(start + turn * k / n), cy + ry * math.sin(start + turn * k / n)) for k in range(n + 1)]


def skeleton(digit: str, rng: random.Random) -> list[list[Point]]:
    """The strokes of ``digit`` in the unit square (x right, y down), in one of its written forms."""
    if digit == "0":
        return [_arc(0.5, 0.5, rng.uniform(0.22, 0.32), 0.4, -math.pi / 2, 2 * math.pi, 16)]
    if digit == "1":
        strokes = [[(0.5, 0.1), (0.5, 0.9)]]
        if rng.random() < 0.5:
            strokes[0].insert(0, (0.33, 0.28))
        if rng.random() < 0.3:
            strokes.append([(0.35, 0.9), (0.65, 0.9)])
        return strokes
    if digit == "2":
        return [
            [(0.25, 0.3), (0.35, 0.13), (0.55, 0.08), (0.72, 0.2), (0.72, 0.38), (0.5, 0.6), (0.25, 0.88), (0.8, 0.88)]
        ]
    if digit == "3":
        return [
            [
                (0.25, 0.15),
                (0.5, 0.08),
                (0.72, 0.2),
                (0.68, 0.38),
                (0.45, 0.48),
                (0.7, 0.58),
                (0.74, 0.78),
                (0.5, 0.92),
                (0.25, 0.85),
            ]
        ]
    if digit == "4":
        if rng.random() < 0.5:
            return [[(0.62, 0.92), (0.62, 0.1), (0.2, 0.62), (0.8, 0.62)]]
        return [[(0.3, 0.1), (0.22, 0.58), (0.8, 0.58)], [(0.64, 0.22), (0.64, 0.92)]]
    if digit == "5":
        return [
            [(0.72, 0.1), (0.32, 0.1), (0.28, 0.45), (0.5, 0.4), (0.7, 0.5), (0.74, 0.72), (0.55, 0.9), (0.28, 0.85)]
        ]
    if digit == "6":
        return [
            [
                (0.68, 0.1),
                (0.45, 0.2),
                (0.3, 0.45),
                (0.28, 0.7),
                (0.4, 0.9),
                (0.6, 0.9),
                (0.72, 0.72),
                (0.62, 0.52),
                (0.42, 0.52),
                (0.3, 0.65),
            ]
        ]
    if digit == "7":
        strokes = [[(0.22, 0.12), (0.78, 0.12), (0.5, 0.55), (0.42, 0.9)]]
        if rng.random() < 0.3:
            strokes.append([(0.4, 0.5), (0.7, 0.5)])
        return strokes
    if digit == "8":
        return [
            _arc(0.5, 0.3, 0.18, 0.2, math.pi / 2, 2 * math.pi, 12),
            _arc(0.5, 0.7, 0.23, 0.2, -math.pi / 2, 2 * math.pi, 12),
        ]
    if digit == "9":
        return [_arc(0.48, 0.32, 0.2, 0.2, 0.0, 2 * math.pi, 14), [(0.68, 0.3), (0.66, 0.6), (0.58, 0.9)]]
    raise ValueError(f"no skeleton for digit {digit!r}")


def _smooth(points: list[Point], per_segment: int = 6) -> list[Point]:
    """A Catmull-Rom curve through ``points`` (a pen does not turn corners sharply)."""
    if len(points) < 3:
        return points
    p = [points[0], *points, points[-1]]
    out = []
    for i in range(1, len(p) - 2):
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = p[i - 1], p[i], p[i + 1], p[i + 2]
        for k in range(per_segment):
            t = k / per_segment
            a, b, c = (2 * t * t - t**3 - t) / 2, (3 * t**3 - 5 * t * t + 2) / 2, (-3 * t**3 + 4 * t * t + t) / 2
            d = (t**3 - t * t) / 2
            out.append((a * x0 + b * x1 + c * x2 + d * x3, a * y0 + b * y1 + c * y2 + d * y3))
    out.append(points[-1])
    return out


def _ink(digit: str, rng: random.Random, canvas: int = 128) -> Image.Image:
    """The digit's strokes, white on black, on a ``canvas``-pixel square."""
    shear, sx, sy = rng.uniform(-0.3, 0.25), rng.uniform(0.75, 1.05), rng.uniform(0.85, 1.05)
    angle = math.radians(rng.uniform(-12, 12))
    ca, sa = math.cos(angle), math.sin(angle)
    jitter = rng.uniform(0.015, 0.045)
    width = max(1, int(canvas * rng.uniform(0.07, 0.17)))
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    for stroke in skeleton(digit, rng):
        pts = []
        for x, y in stroke:
            x, y = x - 0.5 + rng.gauss(0, jitter), y - 0.5 + rng.gauss(0, jitter)
            x, y = (x + shear * y) * sx, y * sy
            pts.append(((x * ca - y * sa) * 0.8 * canvas + canvas / 2, (x * sa + y * ca) * 0.8 * canvas + canvas / 2))
        pts = _smooth(pts)
        draw.line(pts, fill=255, width=width, joint="curve")
        r = width / 2
        for x, y in (pts[0], pts[-1]):  # round pen ends
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return img


def _boxed(ink: Image.Image, margin: float) -> Image.Image:
    """The ink centred in a square that fits it with ``margin`` (a share of its longer side) around."""
    box = ink.getbbox()
    if box is None:
        return ink
    ink = ink.crop(box)
    side = int(max(ink.size) * (1 + margin))
    out = Image.new("L", (side, side), 0)
    out.paste(ink, ((side - ink.width) // 2, (side - ink.height) // 2))
    return out


def digit_mask(digit: str, rng: random.Random, side: int, scan: bool = False) -> Image.Image:
    """An ``L`` mask of ``side`` x ``side`` pixels: 255 where the pen wrote ``digit``."""
    ink = _boxed(_ink(digit, rng), rng.uniform(0.0, 0.1) if scan else rng.uniform(0.1, 0.45))
    if scan:
        bits = np.asarray(ink.resize((32, 32), Image.Resampling.BILINEAR)) > 127
        counts = bits.reshape(8, 4, 8, 4).sum(axis=(1, 3))  # 0..16 per cell
        # a pen writes full ink: a cell that is mostly ink prints as ink, as on the scanned forms
        small = Image.fromarray(np.minimum(255, counts * (255 / 6)).round().astype(np.uint8), "L")
        return small.resize((side, side), Image.Resampling.BICUBIC)
    mask = ink.resize((side, side), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * side / 64))
    return mask
