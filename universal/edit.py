"""Mask editing on the input grid: brush and eraser strokes, component removal, copying a slice to its
neighbours, and a bounded undo/redo history.

Everything here is a pure function of numpy arrays except :class:`EditHistory`, which owns copies of the masks
it edits (copied on a class's first edit, so the caller's arrays are never changed).

**Coordinates.** A stroke is a polyline of ``(row, col)`` points in the pixel coordinates of the *displayed*
slice: the image :func:`universal.viz.slice_overlay` draws for a view (``axial``, ``coronal``, ``sagittal``) and a
slice index, possibly stretched to square pixels and enlarged (:func:`universal.viz.square_pixels`). Pixel
``(r, c)`` covers ``[r, r + 1) × [c, c + 1)``; ``display_shape`` is the displayed image's ``(height, width)``
(``None``: the slice itself, one display pixel per voxel). A slice pixel is painted when its centre, in display
coordinates, lies within ``radius`` display pixels of the polyline, and the pixels the polyline passes through
are always painted, so a click edits exactly the voxel shown under it. :func:`voxel_of` is the inverse of
:func:`universal.viz.orient_slice` (tested against it), so display pixel ``(r, c)`` of view ``v``, slice ``k``
is voxel ``voxel_of(shape, v, k, r, c)`` of the ``(X, Y, Z)`` RAS+ array.

**Edits** are diffs (:class:`Edit`: the flat indices a class's mask gains and loses), not volumes: undo applies
the inverse diff, and the history's memory is bounded by ``max_bytes`` (oldest steps are dropped first).

>>> m = np.zeros((4, 5, 3), bool)
>>> e = stroke_edit(m, "axial", 1, [(0.5, 0.5)], radius=0.4)
>>> new = apply_edit(m, e)
>>> np.argwhere(new).tolist(), voxel_of(m.shape, "axial", 1, 0, 0)
([[3, 4, 1]], (3, 4, 1))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from universal.errors import InputError
from universal.viz import AXES

__all__ = [
    "MODES",
    "VIEWS",
    "Edit",
    "EditHistory",
    "apply_edit",
    "click_voxel",
    "component_edit",
    "copy_to_neighbours_edit",
    "display_to_slice",
    "slice_shape",
    "stroke_edit",
    "stroke_pixels",
    "voxel_of",
]

VIEWS = ("axial", "coronal", "sagittal")
MODES = ("brush", "eraser")
_EMPTY = np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ geometry
def _view_axis(view: str) -> int:
    if view not in AXES:
        raise InputError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    return AXES[view]


def _check_index(shape: Sequence[int], view: str, index: int) -> int:
    n = int(shape[_view_axis(view)])
    if not 0 <= int(index) < n:
        raise InputError(f"slice {index} is outside the {view} view's 0..{n - 1}; choose a slice inside it")
    return int(index)


def slice_shape(shape: Sequence[int], view: str) -> tuple[int, int]:
    """``(rows, cols)`` of the displayed slice of a ``(X, Y, Z)`` volume in ``view`` (as ``orient_slice``).

    >>> slice_shape((10, 20, 30), "axial"), slice_shape((10, 20, 30), "coronal"), slice_shape((10, 20, 30), "sagittal")
    ((20, 10), (30, 10), (30, 20))
    """
    x, y, z = (int(s) for s in shape)
    return {2: (y, x), 1: (z, x), 0: (z, y)}[_view_axis(view)]


def voxel_of(shape: Sequence[int], view: str, index: int, row, col):
    """The voxel ``(x, y, z)`` shown at slice pixel ``(row, col)`` of ``view``'s slice ``index`` (scalars or
    integer arrays of one shape); the inverse of :func:`universal.viz.orient_slice`.

    Raises:
        InputError: an unknown view or a slice outside the volume.
    """
    x, y, z = (int(s) for s in shape)
    k = _check_index(shape, view, index)
    row, col = np.asarray(row), np.asarray(col)
    ax = _view_axis(view)
    if ax == 2:  # rows anterior→posterior (y descending), cols right→left (x descending)
        out = (x - 1 - col, y - 1 - row, np.full_like(row, k))
    elif ax == 1:  # rows superior→inferior (z descending), cols right→left
        out = (x - 1 - col, np.full_like(row, k), z - 1 - row)
    else:  # rows superior→inferior, cols anterior→posterior (y descending)
        out = (np.full_like(row, k), y - 1 - col, z - 1 - row)
    if np.ndim(row) == 0:
        return tuple(int(v) for v in out)
    return out


def display_to_slice(
    points: Iterable[Sequence[float]], slice_hw: Sequence[int], display_hw=None
) -> np.ndarray:
    """``(n, 2)`` float ``(row, col)`` slice coordinates of display points (``display_hw=None``: the same)."""
    pts = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
    if display_hw is None:
        return pts
    scale = np.asarray(slice_hw, np.float64) / np.asarray(display_hw, np.float64)
    return pts * scale


# ------------------------------------------------------------------------------------------------ strokes
def stroke_pixels(
    points: Iterable[Sequence[float]],
    radius: float,
    slice_hw: Sequence[int],
    display_hw: Sequence[int] | None = None,
) -> np.ndarray:
    """Bool ``slice_hw`` image of the slice pixels a stroke covers (see the module's coordinates).

    Args:
        points: The polyline, ``(row, col)`` in display pixels (one point: a dab).
        radius: Brush radius in display pixels (>= 0).
        slice_hw: ``(rows, cols)`` of the slice (:func:`slice_shape`).
        display_hw: ``(height, width)`` of the displayed image, or ``None`` (one display pixel per voxel).

    Raises:
        InputError: a negative or non-finite radius, or no point.
    """
    h, w = (int(s) for s in slice_hw)
    disp = np.asarray(display_hw if display_hw is not None else (h, w), np.float64)
    pts = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
    if pts.size == 0:
        raise InputError("a stroke needs at least one point")
    if not (np.isfinite(radius) and radius >= 0) or not np.isfinite(pts).all():
        raise InputError(f"brush radius {radius!r} and points must be finite numbers >= 0")
    per = disp / np.asarray((h, w), np.float64)  # display pixels per slice pixel (rows, cols)
    out = np.zeros((h, w), dtype=bool)
    segments = list(zip(pts[:-1], pts[1:])) or [(pts[0], pts[0])]
    for a, b in segments:
        _paint_segment(out, a, b, float(radius), per)
    return out


def _paint_segment(out: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float, per: np.ndarray) -> None:
    """Paint (in place) the pixels of ``out`` whose centres lie within ``radius`` of segment ``a``-``b`` (display
    coordinates), and the pixels the segment passes through."""
    h, w = out.shape
    lo = np.floor((np.minimum(a, b) - radius) / per).astype(int)
    hi = np.floor((np.maximum(a, b) + radius) / per).astype(int) + 1
    r0, c0 = max(lo[0], 0), max(lo[1], 0)
    r1, c1 = min(hi[0], h), min(hi[1], w)
    if r0 < r1 and c0 < c1:
        rows = (np.arange(r0, r1) + 0.5) * per[0]
        cols = (np.arange(c0, c1) + 0.5) * per[1]
        pr, pc = np.meshgrid(rows, cols, indexing="ij")
        d = b - a
        length2 = float(d @ d)
        t = 0.0 if length2 == 0 else np.clip(((pr - a[0]) * d[0] + (pc - a[1]) * d[1]) / length2, 0.0, 1.0)
        dist2 = (pr - (a[0] + t * d[0])) ** 2 + (pc - (a[1] + t * d[1])) ** 2
        out[r0:r1, c0:c1] |= dist2 <= radius * radius
    # the pixels under the line itself (sampled finer than a slice pixel), so thin strokes stay connected
    n = int(np.ceil(np.max(np.abs(b - a) / per) * 2)) + 1
    line = a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)
    cells = np.floor(line / per).astype(int)
    keep = (cells[:, 0] >= 0) & (cells[:, 0] < h) & (cells[:, 1] >= 0) & (cells[:, 1] < w)
    out[cells[keep, 0], cells[keep, 1]] = True


@dataclass(frozen=True)
class Edit:
    """A change of one class's mask: the flat indices (C order of the volume) it turns on and off.

    ``inverse()`` undoes it; ``nbytes`` is what the history stores for it.
    """

    name: str
    on: np.ndarray = field(default_factory=lambda: _EMPTY)
    off: np.ndarray = field(default_factory=lambda: _EMPTY)
    what: str = "edit"

    @property
    def size(self) -> int:
        """Voxels changed."""
        return int(self.on.size + self.off.size)

    @property
    def nbytes(self) -> int:
        return int(self.on.nbytes + self.off.nbytes)

    def inverse(self) -> Edit:
        return Edit(self.name, self.off, self.on, f"undo {self.what}")

    def apply_in_place(self, mask: np.ndarray) -> None:
        """Apply to ``mask`` itself (a C-contiguous bool array: the history's own copies)."""
        flat = mask.reshape(-1)
        flat[self.on] = True
        flat[self.off] = False


def _indices(flat: np.ndarray) -> np.ndarray:
    """Flat indices in the smallest integer type that holds them (the history's memory)."""
    flat = np.asarray(flat).ravel()
    dtype = np.uint32 if flat.size == 0 or int(flat.max()) < 2**32 else np.int64
    return flat.astype(dtype, copy=False)


def apply_edit(mask: np.ndarray, edit: Edit) -> np.ndarray:
    """A new mask: ``mask`` with ``edit`` applied (``mask`` is not changed)."""
    out = np.array(mask, dtype=bool, order="C", copy=True)
    edit.apply_in_place(out)
    return out


def stroke_edit(
    mask: np.ndarray,
    view: str,
    index: int,
    points: Iterable[Sequence[float]],
    radius: float,
    mode: str = "brush",
    display_hw: Sequence[int] | None = None,
    name: str = "mask",
) -> Edit:
    """The :class:`Edit` a brush (``mode="brush"``: voxels become part of the mask) or eraser stroke makes on
    slice ``index`` of ``view`` (only voxels that change are recorded).

    Raises:
        InputError: an unknown mode or view, a slice outside the volume, a bad radius or no point.
    """
    if mode not in MODES:
        raise InputError(f"unknown edit mode {mode!r}; choose one of {', '.join(MODES)}")
    mask = np.asarray(mask, dtype=bool)
    painted = stroke_pixels(points, radius, slice_shape(mask.shape, view), display_hw)
    rows, cols = np.nonzero(painted)
    flat = np.ravel_multi_index(voxel_of(mask.shape, view, index, rows, cols), mask.shape)
    current = mask.reshape(-1)[flat]
    if mode == "brush":
        return Edit(name, on=_indices(flat[~current]), what="brush")
    return Edit(name, off=_indices(flat[current]), what="eraser")


def click_voxel(
    shape: Sequence[int],
    view: str,
    index: int,
    point: Sequence[float],
    display_hw: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """The voxel under a click at display point ``(row, col)`` (``InputError`` outside the image)."""
    hw = slice_shape(shape, view)
    r, c = display_to_slice([point], hw, display_hw)[0]
    row, col = int(np.floor(r)), int(np.floor(c))
    if not (0 <= row < hw[0] and 0 <= col < hw[1]):
        raise InputError(f"the point {tuple(point)} lies outside the displayed slice; click inside the image")
    return voxel_of(shape, view, index, row, col)


def component_edit(
    mask: np.ndarray, voxel: Sequence[int], name: str = "mask", connectivity: int = 26
) -> Edit:
    """The :class:`Edit` that removes the connected component (``connectivity`` 6, 18 or 26) holding ``voxel``;
    an empty edit when ``voxel`` is not in the mask.

    Raises:
        InputError: ``voxel`` outside the volume or a bad connectivity.
    """
    import cc3d

    mask = np.asarray(mask, dtype=bool)
    v = tuple(int(i) for i in voxel)
    if len(v) != mask.ndim or not all(0 <= i < s for i, s in zip(v, mask.shape)):
        raise InputError(f"voxel {v} lies outside the volume {mask.shape}")
    if connectivity not in (6, 18, 26):
        raise InputError(f"connectivity {connectivity} must be 6, 18 or 26")
    if not mask[v]:
        return Edit(name, what="remove component")
    labels = cc3d.connected_components(mask, connectivity=connectivity)
    flat = np.flatnonzero(labels.reshape(-1) == labels[v])
    return Edit(name, off=_indices(flat), what="remove component")


def copy_to_neighbours_edit(
    mask: np.ndarray, view: str, index: int, n: int, direction: str = "both", name: str = "mask"
) -> Edit:
    """The :class:`Edit` that makes the ``n`` slices next to ``index`` (``direction``: ``"both"`` sides,
    ``"up"`` = higher indices, ``"down"`` = lower) equal to slice ``index`` of ``view`` (clipped at the edges).

    Raises:
        InputError: ``n`` < 1, an unknown direction or view, a slice outside the volume.
    """
    mask = np.asarray(mask, dtype=bool)
    k = _check_index(mask.shape, view, index)
    if int(n) < 1 or direction not in ("both", "up", "down"):
        raise InputError(
            f"copy to n = {n} neighbours {direction!r}: n must be >= 1, direction both, up or down"
        )
    ax = _view_axis(view)
    steps = [s for s in range(1, int(n) + 1) for s in ((s, -s) if direction == "both" else (s,))]
    sign = -1 if direction == "down" else 1
    targets = sorted({k + sign * s for s in steps if 0 <= k + sign * s < mask.shape[ax]})
    if not targets:
        return Edit(name, what="copy to neighbours")
    source = np.take(mask, [k], axis=ax)
    block = np.take(mask, targets, axis=ax)
    grid = np.indices(block.shape)
    grid[ax] = np.asarray(targets)[grid[ax]]  # block positions -> the target slices' indices
    flat = np.ravel_multi_index(tuple(grid), mask.shape).reshape(-1)
    want = np.broadcast_to(source, block.shape).reshape(-1)
    have = block.reshape(-1)
    return Edit(
        name, on=_indices(flat[want & ~have]), off=_indices(flat[~want & have]), what="copy to neighbours"
    )


# ------------------------------------------------------------------------------------------------ history
class EditHistory:
    """Undo/redo over a set of class masks, storing diffs only.

    ``masks`` starts as the given mapping (arrays shared, never written); a class's array is copied on its first
    edit. At most ``max_steps`` edits and ``max_bytes`` of diffs are kept for undo; older ones are dropped (they
    stay applied). ``corrected`` lists the classes with edits applied (undone edits do not count).

    >>> h = EditHistory({"liver": np.zeros((2, 2, 2), bool)})
    >>> e = Edit("liver", on=np.array([0]))
    >>> h.do(e), int(h.masks["liver"].sum()), h.corrected
    (True, 1, ['liver'])
    >>> h.undo().what, int(h.masks["liver"].sum()), h.corrected
    ('edit', 0, [])
    """

    def __init__(
        self, masks: Mapping[str, np.ndarray], max_steps: int = 200, max_bytes: int = 64 * 2**20
    ) -> None:
        if int(max_steps) < 1 or int(max_bytes) < 1:
            raise InputError("an edit history needs max_steps >= 1 and max_bytes >= 1")
        self.masks: dict[str, np.ndarray] = dict(masks)
        self.max_steps, self.max_bytes = int(max_steps), int(max_bytes)
        self._done: list[Edit] = []
        self._undone: list[Edit] = []
        self._owned: set[str] = set()
        self._applied: dict[str, int] = {}  # class -> edits applied (dropped ones included)
        self.dropped = 0

    def _own(self, name: str) -> np.ndarray:
        if name not in self.masks:
            raise InputError(f"no mask {name!r} to edit; choose one of {', '.join(self.masks) or 'none'}")
        if name not in self._owned:
            self.masks[name] = np.array(self.masks[name], dtype=bool, order="C", copy=True)
            self._owned.add(name)
        return self.masks[name]

    def _count(self, name: str, delta: int) -> None:
        self._applied[name] = self._applied.get(name, 0) + delta

    def do(self, edit: Edit) -> bool:
        """Apply ``edit`` (an empty one is ignored: returns False); the redo list is cleared."""
        if edit.size == 0:
            return False
        edit.apply_in_place(self._own(edit.name))
        self._done.append(edit)
        self._undone.clear()
        self._count(edit.name, +1)
        self._trim()
        return True

    def _trim(self) -> None:
        while self._done and (len(self._done) > self.max_steps or self.nbytes > self.max_bytes):
            self._done.pop(0)
            self.dropped += 1

    @property
    def nbytes(self) -> int:
        """Bytes of the stored diffs (undo and redo)."""
        return sum(e.nbytes for e in self._done) + sum(e.nbytes for e in self._undone)

    @property
    def can_undo(self) -> bool:
        return bool(self._done)

    @property
    def can_redo(self) -> bool:
        return bool(self._undone)

    def undo(self) -> Edit | None:
        """Undo the last edit; returns it (``None`` when there is nothing to undo)."""
        if not self._done:
            return None
        edit = self._done.pop()
        edit.inverse().apply_in_place(self._own(edit.name))
        self._undone.append(edit)
        self._count(edit.name, -1)
        return edit

    def redo(self) -> Edit | None:
        """Apply the last undone edit again; returns it (``None`` when there is nothing to redo)."""
        if not self._undone:
            return None
        edit = self._undone.pop()
        edit.apply_in_place(self._own(edit.name))
        self._done.append(edit)
        self._count(edit.name, +1)
        self._trim()
        return edit

    @property
    def corrected(self) -> list[str]:
        """Classes with edits applied, in the masks' order."""
        return [n for n in self.masks if self._applied.get(n, 0) > 0]
