"""A deterministic synthetic abdominal CT (HU) with one-vs-all universal labels, for tests, tutorials and demos.

The anatomy is a cartoon of a supine adult abdomen and lower chest built from slightly deformed ellipsoids and
tubes: body (subcutaneous fat, muscle wall), liver on the patient's right with two hypodense tumours, gallbladder,
spleen, stomach with an air cap, pancreas, duodenum, both kidneys (a tumour in the left, a cyst in the right),
adrenal glands, aorta and IVC, esophagus, lungs with a nodule, heart, small bowel, colon, rectum, bladder, prostate,
femoral heads, and an unlabelled vertebral column and psoas muscles.

Geometry is defined in millimetres on a canonical 192 x 192 x 144 mm field of view and scaled to the requested
field of view (``shape * spacing``), so grids that cover the same field of view (e.g. ``(128, 128, 96)`` at 1.5 mm
and ``(96, 96, 72)`` at 2 mm) show the same anatomy with the same organ volumes in mL, and a small grid still holds
every organ. The voxel grid is RAS+ (affine ``diag(spacing)``): larger x = patient's right, larger y = anterior,
larger z = superior. Randomness (shape jitter, deformation, noise) comes only from ``seed``.

>>> p = make_phantom((64, 64, 48), spacing=(3.0, 3.0, 3.0), seed=1)
>>> p.volume.shape, p.label_map.dtype.name, "liver tumor" in p.classes
((64, 64, 48), 'int16', True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from universal.errors import InputError
from universal.io import Volume, volume_from_array
from universal.taxonomy import masks_to_label_map, resolve_class

__all__ = ["Phantom", "make_phantom"]

_CANONICAL_FOV_MM = np.array([192.0, 192.0, 144.0])  # (x, y, z) extent the anatomy below is drawn for

# body cross-section (x, y semi-axes in canonical mm): skin, outer muscle boundary, abdominal cavity
_BODY = (92.0, 72.0)
_MUSCLE = (84.0, 64.0)
_CAVITY = (76.0, 56.0)

_HU_AIR, _HU_FAT, _HU_MUSCLE, _HU_CAVITY = -1000.0, -100.0, 50.0, -90.0
_NOISE_SD_HU = 15.0
_BLUR_MM = 0.8


@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic CT and its labels.

    Attributes:
        volume: The CT (:class:`universal.io.Volume`, float32 HU, RAS+, affine ``diag(spacing)``).
        masks: Universal class name → bool mask (X, Y, Z), one-vs-all (tumours are inside their organ).
        label_map: int16 (X, Y, Z) universal ids, tumours drawn over organs.
        classes: Names of the classes present, in universal index order.
        seed: The seed it was made from.
    """

    volume: Volume
    masks: dict[str, np.ndarray]
    label_map: np.ndarray
    classes: list[str]
    seed: int = 0

    @property
    def affine(self) -> np.ndarray:
        return self.volume.affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.volume.spacing


class _Grid:
    """Canonical-mm coordinate vectors of a voxel grid and helpers to work on sub-blocks."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        sp = np.asarray(spacing, dtype=float)
        n = np.asarray(shape, dtype=float)
        self.scale = n * sp / _CANONICAL_FOV_MM  # real mm per canonical mm, per axis
        centre = (n - 1) * sp / 2
        self._sp, self._centre = sp, centre
        # canonical coordinate of every voxel centre along each axis
        self.axes = [(np.arange(shape[i]) * sp[i] - centre[i]) / self.scale[i] for i in range(3)]

    def block(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the canonical box [lo, hi] (None when it misses the grid)."""
        i0 = np.floor((lo * self.scale + self._centre) / self._sp).astype(int)
        i1 = np.ceil((hi * self.scale + self._centre) / self._sp).astype(int) + 1
        i0 = np.clip(i0, 0, self.shape)
        i1 = np.clip(i1, 0, self.shape)
        if np.any(i1 <= i0):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(i0, i1))  # type: ignore[return-value]

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable canonical coordinates (x (n,1,1), y (1,n,1), z (1,1,n)) of a block."""
        x, y, z = (self.axes[i][sl[i]] for i in range(3))
        return x[:, None, None], y[None, :, None], z[None, None, :]


# a shape: a function of the grid giving (block slices, rho) where rho < 1 inside, rho < f in the inner f-core
_Shape = Callable[[_Grid], "tuple[tuple[slice, slice, slice], np.ndarray] | None"]


def _ellipsoid(centre: Any, semi: Any, deform: np.ndarray, rot: np.ndarray | None = None) -> _Shape:
    """A deformed ellipsoid: boundary at normalised radius 1 + delta(direction), delta a low-order harmonic."""
    c = np.asarray(centre, dtype=float)
    a = np.asarray(semi, dtype=float)
    r = np.eye(3) if rot is None else np.asarray(rot, dtype=float)
    bound = 1.0 + float(np.sum(np.abs(deform) * [1, 1, 1, 1, 1, 1, 1, 2]))

    def shape(grid: _Grid):
        half = np.abs(r) @ a * bound
        sl = grid.block(c - half, c + half)
        if sl is None:
            return None
        x, y, z = grid.coords(sl)
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        q = [(r[0, j] * dx + r[1, j] * dy + r[2, j] * dz) / a[j] for j in range(3)]
        rad = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
        safe = np.maximum(rad, 1e-6)
        n0, n1, n2 = q[0] / safe, q[1] / safe, q[2] / safe
        terms = (n0, n1, n2, n0 * n1, n1 * n2, n0 * n2, n0**2 - n1**2, 3 * n2**2 - 1)
        delta = sum(k * t for k, t in zip(deform, terms))
        return sl, rad / (1.0 + delta)

    return shape


def _tube(points: Any, radius: float, wobble: np.ndarray) -> _Shape:
    """A chain of capsules through ``points`` (canonical mm) with a per-segment radius wobble."""
    pts = np.asarray(points, dtype=float)
    radii = radius * (1.0 + wobble[: len(pts) - 1])

    def shape(grid: _Grid):
        rmax = float(radii.max())
        sl = grid.block(pts.min(0) - rmax, pts.max(0) + rmax)
        if sl is None:
            return None
        x, y, z = grid.coords(sl)
        rho = np.full((x.shape[0], y.shape[1], z.shape[2]), np.inf)
        for p0, p1, rr in zip(pts[:-1], pts[1:], radii):
            d = p1 - p0
            wx, wy, wz = x - p0[0], y - p0[1], z - p0[2]
            t = np.clip((wx * d[0] + wy * d[1] + wz * d[2]) / float(d @ d), 0.0, 1.0)
            dist2 = (wx - t * d[0]) ** 2 + (wy - t * d[1]) ** 2 + (wz - t * d[2]) ** 2
            np.minimum(rho, np.sqrt(dist2) / rr, out=rho)
        return sl, rho

    return shape


def _rot_y(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), 0.0, np.sin(t)], [0.0, 1.0, 0.0], [-np.sin(t), 0.0, np.cos(t)]])


@dataclass
class _Part:
    name: str  # universal class name, or "~something" for unlabelled tissue
    shape: _Shape
    hu: float
    clip: str = "cavity"  # "cavity" (soft organs) or "body" (bones)
    core: tuple[float, float] | None = None  # (rho fraction, HU) of an inner core (lumen, medulla...)
    centre: np.ndarray | None = None


class _Jitter:
    """Shape makers (canonical mm) with random jitter; every draw comes from ``rng``, in call order."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def centre(self, c: Any, sd: float = 1.5) -> np.ndarray:
        return np.asarray(c, dtype=float) + self.rng.normal(0.0, sd, 3)

    def ell(
        self, c: Any, a: Any, rot: np.ndarray | None = None, deform: float = 0.05
    ) -> tuple[_Shape, np.ndarray]:
        """A jittered deformed ellipsoid and its (jittered) centre."""
        centre = self.centre(c)
        semi = np.asarray(a, dtype=float) * self.rng.uniform(0.95, 1.05, 3)
        return _ellipsoid(centre, semi, self.rng.uniform(-deform, deform, 8), rot), centre

    def tube(self, points: Any, r: float, sd: float = 1.0) -> _Shape:
        """A tube through jittered ``points`` with a random radius wobble."""
        pts = np.asarray(points, dtype=float) + self.rng.normal(0.0, sd, (len(points), 3))
        return _tube(pts, r, self.rng.uniform(-0.08, 0.08, 8))


def _part(name: str, shape_centre: Any, hu: float, **kw: Any) -> _Part:
    """A :class:`_Part` from a shape or a ``(shape, centre)`` pair (as :meth:`_Jitter.ell` returns)."""
    shape, centre = shape_centre if isinstance(shape_centre, tuple) else (shape_centre, None)
    return _Part(name, shape, hu, centre=centre, **kw)


def _organs(j: _Jitter) -> list[_Part]:
    """The parts, lowest painting priority first (later wins); canonical mm."""
    colon = [(54, 14, -46), (56, 16, -20), (52, 26, -12), (0, 40, -16), (-52, 26, 2), (-58, 6, -14)]
    colon += [(-56, 8, -44), (-24, 4, -56), (-6, -22, -62)]
    duodenum = [(14, 8, 6), (32, 8, 2), (36, 0, -10), (28, -6, -20), (4, -8, -22), (-12, -4, -18)]
    bone = {"clip": "body", "core": (0.8, 400.0)}
    # the list is built element by element, so the random draws happen in this order
    return [
        _part("right lung", j.ell((40, -4, 80), (34, 48, 42)), -850.0),
        _part("left lung", j.ell((-40, -4, 80), (34, 48, 42)), -850.0),
        _part("~psoas", j.tube([(22, -44, -80), (20, -42, 10)], 9.0), 55.0),
        _part("~psoas", j.tube([(-22, -44, -80), (-20, -42, 10)], 9.0), 55.0),
        _part("~heart", j.ell((-6, 18, 80), (32, 28, 30)), 40.0),
        _part("liver", j.ell((40, 4, 28), (34, 44, 26)), 60.0),
        _part("stomach", j.ell((-28, 22, 26), (20, 18, 20)), 40.0, core=(0.8, 15.0)),
        _part("spleen", j.ell((-55, -14, 25), (14, 24, 24)), 50.0),
        _part("intestine", j.ell((0, 18, -36), (40, 24, 20)), 30.0),
        _part("colon", j.tube(colon, 10.0), 35.0, core=(0.6, -600.0)),
        _part(
            "rectum", j.tube([(-6, -22, -62), (-2, -26, -72), (0, -30, -84)], 9.0), 30.0, core=(0.5, -400.0)
        ),
        _part("bladder", j.ell((0, 22, -62), (26, 20, 16)), 8.0),
        _part("prostate", j.ell((0, 2, -76), (11, 9, 9)), 40.0),
        _part("pancreas", j.ell((-4, -4, 6), (38, 7, 8), rot=_rot_y(15.0)), 40.0),
        _part("duodenum", j.tube(duodenum, 7.0), 35.0),
        _part("gallbladder", j.ell((28, 30, 6), (9, 11, 12)), 10.0),
        _part("right kidney", j.ell((38, -32, -5), (13, 15, 28)), 150.0, core=(0.45, 30.0)),
        _part("left kidney", j.ell((-38, -32, 0), (13, 15, 28)), 150.0, core=(0.45, 30.0)),
        _part("right adrenal gland", j.ell((26, -24, 30), (4, 7, 8)), 25.0),
        _part("left adrenal gland", j.ell((-26, -24, 30), (4, 7, 8)), 25.0),
        _part(
            "esophagus", j.tube([(-2, -8, 80), (-4, -6, 45), (-14, 10, 34)], 6.0), 40.0, core=(0.3, -800.0)
        ),
        _part("inferior vena cava", j.tube([(16, -22, -80), (16, -22, 50)], 9.0), 110.0),
        _part("aorta", j.tube([(-12, -24, -70), (-12, -24, 80)], 8.0), 170.0),
        _part(
            "~vertebra", j.tube([(0, -46, -90), (0, -46, 90)], 12.0), 700.0, clip="body", core=(0.8, 300.0)
        ),
        _part("right femoral head", j.ell((66, 0, -66), (15, 15, 15), deform=0.02), 700.0, **bone),
        _part("left femoral head", j.ell((-66, 0, -66), (15, 15, 15), deform=0.02), 700.0, **bone),
    ]


def _anatomy(rng: np.random.Generator) -> tuple[list[_Part], list[tuple[str, str, _Shape, float]]]:
    """The parts (painted in order, later wins) and the tumours (name, parent, shape, HU); canonical mm."""
    j = _Jitter(rng)
    parts = _organs(j)
    c = {p.name: p.centre for p in parts if p.centre is not None}
    tumours = [
        ("liver tumor", "liver", j.ell(c["liver"] + (12, 6, 0), (9, 9, 9), deform=0.1)[0], 20.0),
        ("liver tumor", "liver", j.ell(c["liver"] + (-14, 12, 12), (5, 5, 5), deform=0.1)[0], 25.0),
        (
            "kidney tumor",
            "left kidney",
            j.ell(c["left kidney"] + (-8, -2, 12), (7, 7, 7), deform=0.1)[0],
            35.0,
        ),
        (
            "kidney cyst",
            "right kidney",
            j.ell(c["right kidney"] + (6, 4, -12), (5, 5, 5), deform=0.05)[0],
            5.0,
        ),
        ("lung tumor", "right lung", j.ell((44, -14, 62), (8, 8, 8), deform=0.1)[0], 20.0),
    ]
    return parts, tumours


def _check_grid(shape: Any, spacing: Any) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """``(shape, spacing)`` as int and float triples, or an :class:`InputError` saying what is wrong."""
    shape_t = tuple(int(s) for s in shape)
    spacing_t = tuple(float(s) for s in spacing)
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise InputError(f"make_phantom needs a 3-D shape with at least 8 voxels per axis, got {shape!r}.")
    if len(spacing_t) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_t):
        raise InputError(f"make_phantom needs three positive voxel spacings in mm, got {spacing!r}.")
    return shape_t, spacing_t  # type: ignore[return-value]


def _body_sections(grid: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D (X, Y) masks of the body, the outer muscle boundary and the abdominal cavity (constant along z)."""
    x2 = grid.axes[0][:, None] ** 2
    y2 = grid.axes[1][None, :] ** 2
    return tuple(x2 / ab[0] ** 2 + y2 / ab[1] ** 2 < 1.0 for ab in (_BODY, _MUSCLE, _CAVITY))  # type: ignore[return-value]


def _paint_part(
    part: _Part, grid: _Grid, hu: np.ndarray, owner: np.ndarray, clip2d: np.ndarray, label: int
) -> None:
    """Paint one part into ``hu`` and ``owner`` (both modified in place), clipped to ``clip2d`` (X, Y)."""
    made = part.shape(grid)
    if made is None:
        return
    sl, rho = made
    region = (rho < 1.0) & clip2d[sl[0], sl[1]][:, :, None]
    owner[sl][region] = label
    block = hu[sl]
    block[region] = part.hu
    if part.core is not None:
        block[region & (rho < part.core[0])] = part.core[1]
    if part.name == "stomach":  # an air cap in the non-dependent (anterior) lumen
        _, y, _ = grid.coords(sl)
        assert part.centre is not None
        block[region & (rho < 0.8) & (y > part.centre[1] + 6.0)] = -950.0
    if part.name == "intestine":  # gas pockets between loops
        x, y, z = grid.coords(sl)
        pockets = np.sin(x / 5.0) * np.sin(y / 6.0 + 1.0) * np.sin(z / 4.0 + 2.0) > 0.55
        block[region & pockets] = -700.0


def _paint_organs(grid: _Grid, parts: list[_Part]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The float32 HU array of body and organs, and the organ masks (universal name → bool (X, Y, Z))."""
    body2d, muscle2d, cavity2d = _body_sections(grid)
    section = np.where(
        cavity2d, _HU_CAVITY, np.where(muscle2d, _HU_MUSCLE, np.where(body2d, _HU_FAT, _HU_AIR))
    )
    hu = np.repeat(section.astype(np.float32)[:, :, None], grid.shape[2], axis=2)
    owner = np.zeros(grid.shape, dtype=np.int16)
    ids: dict[str, int] = {}  # unlabelled tissue ("~name") gets a negative id
    for part in parts:
        ids.setdefault(
            part.name, resolve_class(part.name).index if not part.name.startswith("~") else -len(ids) - 1
        )
        _paint_part(part, grid, hu, owner, cavity2d if part.clip == "cavity" else body2d, ids[part.name])
    return hu, {name: owner == i for name, i in ids.items() if i > 0}


def _paint_tumours(
    grid: _Grid, tumours: list[tuple[str, str, _Shape, float]], hu: np.ndarray, masks: dict[str, np.ndarray]
) -> None:
    """Paint the tumours inside their parent organ into ``hu`` and ``masks`` (both modified in place)."""
    for name, parent, shape_fn, value in tumours:
        made = shape_fn(grid)
        if made is None or parent not in masks:
            continue
        sl, rho = made
        region = (rho < 1.0) & masks[parent][sl]
        if name not in masks:
            masks[name] = np.zeros(grid.shape, dtype=bool)
        masks[name][sl] |= region
        hu[sl][region] = value


def make_phantom(
    shape: tuple[int, int, int] = (128, 128, 96),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    seed: int = 0,
) -> Phantom:
    """Make a deterministic synthetic abdominal CT with labels.

    Args:
        shape: Grid size (X, Y, Z) in voxels (each ≥ 8).
        spacing: Voxel size in mm (x, y, z). The anatomy fills the field of view ``shape * spacing``.
        seed: Seeds organ jitter, deformation and noise; the same seed gives the same phantom.

    Returns:
        A :class:`Phantom` (HU volume, one-vs-all masks of ≥ 14 universal classes, int16 label map).

    >>> p = make_phantom((48, 48, 36), spacing=(4.0, 4.0, 4.0))
    >>> bool((p.masks["liver tumor"] <= p.masks["liver"]).all())  # one-vs-all: the tumour is liver too
    True
    """
    from scipy import ndimage

    shape_t, spacing_t = _check_grid(shape, spacing)
    rng = np.random.default_rng(seed)
    grid = _Grid(shape_t, spacing_t)
    parts, tumours = _anatomy(rng)
    hu, masks = _paint_organs(grid, parts)
    _paint_tumours(grid, tumours, hu, masks)
    masks = {n: m for n, m in sorted(masks.items(), key=lambda nm: resolve_class(nm[0]).index) if m.any()}

    sigma = [_BLUR_MM / s for s in spacing_t]
    hu = ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest")
    hu += rng.standard_normal(shape_t, dtype=np.float32) * np.float32(_NOISE_SD_HU)

    volume = volume_from_array(hu, spacing=spacing_t, name="phantom")
    label_map = masks_to_label_map(masks)
    return Phantom(volume=volume, masks=masks, label_map=label_map, classes=list(masks), seed=seed)
