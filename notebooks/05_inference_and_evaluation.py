# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5 · Inference and evaluation on a real CT
#
# From a CT file to masks, volumes, metrics and timings:
#
# 1. `universal.segment(ct, fast=True)`: RAS+ reorientation → foreground crop → resampling (3 mm in `fast` mode,
#    1.5 mm otherwise) → HU window → Gaussian-weighted sliding window → threshold → connected-component
#    post-processing → masks back on the **original grid**;
# 2. slice overlays and a 3-D view (`universal.viz`);
# 3. volumes in mL;
# 4. DSC and NSD with the **FLARE 2023 rules** (`universal.metrics`, preset `flare23`);
# 5. efficiency: the timing breakdown `Segmentation.timings` returns, and memory.
#
# **About the numbers.** The model is the project's built-in one (`universal/resources/builtin.pt`, see
# `MODEL_CARD.md`): a small model trained in 8 GPU-minutes whose accuracy is far below the paper's. This notebook reports what
# it gets, honestly, and asserts no accuracy. The reference labels of these scans are themselves TotalSegmentator
# output, not manual annotations. Research software: not for clinical use.

# %% tags=["parameters"]
QUICK = True  # CI-sized run (one 3 mm scan; False adds a second inference to time a warm model)
DATA_DIR = None  # folder with the real CTs; None = $UNIVERSAL_DATA_DIR or the nearest shared/data above
CASE = (
    "ts_abdomen_3mm"  # or "ts_dicom_series" (a real 20-slice DICOM series, 512 x 512, held out from training)
)
SHOW_ITKWIDGETS = None  # None: only inside a Jupyter server session (and when itkwidgets is installed)

# %%
import os
import resource
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import universal
from universal import metrics, viz
from universal.data import find_sample_data

# where the real CTs are: the DATA_DIR parameter, else $UNIVERSAL_DATA_DIR, else the first shared/data found
# walking up from this notebook's folder (the repository keeps them in ../shared/data beside the project)
DATA_DIR = find_sample_data(DATA_DIR)
print(
    f"universal {universal.__version__} | real CTs: {DATA_DIR or 'not found - using the synthetic phantom'}"
)

plt.rcParams.update({"figure.dpi": 80, "axes.titlesize": 10, "font.size": 9})


def rgb(name):
    """The taxonomy colour of a class as a matplotlib RGB tuple (0-1)."""
    return tuple(c / 255 for c in universal.resolve_class(name).color)


# %% [markdown]
# ## 5.1 The CT and its reference labels
#
# `load_volume` reads NIfTI, NRRD, MHA, DICOM folders or zips into a `Volume`: an `(X, Y, Z)` array in HU on a
# RAS+ grid, with its affine and spacing. The reference (TotalSegmentator v2 ids) is read onto the same grid and
# transferred to universal classes with the dataset's label map.

# %%
SOURCES = {  # case -> (CT, reference label file), relative to DATA_DIR; both references use TotalSegmentator v2 ids
    "ts_abdomen_3mm": ("ts_abdomen_3mm/ct.nii.gz", "ts_abdomen_3mm/labels_totalseg.nii.gz"),
    "ts_dicom_series": ("ts_dicom_series/dicom", "ts_dicom_series/labels_totalseg.nii.gz"),
}
t_start = time.perf_counter()
if DATA_DIR is not None:
    image, label = SOURCES[CASE]
    volume = universal.load_volume(DATA_DIR / image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TotalSegmentator labels bones etc. that have no universal class
        # the evaluation layer reads a reference in its id convention onto the CT's grid
        reference = universal.read_reference(DATA_DIR / label, "totalsegmentator_v2", like=volume)
else:
    CASE = "phantom"
    ph = universal.make_phantom(shape=(128, 128, 96), spacing=(1.5, 1.5, 1.5), seed=0)
    volume = ph.volume
    reference = universal.read_reference(
        dict(ph.masks), like=volume
    )  # masks by class name need no convention
gt, annotated = dict(reference.masks), list(reference.annotated)
present = [n for n in annotated if gt[n].any()]
print(
    f"{CASE}: shape {volume.shape}, spacing {tuple(round(s, 3) for s in volume.spacing)} mm, "
    f"HU range [{volume.array.min():.0f}, {volume.array.max():.0f}]"
)
print(f"reference annotates {len(annotated)} classes, {len(present)} present in this scan: {present}")

# %% [markdown]
# ## 5.2 Segment
#
# `segment` with `model=None` uses the built-in model (loaded once per process and cached). `fast=True` works at
# 3 mm, the resolution the built-in model was trained at. The result's masks are on the input's own grid. We pass
# the `Volume` loaded above, so the `load` stage is ~0 here; `universal.segment("ct.nii.gz")` times the reading too.

# %%
seg = universal.segment(volume, fast=True)
print("model:", {k: seg.info[k] for k in ("model", "backbone", "encoder", "device") if k in seg.info})
print("classes:", seg.classes)
print("mask grid equals the CT grid:", all(m.shape == volume.shape for m in seg.masks.values()))
timings = viz.timings_frame(seg.timings)
timings.round(3)

# %% [markdown]
# ## 5.3 Slice overlays
#
# `viz.slice_overlay` windows a slice, blends the masks in the taxonomy colours and orients it radiologically (the
# patient's right on the image's left). Top: the built-in model; bottom: the reference. `viz.difference_map` shows
# where they disagree.

# %%
pred_any = np.any([m for m in seg.masks.values()], axis=0)
ref_any = np.any([gt[n] for n in present], axis=0) if present else np.zeros(volume.shape, bool)
centre = (
    np.argwhere(ref_any | pred_any).mean(axis=0).round().astype(int)
    if (ref_any | pred_any).any()
    else np.array(volume.shape) // 2
)
views = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
fig, axes = plt.subplots(3, 3, figsize=(13, 11))
for col, (view, axis) in enumerate(views):
    idx = int(centre[axis])
    for row, (title, masks) in enumerate(
        [("built-in model", seg.masks), ("reference", {n: gt[n] for n in present})]
    ):
        im = viz.slice_overlay(volume.array, masks, view, idx, spacing=volume.spacing)
        axes[row, col].imshow(im.square())
        axes[row, col].set_title(f"{title}: {view} {idx}")
    diff = viz.difference_map(
        seg.masks,
        {n: gt[n] for n in present if n in seg.masks},
        view,
        idx,
        volume_array=volume.array,
        spacing=volume.spacing,
    )
    axes[2, col].imshow(diff.square())
    axes[2, col].set_title("white both, orange model only, cyan reference only")
for ax in axes.ravel():
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5.4 A 3-D view
#
# `viz.mesh_figure` turns masks into marching-cubes surfaces in world millimetres (capped in triangles so the figure
# stays fluid) as a plotly figure. If the model finds nothing, the reference is shown instead, so the figure is never
# empty. In a Jupyter session `itkwidgets` adds a full volume viewer; headless runs (CI) skip it.

# %%
found = [n for n, m in seg.masks.items() if m.any()]
show, what = (
    ({n: seg.masks[n] for n in found}, "built-in model")
    if found
    else ({n: gt[n] for n in present}, "reference")
)
fig3d = viz.mesh_figure(show, volume.affine, max_triangles=30_000, height=480)
fig3d.update_layout(title=f"{what}: {fig3d.layout.meta['triangles']:,} triangles")
fig3d.show()

in_jupyter = bool(os.environ.get("JPY_SESSION_NAME")) if SHOW_ITKWIDGETS is None else bool(SHOW_ITKWIDGETS)
if in_jupyter:
    try:
        from itkwidgets import view as itk_view

        display(itk_view(image=volume.array, label_image=seg.label_map()))  # noqa: F821 - IPython's display
    except Exception as err:  # optional viewer: never fail the notebook for it
        print("itkwidgets viewer unavailable:", err)
else:
    print("(not in a Jupyter server session: itkwidgets viewer skipped)")

# %% [markdown]
# ## 5.5 Volumes
#
# `Segmentation.volumes_ml` and `mean_hu` are measured on the original grid. Next to them, the reference's volumes.

# %%
voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
volumes = viz.results_frame(seg).set_index("class")
volumes["reference (mL)"] = [
    round(float(gt[n].sum()) * voxel_ml, 2) if n in gt else np.nan for n in volumes.index
]
volumes

# %% [markdown]
# ## 5.6 DSC and NSD with the FLARE 2023 rules
#
# `evaluate_case(pred, gt, spacing, preset="flare23")` scores the 13 FLARE organs and the `lesion` class with the
# challenge's rules:
#
# * **NSD** (normalised surface Dice) counts the surface within a class-specific tolerance (liver 5 mm, aorta 2 mm,
#   ...), measured in mm with the reference's voxel spacing;
# * both masks empty → DSC = NSD = 1; exactly one empty → 0;
# * NSD is set to 0 where DSC < 0.1;
# * aorta, IVC and oesophagus are cropped to the reference's z-range first;
# * classes the reference does not annotate are "not annotated" (left out of the means, not counted as misses).
#
# First the rules on toy masks, then the real case.

# %%
cube = np.zeros((40, 40, 40), bool)
cube[10:30, 10:30, 10:30] = True  # a 20 mm cube on a 1 mm grid
shifted = np.roll(cube, 1, axis=0)  # one voxel (1 mm) off
empty = np.zeros_like(cube)
toy = metrics.evaluate_case(
    {"liver": shifted, "spleen": empty, "pancreas": empty, "stomach": cube},
    {"liver": cube, "spleen": empty, "pancreas": cube, "stomach": np.roll(cube, 19, axis=0)},
    (1.0, 1.0, 1.0),
    preset="flare23",
    classes=["liver", "spleen", "pancreas", "stomach"],
    annotated=["liver", "spleen", "pancreas", "stomach"],
)
print(toy.table(3))
print("liver: 1 mm shift, 5 mm tolerance -> NSD 1; spleen: both empty -> 1; pancreas: missed -> 0;")
print("stomach: overlap DSC < 0.1 -> NSD forced to 0")

# %%
# the evaluation layer scores the classes both segmented and annotated, and says which others it skipped and why
result = universal.evaluate(seg, reference, preset="flare23", name=CASE)
print(result.summary())
print(result.table(3))
scores = result.to_frame()

# %% [markdown]
# Read the table class by class: an organ outside the scan's field of view that the model also leaves empty scores
# 1 (both empty), so a mean can look better than the masks are.
#
# For context, the same rules applied to two *different automatic* references of the same scan
# (`labels_totalseg` vs `labels_totalseg_fast`, both TotalSegmentator): the level a good model reaches here.

# %%
reference_agreement = None
fast_label = DATA_DIR / CASE / "labels_totalseg_fast.nii.gz" if DATA_DIR is not None else None
if fast_label is not None and fast_label.is_file():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = universal.read_reference(fast_label, "totalsegmentator_v2", like=volume)
    # the second reference scored as if it were a prediction, on the same classes as the model
    reference_agreement = universal.evaluate(other.masks, reference, preset="flare23", classes=result.scored)
    both = pd.DataFrame(
        {
            "built-in DSC": scores.dsc,
            "built-in NSD": scores.nsd,
            "TS-fast vs TS DSC": reference_agreement.to_frame().dsc,
            "TS-fast vs TS NSD": reference_agreement.to_frame().nsd,
        }
    )
    ax = both[["built-in DSC", "TS-fast vs TS DSC"]].plot.bar(figsize=(10, 3.2), color=["#1f77b4", "#bbbbbb"])
    ax.set_ylim(0, 1.05)
    ax.set_title("FLARE 2023 DSC per organ")
    plt.show()
    print(both.round(3))
else:
    print("(no second reference for this case)")

# %% [markdown]
# ## 5.7 Efficiency
#
# FLARE 2023 measures the wall time of the whole run, model loading included, and the GPU memory (tolerances 15 s
# and 4 GB per case). `Segmentation.timings` breaks the time down by stage; on a CPU the sliding-window inference
# dominates.

# %%
fig, ax = plt.subplots(figsize=(8, 2.6))
stages = timings[timings.stage != "total"]
ax.barh(stages.stage, stages.seconds, color="#4c72b0")
ax.invert_yaxis()
ax.set_xlabel("seconds")
ax.set_title(
    f"segment(fast=True) on {CASE}: {seg.timings['total']:.1f} s in total ({seg.info.get('device', 'cpu')})"
)
plt.show()

peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kB
efficiency = {
    "total s (first call, model load included)": round(seg.timings["total"], 2),
    "inference s": round(seg.timings["inference"], 2),
    "peak process memory GB (this kernel, CPU)": round(peak_rss_gb, 2),
}
try:
    import torch

    if torch.cuda.is_available():
        efficiency["peak GPU memory GB"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
except ImportError:
    pass
if not QUICK:  # a second call: the model is cached, so this is the warm time
    warm = universal.segment(volume, fast=True)
    efficiency["total s (warm model)"] = round(warm.timings["total"], 2)
print(efficiency)
print(f"whole notebook so far: {time.perf_counter() - t_start:.1f} s")

# %% [markdown]
# ## Exercises
#
# 1. Run the notebook with `CASE = "ts_dicom_series"` (a real DICOM series the built-in model never saw in
#    training). Its 20 slices cover only part of the abdomen: which FLARE organs are absent from its reference, and
#    what does the rule "both masks empty → DSC = NSD = 1" do to the mean scores of a model that finds little?
# 2. Segment with `fast=False` (1.5 mm). How much slower is it, and do the masks change? (The built-in model was
#    trained at 3 mm.)
# 3. In the toy example, move the stomach reference so that it overlaps the prediction a little more (e.g.
#    `np.roll(cube, 18, axis=0)`). At which shift does the NSD stop being forced to 0?

# %% [markdown]
# <details><summary>Solution (click to open)</summary>
#
# 1. `[n for n in scored if not gt[n].any()]`: e.g. the kidneys, the gallbladder and the duodenum are outside its
#    field of view. Every class that both the model and the reference leave empty scores 1, so the mean rises
#    although nothing was found (a mean DSC of about 0.4 for an almost empty prediction when this was written).
#    Read the per-class table, and say which classes are present in the reference.
# 2. `universal.segment(volume, fast=False)`: about 8× more voxels to infer. A model trained at 3 mm sees
#    unfamiliar voxel sizes at 1.5 mm, so the masks change (usually for the worse).
# 3. With shift `s` the overlap is `20 - s` slices of 20, DSC = (20 - s)/20: shift 19 gives 0.05 (NSD forced to 0),
#    shift 18 gives exactly 0.1, which is not < 0.1, so from there on the NSD is computed.
#
# </details>

# %% [markdown]
# ## Checks

# %%
assert set(seg.masks) == set(seg.classes) and all(
    m.shape == volume.shape and m.dtype == bool for m in seg.masks.values()
)
for stage in ("load", "model", "preprocess", "inference", "postprocess", "resample", "total"):
    assert stage in seg.timings and seg.timings[stage] >= 0, stage
assert seg.timings["total"] >= seg.timings["inference"]
for n, m in seg.masks.items():  # volumes are voxel counts times the voxel volume of the input grid
    assert abs(seg.volumes_ml[n] - m.sum() * voxel_ml) < 1e-6 * max(1.0, seg.volumes_ml[n])
assert toy["liver"].nsd == 1.0 and toy["spleen"].dsc == toy["spleen"].nsd == 1.0
assert toy["pancreas"].dsc == toy["pancreas"].nsd == 0.0 and toy["stomach"].nsd == 0.0 < toy["stomach"].dsc
ok = scores[scores.status == "ok"]
assert len(ok) > 0 and ok.dsc.between(0, 1).all() and ok.nsd.between(0, 1).all()
assert ((ok.dsc >= 0.1) | (ok.nsd == 0)).all()  # the FLARE 2023 rule
if reference_agreement is not None:  # two good automatic references agree: the metric pipeline is sane
    assert reference_agreement["liver"].dsc > 0.8
print(
    "CHECKS PASSED 05",
    {
        "case": CASE,
        "segment_total_s": round(seg.timings["total"], 1),
        "mean_dsc": round(result.mean()["dsc"], 3),
        "mean_nsd": round(result.mean()["nsd"], 3),
    },
)
