"""Connected-component clean-up of predicted masks with simple anatomy rules.

Rules (each a function, testable on its own; :func:`postprocess` applies them in this order):

1. :func:`assign_sides` -- paired organs (kidneys, lungs, adrenal glands, femoral heads): the components of the right
   and the left mask are pooled and each sizeable component is given to the side of its centroid's *world* x
   (RAS+: the patient's right is at *larger* x; the affine decides, not the array axis) relative to a midline; then
   the largest component per side is kept.
2. :func:`remove_small_components` and :func:`keep_largest_component` for organs (single organs keep their largest
   component; tubular or naturally fragmented classes -- hepatic vessel, portal/splenic vein, colon, intestine --
   only lose components below the minimal volume).
3. :func:`restrict_to_parent` for tumours: a tumour component is kept only when it lies inside or touches its parent
   organ dilated by ``tumor_parent_margin_mm``; then components below the minimal volume are removed.

Connectivity: 26 (face, edge and corner neighbours) everywhere, so an oblique thin structure is one component and
"touching" includes diagonal contact. Every function works on the bounding box of its mask(s), not on the whole
volume, and returns new arrays; inputs are never modified.

>>> import numpy as np
>>> m = np.zeros((20, 20, 20), bool); m[2:8, 2:8, 2:8] = True; m[15:17, 15:17, 15:17] = True
>>> int(keep_largest_component(m).sum()), int(m.sum())
(216, 224)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage

from universal import taxonomy
from universal.errors import ClassNameError, InputError
from universal.taxonomy import world_x_mm

__all__ = [
    "CONNECTIVITY",
    "MULTI_COMPONENT_CLASSES",
    "PostprocessConfig",
    "postprocess",
    "keep_largest_component",
    "remove_small_components",
    "assign_sides",
    "restrict_to_parent",
    "body_midline_x_mm",
    "bounding_box",
]

#: Neighbourhood used for connected components (26 = faces, edges and corners).
CONNECTIVITY = 26
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)

#: Classes that are naturally in several pieces inside a CT field of view: not reduced to their largest component.
MULTI_COMPONENT_CLASSES: tuple[str, ...] = ("hepatic vessel", "portal and splenic vein", "colon", "intestine")


@dataclass(frozen=True)
class PostprocessConfig:
    """Settings of :func:`postprocess`.

    Attributes:
        enabled: ``False`` returns copies of the masks untouched.
        keep_largest: Keep only the largest component of single organs (and of each side of a paired organ).
        min_component_mm3: Components smaller than this volume (mm³) are removed (organs and tumours).
        fix_sides: Re-assign the components of paired left/right organs by world x.
        tumor_parent_margin_mm: A tumour component must lie within this distance (mm) of its parent organ.
        overrides: Per-class settings, ``{class name: {field: value}}`` for the fields above (not ``enabled``
            globally, but ``{"enabled": False}`` leaves one class untouched). Defaults turn ``keep_largest`` off for
            :data:`MULTI_COMPONENT_CLASSES`.

    >>> PostprocessConfig().for_class("colon").keep_largest
    False
    """

    enabled: bool = True
    keep_largest: bool = True
    min_component_mm3: float = 20.0
    fix_sides: bool = True
    tumor_parent_margin_mm: float = 5.0
    overrides: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: {name: {"keep_largest": False} for name in MULTI_COMPONENT_CLASSES}
    )

    def __post_init__(self) -> None:
        names = {f.name for f in fields(self)} - {"overrides"}
        for cls, over in self.overrides.items():
            bad = set(over) - names
            if bad:
                raise InputError(
                    f"unknown post-processing setting(s) {sorted(bad)} for {cls!r}; use {sorted(names)}"
                )
        if self.min_component_mm3 < 0 or self.tumor_parent_margin_mm < 0:
            raise InputError("min_component_mm3 and tumor_parent_margin_mm must be >= 0")

    def for_class(self, name: str) -> PostprocessConfig:
        """The settings that apply to one class (global values with that class's overrides)."""
        over = self.overrides.get(name)
        return replace(self, **over) if over else self


# ------------------------------------------------------------------------------------------------ helpers
def _check_mask(mask: Any, what: str = "mask") -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise InputError(f"{what} must be a 3-D (X, Y, Z) array, got shape {arr.shape}")
    return arr if arr.dtype == bool else arr != 0


def _check_affine(affine: Any) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise InputError(
            f"affine must be a finite invertible (4, 4) voxel-to-RAS+ matrix, got shape {a.shape}"
        )
    return a


def _spacing_from(spacing_or_affine: Any) -> tuple[float, float, float]:
    a = np.asarray(spacing_or_affine, dtype=np.float64)
    if a.shape == (4, 4):
        s = np.linalg.norm(a[:3, :3], axis=0)
    else:
        s = np.broadcast_to(a.ravel(), (3,)) if a.size in (1, 3) else np.array([np.nan])
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise InputError(
            f"spacing must be 3 positive numbers in mm (or a (4, 4) affine), got {spacing_or_affine!r}"
        )
    return (float(s[0]), float(s[1]), float(s[2]))


def bounding_box(mask: np.ndarray, margin: Sequence[int] = (0, 0, 0)) -> tuple[slice, ...] | None:
    """Bounding box (grown by ``margin`` voxels, clipped to the grid) of a 3-D mask as slices; ``None`` when empty.

    The first axis is found on the whole volume, the other two only on that slab (cheap for small masks).

    >>> m = np.zeros((10, 10, 10), bool); m[2:4, 5, 7:9] = True
    >>> bounding_box(m)
    (slice(2, 4, None), slice(5, 6, None), slice(7, 9, None))
    >>> bounding_box(m, (1, 1, 3))[2], bounding_box(np.zeros((4, 4, 4), bool))
    (slice(4, 10, None), None)
    """
    idx0 = np.flatnonzero(np.any(mask, axis=(1, 2)))
    if idx0.size == 0:
        return None
    slab = mask[idx0[0] : idx0[-1] + 1]
    idx1 = np.flatnonzero(np.any(slab, axis=(0, 2)))
    idx2 = np.flatnonzero(np.any(slab, axis=(0, 1)))
    out = []
    for ax, idx in enumerate((idx0, idx1, idx2)):
        lo, hi = int(idx[0]) - margin[ax], int(idx[-1]) + 1 + margin[ax]
        out.append(slice(max(lo, 0), min(hi, mask.shape[ax])))
    return tuple(out)


def _label(mask: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Components (26-connected) and their voxel counts (index 0 = background).

    ``cc3d`` (connected-components-3d, 3-4x faster on CT-sized masks) when installed, else SciPy; both number the
    components in the same raster order, so results are identical.
    """
    try:
        import cc3d
    except ImportError:  # pragma: no cover - cc3d is in requirements.txt; SciPy is the fallback
        comps, n = ndimage.label(mask, structure=_STRUCTURE)
    else:
        comps, n = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26, return_N=True)
    return comps, int(n), np.bincount(comps.ravel(), minlength=n + 1)


def _min_voxels(min_mm3: float, spacing: tuple[float, float, float]) -> float:
    return float(min_mm3) / float(np.prod(spacing))


# ------------------------------------------------------------------------------------------------ rules
def keep_largest_component(mask: Any) -> np.ndarray:
    """A new mask with only the largest 26-connected component (empty stays empty; ties: the first found)."""
    m = _check_mask(mask)
    out = np.zeros(m.shape, dtype=bool)
    box = bounding_box(m)
    if box is None:
        return out
    comps, n, sizes = _label(m[box])
    if n <= 1:
        out[box] = m[box]
        return out
    sizes[0] = 0
    out[box] = comps == int(np.argmax(sizes))
    return out


def remove_small_components(mask: Any, min_mm3: float, spacing: Any = (1.0, 1.0, 1.0)) -> np.ndarray:
    """A new mask without the 26-connected components smaller than ``min_mm3`` (mm³).

    Args:
        mask: Boolean (X, Y, Z) mask.
        min_mm3: Minimal component volume in mm³ (``0`` keeps everything).
        spacing: Voxel spacing in mm (array axis order), or the (4, 4) affine.
    """
    m = _check_mask(mask)
    sp = _spacing_from(spacing)
    out = np.zeros(m.shape, dtype=bool)
    box = bounding_box(m)
    if box is None:
        return out
    if min_mm3 <= 0:
        out[box] = m[box]
        return out
    comps, _, sizes = _label(m[box])
    keep = sizes >= _min_voxels(min_mm3, sp)
    keep[0] = False
    out[box] = keep[comps]
    return out


def body_midline_x_mm(ct: Any, affine: Any, threshold_hu: float = -500.0) -> float:
    """World x (mm) of the body's centre: the centroid of voxels above ``threshold_hu`` (air excluded).

    A better midline for :func:`assign_sides` than the grid centre when the patient is off-centre.
    """
    arr = np.asarray(ct)
    a = _check_affine(affine)
    body = arr > threshold_hu
    if not body.any():
        centre = (np.asarray(arr.shape, dtype=np.float64) - 1) / 2
        return float(world_x_mm(a, centre[None])[0])
    com = np.asarray(ndimage.center_of_mass(body), dtype=np.float64)
    return float(world_x_mm(a, com[None])[0])


def assign_sides(
    right: Any,
    left: Any,
    affine: Any,
    *,
    body_x_mm: float | None = None,
    min_component_mm3: float = 0.0,
    keep_largest: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Give each component of a paired organ to the correct side by its centroid's world x.

    The components of both masks are pooled (26-connected); components smaller than ``min_component_mm3`` are
    dropped; each remaining one goes to the patient's right when its centroid's world x is larger than the midline,
    else to the left. The midline is ``body_x_mm`` when given, else the mean centroid x of the pooled components
    when there are at least two, else the x of the grid centre. With ``keep_largest`` only the largest component per
    side is kept.

    Args:
        right: Mask of the right-side class (e.g. "right kidney"), (X, Y, Z).
        left: Mask of the left-side class; ``None`` when only the right one was predicted (then components found on
            the left side are dropped). ``right`` may be ``None`` likewise.
        affine: (4, 4) voxel → RAS+ mm affine of the grid.
        body_x_mm: World x (mm) of the body midline, e.g. from :func:`body_midline_x_mm`.
        min_component_mm3: Components below this volume (mm³) are removed and do not vote for the midline.
        keep_largest: Keep only the largest component per side.

    Returns:
        New (right, left) masks.
    """
    a = _check_affine(affine)
    r, l_ = _check_pair(right, left)
    shape = (r if r is not None else l_).shape  # type: ignore[union-attr]
    out_r, out_l = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    pooled = _pooled_components([m for m in (r, l_) if m is not None])
    if pooled is None:
        return out_r, out_l
    box, comps, n, sizes = pooled
    ids = np.arange(1, n + 1)
    ids = ids[sizes[1:] >= _min_voxels(min_component_mm3, _spacing_from(a))] if min_component_mm3 > 0 else ids
    if ids.size == 0:
        return out_r, out_l
    xs = world_x_mm(a, _centroids(comps, n, sizes, box)[ids])
    is_right = xs > _midline_x(xs, a, shape, body_x_mm)
    for side_mask, out, want in ((r, out_r, True), (l_, out_l, False)):
        chosen = ids[is_right == want]
        if side_mask is None or chosen.size == 0:
            continue
        if keep_largest:
            chosen = chosen[[int(np.argmax(sizes[chosen]))]]
        lut = np.zeros(n + 1, dtype=bool)
        lut[chosen] = True
        out[box] = lut[comps]
    return out_r, out_l


def _check_pair(right: Any, left: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The (right, left) masks as bool arrays (either may be ``None``, not both) on one grid."""
    if right is None and left is None:
        raise InputError("assign_sides needs at least one of the two masks")
    r = _check_mask(right, "right mask") if right is not None else None
    l_ = _check_mask(left, "left mask") if left is not None else None
    if r is not None and l_ is not None and r.shape != l_.shape:
        raise InputError(f"right {r.shape} and left {l_.shape} masks must be on the same grid")
    return r, l_


def _pooled_components(
    masks: Sequence[np.ndarray],
) -> tuple[tuple[slice, ...], np.ndarray, int, np.ndarray] | None:
    """``(box, components, count, sizes)`` of the union of ``masks`` on its bounding box; ``None`` when empty."""
    boxes = [b for b in (bounding_box(m) for m in masks) if b is not None]
    if not boxes:
        return None
    box = tuple(slice(min(b[ax].start for b in boxes), max(b[ax].stop for b in boxes)) for ax in range(3))
    pooled = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    for m in masks:
        pooled |= m[box]
    comps, n, sizes = _label(pooled)
    return box, comps, n, sizes


def _centroids(comps: np.ndarray, n: int, sizes: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """(n + 1, 3) centroids of the components, in voxel coordinates of the full grid (row 0: background, unused)."""
    coords = np.nonzero(comps)
    labels_of = comps[coords]
    sums = [np.bincount(labels_of, weights=c + box[ax].start, minlength=n + 1) for ax, c in enumerate(coords)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack(sums, axis=1) / sizes[:, None]


def _midline_x(xs: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], body_x_mm: float | None) -> float:
    """World x (mm) of the midline: ``body_x_mm``, else the mean of ≥ 2 centroids ``xs``, else the grid centre."""
    if body_x_mm is not None:
        return float(body_x_mm)
    if xs.size >= 2:
        return float(xs.mean())
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    return float(world_x_mm(affine, centre[None])[0])


def restrict_to_parent(
    tumor: Any, parent: Any, spacing: Any = (1.0, 1.0, 1.0), margin_mm: float = 5.0
) -> np.ndarray:
    """A new tumour mask with only the components inside or touching the parent organ dilated by ``margin_mm``.

    "Touching" is 26-connected contact, so with ``margin_mm=0`` a component sharing a face, an edge or a corner
    with the parent is kept. The dilation is exact in mm on anisotropic grids (a Euclidean distance transform on
    the bounding box of the tumour grown by the margin). An empty parent removes every component.

    Args:
        tumor: Tumour mask (X, Y, Z).
        parent: Parent organ mask (or the union of its candidates, e.g. both kidneys).
        spacing: Voxel spacing in mm (array axis order) or the (4, 4) affine.
        margin_mm: Allowed gap (mm) between a tumour component and the organ.
    """
    t = _check_mask(tumor, "tumour mask")
    p = _check_mask(parent, "parent mask")
    if t.shape != p.shape:
        raise InputError(f"tumour {t.shape} and parent {p.shape} masks must be on the same grid")
    sp = _spacing_from(spacing)
    out = np.zeros(t.shape, dtype=bool)
    # grow the tumour's box by the margin (+1 voxel for contact): only the parent there can matter
    grow = [int(np.ceil(margin_mm / s)) + 1 for s in sp]
    box = bounding_box(t, grow)
    if box is None or not p[box].any():
        return out
    tb, pb = t[box], p[box]
    comps, n, _ = _label(tb)
    # voxels within margin of the parent, then "touching" = 26-neighbour of that zone
    near = ndimage.distance_transform_edt(~pb, sampling=sp) <= margin_mm if margin_mm > 0 else pb
    near = ndimage.binary_dilation(near, structure=_STRUCTURE)
    hit = np.unique(comps[near & tb])
    lut = np.zeros(n + 1, dtype=bool)
    lut[hit[hit > 0]] = True
    out[box] = lut[comps]
    return out


# ------------------------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class _ClassRole:
    kind: str  # "organ" or "tumor"
    parents: tuple[str, ...]
    paired: str | None
    side: str | None  # "right", "left" or None


def _role(name: str) -> _ClassRole:
    try:
        info = taxonomy.resolve_class(name)
    except ClassNameError:  # a name outside the taxonomy: a plain organ (size and largest-component rules)
        return _ClassRole("organ", (), None, None)
    parent = getattr(info, "parent", None)
    parents = () if not parent else ((parent,) if isinstance(parent, str) else tuple(parent))
    side = getattr(info, "side", None)
    if side is None and info.paired:
        side = "right" if info.name.startswith("right") else "left" if info.name.startswith("left") else None
    return _ClassRole(str(getattr(info, "kind", "organ")), parents, info.paired, side)


def postprocess(
    masks: Mapping[str, Any],
    affine: Any,
    config: PostprocessConfig | None = None,
    *,
    body_x_mm: float | None = None,
) -> dict[str, np.ndarray]:
    """Clean predicted masks with connected components and anatomy rules (see the module docstring).

    Args:
        masks: Boolean (X, Y, Z) masks keyed by universal class name, on the grid of ``affine``.
        affine: (4, 4) voxel → RAS+ mm affine (sides are decided in world coordinates).
        config: :class:`PostprocessConfig` (default settings when ``None``).
        body_x_mm: World x (mm) of the body midline for paired organs (see :func:`body_midline_x_mm`).

    Returns:
        A new dict with new arrays, same keys and order; the inputs are not modified. A tumour whose parent organ is
        among ``masks`` is restricted to it (an empty parent removes it); a tumour whose parent was not predicted is
        only cleaned of small components.

    >>> import numpy as np
    >>> m = np.zeros((16, 16, 16), bool); m[4:8, 4:8, 4:8] = True
    >>> out = postprocess({"liver": m}, np.eye(4))
    >>> bool(out["liver"].sum() == 64) and out["liver"] is not m
    True
    """
    cfg = config or PostprocessConfig()
    a = _check_affine(affine)
    arrays = {n: _check_mask(m, f"mask {n!r}") for n, m in masks.items()}
    shapes = {m.shape for m in arrays.values()}
    if len(shapes) > 1:
        raise InputError(f"all masks must be on one grid, got shapes {sorted(shapes)}")
    if not cfg.enabled:
        return {n: m.copy() for n, m in arrays.items()}
    sp = _spacing_from(a)
    roles = {n: _role(n) for n in arrays}
    # 1. paired organs: sides by world x, largest per side
    out = _fix_paired_organs(arrays, roles, cfg, a, body_x_mm)
    # 2. organs: small components, largest component
    for n, role in roles.items():
        if n not in out and role.kind != "tumor":
            out[n] = _clean_organ(arrays[n], cfg.for_class(n), sp)
    # 3. tumours: inside/touching the (post-processed) parent, then small components
    for n, role in roles.items():
        if role.kind == "tumor":
            present = [p for p in role.parents if p in arrays]
            parent = np.logical_or.reduce([out.get(p, arrays[p]) for p in present]) if present else None
            out[n] = _clean_tumour(arrays[n], parent, cfg.for_class(n), sp)
    return {n: out[n] for n in arrays}


def _fix_paired_organs(
    arrays: Mapping[str, np.ndarray],
    roles: Mapping[str, _ClassRole],
    cfg: PostprocessConfig,
    affine: np.ndarray,
    body_x_mm: float | None,
) -> dict[str, np.ndarray]:
    """:func:`assign_sides` on every paired organ (and its partner when predicted) whose settings allow it."""
    out: dict[str, np.ndarray] = {}
    for n, role in roles.items():
        if n in out or role.kind != "organ" or role.paired is None or role.side is None:
            continue
        c = cfg.for_class(n)
        if not (c.enabled and c.fix_sides):
            continue
        partner = role.paired if role.paired in arrays else None
        cp = cfg.for_class(partner) if partner else c
        if partner is not None and not (cp.enabled and cp.fix_sides):
            continue
        right_name, left_name = (n, partner) if role.side == "right" else (partner, n)
        r, l_ = assign_sides(
            arrays.get(right_name) if right_name else None,
            arrays.get(left_name) if left_name else None,
            affine,
            body_x_mm=body_x_mm,
            min_component_mm3=min(c.min_component_mm3, cp.min_component_mm3),
            keep_largest=c.keep_largest and cp.keep_largest,
        )
        for name, arr in ((right_name, r), (left_name, l_)):
            if name is not None:
                out[name] = arr
    return out


def _clean_organ(mask: np.ndarray, c: PostprocessConfig, spacing: tuple[float, float, float]) -> np.ndarray:
    """An organ without its small components, and reduced to its largest one when ``c.keep_largest``."""
    if not c.enabled:
        return mask.copy()
    m = remove_small_components(mask, c.min_component_mm3, spacing)
    return keep_largest_component(m) if c.keep_largest else m


def _clean_tumour(
    mask: np.ndarray, parent: np.ndarray | None, c: PostprocessConfig, spacing: tuple[float, float, float]
) -> np.ndarray:
    """A tumour restricted to its ``parent`` organ (when predicted), without its small components."""
    if not c.enabled:
        return mask.copy()
    m = restrict_to_parent(mask, parent, spacing, c.tumor_parent_margin_mm) if parent is not None else mask
    return remove_small_components(m, c.min_component_mm3, spacing)
