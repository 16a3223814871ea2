"""Preprocessing of a CT for the network, and the exact inverse back onto the source grid.

The paper's pipeline, on a :class:`~universal.io.Volume` that is already RAS+:

1. **Foreground crop** — the bounding box of voxels with HU above ``foreground_hu`` (the body, the table),
   plus ``margin_mm``; the box is kept (in source voxels) to map results back.
2. **Resampling** of the cropped box to ``spacing_mm`` (1.5 mm isotropic; 3 mm for the fast mode), trilinear.
3. **HU window** ``[-175, 250]`` scaled to ``[0, 1]`` (clipped).

Before step 2 allocates anything, the prepared grid's shape is computed (:func:`prepared_shape`, the same
computation ``preprocess`` then uses) and a grid of more than :data:`MAX_PREPARED_VOXELS` voxels is refused
(:func:`check_prepared_size`): a small file whose header claims a coarse spacing must not ask for 30 GB.

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
from typing import Any

import numpy as np

__all__ = [
    "CONVENTIONS",
    "MAX_PREPARED_VOXELS",
    "OfficialPrepared",
    "PreprocessConfig",
    "Prepared",
    "prepare",
    "prepare_official",
    "check_prepared_size",
    "prepared_shape",
    "preprocess",
    "foreground_box",
    "resample_to_source",
    "spacing_text",
    "window",
]


def spacing_text(spacing: Any) -> str:
    """A grid spacing as people write it: ``3 mm`` when isotropic, else ``0.8 × 0.8 × 2.5 mm``.

    >>> spacing_text((3.0, 3.0, 3.0)), spacing_text([0.8, 0.8, 2.5])
    ('3 mm', '0.8 × 0.8 × 2.5 mm')
    """
    sides = [f"{float(v):g}" for v in (np.atleast_1d(spacing))]
    return (sides[0] if len(set(sides)) == 1 else " × ".join(sides)) + " mm"


#: grid conventions: how the prepared grid is laid over the source grid (``"universal"``: crop, then resample with
#: box-aligned voxel centres, as described above; ``"official"``: the official release's MONAI chain, resample with
#: ``Spacingd`` then crop, inverted with ``Invertd``: :func:`prepare_official`)
CONVENTIONS = ("universal", "official")

MAX_PREPARED_VOXELS = 256 * 1024**2
"""Most voxels the prepared grid (the crop box resampled to the model's spacing) may hold: 268 million, a 1 GiB
float32 image; with the inference's buffers (its padded copy, one boolean mask per class, the rolling logit slab)
a run needs about 10 GiB for 32 classes at that size. A whole-body CT at 1.5 mm holds about 150 million. Checked
by :func:`preprocess` *before* anything is resampled (:func:`prepared_shape`), so that a file of a few MB whose
header asks for a huge grid is refused with a message instead of exhausting the memory; a Predictor's setting
``max_voxels`` overrides it (the CLI and the dashboard run through a Predictor, so they use this limit)."""

#: bytes per voxel of the prepared float32 image (for messages; the inference needs several times more)
_IMAGE_BYTES_PER_VOXEL = 4


@dataclass(frozen=True)
class PreprocessConfig:
    """How a CT is prepared for the network.

    Attributes:
        spacing_mm: Target isotropic voxel size in mm (1.5 in the paper; 3.0 for the fast mode), or one value per axis.
        hu_window: (low, high) HU mapped linearly to [0, 1] and clipped.
        crop_foreground: Crop to the bounding box of voxels with HU > ``foreground_hu`` (plus ``margin_mm``).
        foreground_hu: HU threshold of the foreground (body, table); -500 keeps the body outline, lungs included.
        margin_mm: Margin added on every side of the foreground box, in mm (clipped to the volume).
        convention: Grid convention (:data:`CONVENTIONS`): ``"universal"`` (:func:`preprocess`) or ``"official"``
            (:func:`prepare_official`: the official release's chain, where the foreground is found after windowing,
            i.e. HU above ``max(foreground_hu, hu_window[0])``, and ``margin_mm`` is rounded up to whole voxels of the
            resampled grid).

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

    def to_source(self, arr: np.ndarray, order: int | None = None, threshold: float = 0.5) -> np.ndarray:
        """``arr`` (X', Y', Z') or (C, X', Y', Z') on the prepared grid → the source grid: :func:`resample_to_source`
        (``order=None``: linear, boolean masks thresholded at ``threshold``; integer labels need ``order=0``)."""
        return resample_to_source(arr, self, order=1 if order is None else order, threshold=threshold)

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


@dataclass(frozen=True)
class _Plan:
    """The prepared grid of a volume, decided before any resampling: crop box, source spacing, its shape ``m``."""

    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]


def _plan(shape, affine, config: PreprocessConfig, hu: np.ndarray | None = None) -> _Plan:
    """The crop box (of ``hu`` when given and cropping, else the whole grid) and the prepared grid's shape."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    if config.crop_foreground and hu is not None:
        box = foreground_box(hu, spacing, config.foreground_hu, config.margin_mm)
    else:
        box = tuple((0, int(s)) for s in shape)
    n = [b1 - b0 for b0, b1 in box]
    m = tuple(max(1, int(round(ni * si / ti))) for ni, si, ti in zip(n, spacing, config.target_spacing()))
    return _Plan(box, spacing, m)  # type: ignore[arg-type]


def prepared_shape(volume, config: PreprocessConfig | None = None) -> tuple[int, int, int]:
    """Shape (X', Y', Z') of the grid :func:`preprocess` would make, computed without resampling anything.

    Args:
        volume: A :class:`~universal.io.Volume` (its foreground box is found when ``config`` crops), or a
            ``(shape, affine)`` pair (then the whole grid is used: the exact shape without cropping, an upper
            bound with it).
        config: The preprocessing (default :class:`PreprocessConfig`).

    :func:`preprocess` uses the same computation, so the two never disagree.

    >>> prepared_shape(((64, 64, 40), np.diag([200.0, 200.0, 200.0, 1.0])), PreprocessConfig(spacing_mm=3.0))
    (4267, 4267, 2667)
    """
    config = config or PreprocessConfig()
    if isinstance(volume, tuple) and len(volume) == 2:
        shape, affine = volume
        return _plan(tuple(int(s) for s in shape), affine, config).shape
    hu = np.asarray(volume.array)
    return _plan(hu.shape, volume.affine, config, hu).shape


def check_prepared_size(
    shape, max_voxels: int = MAX_PREPARED_VOXELS, *, name: str = "volume", spacing=None
) -> None:
    """An :class:`~universal.errors.InputError` when a prepared grid of ``shape`` would hold more than
    ``max_voxels`` voxels (:data:`MAX_PREPARED_VOXELS` by default), saying what it would cost and what to do.

    >>> check_prepared_size((100, 100, 100), max_voxels=10**6)
    >>> check_prepared_size((4267, 4267, 2667), name="coarse")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    universal.errors.InputError: coarse: the prepared grid would be 4267 x 4267 x 2667 voxels (48.6 billion...
    """
    from universal.errors import InputError

    voxels = math.prod(int(s) for s in shape)
    if voxels <= max_voxels:
        return
    at = ""
    if spacing is not None:
        at = f" at {spacing[0]:g} mm" if len(set(spacing)) == 1 else f" at {', '.join(f'{s:g}' for s in spacing)} mm"
    gib = voxels * _IMAGE_BYTES_PER_VOXEL / 1024**3
    raise InputError(
        f"{name}: the prepared grid would be {' x '.join(str(int(s)) for s in shape)} voxels "
        f"({voxels / 1e9:.3g} billion{at}; {gib:,.1f} GiB for the image alone, more for the inference), over the "
        f"limit of {max_voxels:,} voxels: check the voxel spacing in the file's header, crop the scan to the "
        "region of interest or use the fast mode (a coarser spacing); raise the limit (max_voxels) only if this "
        "machine has the memory."
    )


def preprocess(
    volume, config: PreprocessConfig | None = None, *, max_voxels: int | None = MAX_PREPARED_VOXELS
) -> Prepared:
    """Crop, resample and window a RAS+ :class:`~universal.io.Volume` for the network.

    Args:
        volume: The CT (``array`` float32 (X, Y, Z) HU on a RAS+ grid, ``affine``).
        config: Spacing, window and crop settings (default: the paper's 1.5 mm, [-175, 250] HU, foreground crop).
        max_voxels: Refuse (``InputError``, before resampling) a prepared grid of more voxels than this
            (:func:`check_prepared_size`; default :data:`MAX_PREPARED_VOXELS`); ``None``: no limit.

    Returns:
        A :class:`Prepared` with the float32 (X', Y', Z') array in [0, 1] and the geometry to invert.
    """
    import torch

    config = config or PreprocessConfig()
    hu = np.asarray(volume.array)
    if hu.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {hu.shape}")
    affine = np.asarray(volume.affine, dtype=np.float64)
    plan = _plan(hu.shape, affine, config, hu)
    if max_voxels is not None:
        name = str(getattr(volume, "name", "volume"))
        check_prepared_size(plan.shape, max_voxels, name=name, spacing=config.target_spacing())
    box, m = plan.box, list(plan.shape)
    n = [b1 - b0 for b0, b1 in box]
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


# ------------------------------------------------------------------------------------- the official convention
def prepare(volume, config: PreprocessConfig | None = None, *, max_voxels: int | None = MAX_PREPARED_VOXELS):
    """Prepare a RAS+ :class:`~universal.io.Volume` under ``config.convention``.

    ``"universal"``: :func:`preprocess` (a :class:`Prepared`); ``"official"``: :func:`prepare_official` (an
    :class:`OfficialPrepared`). Both results offer ``array``, ``affine``, ``spacing``, ``shape``, ``box``,
    ``config`` and ``to_source(arr, order=None)``.
    """
    config = config or PreprocessConfig()
    if config.convention == "official":
        return prepare_official(volume, config, max_voxels=max_voxels)
    return preprocess(volume, config, max_voxels=max_voxels)


#: classes packed into one float32 channel when masks go back through ``Invertd`` (integers below 2**24 are
#: exact in float32; MONAI resamples in float64 and returns float32)
_BITS_PER_CHANNEL = 16


@dataclass(frozen=True, eq=False)
class OfficialPrepared:
    """A CT prepared by the official release's chain (:func:`prepare_official`) and what is needed to invert it.

    Attributes:
        array: float32 (X', Y', Z') in [0, 1]: resampled by ``Spacingd``, windowed, cropped to the foreground.
        box: Crop box on the *resampled* grid, ``((x0, x1), (y0, y1), (z0, z1))`` (half-open; it reaches outside
            that grid where a margin makes ``CropForegroundd`` pad).
        resampled_shape: Shape of the ``Spacingd`` output (before the crop).
        source_shape: Shape (X, Y, Z) of the source (RAS+) grid.
        source_affine: (4, 4) voxel → world affine of the source grid.
        spacing: Spacing of the prepared grid in mm (exactly the target spacing: MONAI's convention).
        affine: (4, 4) voxel → world affine of the prepared grid.
        config: The configuration used (``convention == "official"``).
        image: The MONAI ``MetaTensor`` (1, X', Y', Z') with MONAI's record of the applied operations.
        transform: The MONAI ``Compose`` of dictionary transforms that made ``image`` (what ``Invertd`` inverts).
    """

    array: np.ndarray
    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    resampled_shape: tuple[int, int, int]
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    config: PreprocessConfig
    image: Any = field(repr=False)
    transform: Any = field(repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape (X', Y', Z') of the prepared grid."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    def to_source(self, arr: np.ndarray, order: int | None = None, *, chunk: int = 4) -> np.ndarray:
        """Map ``arr`` (X', Y', Z') or (C, X', Y', Z') back onto the source grid with MONAI's ``Invertd``.

        Args:
            arr: Boolean masks, integer labels (below 2**24) or floating point values on the prepared grid.
            order: 0 = nearest neighbour (``Invertd(nearest_interp=True)``, the official chain's choice for
                masks), 1 = the recorded bilinear interpolation (probabilities); ``None``: 0 for booleans and
                integers, 1 for floating point values.
            chunk: Floating point channels inverted per ``Invertd`` call (bounds MONAI's float64 buffers).

        Returns:
            (X, Y, Z) or (C, X, Y, Z) on the source grid: bool for boolean input, the input's dtype for integers,
            float32 for floating point input.

        All boolean channels go back in **one** nearest-neighbour inversion: 16 masks are packed as the bits of one
        float32 channel (nearest neighbour copies a value whole, so every bit lands where ``Invertd`` would put
        that mask), which gives the per-mask results at the cost of ``ceil(C / 16)`` channels.
        """
        arr = np.asarray(arr)
        if arr.ndim not in (3, 4) or tuple(arr.shape[-3:]) != self.shape:
            raise ValueError(f"expected shape (C,) + {self.shape}, got {arr.shape}")
        floating = np.issubdtype(arr.dtype, np.floating)
        order = (1 if floating else 0) if order is None else order
        if order not in (0, 1):
            raise ValueError(f"order must be 0 or 1, got {order}")
        if order == 1 and not floating:
            raise ValueError("masks and integer labels go back with order=0 (nearest neighbour)")
        stack = arr[None] if arr.ndim == 3 else arr
        if stack.dtype == np.bool_:
            out = self._masks_to_source(stack)
        elif not floating:
            if stack.size and (int(stack.min()) < 0 or int(stack.max()) >= 2**24):
                raise ValueError("integer labels must be in [0, 2**24) to go back exactly")
            out = self._invert(stack.astype(np.float32), nearest=True).astype(stack.dtype)
        else:
            parts = [
                self._invert(np.asarray(stack[i : i + chunk], dtype=np.float32), nearest=order == 0)
                for i in range(0, stack.shape[0], max(1, int(chunk)))
            ]
            out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out[0] if arr.ndim == 3 else out

    def _masks_to_source(self, masks: np.ndarray) -> np.ndarray:
        n = masks.shape[0]
        groups = range(0, n, _BITS_PER_CHANNEL)
        packed = np.zeros((len(groups), *self.shape), dtype=np.int32)
        for g, start in enumerate(groups):
            for bit, c in enumerate(range(start, min(n, start + _BITS_PER_CHANNEL))):
                packed[g] |= masks[c].astype(np.int32) << bit
        codes = self._invert(packed.astype(np.float32), nearest=True).astype(np.int32)
        del packed
        out = np.empty((n, *self.source_shape), dtype=bool)
        for c in range(n):
            g, bit = divmod(c, _BITS_PER_CHANNEL)
            np.not_equal(codes[g] & (1 << bit), 0, out=out[c])
        return out

    def _invert(self, stack: np.ndarray, nearest: bool) -> np.ndarray:
        """``Invertd`` of a (C, X', Y', Z') float32 stack through this chain (every channel at once)."""
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        inv = Invertd(keys="pred", transform=self.transform, orig_keys="image", nearest_interp=nearest)
        # a MetaTensor (Invertd skips a plain tensor with a warning); its record and meta are the image's
        pred = MetaTensor(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)), affine=self.image.affine)
        with torch.no_grad():
            out = inv({"image": self.image, "pred": pred})["pred"]
        out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
        out = out.numpy()
        if tuple(out.shape[1:]) != self.source_shape:
            raise RuntimeError(f"Invertd returned {tuple(out.shape)}, expected (C,) + {self.source_shape}")
        return out


class _Above:
    """``CropForegroundd``'s ``select_fn``: windowed intensity above a level (the default is above 0)."""

    def __init__(self, level: float) -> None:
        self.level = float(level)

    def __call__(self, img):
        return img > self.level


def official_transform(config: PreprocessConfig):
    """The official release's preprocessing as MONAI dictionary transforms on key ``"image"``.

    ``Orientationd`` (RAS), ``Spacingd`` (``config``'s spacing, bilinear, every other argument at its default),
    ``ScaleIntensityRanged`` (the HU window to [0, 1], clipped), ``CropForegroundd`` on the windowed image (when
    ``config.crop_foreground``). With the official values (``foreground_hu`` = the window's low end, no margin) the
    crop uses MONAI's defaults (foreground = windowed intensity > 0), as the release does.
    """
    from monai.transforms import (
        Compose,
        CropForegroundd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    lo, hi = config.hu_window
    steps = [
        Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys="image", pixdim=config.target_spacing(), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if config.crop_foreground:
        kwargs: dict[str, Any] = {}
        level = (min(max(config.foreground_hu, lo), hi) - lo) / (hi - lo)
        if level > 0:
            kwargs["select_fn"] = _Above(level)
        if config.margin_mm > 0:
            kwargs["margin"] = [int(math.ceil(config.margin_mm / t - 1e-9)) for t in config.target_spacing()]
        steps.append(CropForegroundd(keys="image", source_key="image", **kwargs))
    return Compose(steps)


def prepare_official(
    volume, config: PreprocessConfig | None = None, *, max_voxels: int | None = MAX_PREPARED_VOXELS
) -> OfficialPrepared:
    """Prepare a RAS+ :class:`~universal.io.Volume` the way the official release does (MONAI's transforms).

    The chain of ``../shared/reference/OFFICIAL_PIPELINE.md`` steps 2-6 (:func:`official_transform`): reorient to
    RAS (a no-op: volumes are RAS+ already), resample to the target spacing with ``Spacingd`` (MONAI's
    affine-based grid: the first voxel centre is kept and the spacing is exact), window, crop to the foreground.
    The result keeps MONAI's record of the operations so that :meth:`OfficialPrepared.to_source` maps results back
    with ``Invertd`` (step 10).

    Args:
        volume: The CT (``array`` float32 (X, Y, Z) HU on a RAS+ grid, ``affine``); never modified.
        config: Spacing, window and crop settings (default: the official values, ``convention="official"``).
        max_voxels: Refuse (``InputError``, before resampling) a resampled grid of more voxels than this.
    """
    import torch
    from monai.data import MetaTensor

    config = config or PreprocessConfig(foreground_hu=-175.0, margin_mm=0.0, convention="official")
    hu = np.asarray(volume.array)
    if hu.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {hu.shape}")
    affine = np.asarray(volume.affine, dtype=np.float64)
    target = config.target_spacing()
    if max_voxels is not None:  # Spacingd's grid spans the source's voxel centres: (n - 1) * s / t + 1 voxels
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        shape = [int(math.floor((n - 1) * s / t + 1e-6)) + 1 for n, s, t in zip(hu.shape, spacing, target)]
        check_prepared_size(shape, max_voxels, name=str(getattr(volume, "name", "volume")), spacing=target)
    data = np.ascontiguousarray(hu, dtype=np.float32)
    if not data.flags.writeable:
        data = data.copy()
    transform = official_transform(config)
    d = {"image": MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(affine))}
    resampled = None
    with torch.no_grad():
        for step in transform.transforms:  # Compose's steps, one by one, to see the grid before the crop
            if type(step).__name__ == "CropForegroundd":
                resampled = d["image"]
            d = step(d)
    image = d["image"]
    if image.data_ptr() == data.ctypes.data:  # nothing was copied (a no-op chain): never hand out the input
        image = image.clone()
    prep_affine = image.affine.numpy().astype(np.float64)
    if resampled is None:
        resampled_shape = tuple(int(s) for s in image.shape[1:])
        box = tuple((0, s) for s in resampled_shape)
    else:  # the crop's first voxel on the resampled grid, from the affines before and after the crop
        resampled_shape = tuple(int(s) for s in resampled.shape[1:])
        start = np.linalg.solve(resampled.affine.numpy().astype(np.float64), prep_affine[:, 3])[:3]
        lo = [int(round(v)) for v in start]
        box = tuple((a, a + int(n)) for a, n in zip(lo, image.shape[1:]))
        del resampled
    arr = image.as_tensor()[0].numpy()
    return OfficialPrepared(
        array=arr,
        box=box,  # type: ignore[arg-type]
        resampled_shape=resampled_shape,  # type: ignore[arg-type]
        source_shape=tuple(int(s) for s in hu.shape),  # type: ignore[arg-type]
        source_affine=affine.copy(),
        spacing=tuple(float(s) for s in np.linalg.norm(prep_affine[:3, :3], axis=0)),  # type: ignore[arg-type]
        affine=prep_affine,
        config=config,
        image=image,
        transform=transform,
    )
