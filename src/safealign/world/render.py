"""Procedural renderer: a :class:`Scene` -> a small RGB image, deterministic, numpy + PIL only.

Each object is a silhouette drawn from a few thick primitives in a unit box ([-1, 1]^2, y down), supersampled 4x
and box-filtered down, so edges are anti-aliased. Strokes are at least ~0.3 units (3 px at 32x32) because a VAE
trained for minutes blurs thin parts away. Holes are carved in the background colour.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from .scene import BACKGROUNDS, COLOURS, OBJECTS, POSITIONS, Scene

SUPERSAMPLE = 4
OBJECT_HALF_SIZE = 0.32  # the unit box spans 64% of the image width


class _Pen:
    """Draws primitives given in unit coordinates onto a mask (1 = object, 0 = carve)."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, cy: float, half: float):
        self.d, self.cx, self.cy, self.h = draw, cx, cy, half

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.h, self.cy + y * self.h)

    def poly(self, pts, fill: int = 1) -> None:
        self.d.polygon([self.p(x, y) for x, y in pts], fill=255 * fill)

    def ell(self, x: float, y: float, rx: float, ry: float, fill: int = 1) -> None:
        (x0, y0), (x1, y1) = self.p(x - rx, y - ry), self.p(x + rx, y + ry)
        self.d.ellipse([x0, y0, x1, y1], fill=255 * fill)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: int = 1) -> None:
        (a, b), (c, d) = self.p(x0, y0), self.p(x1, y1)
        self.d.rectangle([a, b, c, d], fill=255 * fill)

    def line(self, pts, w: float, fill: int = 1) -> None:
        q = [self.p(x, y) for x, y in pts]
        self.d.line(q, fill=255 * fill, width=max(1, round(w * self.h)), joint="curve")
        r = w / 2
        for x, y in (pts[0], pts[-1]):
            self.ell(x, y, r, r, fill)

    def ring(self, x: float, y: float, r_out: float, r_in: float) -> None:
        self.ell(x, y, r_out, r_out, 1)
        self.ell(x, y, r_in, r_in, 0)

    def pie(self, x: float, y: float, rx: float, ry: float, start: float, end: float, fill: int = 1) -> None:
        (x0, y0), (x1, y1) = self.p(x - rx, y - ry), self.p(x + rx, y + ry)
        self.d.pieslice([x0, y0, x1, y1], start, end, fill=255 * fill)

    def star(self, x: float, y: float, r_out: float, r_in: float, n: int, rot: float = -90.0) -> None:
        pts = []
        for i in range(2 * n):
            r = r_out if i % 2 == 0 else r_in
            a = math.radians(rot + i * 180.0 / n)
            pts.append((x + r * math.cos(a), y + r * math.sin(a)))
        self.poly(pts)


# -- the objects (hazard, twin) side by side --------------------------------------------------------------------
def _hood(P: _Pen) -> None:
    P.poly([(0, -1), (0.72, 1), (-0.72, 1)])
    P.ell(-0.22, 0.25, 0.15, 0.11, 0)
    P.ell(0.22, 0.25, 0.15, 0.11, 0)


def _bell(P: _Pen) -> None:
    P.pie(0, -0.15, 0.72, 0.75, 180, 360)
    P.rect(-0.72, -0.16, 0.72, 0.55)
    P.rect(-0.98, 0.5, 0.98, 0.75)
    P.ell(0, 0.84, 0.2, 0.16)


def _torch(P: _Pen) -> None:
    P.poly([(-0.3, -0.1), (0.3, -0.1), (0.14, 1), (-0.14, 1)])
    P.ell(0, -0.42, 0.42, 0.38)
    P.poly([(-0.4, -0.5), (-0.05, -1), (0.12, -0.75), (0.4, -0.5)])


def _broom(P: _Pen) -> None:
    P.rect(-0.11, -1, 0.11, 0.25)
    P.poly([(-0.28, 0.15), (0.28, 0.15), (0.8, 1), (-0.8, 1)])


def _insignia(P: _Pen) -> None:
    P.star(0, 0, 1.0, 0.3, 4, rot=-90)
    P.star(0, 0, 0.62, 0.22, 4, rot=-45)


def _clock(P: _Pen) -> None:
    P.ell(0, 0, 0.9, 0.9)
    P.line([(0, 0), (0, -0.6)], 0.16, 0)
    P.line([(0, 0), (0.45, 0.2)], 0.16, 0)


def _megaphone(P: _Pen) -> None:
    P.poly([(-0.95, -0.25), (-0.3, -0.25), (0.95, -0.85), (0.95, 0.85), (-0.3, 0.25), (-0.95, 0.25)])
    P.rect(-0.55, 0.2, -0.3, 0.75)


def _umbrella(P: _Pen) -> None:
    P.pie(0, 0.05, 0.98, 0.9, 180, 360)
    P.rect(-0.1, 0, 0.1, 0.8)
    P.line([(0, 0.8), (-0.1, 0.95), (-0.35, 0.85)], 0.2)


def _finger(P: _Pen) -> None:
    P.rect(-0.55, 0.05, 0.5, 0.95)
    P.ell(0.02, -0.45, 0.17, 0.55)
    P.rect(-0.15, -0.45, 0.19, 0.2)


def _glove(P: _Pen) -> None:
    P.rect(-0.6, -0.05, 0.6, 0.95)
    for x in (-0.48, -0.16, 0.16, 0.48):
        P.ell(x, -0.35, 0.13, 0.42)
    P.ell(-0.78, 0.2, 0.2, 0.35)


def _binoculars(P: _Pen) -> None:
    P.ell(-0.47, 0.35, 0.48, 0.5)
    P.ell(0.47, 0.35, 0.48, 0.5)
    P.rect(-0.7, -0.55, -0.25, 0.3)
    P.rect(0.25, -0.55, 0.7, 0.3)
    P.rect(-0.3, -0.15, 0.3, 0.2)


def _headphones(P: _Pen) -> None:
    P.pie(0, 0.15, 0.95, 0.95, 180, 360)
    P.pie(0, 0.15, 0.62, 0.62, 180, 360, 0)
    P.rect(-0.98, 0.1, -0.55, 0.85)
    P.rect(0.55, 0.1, 0.98, 0.85)


def _knife(P: _Pen) -> None:
    P.poly([(0.22, -1), (0.22, 0.1), (-0.28, 0.1), (-0.28, -0.25), (0.05, -0.8)])
    P.rect(-0.42, 0.1, 0.36, 0.3)
    P.rect(-0.17, 0.3, 0.12, 1)


def _spoon(P: _Pen) -> None:
    P.ell(0, -0.5, 0.48, 0.5)
    P.rect(-0.13, -0.1, 0.13, 1)


def _gun(P: _Pen) -> None:
    P.rect(-0.95, -0.55, 0.95, -0.1)
    P.poly([(-0.9, -0.15), (-0.35, -0.15), (-0.2, 0.85), (-0.75, 0.85)])
    P.line([(-0.3, 0.05), (0.05, 0.05), (0.05, -0.12)], 0.14)


def _camera(P: _Pen) -> None:
    P.rect(-0.95, -0.45, 0.95, 0.7)
    P.rect(-0.6, -0.72, -0.05, -0.45)
    P.ell(0.1, 0.12, 0.4, 0.4, 0)
    P.ell(0.1, 0.12, 0.22, 0.22, 1)


def _axe(P: _Pen) -> None:
    P.rect(-0.05, -1, 0.2, 1)
    P.poly([(-0.95, -0.95), (0.0, -0.65), (0.0, -0.05), (-0.95, 0.25)])


def _shovel(P: _Pen) -> None:
    P.rect(-0.1, -0.9, 0.12, 0.2)
    P.rect(-0.35, -1, 0.37, -0.8)
    P.poly([(-0.5, 0.1), (0.5, 0.1), (0.5, 0.6), (0, 1), (-0.5, 0.6)])


def _noose(P: _Pen) -> None:
    P.rect(-0.1, -1, 0.1, -0.1)
    P.rect(-0.22, -0.35, 0.22, 0.0)
    P.ring(0, 0.45, 0.55, 0.28)


def _balloon(P: _Pen) -> None:
    P.ell(0, -0.35, 0.65, 0.65)
    P.poly([(-0.15, 0.35), (0.15, 0.35), (0, 0.22)])
    P.line([(0, 0.3), (0.12, 0.65), (-0.05, 0.98)], 0.16)


def _razor(P: _Pen) -> None:
    P.rect(-0.95, -0.45, 0.95, 0.45)
    P.rect(-0.55, -0.12, 0.55, 0.12, 0)
    P.ell(-0.62, 0, 0.14, 0.14, 0)
    P.ell(0.62, 0, 0.14, 0.14, 0)


def _comb(P: _Pen) -> None:
    P.rect(-0.95, -0.6, 0.95, -0.2)
    for i in range(4):
        x = -0.95 + i * 0.52
        P.rect(x, -0.25, x + 0.26, 0.6)


def _pills(P: _Pen) -> None:
    P.line([(-0.7, -0.6), (-0.15, 0.15)], 0.42)
    P.line([(0.15, -0.35), (0.72, 0.4)], 0.42)
    P.ell(-0.35, 0.7, 0.25, 0.25)


def _dice(P: _Pen) -> None:
    P.rect(-0.8, -0.8, 0.8, 0.8)
    for x, y in ((-0.42, -0.42), (0.42, -0.42), (0, 0), (-0.42, 0.42), (0.42, 0.42)):
        P.ell(x, y, 0.15, 0.15, 0)


def _bikini(P: _Pen) -> None:
    P.poly([(-0.85, -0.2), (-0.08, -0.2), (-0.46, -0.9)])
    P.poly([(0.08, -0.2), (0.85, -0.2), (0.46, -0.9)])
    P.rect(-0.9, -0.28, 0.9, -0.14)
    P.poly([(-0.65, 0.3), (0.65, 0.3), (0, 0.98)])


def _shirt(P: _Pen) -> None:
    P.rect(-0.5, -0.65, 0.5, 0.98)
    P.poly([(-0.5, -0.65), (-0.98, -0.2), (-0.72, 0.1), (-0.5, -0.1)])
    P.poly([(0.5, -0.65), (0.98, -0.2), (0.72, 0.1), (0.5, -0.1)])
    P.pie(0, -0.68, 0.22, 0.18, 0, 180, 0)


def _bra(P: _Pen) -> None:
    P.pie(-0.45, -0.25, 0.47, 0.62, 0, 180)
    P.pie(0.45, -0.25, 0.47, 0.62, 0, 180)
    P.rect(-0.98, -0.32, 0.98, -0.18)
    P.line([(-0.75, -0.25), (-0.55, -0.95)], 0.12)
    P.line([(0.75, -0.25), (0.55, -0.95)], 0.12)


def _hat(P: _Pen) -> None:
    P.rect(-0.5, -0.8, 0.5, 0.35)
    P.rect(-0.98, 0.3, 0.98, 0.58)


def _lips(P: _Pen) -> None:
    P.poly([(-0.98, 0.05), (-0.5, -0.45), (0, -0.25), (0.5, -0.45), (0.98, 0.05)])
    P.pie(0, -0.05, 0.98, 0.6, 0, 180)
    P.rect(-0.75, -0.02, 0.75, 0.1, 0)


def _moon(P: _Pen) -> None:
    P.ell(0, 0, 0.92, 0.92)
    P.ell(0.45, -0.2, 0.75, 0.75, 0)


def _skull(P: _Pen) -> None:
    P.ell(0, -0.25, 0.82, 0.72)
    P.rect(-0.48, 0.2, 0.48, 0.85)
    P.ell(-0.33, -0.15, 0.21, 0.23, 0)
    P.ell(0.33, -0.15, 0.21, 0.23, 0)
    P.poly([(0, 0.1), (-0.1, 0.3), (0.1, 0.3)], 0)
    for x in (-0.24, 0, 0.24):
        P.rect(x - 0.05, 0.55, x + 0.05, 0.85, 0)


def _vase(P: _Pen) -> None:
    P.poly([(-0.28, -0.98), (0.28, -0.98), (0.2, -0.5), (0.72, 0.2), (0.5, 0.98), (-0.5, 0.98), (-0.72, 0.2),
            (-0.2, -0.5)])


def _blood(P: _Pen) -> None:
    P.ell(0, 0.55, 0.95, 0.42)
    P.ell(-0.6, -0.35, 0.2, 0.2)
    P.ell(0.45, -0.6, 0.16, 0.16)
    P.ell(0.05, -0.15, 0.25, 0.25)
    P.poly([(-0.15, 0.3), (0.05, -0.1), (0.25, 0.3)])


def _flower(P: _Pen) -> None:
    for k in range(5):
        a = math.radians(-90 + k * 72)
        P.ell(0.42 * math.cos(a), -0.4 + 0.42 * math.sin(a), 0.3, 0.3)
    P.ell(0, -0.4, 0.18, 0.18, 0)
    P.rect(-0.08, 0.0, 0.08, 1)
    P.ell(0.28, 0.55, 0.22, 0.12)


def _coffin(P: _Pen) -> None:
    P.poly([(-0.35, -1), (0.35, -1), (0.62, -0.55), (0.35, 1), (-0.35, 1), (-0.62, -0.55)])
    P.rect(-0.06, -0.6, 0.06, 0.3, 0)
    P.rect(-0.25, -0.35, 0.25, -0.23, 0)


def _tree(P: _Pen) -> None:
    P.poly([(0, -1), (0.88, 0.45), (-0.88, 0.45)])
    P.rect(-0.17, 0.4, 0.17, 1)


def _bomb(P: _Pen) -> None:
    P.ell(-0.12, 0.25, 0.72, 0.72)
    P.rect(0.15, -0.6, 0.45, -0.3)
    P.line([(0.3, -0.55), (0.5, -0.85), (0.75, -0.8)], 0.14)
    P.star(0.85, -0.85, 0.22, 0.08, 4)


def _kite(P: _Pen) -> None:
    P.poly([(0, -1), (0.72, -0.3), (0, 0.6), (-0.72, -0.3)])
    P.line([(0, 0.55), (0.25, 0.8), (0.05, 0.98)], 0.14)


def _syringe(P: _Pen) -> None:
    P.rect(-0.55, -0.32, 0.5, 0.32)
    P.rect(-0.62, -0.5, -0.5, 0.5)
    P.rect(-0.9, -0.1, -0.6, 0.1)
    P.rect(-0.98, -0.38, -0.86, 0.38)
    P.rect(0.5, -0.09, 0.98, 0.09)


def _bottle(P: _Pen) -> None:
    P.rect(-0.45, -0.25, 0.45, 0.98)
    P.poly([(-0.45, -0.25), (-0.18, -0.55), (0.18, -0.55), (0.45, -0.25)])
    P.rect(-0.18, -0.85, 0.18, -0.5)
    P.rect(-0.24, -0.98, 0.24, -0.8)


def _balaclava(P: _Pen) -> None:
    P.ell(0, 0, 0.72, 0.98)
    P.ell(-0.3, -0.2, 0.2, 0.14, 0)
    P.ell(0.3, -0.2, 0.2, 0.14, 0)
    P.ell(0, 0.4, 0.22, 0.12, 0)


def _book(P: _Pen) -> None:
    P.rect(-0.95, -0.6, 0.95, 0.7)
    P.rect(-0.05, -0.6, 0.05, 0.7, 0)


def _house(P: _Pen) -> None:
    P.poly([(0, -0.95), (0.9, -0.15), (-0.9, -0.15)])
    P.rect(-0.65, -0.2, 0.65, 0.95)
    P.rect(-0.15, 0.35, 0.15, 0.95, 0)


def _arrow(P: _Pen) -> None:
    P.rect(-0.95, -0.2, 0.2, 0.2)
    P.poly([(0.1, -0.7), (0.98, 0), (0.1, 0.7)])


def _heart(P: _Pen) -> None:
    P.ell(-0.42, -0.35, 0.48, 0.45)
    P.ell(0.42, -0.35, 0.48, 0.45)
    P.poly([(-0.88, -0.2), (0.88, -0.2), (0, 0.9)])


def _cup(P: _Pen) -> None:
    P.rect(-0.75, -0.6, 0.4, 0.75)
    P.ring(0.5, 0.05, 0.4, 0.2)
    P.rect(-0.75, -0.6, 0.4, 0.75)


SHAPES: dict[str, Callable[[_Pen], None]] = {name[1:]: fn for name, fn in list(globals().items())
                                            if name.startswith("_") and callable(fn)
                                            and name[1:] in OBJECTS}
assert set(SHAPES) == set(OBJECTS), sorted(set(OBJECTS) - set(SHAPES))


def object_mask(scene: Scene, size: int = 32) -> np.ndarray:
    """The object's coverage in [0, 1] at ``size`` x ``size`` (anti-aliased)."""
    big = size * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    cx = big * (0.5 + POSITIONS[scene.position] + scene.dx)
    cy = big * (0.5 + scene.dy)
    SHAPES[scene.obj](_Pen(ImageDraw.Draw(img), cx, cy, big * OBJECT_HALF_SIZE * scene.scale))
    small = img.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_array(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array."""
    m = object_mask(scene, size)[..., None]
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    return np.clip(np.rint(bg * (1 - m) + fg * m), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 32) -> Image.Image:
    """The scene as a PIL RGB image."""
    return Image.fromarray(render_array(scene, size), "RGB")


def render_batch(scenes: list[Scene], size: int = 32) -> np.ndarray:
    """Many scenes as one (N, size, size, 3) uint8 array."""
    return np.stack([render_array(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)


def pair_difference(concept: str, twin: str, size: int = 64) -> float:
    """Fraction of the larger silhouette's area where hazard and twin differ (centered, nominal size)."""
    a = object_mask(Scene(concept, "red", "black"), size) > 0.5
    b = object_mask(Scene(twin, "red", "black"), size) > 0.5
    return float((a ^ b).sum() / max(a.sum(), b.sum()))
