"""Label-conditioned synthesis of training patches (the SynthSeg idea, adapted to partial labels).

Few real labeled scans cannot show a model the variety of real CT: contrast phases (a non-contrast liver at 45 HU
versus a portal-venous one at 110 HU, an aorta at 40 or 300 HU), shapes, noise and resolution. :func:`synthesize`
makes a new training patch from a real patch and its label masks:

1. **Elastic deformation** (image and masks together): a smooth random displacement field (coarse Gaussian noise
   on a control grid, upsampled with cubic splines) plus a small random scaling/rotation about the centre; image
   with linear interpolation, masks with nearest neighbour (all masks packed into one integer bit field, so it is
   one resampling for every class).
2. **Per-tissue HU sampling**: for every *available* class present in the patch, a new mean HU is drawn from a
   plausible range for that tissue (:data:`HU_RANGES`, widened to include the real image's own mean for the
   class ± 30 HU), and the tissue's voxels are moved to it (``x + (new_mean - real_mean)``); the within-tissue
   texture is rescaled by ``U(0.7, 1.3)``. Organs first, tumours (drawn inside organs) last. Voxels outside every
   annotated class keep their real intensities (a small global shift is applied), so unannotated anatomy stays
   realistic context.
3. **Blur and noise**: Gaussian blur (σ ∈ [0, ``blur_max``] voxels) then Gaussian noise (σ ∈ [0, ``noise_max_hu``]).

The patch arrives windowed to [0, 1] (``window_hu``, the training window) and leaves windowed the same way.
It is a training hook: ``synthesis: {hook: "universal.synthesis:synthesize", prob: 0.7, kwargs: {...}}`` in a
training config (it is also registered with :func:`universal.train.register_synthesis` as ``"synthseg"``). The
availability mask is returned unchanged: synthesis never invents a class it was not told about.

>>> import numpy as np
>>> img = np.full((1, 16, 16, 16), 0.5, np.float32); tgt = np.zeros((2, 16, 16, 16), bool); tgt[0, 4:12] = True
>>> out, t2, a2 = synthesize(img, tgt, np.array([True, False]), classes=["liver", "spleen"],
...                          rng=np.random.default_rng(0))
>>> out.shape, t2.shape, t2.dtype, bool(t2[0].any()), a2.tolist()
((1, 16, 16, 16), (2, 16, 16, 16), dtype('bool'), True, [True, False])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["HU_RANGES", "DEFAULT_HU_RANGE", "synthesize"]

#: Plausible mean HU of each tissue over CT phases (non-contrast .. arterial/portal venous), universal names.
HU_RANGES: dict[str, tuple[float, float]] = {
    "spleen": (35.0, 170.0),
    "right kidney": (25.0, 220.0),
    "left kidney": (25.0, 220.0),
    "gallbladder": (-5.0, 35.0),
    "esophagus": (10.0, 80.0),
    "liver": (40.0, 150.0),
    "stomach": (-80.0, 70.0),
    "aorta": (30.0, 350.0),
    "inferior vena cava": (30.0, 200.0),
    "portal and splenic vein": (35.0, 230.0),
    "pancreas": (25.0, 130.0),
    "right adrenal gland": (0.0, 80.0),
    "left adrenal gland": (0.0, 80.0),
    "duodenum": (-80.0, 80.0),
    "right lung": (-900.0, -650.0),
    "left lung": (-900.0, -650.0),
    "colon": (-600.0, 60.0),
    "intestine": (-60.0, 110.0),
    "rectum": (-300.0, 60.0),
    "bladder": (0.0, 40.0),
    "prostate": (20.0, 60.0),
    "liver tumor": (10.0, 120.0),
    "lung tumor": (-20.0, 80.0),
    "kidney tumor": (15.0, 150.0),
    "kidney cyst": (-5.0, 25.0),
    "pancreas tumor": (15.0, 100.0),
    "hepatic vessel tumor": (10.0, 120.0),
    "colon tumor": (15.0, 100.0),
}
#: Range for a class without an entry in :data:`HU_RANGES`.
DEFAULT_HU_RANGE: tuple[float, float] = (-50.0, 150.0)


def _is_tumor(name: str) -> bool:
    return "tumor" in name or "cyst" in name


def _deform(
    image: np.ndarray,
    packed: np.ndarray,
    rng: np.random.Generator,
    sigma_vox: float,
    scale: float,
    rot_deg: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Elastically deform ``image`` (X,Y,Z float) and ``packed`` (X,Y,Z int bit field) with one random field."""
    from scipy import ndimage

    shape = np.asarray(image.shape)
    grid = 5
    coarse = rng.normal(0.0, sigma_vox, size=(3, grid, grid, grid))
    disp = [
        ndimage.zoom(c, shape / grid, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
        for c in coarse
    ]
    # random small rotation (about a random axis) and isotropic scaling about the centre
    ang = np.deg2rad(rng.uniform(-rot_deg, rot_deg, size=3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    mat = (rz @ ry @ rx) * rng.uniform(1.0 - scale, 1.0 + scale)
    centre = (shape - 1) / 2.0
    idx = np.indices(tuple(shape), dtype=np.float32).reshape(3, -1) - centre[:, None]
    coords = (mat @ idx) + centre[:, None]
    coords = coords.reshape(3, *shape) + np.stack(disp).astype(np.float32)
    img = ndimage.map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32)
    lab = ndimage.map_coordinates(packed.astype(np.float64), coords, order=0, mode="nearest")
    return img, lab.astype(np.int64)


def synthesize(
    image: np.ndarray,
    target: np.ndarray,
    available: np.ndarray,
    *,
    classes: Sequence[str],
    rng: np.random.Generator,
    window_hu: Sequence[float] = (-175.0, 250.0),
    hu_ranges: Mapping[str, Sequence[float]] | None = None,
    elastic_prob: float = 0.7,
    elastic_sigma_vox: float = 3.0,
    scale: float = 0.12,
    rotate_deg: float = 10.0,
    intensity_prob: float = 0.9,
    texture_scale: Sequence[float] = (0.7, 1.3),
    global_shift_hu: float = 20.0,
    blur_max: float = 1.0,
    noise_max_hu: float = 25.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic training patch from a real one (see the module docstring).

    Args:
        image: float32 ``(1, X, Y, Z)`` intensities windowed to [0, 1] by ``window_hu``.
        target: bool ``(K, X, Y, Z)`` one-vs-all masks in the order of ``classes``.
        available: bool ``(K,)`` classes the patch's dataset annotates (only these are re-coloured).
        classes: Universal class names of the channels.
        rng: Random generator (the training sample's own, so patches stay reproducible).
        window_hu: The training HU window (to go to HU and back).
        hu_ranges: Overrides of :data:`HU_RANGES` (name → (low, high) mean HU).
        elastic_prob: Probability of the elastic deformation.
        elastic_sigma_vox: Standard deviation (voxels) of the coarse displacement field.
        scale: Random isotropic scaling ``U(1 - scale, 1 + scale)``.
        rotate_deg: Random rotation ``U(-rotate_deg, rotate_deg)`` about each axis.
        intensity_prob: Probability of the per-tissue HU sampling.
        texture_scale: Range of the within-tissue contrast factor.
        global_shift_hu: Range ``U(-g, g)`` of a shift applied to the whole patch.
        blur_max: Largest Gaussian blur σ (voxels).
        noise_max_hu: Largest noise σ (HU).

    Returns:
        ``(image, target, available)`` with the input shapes and dtypes.
    """
    lo_w, hi_w = (float(w) for w in window_hu)
    width = hi_w - lo_w
    target = np.asarray(target).astype(bool)
    available = np.asarray(available, dtype=bool)
    hu = np.asarray(image[0], dtype=np.float32) * np.float32(width) + np.float32(lo_w)
    draws = rng.random(2)
    if draws[0] < elastic_prob and target.shape[0] <= 62:
        hu, target = _deform_with_masks(hu, target, rng, elastic_sigma_vox, scale, rotate_deg)
    if draws[1] < intensity_prob:
        ranges = {**HU_RANGES, **{str(n): tuple(map(float, r)) for n, r in (hu_ranges or {}).items()}}
        hu = _resample_tissues(hu, target, available, classes, rng, ranges, texture_scale, global_shift_hu)
    hu = _blur_and_noise(hu, rng, blur_max, noise_max_hu)
    img = np.clip((hu - np.float32(lo_w)) / np.float32(width), 0.0, 1.0).astype(np.float32)[None]
    return img, target, available


def _deform_with_masks(
    hu: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator,
    sigma_vox: float,
    scale: float,
    rot_deg: float,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_deform` of ``hu`` (X, Y, Z) and the ≤ 62 masks ``target`` (K, X, Y, Z), packed into one bit field."""
    k = target.shape[0]
    bits = np.arange(k, dtype=np.int64).reshape(k, 1, 1, 1)
    packed = (target.astype(np.int64) * (np.int64(1) << bits)).sum(axis=0)
    hu, packed = _deform(hu, packed, rng, sigma_vox, scale, rot_deg)
    return hu, ((packed[None] >> bits) & 1).astype(bool)


def _resample_tissues(
    hu: np.ndarray,
    target: np.ndarray,
    available: np.ndarray,
    classes: Sequence[str],
    rng: np.random.Generator,
    ranges: Mapping[str, Sequence[float]],
    texture_scale: Sequence[float],
    global_shift_hu: float,
) -> np.ndarray:
    """New HU (X, Y, Z): each available class present moved to a random mean from ``ranges``, texture rescaled."""
    order = sorted(
        range(target.shape[0]), key=lambda i: _is_tumor(str(classes[i]))
    )  # organs first, tumours over
    out = hu + np.float32(rng.uniform(-global_shift_hu, global_shift_hu))
    for i in order:
        m = target[i]
        if not available[i] or not m.any():
            continue
        vals = hu[m]
        real_mean = float(vals.mean())
        lo, hi = ranges.get(str(classes[i]), DEFAULT_HU_RANGE)
        lo, hi = min(lo, real_mean - 30.0), max(hi, real_mean + 30.0)
        new_mean = rng.uniform(lo, hi)
        tex = rng.uniform(*texture_scale)
        out[m] = np.float32(new_mean) + (vals - np.float32(real_mean)) * np.float32(tex)
    return out


def _blur_and_noise(
    hu: np.ndarray, rng: np.random.Generator, blur_max: float, noise_max_hu: float
) -> np.ndarray:
    """A random Gaussian blur (σ ≤ ``blur_max`` voxels, skipped below 0.2) then noise (σ ≤ ``noise_max_hu`` HU)."""
    from scipy import ndimage

    sigma = rng.uniform(0.0, blur_max)
    if sigma > 0.2:
        hu = ndimage.gaussian_filter(hu, sigma)
    noise = rng.uniform(0.0, noise_max_hu)
    if noise > 1.0:
        hu = hu + rng.normal(0.0, noise, size=hu.shape).astype(np.float32)
    return hu


def _register() -> None:
    try:
        from universal.train import register_synthesis
    except Exception:  # pragma: no cover - train needs nothing heavy, but never fail an import over it
        return
    register_synthesis("synthseg")(synthesize)


_register()
