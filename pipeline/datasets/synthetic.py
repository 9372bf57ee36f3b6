"""A synthetic weakly-supervised localization data set with exact boxes and masks.

Why and how it is built: docs/synthetic_data.md. In short: K classes of objects on
cluttered backgrounds; every class shares one body (shape, texture and colour drawn from
the same distribution); the class is decided only by a small part (a bird's head, a
vehicle's roof sign), as the head is in CUB. A classifier therefore needs only the small
part, while the localization ground truth is the whole object: the gap WSOL is about.

Drawing is vectorised over a chunk of images: every shape is a soft-edged coverage map
on the pixel grid computed for all images of the chunk at once (numpy, float32).
Each chunk has its own random stream derived from (seed, family, split, chunk index), so
splits with the same seed differ, and sample i is the same whatever the shard size.
"""
from __future__ import annotations

import io
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.datasets.webdataset_writer import ShardWriter

# "plumage" is the pre-training family (a stand-in for ImageNet, docs/quality.md): the same
# birds, but the class is the plumage (body colour and pattern), so evidence covers the
# whole object, as it does for most ImageNet classes; the head is random. "species" is the
# second pre-training stand-in: every part co-varies with the class (body hue and
# pattern, head hue and pattern, as a species sets all of a bird's colours at once), so
# all of an object's patches carry class evidence, not one part.
FAMILIES = ("birds", "vehicles", "plumage", "species")
HUE_NAMES = (
    "red", "orange", "yellow", "lime", "green", "teal",
    "cyan", "azure", "blue", "violet", "magenta", "pink",
)  # fmt: skip
PATTERNS = {
    "birds": ("plain", "capped", "masked", "cheeked"),
    "vehicles": ("solid", "striped", "split", "ringed"),
    "plumage": ("plain", "barred", "streaked", "scaled"),
}
PATTERNS["species"] = PATTERNS["plumage"]
# The bird families and where each puts the class (see _draw_birds).
BIRD_EVIDENCE = {"birds": "head", "plumage": "plumage", "species": "whole"}
MAX_CLASSES = len(HUE_NAMES) * 4
_CHUNK = 128  # images drawn together; fixed, so samples do not depend on the shard size
_JPEG_QUALITY = 90
# Box area as a share of the image, drawn uniformly (the mask covers roughly half of it).
BOX_AREA_RANGE = (0.05, 0.60)


# ----------------------------------------------------------------------------- classes


def _class_layout(num_classes: int) -> tuple[int, int]:
    """(number of head patterns, number of hues) for ``num_classes``."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    patterns = 2 if num_classes <= 2 * len(HUE_NAMES) else 4
    return patterns, math.ceil(num_classes / patterns)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown synthetic family {family!r}: choose one of {', '.join(FAMILIES)}")


def class_attributes(family: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(hue in 0..1, pattern index) of the discriminative part of every class.

    Hues are spread evenly over the colour wheel, so neighbouring classes differ by at
    least 360/ceil(K/patterns) degrees; classes that share a hue differ by pattern.
    """
    _check_family(family)
    n_patterns, n_hues = _class_layout(num_classes)
    hue_idx = np.array([round(g * len(HUE_NAMES) / n_hues) % len(HUE_NAMES) for g in range(n_hues)])
    k = np.arange(num_classes)
    return hue_idx[k // n_patterns] / len(HUE_NAMES), k % n_patterns


def class_names(family: str = "birds", num_classes: int = 10) -> list[str]:
    """Names like ``red_capped``: the hue and pattern of the class's small part."""
    _check_family(family)
    n_patterns, n_hues = _class_layout(num_classes)
    hue_idx = [round(g * len(HUE_NAMES) / n_hues) % len(HUE_NAMES) for g in range(n_hues)]
    return [
        f"{HUE_NAMES[hue_idx[k // n_patterns]]}_{PATTERNS[family][k % n_patterns]}"
        for k in range(num_classes)
    ]


# ----------------------------------------------------------------------------- drawing


def _col(a) -> np.ndarray:
    """Per-image parameters (B,) -> (B, 1, 1) so they broadcast over the pixel grid."""
    return np.asarray(a, dtype=np.float32)[:, None, None]


def hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorised HSV (each in 0..1, same shape) -> RGB with a trailing axis of 3."""
    h, s, v = (np.asarray(x, dtype=np.float32) for x in (h, s, v))
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h * 6.0) % 6.0
        out.append(v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(out, axis=-1)


def _soft(dist_px: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) -> coverage with a one-pixel ramp."""
    return np.clip(0.5 - dist_px, 0.0, 1.0)


def _rotate(u, v, angle):
    c, s = np.cos(angle), np.sin(angle)
    return c * u + s * v, -s * u + c * v


def _ellipse(u, v, cu, cv, a, b, angle=None):
    """Approximate signed distance (in the units of u, v) to an ellipse."""
    du, dv = u - cu, v - cv
    if angle is not None:
        du, dv = _rotate(du, dv, angle)
    du, dv = du / a, dv / b
    f = np.sqrt(du * du + dv * dv) + 1e-6
    grad = np.sqrt((du / a) ** 2 + (dv / b) ** 2) / f + 1e-6
    return (f - 1.0) / grad


def _rounded_rect(u, v, cu, cv, hu, hv, r):
    qu = np.abs(u - cu) - hu + r
    qv = np.abs(v - cv) - hv + r
    outside = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2)
    return outside + np.minimum(np.maximum(qu, qv), 0) - r


def _capsule(x, y, x0, y0, x1, y1, half_width):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0.0, 1.0)
    return np.sqrt((x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2) - half_width


def _paint(img: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> None:
    """Composite ``color`` ((B,3) or (B,3,S,S)) over ``img`` (B,3,S,S) with coverage ``alpha``.

    Channels come first: broadcasting a length-3 last axis is several times slower.
    """
    if color.ndim == 2:
        color = color[:, :, None, None]
    img += alpha[:, None] * (color - img)


def _texture(color: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """(B,3) colour modulated by a (B,S,S) shade -> (B,3,S,S)."""
    return color[:, :, None, None] * shade[:, None].astype(np.float32)


def _value_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about -1..1 on a ``cells`` x ``cells`` lattice, (n, S, S)."""
    grid = rng.uniform(-1.0, 1.0, size=(n, cells + 1, cells + 1)).astype(np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size)
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    t = pos - i0.astype(np.float32)
    t = t * t * (3 - 2 * t)
    rows = grid[:, i0, :] * (1 - t)[None, :, None] + grid[:, i0 + 1, :] * t[None, :, None]
    return rows[:, :, i0] * (1 - t)[None, None, :] + rows[:, :, i0 + 1] * t[None, None, :]


@dataclass
class _Canvas:
    """The pixel grid (pixel centres) shared by every shape of a chunk."""

    size: int
    x: np.ndarray  # (1, S, S)
    y: np.ndarray

    @classmethod
    def make(cls, size: int) -> _Canvas:
        c = np.arange(size, dtype=np.float32) + 0.5
        return cls(size, c[None, None, :].repeat(size, 1), c[None, :, None].repeat(size, 2))


def _natural_background(rng, canvas: _Canvas, n: int) -> np.ndarray:
    """Foliage, sky, earth: smooth colour fields, leaves, twigs and a few bright berries."""
    s = canvas.size
    palette_h = rng.choice([0.08, 0.1, 0.22, 0.3, 0.33, 0.55, 0.58, 0.12], size=(n, 2))
    c1 = hsv_to_rgb(palette_h[:, 0], rng.uniform(0.2, 0.6, n), rng.uniform(0.3, 0.85, n))
    c2 = hsv_to_rgb(palette_h[:, 1], rng.uniform(0.2, 0.6, n), rng.uniform(0.3, 0.85, n))
    blend = np.clip(0.5 + 0.8 * _value_noise(rng, n, s, 2), 0, 1)[:, None]
    img = _texture(c1, 1 - blend[:, 0]) + _texture(c2, blend[:, 0])
    img *= (1 + 0.18 * _value_noise(rng, n, s, 5) + 0.08 * _value_noise(rng, n, s, 12))[:, None]
    # Twigs: long thin capsules of bark colour.
    for _ in range(3):
        on = rng.random(n) < 0.6
        x0, y0 = rng.uniform(-0.2, 1.2, (2, n)) * s
        ang = rng.uniform(0, np.pi, n)
        length = rng.uniform(0.3, 1.0, n) * s
        d = _capsule(canvas.x, canvas.y, _col(x0), _col(y0), _col(x0 + length * np.cos(ang)),
                     _col(y0 + length * np.sin(ang)), _col(rng.uniform(0.4, 1.6, n) * s / 64))
        bark = hsv_to_rgb(rng.uniform(0.05, 0.1, n), rng.uniform(0.3, 0.6, n), rng.uniform(0.15, 0.45, n))
        _paint(img, _soft(d) * _col(on), bark)
    # Leaves: ellipses in greens, yellows and browns, about head-sized to body-sized.
    for _ in range(8):
        on = rng.random(n) < 0.6
        r = rng.uniform(0.03, 0.11, n) * s
        d = _ellipse(canvas.x, canvas.y, _col(rng.uniform(0, s, n)), _col(rng.uniform(0, s, n)),
                     _col(r), _col(r * rng.uniform(0.3, 0.7, n)), _col(rng.uniform(0, np.pi, n)))
        leaf = hsv_to_rgb(rng.uniform(0.08, 0.38, n), rng.uniform(0.35, 0.8, n), rng.uniform(0.25, 0.8, n))
        _paint(img, _soft(d) * _col(on), leaf)
    # Berries and blossoms: small saturated discs of any hue, as in real scenes.
    for _ in range(3):
        on = rng.random(n) < 0.3
        r = rng.uniform(0.015, 0.045, n) * s
        d = _ellipse(canvas.x, canvas.y, _col(rng.uniform(0, s, n)), _col(rng.uniform(0, s, n)),
                     _col(r), _col(r))
        bright = hsv_to_rgb(rng.random(n), rng.uniform(0.6, 1.0, n), rng.uniform(0.6, 1.0, n))
        _paint(img, _soft(d) * _col(on), bright)
    return img


def _urban_background(rng, canvas: _Canvas, n: int) -> np.ndarray:
    """Streets: facades with window grids, poles with signs, grainy asphalt and concrete."""
    s = canvas.size
    wall = hsv_to_rgb(rng.uniform(0.0, 0.15, n), rng.uniform(0.05, 0.35, n), rng.uniform(0.35, 0.8, n))
    img = np.ascontiguousarray(np.broadcast_to(wall[:, :, None, None], (n, 3, s, s)))
    for _ in range(3):  # buildings: axis-aligned blocks with a grid of windows
        on = rng.random(n) < 0.8
        x0 = rng.uniform(-0.2, 0.9, n) * s
        w = rng.uniform(0.2, 0.6, n) * s
        top = rng.uniform(0.0, 0.5, n) * s
        block = _soft(_rounded_rect(canvas.x, canvas.y, _col(x0 + w / 2), _col(top + s),
                                    _col(w / 2), _col(np.full(n, s - 0.01)), _col(np.zeros(n)))) * _col(on)
        facade = hsv_to_rgb(rng.uniform(0.0, 1.0, n), rng.uniform(0.05, 0.3, n), rng.uniform(0.3, 0.85, n))
        _paint(img, block, facade)
        period = _col(rng.uniform(0.07, 0.14, n) * s)
        wx = ((canvas.x - _col(x0)) % period) < period * 0.55
        wy = ((canvas.y - _col(top)) % period) < period * 0.6
        glass = hsv_to_rgb(rng.uniform(0.5, 0.65, n), rng.uniform(0.1, 0.4, n), rng.uniform(0.1, 0.6, n))
        _paint(img, block * (wx & wy), glass)
    for _ in range(2):  # poles with a small coloured sign
        on = rng.random(n) < 0.5
        px = rng.uniform(0, s, n)
        top = rng.uniform(0.05, 0.5, n) * s
        pole = _capsule(canvas.x, canvas.y, _col(px), _col(top), _col(px), _col(np.full(n, 2.0 * s)),
                        _col(np.full(n, 0.012 * s)))
        _paint(img, _soft(pole) * _col(on), hsv_to_rgb(np.zeros(n), np.zeros(n), rng.uniform(0.2, 0.5, n)))
        sign = _rounded_rect(canvas.x, canvas.y, _col(px), _col(top), _col(np.full(n, 0.05 * s)),
                             _col(np.full(n, 0.035 * s)), _col(np.full(n, 0.01 * s)))
        on_sign = on & (rng.random(n) < 0.6)
        bright = hsv_to_rgb(rng.random(n), rng.uniform(0.6, 1.0, n), rng.uniform(0.6, 1.0, n))
        _paint(img, _soft(sign) * _col(on_sign), bright)
    grain = 1 + 0.1 * _value_noise(rng, n, s, 16) + rng.normal(0, 0.04, (n, s, s)).astype(np.float32)
    img *= grain[:, None]
    return img


def _road(rng, canvas: _Canvas, img: np.ndarray, ground_y: np.ndarray, on: np.ndarray) -> None:
    """Asphalt band from the wheels down, with lane dashes: context shared by all classes."""
    n, s = img.shape[0], canvas.size
    top = _col(ground_y - rng.uniform(0.02, 0.15, n) * s)
    band = _soft(top - canvas.y) * _col(on)
    asphalt = hsv_to_rgb(np.zeros(n), np.zeros(n), rng.uniform(0.2, 0.45, n))
    _paint(img, band, asphalt)
    period = _col(rng.uniform(0.2, 0.35, n) * s)
    lane_y = _col(ground_y + rng.uniform(0.05, 0.2, n) * s)
    along = ((canvas.x + _col(rng.uniform(0, s, n))) % period) < period * 0.5
    dash = along & (np.abs(canvas.y - lane_y) < 0.012 * s + 0.5)
    _paint(img, band * dash, np.full((n, 3), 0.9, dtype=np.float32))


@dataclass
class _Pose:
    """Placement of the canonical object frame in the image."""

    cx: np.ndarray
    cy: np.ndarray
    scale: np.ndarray  # pixels per canonical unit
    angle: np.ndarray
    flip: np.ndarray  # +1 faces right, -1 faces left

    def to_canonical(self, canvas: _Canvas):
        du = (canvas.x - _col(self.cx)) / _col(self.scale)
        dv = (canvas.y - _col(self.cy)) / _col(self.scale)
        u, v = _rotate(du, dv, _col(self.angle))
        return u * _col(self.flip), v

    def to_image(self, u: np.ndarray, v: np.ndarray):
        """Canonical points (B, P) -> image points."""
        u = u * self.flip[:, None]
        c, s = np.cos(self.angle)[:, None], np.sin(self.angle)[:, None]
        x = (c * u - s * v) * self.scale[:, None] + self.cx[:, None]
        y = (s * u + c * v) * self.scale[:, None] + self.cy[:, None]
        return x, y


def _place(rng, size: int, outline_u: np.ndarray, outline_v: np.ndarray, max_angle: float) -> _Pose:
    """Pick angle, flip, scale (so the box covers BOX_AREA_RANGE of the image) and centre."""
    n = outline_u.shape[0]
    angle = rng.uniform(-max_angle, max_angle, n)
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    unit = _Pose(np.zeros(n), np.zeros(n), np.ones(n), angle, flip)
    x, y = unit.to_image(outline_u, outline_v)
    w, h = x.max(1) - x.min(1), y.max(1) - y.min(1)
    area = rng.uniform(*BOX_AREA_RANGE, n) * size * size
    scale = np.sqrt(area / (w * h))
    scale = np.minimum(scale, 0.96 * size / np.maximum(w, h))
    lo_x, hi_x = 0.5 - x.min(1) * scale, size - 0.5 - x.max(1) * scale
    lo_y, hi_y = 0.5 - y.min(1) * scale, size - 0.5 - y.max(1) * scale
    cx = lo_x + rng.random(n) * np.maximum(hi_x - lo_x, 0)
    cy = lo_y + rng.random(n) * np.maximum(hi_y - lo_y, 0)
    return _Pose(cx, cy, scale, angle, flip)


def _ellipse_outline(cu, cv, a, b, angle=None, points=24):
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)[None, :]
    u, v = a[:, None] * np.cos(t), b[:, None] * np.sin(t)
    if angle is not None:
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        u, v = c * u - s * v, s * u + c * v
    return u + cu[:, None], v + cv[:, None]


def _rect_outline(cu, cv, hu, hv):
    su = np.array([-1, 1, 1, -1])[None, :]
    sv = np.array([-1, -1, 1, 1])[None, :]
    return cu[:, None] + su * hu[:, None], cv[:, None] + sv * hv[:, None]


def _contrast_with(img, cover, color, min_diff=0.2):
    """Shift ``color``'s brightness away from the background under the object.

    Objects are camouflaged in real photos only sometimes; a body as bright as the scene
    behind it would have no visible outline at 64 px, and the task says the body must
    read as object. Only the overall brightness moves, not the hue.
    """
    lum = lambda c: c @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # noqa: E731
    w = cover.sum((1, 2)) + 1e-6
    bg = (img * cover[:, None]).sum((2, 3)) / w[:, None]
    lb, lc = lum(bg), lum(color) + 1e-6
    target = np.where(lb > 0.5, np.minimum(lc, lb - min_diff), np.maximum(lc, lb + min_diff))
    return np.clip(color * (target / lc)[:, None], 0, 1)


def _draw_birds(rng, canvas: _Canvas, img, hues, patterns, evidence: str = "head"):
    """A bird: body, wing, tail, beak and eye common to all classes; the head is the class.

    ``evidence="plumage"`` (a pre-training family) moves the class to the body instead;
    ``evidence="whole"`` puts it everywhere: body, wing and head colours and the patterns
    of body and head all follow the class.
    """
    n = img.shape[0]
    bb = rng.uniform(0.5, 0.65, n)  # body half-height (half-length is 1)
    rh = rng.uniform(0.28, 0.38, n)  # head radius: about 15% of the bird's area
    hu, hv = rng.uniform(0.72, 0.92, n), -bb * rng.uniform(0.6, 0.95, n)
    bl = rng.uniform(0.18, 0.32, n)  # beak length
    tl = rng.uniform(0.5, 0.8, n)  # tail length
    ta = rng.uniform(-0.6, 0.1, n)  # tail angle (negative: raised)
    tail_u, tail_v = -0.9 - 0.45 * tl * np.cos(ta), -0.1 + 0.45 * tl * np.sin(ta)
    beak_u, beak_v = hu + rh + 0.4 * bl, hv + 0.15 * rh

    parts = [
        _ellipse_outline(np.zeros(n), np.zeros(n), np.ones(n), bb),
        _ellipse_outline(hu, hv, rh, rh),
        _ellipse_outline(beak_u, beak_v, 0.55 * bl, 0.22 * rh),
        _ellipse_outline(tail_u, tail_v, 0.55 * tl, np.full(n, 0.16), ta),
    ]
    pose = _place(rng, canvas.size, np.concatenate([p[0] for p in parts], 1),
                  np.concatenate([p[1] for p in parts], 1), np.radians(30))
    u, v = pose.to_canonical(canvas)
    px = _col(pose.scale)  # canonical unit -> pixels

    body = _soft(_ellipse(u, v, 0, 0, 1, _col(bb)) * px)
    tail = _soft(_ellipse(u, v, _col(tail_u), _col(tail_v), _col(0.55 * tl), 0.16, _col(ta)) * px)
    wing = _soft(_ellipse(u, v, -0.2, _col(-0.25 * bb), 0.72, _col(0.5 * bb), _col(rng.uniform(-0.25, 0.1, n))) * px)
    head = _soft(_ellipse(u, v, _col(hu), _col(hv), _col(rh), _col(rh)) * px)
    beak = _soft(_ellipse(u, v, _col(beak_u), _col(beak_v), _col(0.55 * bl), _col(0.22 * rh)) * px)
    cover = np.maximum.reduce([body, tail, wing, head, beak])

    # Plumage: any dull colour, barred with a random frequency and direction.
    plumage = hsv_to_rgb(rng.random(n), rng.uniform(0.1, 0.5, n), rng.uniform(0.25, 0.85, n))
    if evidence in ("plumage", "whole"):
        plumage = hsv_to_rgb((hues + rng.uniform(-0.02, 0.02, n)) % 1, rng.uniform(0.55, 0.9, n),
                             rng.uniform(0.45, 0.9, n))
    plumage = _contrast_with(img, cover, plumage)
    bar_dir = _col(rng.uniform(0, np.pi, n))
    bars = np.sin((u * np.cos(bar_dir) + v * np.sin(bar_dir)) * _col(rng.uniform(6, 14, n)))
    shade = 1 + _col(rng.uniform(0.0, 0.25, n)) * bars + 0.15 * v / _col(bb)  # lighter belly
    if evidence in ("plumage", "whole"):
        p = _col(patterns)
        marks = np.where(p == 1, np.sin(v * 12), np.where(p == 2, np.sin(u * 12), np.sin(u * 10) * np.sin(v * 10)))
        shade = 1 + 0.35 * marks * (p > 0) + 0.15 * v / _col(bb)
    _paint(img, np.maximum(body, tail), _texture(plumage, shade))
    wing_col = plumage * rng.uniform(0.5, 0.8, (n, 1)).astype(np.float32)
    wing_bars = (np.sin(u * 9 + _col(rng.uniform(0, 6.3, n))) > 0.75) * _col(rng.random(n) < 0.6)
    _paint(img, wing, _texture(wing_col, 1 + 0.5 * wing_bars))
    _paint(img, tail * (u < -1.0), wing_col)

    # Head: the class lives here (hue and pattern), everything else is shared.
    # "whole": the head's hue is the body's, turned a third of the wheel (one colour scheme per class).
    if evidence == "head":
        head_hues = hues
    elif evidence == "whole":
        head_hues = (hues + 1 / 3) % 1
    else:  # the only draw here: the birds' random stream stays as it was before "whole"
        head_hues = rng.random(n)
    head_col = hsv_to_rgb((head_hues + rng.uniform(-0.02, 0.02, n)) % 1, rng.uniform(0.65, 0.95, n),
                          rng.uniform(0.6, 0.95, n))
    _paint(img, head, head_col)
    dark = np.full((n, 3), 0.08, dtype=np.float32)
    du, dv = u - _col(hu), v - _col(hv)
    p = _col(patterns if evidence in ("head", "whole") else rng.integers(0, 4, n))
    cap = head * (dv < -0.25 * _col(rh)) * (p == 1)
    mask_band = head * (np.abs(dv + 0.1 * _col(rh)) < 0.2 * _col(rh)) * (p == 2)
    cheek = _soft(_ellipse(du, dv, _col(0.05 * rh), _col(0.4 * rh), _col(0.45 * rh), _col(0.3 * rh)) * px) * (p == 3)
    _paint(img, np.maximum(cap, mask_band), dark)
    _paint(img, cheek * head, np.full((n, 3), 0.95, dtype=np.float32))
    eye = _soft(_ellipse(du, dv, _col(0.35 * rh), _col(-0.1 * rh), _col(0.16 * rh), _col(0.16 * rh)) * px)
    _paint(img, eye, dark)
    beak_col = hsv_to_rgb(rng.uniform(0.05, 0.15, n), rng.uniform(0, 0.8, n), rng.uniform(0.1, 0.9, n))
    _paint(img, beak, beak_col)
    return cover, head, pose


def _draw_vehicles(rng, canvas: _Canvas, img, hues, patterns):
    """A vehicle: body, cabin, windows, wheels, lights common to all; the roof sign is the class."""
    n = img.shape[0]
    hb = rng.uniform(0.26, 0.36, n)  # body half-height (half-length is 1)
    cab_u, cl, ch = rng.uniform(-0.25, 0.05, n), rng.uniform(0.42, 0.6, n), rng.uniform(0.2, 0.28, n)
    cab_v = -hb - ch + 0.05
    wr = rng.uniform(0.2, 0.25, n)  # wheel radius
    sl, sh = rng.uniform(0.26, 0.34, n), rng.uniform(0.13, 0.17, n)  # sign half-size
    sign_u, sign_v = cab_u + rng.uniform(-0.15, 0.15, n) * cl, cab_v - ch - sh + 0.03

    parts = [
        _rect_outline(np.zeros(n), np.zeros(n), np.ones(n), hb),
        _rect_outline(cab_u, cab_v, cl, ch),
        _rect_outline(sign_u, sign_v, sl, sh),
        _rect_outline(np.zeros(n), 0.85 * hb, 0.62 + wr, wr),
    ]
    pose = _place(rng, canvas.size, np.concatenate([p[0] for p in parts], 1),
                  np.concatenate([p[1] for p in parts], 1), np.radians(10))
    u, v = pose.to_canonical(canvas)
    px = _col(pose.scale)

    body = _soft(_rounded_rect(u, v, 0, 0, 1, _col(hb), 0.12) * px)
    cabin = _soft(_rounded_rect(u, v, _col(cab_u), _col(cab_v), _col(cl), _col(ch), 0.1) * px)
    wheels = [
        _soft(_ellipse(u, v, wu, _col(0.85 * hb), _col(wr), _col(wr)) * px) for wu in (-0.62, 0.62)
    ]
    sign = _soft(_rounded_rect(u, v, _col(sign_u), _col(sign_v), _col(sl), _col(sh), 0.04) * px)
    cover = np.maximum.reduce([body, cabin, sign, *wheels])

    paint = hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.5, n), rng.uniform(0.15, 0.95, n))
    paint = _contrast_with(img, cover, paint)
    shine = 1 + 0.2 * np.clip(-v, -1, 1) + 0.05 * _value_noise(rng, n, canvas.size, 8)
    _paint(img, np.maximum(body, cabin), _texture(paint, shine))
    glass = _soft(_rounded_rect(u, v, _col(cab_u), _col(cab_v + 0.03), _col(cl - 0.08), _col(ch - 0.07), 0.05) * px)
    pillar = np.abs(u - _col(cab_u + rng.uniform(-0.1, 0.1, n))) < 0.05
    glass_col = hsv_to_rgb(rng.uniform(0.5, 0.62, n), rng.uniform(0.1, 0.4, n), rng.uniform(0.2, 0.6, n))
    _paint(img, glass * ~pillar, glass_col)
    door = body * (np.abs(u - _col(cab_u)) < 0.025) * (v > -_col(hb) * 0.6)
    _paint(img, door, paint * 0.5)
    light = _soft(_ellipse(u, v, 0.93, _col(-0.35 * hb), 0.07, 0.06) * px)
    _paint(img, light, hsv_to_rgb(np.full(n, 0.14), rng.uniform(0.0, 0.6, n), np.full(n, 0.95)))
    for wheel in wheels:
        _paint(img, wheel, np.full((n, 3), 0.07, dtype=np.float32))
    for wu in (-0.62, 0.62):
        hub = _soft(_ellipse(u, v, wu, _col(0.85 * hb), _col(0.45 * wr), _col(0.45 * wr)) * px)
        _paint(img, hub, np.full((n, 3), 0.6, dtype=np.float32))

    # Roof sign: the class lives here (hue and pattern).
    sign_col = hsv_to_rgb((hues + rng.uniform(-0.02, 0.02, n)) % 1, rng.uniform(0.65, 0.95, n),
                          rng.uniform(0.6, 0.95, n))
    _paint(img, sign, sign_col)
    su, sv = u - _col(sign_u), v - _col(sign_v)
    p = _col(patterns)
    stripes = sign * (np.sin(su / _col(sl) * 3 * np.pi) > 0) * (p == 1)
    split = sign * (su > 0) * (p == 2)
    _paint(img, stripes, np.full((n, 3), 0.95, dtype=np.float32))
    _paint(img, split, np.full((n, 3), 0.08, dtype=np.float32))
    ring = _soft(_ellipse(su, sv, 0, 0, _col(0.5 * sh), _col(0.5 * sh)) * px) * (p == 3)
    _paint(img, ring * sign, np.full((n, 3), 0.95, dtype=np.float32))
    return cover, sign, pose


def render_chunk(
    rng: np.random.Generator, labels: np.ndarray, image_size: int, family: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image per label: (uint8 images BxSxSx3, bool masks BxSxS, bool part masks)."""
    hue_table, pattern_table = class_attributes(family, num_classes)
    hues, patterns = hue_table[labels], pattern_table[labels]
    canvas = _Canvas.make(image_size)
    n = len(labels)
    if family in BIRD_EVIDENCE:
        img = _natural_background(rng, canvas, n)
        cover, part, pose = _draw_birds_with_perch(rng, canvas, img, hues, patterns, BIRD_EVIDENCE[family])
    else:
        img = _urban_background(rng, canvas, n)
        cover, part, pose = _draw_vehicles_on_road(rng, canvas, img, hues, patterns)
    # Camera: exposure, a little sensor noise.
    img *= rng.uniform(0.85, 1.15, (n, 1, 1, 1)).astype(np.float32)
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    images = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return images, cover >= 0.5, part >= 0.5


def _draw_birds_with_perch(rng, canvas, img, hues, patterns, evidence="head"):
    """Most birds sit on a branch: draw it behind the bird, under its body."""
    n = img.shape[0]
    layer = img.copy()
    cover, part, pose = _draw_birds(rng, canvas, layer, hues, patterns, evidence)
    ys = np.where(cover >= 0.5, canvas.y, -1).max((1, 2))  # lowest object row
    on = rng.random(n) < 0.6
    tilt = rng.uniform(-0.3, 0.3, n)
    y_mid = ys + 0.5
    x0, x1 = np.full(n, -5.0), np.full(n, canvas.size + 5.0)
    yc = y_mid + tilt * (x0 - pose.cx)
    yd = y_mid + tilt * (x1 - pose.cx)
    d = _capsule(canvas.x, canvas.y, _col(x0), _col(yc), _col(x1), _col(yd),
                 _col(rng.uniform(0.8, 2.0, n) * canvas.size / 64))
    bark = hsv_to_rgb(rng.uniform(0.05, 0.1, n), rng.uniform(0.3, 0.6, n), rng.uniform(0.15, 0.45, n))
    _paint(img, _soft(d) * _col(on), bark)
    _paint(img, cover, layer)
    return cover, part, pose


def _draw_vehicles_on_road(rng, canvas, img, hues, patterns):
    """Vehicles stand on a road (most of the time): drawn behind, from the wheels down."""
    n = img.shape[0]
    layer = img.copy()
    cover, part, pose = _draw_vehicles(rng, canvas, layer, hues, patterns)
    ys = np.where(cover >= 0.5, canvas.y, -1).max((1, 2))
    _road(rng, canvas, img, ys, rng.random(n) < 0.8)
    _paint(img, cover, layer)
    return cover, part, pose


# ----------------------------------------------------------------------------- samples


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight box [x0, y0, x1, y1] of a boolean mask, x1/y1 exclusive (DESIGN §2)."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if len(cols) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _chunk_rng(seed: int, family: str, split: str, chunk: int) -> np.random.Generator:
    """Independent stream per (seed, family, split, chunk): splits never share images."""
    words = [seed, zlib.crc32(family.encode()), zlib.crc32(split.encode()), chunk]
    return np.random.default_rng(np.random.SeedSequence(words))


def _encode(image: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **options)
    return buf.getvalue()


def iter_synthetic_samples(
    split: str,
    num_samples: int,
    seed: int,
    image_size: int = 64,
    num_classes: int = 10,
    family: str = "birds",
    start: int = 0,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for samples ``start .. start+num_samples-1`` of a split."""
    _check_family(family)
    if not 32 <= image_size <= 512:
        raise ValueError(f"image_size must be in 32..512 (64..112 recommended), got {image_size}")
    if num_samples < 0 or start < 0:
        raise ValueError(f"num_samples and start must be >= 0, got {num_samples}, {start}")
    names = class_names(family, num_classes)
    end = start + num_samples
    for chunk in range(start // _CHUNK, (end + _CHUNK - 1) // _CHUNK):
        rng = _chunk_rng(seed, family, split, chunk)
        first = chunk * _CHUNK
        # Balanced labels within each chunk, in random order.
        labels = rng.permutation((first + np.arange(_CHUNK)) % num_classes)
        images, masks, parts = render_chunk(rng, labels, image_size, family, num_classes)
        for j in range(max(start - first, 0), min(end - first, _CHUNK)):
            index = first + j
            label = int(labels[j])
            meta = {
                "label": label,
                "class_name": names[label],
                "width": image_size,
                "height": image_size,
                "boxes": [mask_box(masks[j])],
                "part_boxes": [mask_box(parts[j] & masks[j])],
                "family": family,
                "split": split,
                "index": index,
            }
            yield f"{split}_{index:07d}", {
                "jpg": _encode(images[j], "JPEG", quality=_JPEG_QUALITY, subsampling=0),
                "mask.png": _encode(masks[j].astype(np.uint8) * 255, "PNG"),
                "json": json.dumps(meta).encode(),
                "cls": str(label).encode(),
            }


def write_synthetic_shards(
    out_url: str,
    split: str,
    num_samples: int,
    seed: int,
    image_size: int = 64,
    shard_size: int = 1000,
    num_classes: int = 10,
    family: str = "birds",
    max_bytes: int = 1 << 30,
) -> list[str]:
    """Write ``{split}-000000.tar ...`` under ``out_url``; returns the shard URLs."""
    with ShardWriter(out_url, prefix=split, max_count=shard_size, max_bytes=max_bytes) as writer:
        for key, members in iter_synthetic_samples(split, num_samples, seed, image_size, num_classes, family):
            writer.write(key, members)
    return writer.urls
