"""Procedural surface-defect images for Whittle's demo (numpy only).

Each image imitates a small crop from a factory inspection camera looking at a
brushed / machined metal surface: a grey base level, a random illumination
gradient, brushing stripes, a streaky "brushed" texture, pixel noise and now and
then a soft, harmless smudge. On top of that one of four things is drawn:

    0 ok       nothing
    1 scratch  a thin straight line at a random angle, brighter or darker than
               the surface, with a contrast that fades along its length
    2 spot     a small dark pit / blob, sometimes slightly elongated
    3 crack    a jagged dark polyline (random walk of 4-7 short segments,
               sometimes with a short branch)

Contrast, size, position and orientation are all random, and some defects are
deliberately faint, so the task is learnable but not trivial.

Images are float32 arrays of shape (3, 32, 32) (CHW) with values in [0, 1].
The three channels are the same grey picture with a slight random tint and a
little independent noise ("grayscale-ish").

Used by scripts/make_demo_data.py; import it from other scripts with
``sys.path.insert(0, "scripts"); import defects``.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ("ok", "scratch", "spot", "crack")
SIZE = 32

# Pixel-centre coordinates, shared by every drawing function.
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


# --------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------

def _segment_distance(p0, p1):
    """Distance of every pixel centre to segment p0-p1, and the position
    t in [0, 1] of the closest point along the segment."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    if length2 < 1e-9:
        t = np.zeros_like(_XX)
    else:
        t = np.clip(((_XX - x0) * dx + (_YY - y0) * dy) / length2, 0.0, 1.0)
    px, py = x0 + t * dx, y0 + t * dy
    return np.hypot(_XX - px, _YY - py), t


def _line_profile(dist, width):
    """Soft (anti-aliased) cross-section of a line: 1 on the centre line."""
    return np.exp(-0.5 * (dist / width) ** 2)


# --------------------------------------------------------------------------
# background
# --------------------------------------------------------------------------

def _smooth_1d(values, passes=2):
    kernel = np.array([0.25, 0.5, 0.25])
    for _ in range(passes):
        values = np.convolve(values, kernel, mode="same")
    return values


def background(rng: np.random.Generator) -> np.ndarray:
    """A (32, 32) float64 brushed-metal texture, roughly in [0.2, 0.8]."""
    base = rng.uniform(0.35, 0.65)

    # illumination gradient
    g_angle = rng.uniform(0, 2 * np.pi)
    g_strength = rng.uniform(0.0, 0.25)
    centred = ((_XX - SIZE / 2) * np.cos(g_angle) + (_YY - SIZE / 2) * np.sin(g_angle)) / SIZE
    gradient = g_strength * centred

    # stripes: all brushing runs along one direction, u is the coordinate across it
    theta = rng.uniform(0, np.pi)
    u = _XX * np.cos(theta) + _YY * np.sin(theta)
    freq = rng.uniform(0.08, 0.5)
    stripes = rng.uniform(0.0, 0.05) * np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi))

    # brushed streaks: a smoothed random profile across the brushing direction
    profile = _smooth_1d(rng.normal(0.0, 1.0, 96), passes=rng.integers(0, 3))
    profile /= profile.std() + 1e-9
    streaks = rng.uniform(0.0, 0.035) * np.interp(u + 48.0, np.arange(96), profile)

    # pixel noise
    noise = rng.normal(0.0, rng.uniform(0.01, 0.045), size=(SIZE, SIZE))

    img = base + gradient + stripes + streaks + noise

    # a harmless soft smudge now and then (large, low contrast): a distractor
    # for the spot class
    if rng.random() < 0.3:
        cx, cy = rng.uniform(0, SIZE, 2)
        sigma = rng.uniform(4.0, 9.0)
        img += rng.uniform(-0.08, 0.08) * np.exp(-((_XX - cx) ** 2 + (_YY - cy) ** 2) / (2 * sigma**2))
    return img


# --------------------------------------------------------------------------
# defects
# --------------------------------------------------------------------------

def _random_point(rng, margin):
    return rng.uniform(margin, SIZE - margin, 2)


def add_scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thin straight line at a random angle, bright or dark."""
    centre = _random_point(rng, 6.0)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(9.0, 30.0)
    half = 0.5 * length * np.array([np.cos(angle), np.sin(angle)])
    dist, t = _segment_distance(centre - half, centre + half)
    width = rng.uniform(0.35, 0.75)
    amplitude = rng.uniform(0.1, 0.3) * rng.choice([-1.0, 1.0])
    # contrast fades along the scratch (a tool leaving the surface)
    a, b = rng.uniform(0.5, 1.0, 2)
    taper = a + (b - a) * t
    return img + amplitude * taper * _line_profile(dist, width)


def add_spot(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small dark pit, round or slightly elongated."""
    cx, cy = _random_point(rng, 3.0)
    sigma = rng.uniform(0.7, 1.8)
    elongation = rng.uniform(1.0, 1.8)
    angle = rng.uniform(0, np.pi)
    du = (_XX - cx) * np.cos(angle) + (_YY - cy) * np.sin(angle)
    dv = -(_XX - cx) * np.sin(angle) + (_YY - cy) * np.cos(angle)
    r2 = (du / (sigma * elongation)) ** 2 + (dv / sigma) ** 2
    amplitude = rng.uniform(0.1, 0.4)
    return img - amplitude * np.exp(-0.5 * r2)


def add_crack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Jagged dark polyline: a random walk with sharp direction changes."""
    def walk(start, heading, n_segments):
        points = [start]
        for _ in range(n_segments):
            heading += rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.2)
            step = rng.uniform(2.0, 5.0)
            nxt = points[-1] + step * np.array([np.cos(heading), np.sin(heading)])
            points.append(np.clip(nxt, 0.5, SIZE - 0.5))
        return points, heading

    start = _random_point(rng, 7.0)
    heading = rng.uniform(0, 2 * np.pi)
    points, _ = walk(start, heading, int(rng.integers(4, 8)))
    polylines = [points]
    if rng.random() < 0.35:  # short branch from a middle vertex
        k = int(rng.integers(1, len(points) - 1))
        branch, _ = walk(points[k], heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.4), int(rng.integers(1, 3)))
        polylines.append(branch)

    dist = np.full_like(_XX, np.inf)
    for line in polylines:
        for p0, p1 in zip(line[:-1], line[1:]):
            d, _ = _segment_distance(p0, p1)
            dist = np.minimum(dist, d)
    width = rng.uniform(0.35, 0.7)
    amplitude = rng.uniform(0.12, 0.35)
    return img - amplitude * _line_profile(dist, width)


_DEFECTS = {0: None, 1: add_scratch, 2: add_spot, 3: add_crack}


def make_image(rng: np.random.Generator, label: int) -> np.ndarray:
    """One (3, 32, 32) float32 image in [0, 1] of the given class."""
    img = background(rng)
    draw = _DEFECTS[int(label)]
    if draw is not None:
        img = draw(img, rng)
    tint = 1.0 + rng.normal(0.0, 0.03, size=(3, 1, 1))
    rgb = img[None, :, :] * tint + rng.normal(0.0, 0.008, size=(3, SIZE, SIZE))
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images with balanced, shuffled labels.

    Returns x: float32 (n, 3, 32, 32) and y: int64 (n,).
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % len(CLASS_NAMES)
    rng.shuffle(y)
    x = np.stack([make_image(rng, label) for label in y]) if n else np.zeros((0, 3, SIZE, SIZE), np.float32)
    return x.astype(np.float32), y
