"""Figures shared by the notebooks and the dashboard: CT windows, slice overlays, 3-D meshes, charts, downloads.

Arrays follow the project convention: ``(X, Y, Z)`` in RAS+ voxel order (the first axis grows toward the
patient's Right, the second toward Anterior, the third toward Superior). Slices are returned **oriented for
display** in the radiological convention:

- ``axial``: the patient's right on the image's left, anterior at the top (as if looking up from the feet);
- ``coronal``: the patient's right on the image's left, superior at the top;
- ``sagittal``: anterior on the image's left, superior at the top.

Pixels of a slice are generally not square (e.g. 0.8 mm in-plane, 3 mm between slices): every slice comes with
its ``aspect`` (height of a pixel / width of a pixel, in mm), and :func:`square_pixels` stretches an image so
that it can be shown by a viewer that knows nothing about spacing.

plotly is imported inside the functions that need it, so ``import universal.viz`` stays cheap.

>>> import numpy as np
>>> apply_window(np.array([-1000.0, 40.0, 1000.0]), *window_presets()["abdomen"]).tolist()
[0, 128, 255]
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from universal.io import json_float, to_json
from universal.taxonomy import resolve_class

AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
"""View name → the array axis that is fixed by the slice index."""

_FALLBACK_COLORS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ windows
def window_presets() -> dict[str, tuple[float, float]]:
    """CT display windows as ``name → (level, width)`` in HU.

    >>> window_presets()["lung"]
    (-600.0, 1500.0)
    """
    return {
        "abdomen": (40.0, 400.0),
        "liver": (80.0, 150.0),
        "lung": (-600.0, 1500.0),
        "bone": (400.0, 1800.0),
    }


def _window_tuple(window: str | tuple[float, float] | None) -> tuple[float, float]:
    if window is None:
        return window_presets()["abdomen"]
    if isinstance(window, str):
        try:
            return window_presets()[window.lower()]
        except KeyError:
            raise ValueError(f"unknown window {window!r}; choose one of {sorted(window_presets())}") from None
    level, width = window
    return float(level), float(width)


def apply_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map HU to display grey levels: ``level - width/2`` → 0, ``level + width/2`` → 255 (clipped), uint8.

    >>> apply_window(np.array([-160.0, 40.0, 240.0]), 40, 400).tolist()
    [0, 128, 255]
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = level - width / 2.0
    g = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / width)
    return np.clip(np.rint(g), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ slices
def _axis(axis: str | int) -> int:
    if isinstance(axis, str):
        try:
            return AXES[axis.lower()]
        except KeyError:
            raise ValueError(f"unknown view {axis!r}; choose axial, coronal or sagittal") from None
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    return int(axis)


def num_slices(shape: Sequence[int], axis: str | int) -> int:
    """How many slices the view ``axis`` has for a volume of ``shape`` (X, Y, Z)."""
    return int(shape[_axis(axis)])


def orient_slice(array: np.ndarray, axis: str | int, index: int) -> np.ndarray:
    """The 2-D slice ``index`` of an (X, Y, Z) RAS+ array along ``axis``, oriented for display (rows, cols).

    ``img[0, 0]`` is the top-left pixel: for ``axial`` it is the patient's anterior-right corner.
    """
    ax = _axis(axis)
    n = array.shape[ax]
    if not 0 <= index < n:
        raise IndexError(f"slice {index} out of range 0..{n - 1} for the {axis} view")
    if ax == 2:  # (X, Y) -> rows: anterior→posterior, cols: right→left
        return array[::-1, ::-1, index].T
    if ax == 1:  # (X, Z) -> rows: superior→inferior, cols: right→left
        return array[::-1, index, ::-1].T
    return array[index, ::-1, ::-1].T  # (Y, Z) -> rows: superior→inferior, cols: anterior→posterior


def slice_aspect(spacing: Sequence[float], axis: str | int) -> float:
    """Height / width of one displayed pixel (mm / mm) for the view ``axis``.

    >>> slice_aspect((0.8, 0.8, 3.0), "coronal")
    3.75
    """
    sx, sy, sz = (float(s) for s in spacing)
    ax = _axis(axis)
    return {2: sy / sx, 1: sz / sx, 0: sz / sy}[ax]


def square_pixels(image: np.ndarray, aspect: float, min_size: int = 0) -> np.ndarray:
    """Stretch rows (nearest neighbour) so that displayed pixels are square; optionally upscale small images.

    Args:
        image: (H, W) or (H, W, C) array.
        aspect: Height / width of one pixel (from :func:`slice_aspect`).
        min_size: Upscale (nearest) until the longer side is at least this many pixels (0: no upscaling).
    """
    h, w = image.shape[:2]
    sy, sx = float(aspect), 1.0
    if min_size and max(h * sy, w * sx) < min_size:
        f = min_size / max(h * sy, w * sx)
        sy, sx = sy * f, sx * f
    new_h, new_w = max(1, int(round(h * sy))), max(1, int(round(w * sx)))
    if (new_h, new_w) == (h, w):
        return image
    rows = np.minimum((np.arange(new_h) + 0.5) * h / new_h, h - 1).astype(np.intp)
    cols = np.minimum((np.arange(new_w) + 0.5) * w / new_w, w - 1).astype(np.intp)
    return image[rows][:, cols]


def class_color(name: str, default_index: int = 0) -> tuple[int, int, int]:
    """The taxonomy colour (RGB 0-255) of a universal class name or alias; a fixed palette for other names."""
    try:
        return tuple(int(c) for c in resolve_class(name).color)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - e.g. the FLARE "lesion" class: not a universal class
        return _FALLBACK_COLORS[default_index % len(_FALLBACK_COLORS)]


def class_rgb(name: str, default_index: int = 0) -> tuple[float, float, float]:
    """:func:`class_color` as fractions 0-1 (the colour form matplotlib takes).

    >>> class_rgb("liver") == tuple(c / 255 for c in class_color("liver"))
    True
    """
    return tuple(c / 255 for c in class_color(name, default_index))  # type: ignore[return-value]


def _draw_order(names: Iterable[str]) -> list[str]:
    """Organs first, tumours last (drawn on top of their organ)."""
    names = list(names)

    def kind(n: str) -> int:
        try:
            return 1 if resolve_class(n).kind == "tumor" else 0
        except Exception:  # noqa: BLE001
            return 1 if ("tumor" in n or "lesion" in n or "cyst" in n) else 0

    return sorted(names, key=lambda n: (kind(n), names.index(n)))


def _boundary(mask2d: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D mask that touch the background (4-neighbourhood)."""
    m = np.pad(mask2d, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask2d & ~inner


@dataclass(frozen=True)
class SliceImage:
    """A displayed slice: ``rgb`` (H, W, 3) uint8 and ``aspect`` (pixel height / width)."""

    rgb: np.ndarray
    aspect: float

    def square(self, min_size: int = 0) -> np.ndarray:
        """The image with square pixels (see :func:`square_pixels`)."""
        return square_pixels(self.rgb, self.aspect, min_size=min_size)


def slice_overlay(
    volume_array: np.ndarray,
    masks: Mapping[str, np.ndarray],
    axis: str | int,
    index: int,
    colors: Mapping[str, Sequence[int]] | None = None,
    opacity: float = 0.45,
    window: str | tuple[float, float] | None = "abdomen",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    outline: bool = True,
) -> SliceImage:
    """A windowed CT slice with coloured class masks blended over it.

    Args:
        volume_array: (X, Y, Z) HU array in RAS+ order.
        masks: Class name → bool (X, Y, Z) mask on the same grid (only the classes to show).
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"`` (or 2, 1, 0).
        index: Slice index along that axis.
        colors: Class name → RGB 0-255; default: the taxonomy colours.
        opacity: Fill opacity of the masks (0-1); the outline (when ``outline``) is drawn opaque.
        window: A preset name of :func:`window_presets` or ``(level, width)`` in HU.
        spacing: Voxel spacing (mm) in array axis order, for the returned aspect ratio.
        outline: Draw each mask's boundary at full opacity.

    Returns:
        :class:`SliceImage` with the RGB uint8 image oriented for display and its pixel aspect.

    >>> ct = np.zeros((8, 6, 4), np.float32)
    >>> m = np.zeros((8, 6, 4), bool); m[7, 0, 2] = True    # patient's far right, posterior
    >>> img = slice_overlay(ct, {"liver": m}, "axial", 2, opacity=1.0)
    >>> img.rgb.shape, bool((img.rgb[-1, 0] != img.rgb[0, -1]).any())
    ((6, 8, 3), True)
    """
    level, width = _window_tuple(window)
    grey = apply_window(orient_slice(volume_array, axis, index), level, width)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    alpha = float(np.clip(opacity, 0.0, 1.0))
    for i, name in enumerate(_draw_order(masks)):
        m2 = np.asarray(orient_slice(masks[name], axis, index), dtype=bool)
        if not m2.any():
            continue
        color = np.asarray(colors[name] if colors and name in colors else class_color(name, i), np.float32)
        rgb[m2] = (1.0 - alpha) * rgb[m2] + alpha * color
        if outline:
            rgb[_boundary(m2)] = color
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return SliceImage(rgb=np.ascontiguousarray(out), aspect=slice_aspect(spacing, axis))


DIFF_COLORS = {"both": (255, 255, 255), "only_a": (255, 140, 0), "only_b": (0, 190, 255)}
"""Colours of :func:`difference_map`: agreement (white), only in run A (orange), only in run B (cyan)."""


def difference_map(
    masks_a: Mapping[str, np.ndarray],
    masks_b: Mapping[str, np.ndarray],
    axis: str | int,
    index: int,
    volume_array: np.ndarray | None = None,
    window: str | tuple[float, float] | None = "abdomen",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    opacity: float = 0.7,
) -> SliceImage:
    """Where two segmentations of the same scan disagree, on one slice.

    A voxel counts when any class of the union of both runs' classes holds it: white where both runs agree on
    at least one class, orange where only run A has it (for some class), cyan where only run B has it.

    Args:
        masks_a, masks_b: Class name → bool (X, Y, Z) masks of the two runs (same grid).
        axis, index: The slice (see :func:`slice_overlay`).
        volume_array: Optional CT (X, Y, Z) in HU drawn underneath (windowed); black otherwise.
        window, spacing, opacity: As in :func:`slice_overlay`.
    """
    names = sorted(set(masks_a) | set(masks_b))
    ref = next(iter(masks_a.values()), None)
    if ref is None:
        ref = next(iter(masks_b.values()), None)
    if ref is None and volume_array is None:
        raise ValueError("difference_map needs at least one mask or the volume")
    shape = (volume_array if volume_array is not None else ref).shape
    empty = np.zeros(orient_slice(np.zeros(shape, bool), axis, index).shape, bool)
    only_a, only_b, both = empty.copy(), empty.copy(), empty.copy()
    for n in names:
        a = orient_slice(masks_a[n], axis, index).astype(bool) if n in masks_a else empty
        b = orient_slice(masks_b[n], axis, index).astype(bool) if n in masks_b else empty
        both |= a & b
        only_a |= a & ~b
        only_b |= b & ~a
    if volume_array is not None:
        level, width = _window_tuple(window)
        grey = apply_window(orient_slice(volume_array, axis, index), level, width).astype(np.float32)
        rgb = np.repeat(grey[..., None], 3, axis=2) * 0.6
    else:
        rgb = np.zeros((*empty.shape, 3), np.float32)
    alpha = float(np.clip(opacity, 0.0, 1.0))
    for key, region in (("both", both & ~only_a & ~only_b), ("only_a", only_a), ("only_b", only_b)):
        color = np.asarray(DIFF_COLORS[key], np.float32)
        rgb[region] = (1 - alpha) * rgb[region] + alpha * color
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return SliceImage(rgb=np.ascontiguousarray(out), aspect=slice_aspect(spacing, axis))


# ------------------------------------------------------------------------------------------------ 3-D
@dataclass(frozen=True)
class Mesh:
    """A triangle mesh in world coordinates (mm): ``vertices`` (V, 3) float32, ``faces`` (F, 3) int32."""

    name: str
    vertices: np.ndarray
    faces: np.ndarray
    color: tuple[int, int, int]


def _block_mean(mask: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor``³ blocks (zero-padded to a multiple of ``factor``), float32."""
    if factor == 1:
        return mask.astype(np.float32)
    pads = [(0, (-s) % factor) for s in mask.shape]
    m = np.pad(mask.astype(np.float32), pads)
    x, y, z = (s // factor for s in m.shape)
    return m.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def _class_meshes(
    masks: Mapping[str, np.ndarray],
    affine: np.ndarray,
    names: Sequence[str],
    factor: int,
    step: int,
    smooth: float,
) -> list[Mesh]:
    from scipy import ndimage
    from skimage.measure import marching_cubes

    from universal.postprocess import bounding_box  # SciPy at import: loaded with the meshes only

    meshes = []
    for i, name in enumerate(names):
        mask = np.asarray(masks[name], dtype=bool)
        box = bounding_box(mask)
        if box is None:
            continue
        lo = np.array([b.start for b in box])
        crop = mask[box]
        small = _block_mean(crop, factor)
        if smooth > 0:
            small = ndimage.gaussian_filter(small, smooth)
        small = np.pad(small, 1)  # closed surfaces at the crop border
        if small.max() <= 0.5 and small.max() > 0:
            level = float(small.max()) / 2.0  # tiny structures: still show a blob
        else:
            level = 0.5
        try:
            verts, faces, _, _ = marching_cubes(small, level=level, step_size=max(1, step))
        except (ValueError, RuntimeError):  # no surface at this level
            continue
        # downsampled voxel coords (with the 1-voxel pad) -> original voxel coords -> world mm
        vox = (verts - 1.0) * factor + (factor - 1) / 2.0 + lo
        world = vox @ np.asarray(affine, np.float64)[:3, :3].T + np.asarray(affine, np.float64)[:3, 3]
        meshes.append(Mesh(name, world.astype(np.float32), faces.astype(np.int32), class_color(name, i)))
    return meshes


def class_meshes(
    masks: Mapping[str, np.ndarray],
    affine: np.ndarray,
    classes: Sequence[str] | None = None,
    max_triangles: int = 60_000,
    step: int = 1,
    max_side: int = 96,
    smooth: float = 0.6,
) -> list[Mesh]:
    """Marching-cubes surfaces of the classes, downsampled until their total triangle count is ≤ ``max_triangles``.

    Each mask is cropped to its bounding box, averaged over ``f``³ blocks (``f`` starts so that the volume's
    longest side is ≤ ``max_side`` voxels), lightly smoothed and passed to
    ``skimage.measure.marching_cubes(step_size=step)``; ``f`` grows until the cap holds.
    """
    names = [n for n in (classes if classes is not None else list(masks)) if n in masks]
    if not names:
        return []
    shape = np.asarray(next(iter(masks.values())).shape)
    factor = max(1, int(np.ceil(shape.max() / max_side)))
    for _ in range(12):
        meshes = _class_meshes(masks, affine, names, factor, step, smooth)
        total = sum(len(m.faces) for m in meshes)
        if total <= max_triangles:
            return meshes
        # triangle count falls roughly with the square of the downsampling factor
        factor = max(factor + 1, int(np.ceil(factor * np.sqrt(total / max_triangles))))
    # last resort (pathological inputs): keep the largest meshes that fit
    kept, total = [], 0
    for m in sorted(meshes, key=lambda m: len(m.faces)):
        if total + len(m.faces) <= max_triangles:
            kept.append(m)
            total += len(m.faces)
    return kept


def mesh_figure(
    masks: Mapping[str, np.ndarray],
    affine: np.ndarray,
    classes: Sequence[str] | None = None,
    max_triangles: int = 60_000,
    step: int = 1,
    opacity: float = 1.0,
    height: int = 600,
):
    """A plotly figure of the classes as 3-D surfaces in world coordinates (mm), taxonomy colours.

    Args:
        masks: Class name → bool (X, Y, Z) mask.
        affine: (4, 4) voxel → RAS+ mm affine of the mask grid.
        classes: The classes to draw (default: all in ``masks``); empty masks are skipped.
        max_triangles: Cap on the total number of triangles (keeps the figure fluid in a browser).
        step: ``step_size`` of marching cubes (larger: coarser).
        opacity: Mesh opacity (0-1).
        height: Figure height in pixels.

    Returns:
        ``plotly.graph_objects.Figure`` with one ``Mesh3d`` trace per non-empty class; ``fig.layout.meta``
        holds ``{"triangles": total}``.
    """
    import plotly.graph_objects as go

    meshes = class_meshes(masks, affine, classes, max_triangles=max_triangles, step=step)
    fig = go.Figure()
    for m in meshes:
        fig.add_trace(_mesh_trace(m, opacity))
    total = int(sum(len(m.faces) for m in meshes))
    fig.update_layout(
        height=height,
        margin={"l": 0, "r": 0, "t": 30, "b": 0},
        scene={
            "aspectmode": "data",
            "xaxis_title": "x (mm, → R)",
            "yaxis_title": "y (mm, → A)",
            "zaxis_title": "z (mm, → S)",
            "camera": {"eye": {"x": 0.0, "y": 2.0, "z": 0.3}, "up": {"x": 0, "y": 0, "z": 1}},
        },
        legend={"itemsizing": "constant"},
        meta={"triangles": total},
        title={"text": f"{len(meshes)} structures, {total:,} triangles", "font": {"size": 13}},
    )
    return fig


def _mesh_trace(m: Mesh, opacity: float):
    """One ``plotly`` ``Mesh3d`` trace of a mesh (vertices rounded to 0.1 mm) in its colour."""
    import plotly.graph_objects as go

    v = np.round(m.vertices, 1)
    return go.Mesh3d(
        x=v[:, 0],
        y=v[:, 1],
        z=v[:, 2],
        i=m.faces[:, 0],
        j=m.faces[:, 1],
        k=m.faces[:, 2],
        color="rgb({},{},{})".format(*m.color),
        opacity=opacity,
        name=m.name,
        showlegend=True,
        flatshading=False,
        lighting={"ambient": 0.45, "diffuse": 0.8, "specular": 0.2, "roughness": 0.6},
        hovertemplate=f"{m.name}<extra></extra>",
    )


# ------------------------------------------------------------------------------------------------ charts
def metrics_frame(result: Any):
    """A pandas DataFrame (one row per class: ``class``, ``dsc``, ``nsd``, ``annotated``, ...) from a metrics result.

    Accepts a :class:`universal.metrics.CaseResult` (anything with ``to_frame()``), its ``to_dict()`` form
    (``{"classes": {name: {"dsc": .., "nsd": ..}}, ...}``), a DataFrame or a list of row dicts.
    """
    import pandas as pd

    if hasattr(result, "to_frame"):
        df = result.to_frame()
    elif isinstance(result, pd.DataFrame):
        df = result
    elif isinstance(result, Mapping):
        per_class = result.get("classes", result.get("per_class", result))
        if isinstance(per_class, Mapping):
            rows = [
                {"class": k, **(v if isinstance(v, Mapping) else {"value": v})} for k, v in per_class.items()
            ]
        else:
            rows = list(per_class)
        df = pd.DataFrame(rows)
    else:
        df = pd.DataFrame(list(result))
    df = df.copy()
    if "class" not in df.columns:
        if df.index.name is not None or not isinstance(df.index, pd.RangeIndex):
            df = df.reset_index().rename(columns={df.index.name or "index": "class"})
    df.columns = [str(c).lower() if str(c).lower() in ("dsc", "nsd", "class") else c for c in df.columns]
    return df


def metrics_bar_chart(result: Any, height: int = 380):
    """A grouped bar chart of per-class DSC and NSD (plotly); classes without a score are marked 'not annotated'.

    Args:
        result: A metrics result (see :func:`metrics_frame`).
    """
    import plotly.graph_objects as go

    df = metrics_frame(result)
    df = df[df["class"].astype(str).str.lower() != "mean"] if "class" in df.columns else df
    fig = go.Figure()
    labelled = len(df) <= 10  # value labels on the bars only while they stay readable
    for col, color in (("dsc", "#1f77b4"), ("nsd", "#ff7f0e")):
        if col in df.columns:
            vals = np.asarray(df[col], dtype=np.float64)
            fig.add_trace(
                go.Bar(
                    x=df["class"],
                    y=np.where(np.isfinite(vals), vals, 0.0),
                    name=col.upper(),
                    marker_color=color,
                    text=[f"{v:.2f}" if np.isfinite(v) else "n/a" for v in vals],
                    textposition="outside" if labelled else "none",
                    hovertemplate="%{x}: %{text}<extra>" + col.upper() + "</extra>",
                )
            )
    fig.update_layout(
        barmode="group",
        height=height,
        yaxis={"range": [0, 1.1], "title": "score"},
        margin={"l": 40, "r": 10, "t": 30, "b": 120},
        legend={"orientation": "h", "y": 1.08},
    )
    return fig


def similarity_heatmap(matrix: np.ndarray, labels: Sequence[str], col_labels: Sequence[str] | None = None,
                       title: str = "cosine similarity of the prompt embeddings", height: int = 520):  # fmt: skip
    """A plotly heatmap of a (K, K') similarity matrix (e.g. prompts of template A × template B)."""
    import plotly.graph_objects as go

    m = np.asarray(matrix, dtype=np.float64)
    cols = list(col_labels) if col_labels is not None else list(labels)
    if m.shape != (len(labels), len(cols)):
        raise ValueError(f"matrix shape {m.shape} does not match {len(labels)} x {len(cols)} labels")
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=cols,
            y=list(labels),
            colorscale="Viridis",
            zmin=float(min(0.0, np.nanmin(m))) if m.size else 0.0,
            zmax=1.0,
            colorbar={"title": "cos"},
            hovertemplate="%{y} × %{x}: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title, "font": {"size": 13}},
        height=height,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        yaxis={"autorange": "reversed"},
    )
    return fig


def timings_frame(timings: Mapping[str, float]):
    """A DataFrame ``stage, seconds, share`` of a Segmentation's timings (``total`` kept as the last row)."""
    import pandas as pd

    rows = [(k, float(v)) for k, v in timings.items() if k != "total" and v is not None]
    total = float(timings.get("total", sum(v for _, v in rows)))
    rows.append(("total", total))
    df = pd.DataFrame(rows, columns=["stage", "seconds"])
    df["share"] = df["seconds"] / total if total > 0 else np.nan
    return df


def results_frame(seg: Any, classes: Sequence[str] | None = None):
    """Per-class volume (mL), mean HU and voxel count of a Segmentation as a DataFrame."""
    import pandas as pd

    names = [n for n in (classes if classes is not None else list(seg.masks)) if n in seg.masks]
    vols = getattr(seg, "volumes_ml", {}) or {}
    hus = getattr(seg, "mean_hu", {}) or {}
    rows = []
    for n in names:
        try:
            kind = resolve_class(n).kind
        except Exception:  # noqa: BLE001
            kind = ""
        hu = hus.get(n)
        rows.append(
            {
                "class": n,
                "kind": kind,
                "volume (mL)": round(float(vols.get(n, 0.0)), 2),
                "mean HU": json_float(hu, 1),
                "voxels": int(np.count_nonzero(seg.masks[n])),
            }
        )
    return pd.DataFrame(rows, columns=["class", "kind", "volume (mL)", "mean HU", "voxels"])


# ------------------------------------------------------------------------------------------------ downloads
def masks_zip_bytes(seg: Any) -> bytes:
    """A zip of ``masks/<class_name>.nii.gz`` (uint8 0/1, on the input's own grid) and ``labels.nii.gz``.

    Uses ``seg.save`` (the same files as ``universal segment``) into a temporary folder.
    """
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="universal-zip-") as tmp:
        out = Path(tmp) / "case"
        seg.save(out)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # .nii.gz is compressed already
            for f in sorted(out.rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(out).as_posix())
        return buf.getvalue()


def saved_files(seg: Any) -> dict[str, bytes]:
    """The bytes of what ``seg.save`` writes: ``labels.nii.gz``, ``report.json`` and ``masks/*.nii.gz``."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="universal-save-") as tmp:
        out = Path(tmp) / "case"
        seg.save(out)
        return {f.relative_to(out).as_posix(): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


def zip_bytes(files: Mapping[str, bytes]) -> bytes:
    """A zip archive (stored, no compression) of ``name → bytes``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def metrics_csv(result: Any) -> str:
    """The per-class metrics table (see :func:`metrics_frame`) as CSV text."""
    return metrics_frame(result).to_csv(index=False)


def to_json_bytes(obj: Any) -> bytes:
    """JSON (UTF-8, indented) with NaN/inf as ``null`` and numpy values as numbers (:func:`universal.io.to_json`)."""
    return json.dumps(to_json(obj), indent=2, allow_nan=False).encode()
