"""Procedural stand-ins for VTAB's structured tasks (dSprites, CLEVR, SmallNORB), built without downloads.

Every generator is ``task(n, seed, size=32) -> (images, labels)``: ``images`` uint8 of shape
``(n, size, size, 3)``, ``labels`` int64 of shape ``(n,)``, with VTAB's label definition and class count.
The label is drawn first (balanced: each class ``n // k`` or ``n // k + 1`` times) and the latent factors
are drawn consistent with it; every other factor is random nuisance. The same ``(n, seed, size)`` gives
identical arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

TaskGenerator = Callable[..., tuple[np.ndarray, np.ndarray]]
_SUPERSAMPLE = 2  # render at twice the size and box-filter down (anti-aliasing)


def _balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n`` labels in ``[0, k)``, each class equally often (up to one), in random order."""
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _downsample(canvas: np.ndarray) -> np.ndarray:
    """Box-filter a supersampled float canvas ``(..., S, S, C)`` in [0, 1] down to uint8."""
    s, side = _SUPERSAMPLE, canvas.shape[-2] // _SUPERSAMPLE
    small = canvas.reshape(*canvas.shape[:-3], side, s, side, s, canvas.shape[-1]).mean(axis=(-4, -2))
    return np.round(np.clip(small, 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- dSprites

_DSPRITES_BINS = 16


def _sprite_mask(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-masks of square (0), ellipse (1) and heart (2) in sprite coordinates (half-extent ~1)."""
    square = np.maximum(np.abs(u), np.abs(v)) <= 0.8
    ellipse = u**2 + (v / 0.5) ** 2 <= 1
    x, y = 1.25 * u, -1.25 * v + 0.15
    heart = (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    shape = shape[:, None, None]
    return np.where(shape == 0, square, np.where(shape == 1, ellipse, heart))


def _render_sprites(
    shape: np.ndarray, scale: np.ndarray, angle: np.ndarray, pos: np.ndarray, size: int
) -> np.ndarray:
    """White sprites on black; ``pos`` in [0, 1]^2 spans the image less a margin for the largest sprite."""
    side = size * _SUPERSAMPLE
    grid = (np.arange(side, dtype=np.float32) + 0.5) / side
    images = np.empty((len(shape), size, size, 3), np.uint8)
    for start in range(0, len(shape), 256):
        sl = slice(start, start + 256)
        centre = 0.18 + 0.64 * pos[sl].astype(np.float32)
        half = (0.16 * scale[sl]).astype(np.float32)[:, None, None]
        dx = grid[None, None, :] - centre[:, 0, None, None]
        dy = grid[None, :, None] - centre[:, 1, None, None]
        cos, sin = (f(angle[sl]).astype(np.float32)[:, None, None] for f in (np.cos, np.sin))
        u, v = (cos * dx + sin * dy) / half, (-sin * dx + cos * dy) / half
        images[sl] = _downsample(_sprite_mask(shape[sl], u, v)[..., None].astype(np.float32))
    return images


def _dsprites(n: int, seed: int, size: int, factor: str) -> tuple[np.ndarray, np.ndarray]:
    """dSprites-like images; the label bins ``factor`` ('x' or 'orientation') into 16 bins."""
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, n, _DSPRITES_BINS)
    shape = rng.integers(0, 3, n)
    scale = rng.uniform(0.5, 1.0, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    pos = rng.uniform(0, 1, (n, 2))
    within_bin = (labels + rng.uniform(0, 1, n)) / _DSPRITES_BINS
    if factor == "x":
        pos[:, 0] = within_bin
    else:
        angle = 2 * np.pi * within_bin
    return _render_sprites(shape, scale, angle, pos, size), labels


def dsprites_location(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """dSprites location: label = the sprite's x position binned into 16 bins (VTAB ``Dsprites_loc``).

    A white square, ellipse or heart on black; scale (0.5..1), orientation (0..2 pi) and y are nuisance.
    """
    return _dsprites(n, seed, size, "x")


def dsprites_orientation(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """dSprites orientation: label = orientation in [0, 2 pi) binned into 16 bins (VTAB ``Dsprites_ori``).

    Shape, scale and x, y are nuisance. As in dSprites, the square's 90-degree and the ellipse's 180-degree
    symmetry make some orientation bins look alike.
    """
    return _dsprites(n, seed, size, "orientation")


# ------------------------------------------------------------------------------------------------- CLEVR

# CLEVR's eight colours
_CLEVR_COLOURS = (
    np.array(
        [[87, 87, 87], [173, 35, 35], [42, 75, 215], [29, 105, 20], [129, 74, 25], [129, 38, 192],
         [41, 208, 208], [255, 238, 51]],
        np.float32,
    )
    / 255
)  # fmt: skip
_CLEVR_SIZES = (0.35, 0.7)  # world radius of small and large objects
_HORIZON, _FOCAL, _CAM_HEIGHT = 0.3, 1.0, 1.95  # horizon row, focal length, camera height (image units)
_NEAR, _FAR = 3.0, 12.0  # depth range of objects on the floor
_CLEVR_DEPTH_EDGES = np.array([3.0, 4.0, 5.0, 6.0, 7.0, 8.5, 10.0])  # closest-object depth bins (6)
_MIN_COUNT, _MAX_COUNT = 3, 10
_PLACEMENT_ATTEMPTS = 1000


def _place_objects(rng: np.random.Generator, count: int, closest: float | None) -> np.ndarray:
    """Rows ``(depth, x, radius)`` of objects on the floor, apart in the world and not hiding each other.

    With ``closest``, the first object sits at that depth and the others behind it. Gives up (RuntimeError)
    after ``_PLACEMENT_ATTEMPTS`` fresh layouts, which no label of the shipped tasks comes near.
    """
    for _attempt in range(_PLACEMENT_ATTEMPTS):
        objects: list[tuple[float, float, float]] = []
        for _ in range(50 * count):
            first = closest is not None and not objects
            z = closest if first else rng.uniform(closest or _NEAR, _FAR)
            r = _CLEVR_SIZES[rng.integers(0, 2)]
            x = rng.uniform(-1, 1) * (0.45 * z - r)
            if all(_apart(z, x, r, *other) for other in objects):
                objects.append((z, x, r))
            if len(objects) == count:
                return np.array(objects)
    raise RuntimeError(
        f"Could not place {count} objects apart (closest depth {closest}) in {_PLACEMENT_ATTEMPTS} layouts; "
        f"the scene constants leave too little room."
    )


def _apart(z1: float, x1: float, r1: float, z2: float, x2: float, r2: float) -> bool:
    """No intersection on the floor, and the smaller screen disc's centre clear of the larger disc."""
    if np.hypot(z1 - z2, x1 - x2) < r1 + r2 + 0.1:
        return False
    (cx1, cy1, s1), (cx2, cy2, s2) = _screen_disc(z1, x1, r1), _screen_disc(z2, x2, r2)
    return np.hypot(cx1 - cx2, cy1 - cy2) >= max(s1, s2) + 0.3 * min(s1, s2)


def _screen_disc(z: float, x: float, r: float) -> tuple[float, float, float]:
    """Centre and radius on screen (image units) of an object of radius ``r`` resting on the floor."""
    return 0.5 + _FOCAL * x / z, _HORIZON + _FOCAL * (_CAM_HEIGHT - r) / z, _FOCAL * r / z


def _clevr_background(side: int) -> np.ndarray:
    """Dark backdrop above the horizon, a floor brightening towards the camera below it."""
    rows = (np.arange(side) + 0.5) / side
    floor = 0.42 + 0.18 * np.clip((rows - _HORIZON) / (1 - _HORIZON), 0, 1)
    gray = np.where(rows < _HORIZON, 0.3, floor).astype(np.float32)
    return np.broadcast_to(gray[:, None, None], (side, side, 3)).copy()


def _draw_object(canvas: np.ndarray, z: float, x: float, r: float, cube: bool, colour: np.ndarray) -> None:
    """Paint a Lambert-shaded sphere or a cube (front and top faces) onto the float canvas in place."""
    side = canvas.shape[0]
    cx, cy, rad = (v * side for v in _screen_disc(z, x, r))
    y0, y1 = int(max(cy - 1.6 * rad, 0)), int(min(cy + rad + 1, side))
    x0, x1 = int(max(cx - rad - 1, 0)), int(min(cx + 1.6 * rad + 1, side))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    u, v = (xx - cx) / rad, (yy - cy) / rad
    if cube:
        front = (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
        depth = -0.8 - v  # height above the front face's top edge
        top = (depth > 0) & (depth <= 0.5) & (u >= -0.8 + depth) & (u <= 0.8 + depth) & ~front
        shade = np.where(front, 0.75, 1.0)
        mask = front | top
    else:
        rho2 = u**2 + v**2
        mask = rho2 <= 1
        normal_z = np.sqrt(np.clip(1 - rho2, 0, 1))
        shade = 0.3 + 0.8 * np.clip(-0.45 * u - 0.55 * v + 0.7 * normal_z, 0, 1)
    patch = canvas[y0:y1, x0:x1]
    patch[mask] = np.clip(colour * shade[mask][:, None], 0, 1)


def _render_scene(rng: np.random.Generator, objects: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Draw ``objects`` far to near (painter's order) with random shapes and colours."""
    canvas = background.copy()
    for z, x, r in objects[np.argsort(-objects[:, 0])]:
        _draw_object(canvas, z, x, r, bool(rng.integers(0, 2)), _CLEVR_COLOURS[rng.integers(0, 8)])
    return _downsample(canvas)


def _clevr(n: int, seed: int, size: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """CLEVR-like scenes labelled by object count or by the closest object's depth bin."""
    rng = np.random.default_rng(seed)
    num_classes = _MAX_COUNT - _MIN_COUNT + 1 if task == "count" else len(_CLEVR_DEPTH_EDGES) - 1
    labels = _balanced_labels(rng, n, num_classes)
    background = _clevr_background(size * _SUPERSAMPLE)
    images = np.empty((n, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        if task == "count":
            objects = _place_objects(rng, label + _MIN_COUNT, None)
        else:
            closest = rng.uniform(_CLEVR_DEPTH_EDGES[label], _CLEVR_DEPTH_EDGES[label + 1])
            objects = _place_objects(rng, int(rng.integers(_MIN_COUNT, _MAX_COUNT + 1)), closest)
        images[i] = _render_scene(rng, objects, background)
    return images, labels


def clevr_count(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """CLEVR count: label = number of objects minus 3, for 3..10 objects (8 classes, VTAB ``Clevr_Count``).

    Spheres and cubes of CLEVR's 8 colours and 2 sizes on a gray floor seen in perspective: farther objects
    sit higher and are smaller. Objects don't intersect and screen overlaps are limited.
    """
    return _clevr(n, seed, size, "count")


def clevr_distance(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """CLEVR closest-object distance: label = the nearest object's depth binned into 6 bins (``Clevr_Dist``).

    Bins of depth (floor units, objects lie in 3..12): [3, 4), [4, 5), [5, 6), [6, 7), [7, 8.5), [8.5, 10).
    Scenes hold 3..10 objects; the others lie behind the closest.
    """
    return _clevr(n, seed, size, "distance")


# --------------------------------------------------------------------------------------------- SmallNORB

_AZIMUTHS = np.deg2rad(np.arange(0, 360, 20))  # 18 azimuths
_ELEVATIONS = np.deg2rad(np.arange(30, 75, 5))  # 9 elevations, as SmallNORB's 30..70 degrees
# (centre, half-extent) boxes per category: x forward, y up, z to the side
_CATEGORIES = {
    "animal": [((0, 0.5, 0), (0.6, 0.2, 0.2)), ((0.75, 0.75, 0), (0.16, 0.14, 0.12)),
               ((0.45, 0.15, 0.12), (0.06, 0.15, 0.06)), ((0.45, 0.15, -0.12), (0.06, 0.15, 0.06)),
               ((-0.45, 0.15, 0.12), (0.06, 0.15, 0.06)), ((-0.45, 0.15, -0.12), (0.06, 0.15, 0.06)),
               ((-0.75, 0.6, 0), (0.16, 0.03, 0.03))],
    "human": [((0, 0.9, 0), (0.1, 0.3, 0.2)), ((0, 1.35, 0), (0.12, 0.12, 0.12)),
              ((0.04, 0.3, 0.1), (0.07, 0.3, 0.07)), ((0.04, 0.3, -0.1), (0.07, 0.3, 0.07)),
              ((0.1, 0.03, 0.1), (0.14, 0.03, 0.07)), ((0.1, 0.03, -0.1), (0.14, 0.03, 0.07)),
              ((0.15, 0.95, 0.28), (0.25, 0.06, 0.06)), ((0, 0.95, -0.28), (0.06, 0.28, 0.06))],
    "airplane": [((0, 0.4, 0), (0.8, 0.1, 0.1)), ((0.1, 0.4, 0), (0.2, 0.03, 0.8)),
                 ((-0.7, 0.6, 0), (0.1, 0.2, 0.03)), ((-0.7, 0.42, 0), (0.08, 0.02, 0.3)),
                 ((0.9, 0.4, 0), (0.1, 0.06, 0.06))],
    "truck": [((0.6, 0.35, 0), (0.2, 0.3, 0.3)), ((-0.2, 0.45, 0), (0.55, 0.35, 0.3)),
              ((0.6, 0.1, 0.32), (0.1, 0.1, 0.03)), ((0.6, 0.1, -0.32), (0.1, 0.1, 0.03)),
              ((-0.5, 0.1, 0.32), (0.1, 0.1, 0.03)), ((-0.5, 0.1, -0.32), (0.1, 0.1, 0.03))],
    "car": [((0, 0.25, 0), (0.7, 0.15, 0.3)), ((-0.1, 0.5, 0), (0.35, 0.12, 0.27)),
            ((0.45, 0.1, 0.31), (0.1, 0.1, 0.03)), ((0.45, 0.1, -0.31), (0.1, 0.1, 0.03)),
            ((-0.45, 0.1, 0.31), (0.1, 0.1, 0.03)), ((-0.45, 0.1, -0.31), (0.1, 0.1, 0.03))],
}  # fmt: skip
_CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64)
# quads as corner indices, counter-clockwise seen from outside, with their outward normals
_QUADS = np.array([[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]])
_NORMALS = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], np.float64)
# six lighting conditions, as SmallNORB's: (direction in camera space, intensity)
_LIGHTS = [((0.3, 0.5, 0.8), 1.0), ((-0.4, 0.6, 0.7), 0.9), ((0.6, 0.2, 0.7), 0.8),
           ((0.0, 0.8, 0.6), 1.0), ((-0.6, 0.3, 0.7), 0.85), ((0.2, -0.2, 1.0), 0.75)]  # fmt: skip


def _instance(rng: np.random.Generator, category: str) -> tuple[np.ndarray, np.ndarray]:
    """Box centres and half-extents of one instance: the category's boxes, stretched at random, centred."""
    boxes = np.array(_CATEGORIES[category], np.float64)
    stretch = rng.uniform(0.85, 1.15, 3) * rng.uniform(0.9, 1.1, (len(boxes), 1, 3))
    centres, halves = boxes[:, 0] * stretch[:, 0], boxes[:, 1] * stretch[:, 0]
    low, high = (centres - halves).min(0), (centres + halves).max(0)
    centres = centres - (low + high) / 2
    radius = np.linalg.norm(np.abs(centres) + halves, axis=1).max()
    return centres / radius, halves / radius


def _rotation(azimuth: float, elevation: float) -> np.ndarray:
    """World to camera: turn the object by ``azimuth`` about the vertical, then view from ``elevation``."""
    ca, sa, ce, se = np.cos(azimuth), np.sin(azimuth), np.cos(elevation), np.sin(elevation)
    turn = np.array([[ca, 0, sa], [0, 1, 0], [-sa, 0, ca]])
    tilt = np.array([[1, 0, 0], [0, ce, -se], [0, se, ce]])
    return tilt @ turn


def _render_object(rng: np.random.Generator, azimuth: float, elevation: float, size: int) -> np.ndarray:
    """Orthographic, back-face culled, painter's-ordered Lambert rendering of a random instance."""
    category = list(_CATEGORIES)[rng.integers(0, len(_CATEGORIES))]
    centres, halves = _instance(rng, category)
    direction, intensity = _LIGHTS[rng.integers(0, len(_LIGHTS))]
    light = np.array(direction) / np.linalg.norm(direction)
    rot = _rotation(azimuth, elevation)
    vertices = (centres[:, None] + halves[:, None] * _CORNERS) @ rot.T  # (boxes, 8, 3)
    normals = _NORMALS @ rot.T
    faces = vertices[:, _QUADS].reshape(-1, 4, 3)  # (boxes * 6, 4, 3)
    face_normals = np.tile(normals, (len(centres), 1))
    visible = face_normals[:, 2] > 1e-6
    faces, face_normals = faces[visible], face_normals[visible]
    shade = intensity * (0.25 + 0.75 * np.clip(face_normals @ light, 0, 1))
    side = size * _SUPERSAMPLE
    canvas = Image.new("L", (side, side), 20)
    draw = ImageDraw.Draw(canvas)
    for k in np.argsort(faces[:, :, 2].mean(1)):
        points = [(side * (0.5 + 0.42 * px), side * (0.5 - 0.42 * py)) for px, py, _ in faces[k]]
        draw.polygon(points, fill=int(30 + 215 * shade[k]))
    return np.asarray(canvas.reduce(_SUPERSAMPLE))


def _smallnorb(n: int, seed: int, size: int, factor: str) -> tuple[np.ndarray, np.ndarray]:
    """SmallNORB-like renderings labelled by the azimuth or the elevation index."""
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, n, len(_AZIMUTHS) if factor == "azimuth" else len(_ELEVATIONS))
    images = np.empty((n, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        azimuth_index = label if factor == "azimuth" else rng.integers(0, len(_AZIMUTHS))
        elevation_index = label if factor == "elevation" else rng.integers(0, len(_ELEVATIONS))
        gray = _render_object(rng, _AZIMUTHS[azimuth_index], _ELEVATIONS[elevation_index], size)
        images[i] = gray[..., None]
    return images, labels


def smallnorb_azimuth(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """SmallNORB azimuth: label = azimuth index, 0..340 degrees in 20-degree steps (18, ``Smallnorb_azi``).

    One of 5 box-built categories (animal, human, airplane, truck, car) with randomly stretched parts, gray on
    a dark background; elevation (30..70 degrees) and one of 6 lighting conditions are nuisance.
    """
    return _smallnorb(n, seed, size, "azimuth")


def smallnorb_elevation(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """SmallNORB elevation: label = elevation index, 30..70 degrees in 5-degree steps (9, ``Smallnorb_ele``).

    Category, instance, azimuth and lighting are nuisance (see :func:`smallnorb_azimuth`).
    """
    return _smallnorb(n, seed, size, "elevation")


TASKS: dict[str, tuple[TaskGenerator, int]] = {
    "dsprites_location": (dsprites_location, _DSPRITES_BINS),
    "dsprites_orientation": (dsprites_orientation, _DSPRITES_BINS),
    "clevr_count": (clevr_count, _MAX_COUNT - _MIN_COUNT + 1),
    "clevr_distance": (clevr_distance, len(_CLEVR_DEPTH_EDGES) - 1),
    "smallnorb_azimuth": (smallnorb_azimuth, len(_AZIMUTHS)),
    "smallnorb_elevation": (smallnorb_elevation, len(_ELEVATIONS)),
}
