"""Preprocessing of a CT for the network, and the exact inverse back onto the source grid.

The paper's pipeline, on a :class:`~universal.io.Volume` that is already RAS+:

1. **Foreground crop** — the bounding box of voxels with HU above ``foreground_hu`` (the body, the table),
   plus ``margin_mm``; the box is kept (in source voxels) to map results back.
2. **Resampling** of the cropped box to ``spacing_mm`` (1.5 mm isotropic; 3 mm for the fast mode), trilinear.
3. **HU window** ``[-175, 250]`` scaled to ``[0, 1]`` (clipped).

Geometry (the single convention used in both directions). For one axis, let the crop box hold ``n`` source voxels
starting at source index ``b`` and the prepared grid hold ``m = max(1, round(n * s / t))`` voxels (``s`` the source
spacing, ``t`` the target spacing). Voxel *centres* map as in ``torch.nn.functional.interpolate(...,
align_corners=False)`` with an explicit size: prepared voxel ``j`` sits at source coordinate
``b + (j + 0.5) * n / m - 0.5`` and source voxel ``i`` at prepared coordinate ``(i - b + 0.5) * m / n - 0.5``.
Both grids therefore cover exactly the same physical box (the crop box's outer faces), the effective prepared spacing
is ``s * n / m`` (within half a voxel over the box of the requested one; it is recorded in
:attr:`Prepared.spacing` and :attr:`Prepared.affine`), and the forward and inverse maps are exact inverses of
each other, so a structure's centroid in world millimetres is preserved through ``preprocess`` →
:func:`resample_to_source`.

Interpolation is separable (one axis at a time, linear or nearest, edge-clamped) and is implemented here with
``torch.index_select`` so that the inverse can be computed on a sub-box only (a class's bounding box), which is
what makes mapping 32 masks back onto a large CT cheap.

>>> import numpy as np
>>> from universal.io import volume_from_array
>>> hu = np.full((40, 40, 10), -1000, np.float32); hu[10:30, 10:30, 2:8] = 40
>>> p = preprocess(volume_from_array(hu, spacing=(0.75, 0.75, 3.0)), PreprocessConfig(margin_mm=0))
>>> p.box, p.shape
(((10, 30), (10, 30), (2, 8)), (10, 10, 12))
>>> round(float(p.array.min()), 3), round(float(p.array.max()), 3)  # (40 + 175) / 425
(0.506, 0.506)
>>> resample_to_source(p.array > 0.5, p).shape
(40, 40, 10)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CONVENTIONS",
    "PreprocessConfig",
    "Prepared",
    "preprocess",
    "foreground_box",
    "resample_to_source",
    "window",
]


#: grid conventions: how the prepared grid is laid over the source grid (``"universal"``: crop, then resample with
#: box-aligned voxel centres, as described above)
CONVENTIONS = ("universal",)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a CT is prepared for the network.

    Attributes:
        spacing_mm: Target isotropic voxel size in mm (1.5 in the paper; 3.0 for the fast mode), or one value per axis.
        hu_window: (low, high) HU mapped linearly to [0, 1] and clipped.
        crop_foreground: Crop to the bounding box of voxels with HU > ``foreground_hu`` (plus ``margin_mm``).
        foreground_hu: HU threshold of the foreground (body, table); -500 keeps the body outline, lungs included.
        margin_mm: Margin added on every side of the foreground box, in mm (clipped to the volume).
        convention: Grid convention (:data:`CONVENTIONS`).

    Every value is checked here, where it enters (``InputError`` naming the field and what is allowed).
    """

    spacing_mm: float | tuple[float, float, float] = 1.5
    hu_window: tuple[float, float] = (-175.0, 250.0)
    crop_foreground: bool = True
    foreground_hu: float = -500.0
    margin_mm: float = 5.0
    convention: str = "universal"

    def __post_init__(self) -> None:
        from universal.errors import InputError

        try:
            spacing = self.target_spacing()
        except (TypeError, ValueError):
            spacing = ()
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise InputError(
                f"preprocessing.spacing_mm is {self.spacing_mm!r}; it must be one positive number of mm or three"
            )
        if not np.isscalar(self.spacing_mm):
            object.__setattr__(self, "spacing_mm", spacing)
        try:
            lo, hi = (float(v) for v in self.hu_window)
        except (TypeError, ValueError):
            lo = hi = float("nan")
        if not hi > lo:
            raise InputError(
                f"preprocessing.hu_window is {self.hu_window!r}; it must be (low, high) HU with high > low"
            )
        object.__setattr__(self, "hu_window", (lo, hi))
        if not isinstance(self.crop_foreground, (bool, np.bool_)):
            raise InputError(
                f"preprocessing.crop_foreground is {self.crop_foreground!r}; it must be true or false"
            )
        object.__setattr__(self, "crop_foreground", bool(self.crop_foreground))
        for name in ("foreground_hu", "margin_mm"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float, np.floating, np.integer))
                or not math.isfinite(v)
            ):
                raise InputError(f"preprocessing.{name} is {v!r}; it must be a finite number")
            object.__setattr__(self, name, float(v))
        if self.margin_mm < 0:
            raise InputError(f"preprocessing.margin_mm is {self.margin_mm!r}; it must be 0 or more")
        if self.convention not in CONVENTIONS:
            raise InputError(
                f"preprocessing.convention is {self.convention!r}; it must be one of {', '.join(CONVENTIONS)}"
            )

    def target_spacing(self) -> tuple[float, float, float]:
        s = self.spacing_mm
        if np.isscalar(s):
            return (float(s),) * 3  # type: ignore[return-value]
        t = tuple(float(v) for v in s)  # type: ignore[union-attr]
        if len(t) != 3:
            raise ValueError(f"spacing_mm must be one number or three, got {s!r}")
        return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Prepared:
    """A preprocessed CT and the exact geometry needed to map results back.

    Attributes:
        array: float32 (X', Y', Z') in [0, 1] on the prepared grid (crop box resampled to the target spacing).
        box: Crop box in source voxels, ``((x0, x1), (y0, y1), (z0, z1))`` (half-open).
        source_shape: Shape (X, Y, Z) of the source (RAS+) grid.
        source_affine: (4, 4) voxel → world affine of the source grid.
        spacing: Effective spacing of the prepared grid in mm (≈ the target spacing).
        affine: (4, 4) voxel → world affine of the prepared grid.
        config: The configuration used.
    """

    array: np.ndarray
    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    config: PreprocessConfig = field(default_factory=PreprocessConfig)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape (X', Y', Z') of the prepared grid."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def zoom(self) -> tuple[float, float, float]:
        """Per-axis factor prepared voxels / source voxels of the crop box (``m / n``)."""
        return tuple(m / (b1 - b0) for m, (b0, b1) in zip(self.shape, self.box))  # type: ignore[return-value]

    def source_to_prepared(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous source voxel coordinates (N, 3) → prepared voxel coordinates (N, 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        b0 = np.array([b[0] for b in self.box], dtype=np.float64)
        return (ijk - b0 + 0.5) * np.asarray(self.zoom) - 0.5


def window(hu: np.ndarray, hu_window: tuple[float, float] = (-175.0, 250.0)) -> np.ndarray:
    """HU → [0, 1] float32 through a clipped linear window.

    >>> window(np.array([-1000.0, -175.0, 37.5, 250.0, 3000.0]))
    array([0. , 0. , 0.5, 1. , 1. ], dtype=float32)
    """
    lo, hi = (float(v) for v in hu_window)
    if not hi > lo:
        raise ValueError(f"hu_window must be (low, high) with high > low, got {hu_window!r}")
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def foreground_box(
    hu: np.ndarray, spacing: tuple[float, float, float], threshold_hu: float = -500.0, margin_mm: float = 0.0
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Half-open bounding box ``((x0, x1), (y0, y1), (z0, z1))`` of voxels with HU > ``threshold_hu``.

    The margin is converted to whole voxels per axis (rounded up) and clipped to the volume. A volume without
    foreground gives the whole grid.
    """
    fg = np.asarray(hu) > threshold_hu
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(fg.any(axis=other))
        n = fg.shape[axis]
        if idx.size == 0:
            return tuple((0, s) for s in fg.shape)  # type: ignore[return-value]
        pad = int(math.ceil(margin_mm / spacing[axis] - 1e-9)) if margin_mm > 0 else 0
        box.append((max(0, int(idx[0]) - pad), min(n, int(idx[-1]) + 1 + pad)))
    return tuple(box)  # type: ignore[return-value]


def preprocess(volume, config: PreprocessConfig | None = None) -> Prepared:
    """Crop, resample and window a RAS+ :class:`~universal.io.Volume` for the network.

    Args:
        volume: The CT (``array`` float32 (X, Y, Z) HU on a RAS+ grid, ``affine``).
        config: Spacing, window and crop settings (default: the paper's 1.5 mm, [-175, 250] HU, foreground crop).

    Returns:
        A :class:`Prepared` with the float32 (X', Y', Z') array in [0, 1] and the geometry to invert.
    """
    import torch

    config = config or PreprocessConfig()
    hu = np.asarray(volume.array)
    if hu.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {hu.shape}")
    affine = np.asarray(volume.affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    if config.crop_foreground:
        box = foreground_box(hu, spacing, config.foreground_hu, config.margin_mm)
    else:
        box = tuple((0, s) for s in hu.shape)
    target = config.target_spacing()
    n = [b1 - b0 for b0, b1 in box]
    m = [max(1, int(round(ni * si / ti))) for ni, si, ti in zip(n, spacing, target)]
    zoom = np.array([mi / ni for mi, ni in zip(m, n)])  # prepared voxels per source voxel

    crop = hu[tuple(slice(b0, b1) for b0, b1 in box)]
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))
        for axis in _axis_order(n, m):
            # prepared voxel j sits at crop coordinate (j + 0.5) * n / m - 0.5
            coords = (np.arange(m[axis]) + 0.5) / zoom[axis] - 0.5
            t = _resample_axis(t, axis, coords, n[axis], order=1)
        arr = t.numpy()
    arr = window(arr, config.hu_window)

    # prepared voxel j -> source voxel b + (j + 0.5) / zoom - 0.5 -> world
    b0 = np.array([b[0] for b in box], dtype=np.float64)
    vox = np.eye(4)
    vox[:3, :3] = np.diag(1.0 / zoom)
    vox[:3, 3] = b0 + 0.5 / zoom - 0.5
    new_affine = affine @ vox
    eff_spacing = tuple(float(s) for s in np.linalg.norm(new_affine[:3, :3], axis=0))
    return Prepared(
        array=arr,
        box=tuple((int(a), int(b)) for a, b in box),  # type: ignore[arg-type]
        source_shape=tuple(int(s) for s in hu.shape),  # type: ignore[arg-type]
        source_affine=affine.copy(),
        spacing=eff_spacing,  # type: ignore[arg-type]
        affine=new_affine,
        config=config,
    )


def resample_to_source(
    arr: np.ndarray, prepared: Prepared, order: int = 1, threshold: float = 0.5
) -> np.ndarray:
    """Map an array on the prepared grid back exactly onto the source grid (outside the crop box = 0).

    Args:
        arr: (X', Y', Z') or (C, X', Y', Z') array on the prepared grid: a boolean mask, integer labels,
            or floating point values (probabilities, logits).
        prepared: The :class:`Prepared` returned by :func:`preprocess`.
        order: 0 = nearest neighbour, 1 = linear. Integer labels need ``order=0``. A boolean mask with ``order=1`` is
            interpolated as 0/1 values and thresholded at ``threshold`` (smooth boundaries instead of staircases).
        threshold: Threshold of the linearly interpolated boolean masks.

    Returns:
        Array of shape (X, Y, Z) or (C, X, Y, Z) on the source grid, of the same dtype as ``arr``.

    Work is restricted to the bounding box of the non-zero voxels of ``arr`` (per channel), so a small mask costs
    little even on a large CT.
    """
    arr = np.asarray(arr)
    if arr.shape[-3:] != prepared.shape or arr.ndim not in (3, 4):
        raise ValueError(f"expected shape (C,) + {prepared.shape}, got {arr.shape}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order}")
    is_bool = arr.dtype == np.bool_
    if order == 1 and not is_bool and not np.issubdtype(arr.dtype, np.floating):
        raise ValueError("integer labels must be resampled with order=0 (nearest neighbour)")
    if arr.ndim == 4:
        out = np.zeros((arr.shape[0], *prepared.source_shape), dtype=arr.dtype)
        for c in range(arr.shape[0]):
            _resample_channel(arr[c], prepared, order, threshold, out[c])
        return out
    out = np.zeros(prepared.source_shape, dtype=arr.dtype)
    _resample_channel(arr, prepared, order, threshold, out)
    return out


def _resample_channel(
    arr: np.ndarray, prepared: Prepared, order: int, threshold: float, out: np.ndarray
) -> None:
    """Resample one (X', Y', Z') channel into ``out`` (source grid, pre-zeroed), over its non-zero bounding box."""
    import torch

    m = prepared.shape
    n = [b1 - b0 for b0, b1 in prepared.box]
    if tuple(n) == tuple(m):  # same grid inside the crop box (source already at the target spacing): paste
        out[tuple(slice(b0, b1) for b0, b1 in prepared.box)] = arr
        return
    sub = _nonzero_box(arr)
    if sub is None:
        return
    # one zero voxel around the non-zero box (where the grid has one), so that edge clamping inside the
    # extracted block reproduces the zeros of the full grid
    ext = [(max(0, lo - 1), min(mi, hi + 1)) for (lo, hi), mi in zip(sub, m)]
    zoom = prepared.zoom
    # the source voxels whose value can be non-zero: those whose prepared coordinate lies within reach of the
    # non-zero box (1 voxel for linear, 1/2 for nearest), inside the crop box
    reach = 1.0 if order == 1 else 0.5
    src_ranges, coords = [], []
    for axis in range(3):
        b0, b1 = prepared.box[axis]
        lo, hi = sub[axis]
        # prepared coord t(i) = (i - b0 + 0.5) * zoom - 0.5 ; need lo - reach < t(i) < hi - 1 + reach
        i_lo = int(math.floor((lo - reach + 0.5) / zoom[axis] - 0.5 + b0)) - 1
        i_hi = int(math.ceil((hi - 1 + reach + 0.5) / zoom[axis] - 0.5 + b0)) + 2
        if lo == 0:
            i_lo = b0
        if hi == m[axis]:
            i_hi = b1
        i_lo, i_hi = max(b0, i_lo), min(b1, i_hi)
        if i_hi <= i_lo:
            return
        src_ranges.append((i_lo, i_hi))
        t = (np.arange(i_lo, i_hi) - b0 + 0.5) * zoom[axis] - 0.5 - ext[axis][0]  # coordinates in the block
        coords.append(t)
    block = arr[tuple(slice(lo, hi) for lo, hi in ext)]
    n_sub = [hi - lo for lo, hi in ext]
    is_bool = arr.dtype == np.bool_
    with torch.inference_mode():
        if order == 1:
            t = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        else:
            t = torch.from_numpy(np.ascontiguousarray(block.view(np.uint8) if is_bool else block))
        for axis in _axis_order(n_sub, [len(c) for c in coords]):
            t = _resample_axis(t, axis, coords[axis], n_sub[axis], order=order)
        res = t.numpy()
    if order == 1 and is_bool:
        res = res >= threshold
    elif is_bool:
        res = res.view(np.bool_)
    out[tuple(slice(lo, hi) for lo, hi in src_ranges)] = res


def _nonzero_box(arr: np.ndarray):
    """Half-open bounding box of the non-zero voxels, or None when all are zero."""
    nz = arr != 0
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(nz.any(axis=other))
        if idx.size == 0:
            return None
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return box


def _axis_order(n_in, n_out) -> list[int]:
    """Process shrinking axes first so that intermediate arrays stay small."""
    return sorted(range(3), key=lambda a: n_out[a] / n_in[a])


def _resample_axis(t, axis: int, coords: np.ndarray, n_in: int, order: int):
    """Sample tensor ``t`` along ``axis`` at continuous input coordinates ``coords`` (edge-clamped).

    ``order=1``: linear interpolation (float tensors); ``order=0``: nearest neighbour (round half up, the
    ``nearest-exact`` convention), any dtype.
    """
    import torch

    if order == 0:
        idx = np.clip(np.floor(coords + 0.5), 0, n_in - 1).astype(np.int64)
        if len(idx) == n_in and np.array_equal(idx, np.arange(n_in)):
            return t
        return t.index_select(axis, torch.from_numpy(idx))
    c = np.clip(coords, 0.0, n_in - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (c - lo).astype(np.float32)
    if len(lo) == n_in and not w.any() and np.array_equal(lo, np.arange(n_in)):
        return t
    shape = [1, 1, 1]
    shape[axis] = len(w)
    wt = torch.from_numpy(w).reshape(shape)
    a = t.index_select(axis, torch.from_numpy(lo))
    b = t.index_select(axis, torch.from_numpy(hi))
    return torch.lerp(a, b, wt)
