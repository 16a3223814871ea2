"""A *reference-style* inference, written the way the official Universal Model code works (bench/test helper only).

Not part of the package: it exists so that ``bench/inference.py`` can measure ``universal.segment`` against the
official algorithm's choices, and so that ``tests/test_inference.py`` can check that both give the same masks.
Re-implemented from the description of the method, not copied. Its choices:

- sliding window with MONAI's ``sliding_window_inference`` (overlap 0.5, Gaussian, one window per forward pass),
  whose accumulator and count map are float32 at full resolution for **all** the model's classes;
- in the predictor, the backbone once per window and then a **Python loop over classes** for the dynamic heads;
- sigmoid of the full (K, X', Y', Z') float32 logits, threshold, post-processing on the prepared grid;
- **per-class** resampling back to the source grid with a full-volume trilinear interpolation of each mask.

The preprocessing and the resampling *semantics* are the package's (``universal.preprocess``), so that the two
implementations are comparable voxel for voxel; only the implementation strategy differs.

Also here: :func:`calibrated_random_model`, a randomly initialised model (fixed seed, one-hot prompts) whose heads are
calibrated so that every class gives a non-trivial mask; trained weights are not needed to compare implementations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def calibrated_random_model(
    classes: Sequence[str] | None = None,
    seed: int = 0,
    backbone: str = "segresnet",
    probe: np.ndarray | None = None,
    contrast: float = 50.0,
    **backbone_kwargs,
):
    """A randomly initialised Universal Model whose classes each segment roughly half of ``probe``.

    A random network's logits are nearly constant (std ~0.005) and of one sign, so every mask would be empty or
    full. Two surgical changes make the masks informative while keeping a genuine ``UniversalModel``:
    the rows of the controller that produce the last head layer's weights are scaled by ``contrast`` (spatial
    variation), and a per-class offset is added to the last bias through two dedicated text-feature channels
    (the median logit of each class on ``probe`` becomes ~0).

    Args:
        classes: Class names (default: all 32).
        seed: Torch seed of the initialisation.
        backbone: Backbone name.
        probe: A preprocessed (X, Y, Z) array in [0, 1] (any size multiple of 8; default: random 32³).
        contrast: Factor of the last head layer's weights.
    """
    from universal.model import create_model
    from universal.model.universal_model import CONTROLLER_SPLITS, GLOBAL_DIM

    torch.manual_seed(seed)
    model = create_model(backbone, classes=classes, encoder="onehot", **backbone_kwargs).eval()
    w3_start = CONTROLLER_SPLITS[0] + CONTROLLER_SPLITS[1]
    w3 = slice(w3_start, w3_start + CONTROLLER_SPLITS[2])
    b3 = sum(CONTROLLER_SPLITS) - 1
    pos_c, neg_c = GLOBAL_DIM - 1, GLOBAL_DIM - 2  # text features reserved for the offsets
    with torch.no_grad():
        model.controller.weight[w3] *= contrast
        model.controller.bias[w3] *= contrast
        tv = model.text_to_vision
        for c in (pos_c, neg_c):
            tv.weight[c] = 0.0
            tv.bias[c] = 0.0
            model.controller.weight[:, GLOBAL_DIM + c] = 0.0
        model.controller.weight[b3, GLOBAL_DIM + pos_c] = 1.0
        model.controller.weight[b3, GLOBAL_DIM + neg_c] = -1.0
        if probe is None:
            gen = torch.Generator().manual_seed(seed)
            x = torch.rand((1, 1, 32, 32, 32), generator=gen)
        else:
            x = torch.as_tensor(np.asarray(probe, np.float32))[None, None]
        logits = model(x)  # (1, K, ...)
        medians = logits.flatten(2).median(dim=2).values[0]  # (K,)
        onehot_index = model.organ_embedding.argmax(dim=1)  # the column of text_to_vision each class uses
        for k, m in enumerate(medians.tolist()):
            j = int(onehot_index[k])
            if m < 0:
                tv.weight[pos_c, j] = -m
            else:
                tv.weight[neg_c, j] = m
    return model


class _LoopHeadsPredictor:
    """Backbone once per window, then the dynamic heads one class at a time (the official code's structure)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from universal.model import dynamic_heads

        m = self.model
        bottleneck, decoded = m.backbone(x)
        g = m.GAP(bottleneck).flatten(1)
        feats = m.precls_conv(decoded)
        outs = []
        for k in range(m.num_classes):  # the official per-class loop
            params = m.controller_params(g, [k])  # (B, 1, 153)
            outs.append(dynamic_heads(feats, params))
        return torch.cat(outs, dim=1)


def reference_segment(
    volume,
    model,
    classes: Sequence[str] | None = None,
    *,
    overlap: float = 0.5,
    patch_size: int | Sequence[int] | None = None,
    spacing_mm: float | Sequence[float] | None = None,
    postprocess: bool = True,
    threshold: float = 0.5,
) -> dict[str, np.ndarray]:
    """Masks on the source grid, computed the reference way (see the module docstring).

    All of the model's classes are computed and accumulated; ``classes`` only selects what is returned.
    ``patch_size`` and ``spacing_mm`` default to the model's spec (its training window and spacing).
    """
    from monai.inferers import sliding_window_inference

    from universal.preprocess import PreprocessConfig, preprocess

    model = model.eval()
    spec = model.spec  # what the weights expect (universal.spec.ModelSpec)
    if spacing_mm is None:
        spacing_mm = spec.preprocessing.target_spacing()
    if not np.isscalar(spacing_mm):
        spacing_mm = tuple(float(v) for v in spacing_mm)  # type: ignore[union-attr]
    if patch_size is None:
        patch_size = spec.inference.patch_size
    patch = (int(patch_size),) * 3 if np.isscalar(patch_size) else tuple(int(v) for v in patch_size)  # type: ignore[union-attr]
    prepared = preprocess(
        volume,
        PreprocessConfig(
            spacing_mm=spacing_mm,  # type: ignore[arg-type]
            hu_window=spec.preprocessing.hu_window,
            crop_foreground=spec.preprocessing.crop_foreground,
        ),
    )
    dev = next(
        model.parameters()
    ).device  # the reference keeps volume, windows and accumulator on that device
    x = torch.from_numpy(prepared.array)[None, None].to(dev)
    with torch.no_grad():
        logits = sliding_window_inference(
            x, patch, 1, _LoopHeadsPredictor(model), overlap=overlap, mode="gaussian"
        )
        probs = torch.sigmoid(logits)[0].cpu()  # (K, X', Y', Z') float32, all classes
    names = list(model.class_names)
    wanted = names if classes is None else list(classes)
    masks_prep = {n: (probs[names.index(n)] >= threshold).numpy() for n in wanted}
    del logits, probs
    if postprocess:
        from universal.postprocess import body_midline_x_mm
        from universal.postprocess import postprocess as run_postprocess

        body_x = body_midline_x_mm(volume.array, volume.affine)
        masks_prep = run_postprocess(masks_prep, prepared.affine, body_x_mm=body_x)
    box = tuple(slice(a, b) for a, b in prepared.box)
    size = tuple(b - a for a, b in prepared.box)
    out = {}
    for n in wanted:  # per-class, full-volume resampling back
        t = torch.from_numpy(masks_prep[n].astype(np.float32))[None, None]
        r = F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy() >= 0.5
        full = np.zeros(prepared.source_shape, bool)
        full[box] = r
        out[n] = full
    return out


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s
