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
# **What you will learn**
#
# * how `universal.Predictor` turns a CT file into masks on the CT's own grid, and which settings it takes from the
#   model (its `ModelSpec`) rather than from you;
# * how to *look* at a segmentation honestly: overlays with a class legend, a per-class difference map, and a
#   confusion matrix that shows which organ a wrong prediction actually lies on;
# * the two metrics of the FLARE 2023 challenge, their rules, and how those rules can flatter a weak model;
# * why a score on a scan the model was **trained** on says nothing about new patients;
# * what the timing breakdown says about efficiency.
#
# **The metrics.** For a predicted mask $P$ and a reference mask $G$ (sets of voxels):
#
# $$\mathrm{DSC}(P, G) = \frac{2\,|P \cap G|}{|P| + |G|}$$
#
# The **normalised surface Dice** at tolerance $\tau$ (mm) compares the surfaces $\partial P$ and $\partial G$
# (areas, measured with surface elements in mm²): the share of both surfaces that lies within $\tau$ of the other,
#
# $$\mathrm{NSD}_\tau(P, G) = \frac{|\partial P \cap B_\tau(\partial G)| + |\partial G \cap B_\tau(\partial P)|}
# {|\partial P| + |\partial G|}, \qquad B_\tau(S) = \{x : d(x, S) \le \tau\}.$$
#
# DSC punishes volume errors, NSD punishes boundary errors larger than what a human annotator would dispute
# ($\tau$ is class-specific: liver 5 mm, aorta 2 mm, ...). FLARE 2023 adds rules: both masks empty → DSC = NSD = 1;
# exactly one empty → 0; NSD := 0 where DSC < 0.1; aorta, IVC and oesophagus are cropped to the reference's z-range.
#
# **The steps of inference.** RAS+ reorientation → foreground crop → resampling to the model's spacing (the spec's
# `spacing_mm`; `fast=True` uses the spec's fast spacing, which is never finer than the model's own — section 5.2
# prints both for the model used here) → HU window → Gaussian-weighted sliding window → threshold →
# connected-component post-processing → masks back on the **original grid**.
#
# **About the numbers.** The model is the project's built-in one (`universal/resources/builtin.pt`, see
# `MODEL_CARD.md`): a small model trained in 8 GPU-minutes whose accuracy is far below the paper's. The default case
# is `ts_dicom_series`, a real DICOM series of a patient the model **never saw** in training; section 5.8 runs the
# same model on `ts_abdomen_3mm`, the scan it **was trained on**, to show how different the two answers are. The
# reference labels are themselves TotalSegmentator output, not manual annotations. Research software: not for
# clinical use.

# %% tags=["parameters"]
QUICK = True  # CI-sized run (False adds a second, warm-model inference for the timings)
DATA_DIR = None  # folder with the real CTs; None = $UNIVERSAL_DATA_DIR or the nearest shared/data above
CASE = "ts_dicom_series"  # held out from training; "ts_abdomen_3mm" is the built-in model's training scan
SHOW_ITKWIDGETS = None  # None: only inside a Jupyter server session (and when itkwidgets is installed)
RUN_SOLUTIONS = False  # True: run the (hidden) solution cells of the exercises

# %%
import os
import resource
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch
from mpl_toolkits.mplot3d.art3d import Poly3DCollection

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
rgb = viz.class_rgb  # the taxonomy colour of a class as a matplotlib RGB tuple (0-1)


def heatmap(ax, matrix, rows, cols, title, cmap="viridis", fmt="{:.2f}", vmax=1.0):
    """A labelled matrix with a colour bar and its values written in the cells."""
    im = ax.imshow(matrix, cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(matrix):
        if v > 0.005:
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set_title(title)
    plt.colorbar(im, ax=ax, shrink=0.85)


# %% [markdown]
# ## 5.1 The CT and its reference labels
#
# `load_volume` reads NIfTI, NRRD, MHA, DICOM folders or zips into a `Volume`: an `(X, Y, Z)` array in HU on a
# RAS+ grid, with its affine and spacing. The reference (TotalSegmentator v2 ids) is read onto the same grid and
# transferred to universal classes with the dataset's label map (`universal.read_reference`).
#
# Which scans the built-in model was trained on is written in `MODEL_CARD.md` ("Training data"); its checkpoint
# does not record it (the provenance printed below has no dataset list), so we copy that fact here.

# %%
SOURCES = {  # case -> (CT, reference label file), relative to DATA_DIR; both references use TotalSegmentator v2 ids
    "ts_abdomen_3mm": ("ts_abdomen_3mm/ct.nii.gz", "ts_abdomen_3mm/labels_totalseg.nii.gz"),
    "ts_dicom_series": ("ts_dicom_series/dicom", "ts_dicom_series/labels_totalseg.nii.gz"),
}
TRAINING_SCANS = {"ts_abdomen_3mm"}  # MODEL_CARD.md: the only real labelled abdomen scan of the training set
t_start = time.perf_counter()
if DATA_DIR is None:
    CASE, OTHER = "phantom", None
else:  # the other real scan, for section 5.8
    OTHER = "ts_abdomen_3mm" if CASE != "ts_abdomen_3mm" else "ts_dicom_series"
loaded = {}  # case -> (CT, reference)
for name in [CASE, OTHER] if OTHER else [CASE]:
    if name == "phantom":
        ph = universal.make_phantom(shape=(128, 128, 96), spacing=(1.5, 1.5, 1.5), seed=0)
        loaded[name] = (ph.volume, universal.read_reference(dict(ph.masks), like=ph.volume))
        continue
    image, label = SOURCES[name]
    ct = universal.load_volume(DATA_DIR / image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TotalSegmentator labels bones etc. that have no universal class
        # the evaluation layer reads a reference in its id convention onto the CT's grid
        loaded[name] = (ct, universal.read_reference(DATA_DIR / label, "totalsegmentator_v2", like=ct))
volume, reference = loaded[CASE]
gt, annotated = dict(reference.masks), list(reference.annotated)
present = [n for n in annotated if gt[n].any()]
seen_in_training = CASE in TRAINING_SCANS
print(
    f"{CASE}: shape {volume.shape}, spacing {tuple(round(s, 3) for s in volume.spacing)} mm, "
    f"HU range [{volume.array.min():.0f}, {volume.array.max():.0f}]"
)
print(f"reference annotates {len(annotated)} classes, {len(present)} present in this scan: {present}")
print(
    "THIS SCAN WAS IN THE MODEL'S TRAINING DATA: its scores measure memorisation, not accuracy"
    if seen_in_training
    else "this scan was never seen in training: its scores estimate accuracy on a new patient"
)

# %% [markdown]
# ## 5.2 Segment
#
# A `Predictor` loads the weights once and fixes its settings; everything the model was trained with (spacing, HU
# window, sliding-window size) comes from the checkpoint's `ModelSpec`. Compare the grid of `fast=True` and of
# `fast=False` for this model: the printout decides whether `fast` can change anything here. We pass the `Volume`
# loaded above, so the `load` stage is ~0; `predictor.predict("ct.nii.gz")` times the reading too.

# %%
predictor = universal.Predictor("builtin", fast=True)
spacing_fast = predictor.resolved.preprocessing.spacing_mm
spacing_full = predictor.with_settings(fast=False).resolved.preprocessing.spacing_mm
print(predictor)
print(f"model spacing: fast=True -> {spacing_fast} mm, fast=False -> {spacing_full} mm")
print("provenance:", predictor.spec.provenance)
seg = predictor.predict(volume)
print("classes:", seg.classes)
print("mask grid equals the CT grid:", all(m.shape == volume.shape for m in seg.masks.values()))
timings = viz.timings_frame(seg.timings)
timings.round(3)

# %% [markdown]
# ## 5.3 Slice overlays, with a legend
#
# `viz.slice_overlay` windows a slice, blends the masks in the taxonomy colours and orients it radiologically (the
# patient's right on the image's left). Row 1: the built-in model; row 2: the reference; row 3:
# `viz.difference_map`, which pools all classes: it says *where* the two disagree, not *about what*.

# %%
pred_any = np.any([m for m in seg.masks.values()], axis=0)
ref_any = np.any([gt[n] for n in present], axis=0) if present else np.zeros(volume.shape, bool)
centre = (
    np.argwhere(ref_any | pred_any).mean(axis=0).round().astype(int)
    if (ref_any | pred_any).any()
    else np.array(volume.shape) // 2
)
found = [n for n, m in seg.masks.items() if m.any()]
shown_ref = {n: gt[n] for n in present}
if volume.shape[2] * volume.spacing[2] >= 120:  # axial, coronal and sagittal through the labelled centre
    views = [("axial", int(centre[2])), ("coronal", int(centre[1])), ("sagittal", int(centre[0]))]
else:  # a thin slab (the DICOM series covers 40 mm): three axial levels say more than two thin strips
    zs = (
        np.flatnonzero((ref_any | pred_any).any(axis=(0, 1)))
        if (ref_any | pred_any).any()
        else [volume.shape[2] // 2]
    )
    views = [("axial", int(np.percentile(zs, q))) for q in (15, 50, 85)]
fig, axes = plt.subplots(3, 3, figsize=(14, 13))
for col, (view, idx) in enumerate(views):
    for row, (title, masks) in enumerate([("built-in model", seg.masks), ("reference", shown_ref)]):
        im = viz.slice_overlay(volume.array, masks, view, idx, spacing=volume.spacing)
        axes[row, col].imshow(im.square())
        axes[row, col].set_title(f"{title}: {view} slice {idx}")
    diff = viz.difference_map(
        seg.masks,
        {n: gt[n] for n in present if n in seg.masks},
        view,
        idx,
        volume_array=volume.array,
        spacing=volume.spacing,
    )
    axes[2, col].imshow(diff.square())
    axes[2, col].set_title(f"difference (any class): {view} slice {idx}")
for ax in axes.ravel():
    ax.axis("off")
legend_classes = sorted(set(found) | set(present), key=lambda n: universal.resolve_class(n).index)
fig.legend(
    handles=[Patch(color=rgb(n), label=n) for n in legend_classes],
    loc="upper left",
    bbox_to_anchor=(0.86, 0.95),
    title="class (rows 1-2)",
    fontsize=8,
)
fig.legend(
    handles=[
        Patch(facecolor=np.array(viz.DIFF_COLORS[k]) / 255, edgecolor="k", label=lab)
        for k, lab in [("both", "both"), ("only_a", "model only"), ("only_b", "reference only")]
    ],
    loc="lower left",
    bbox_to_anchor=(0.86, 0.08),
    title="row 3",
    fontsize=8,
)
plt.tight_layout(rect=(0, 0, 0.85, 1))
plt.show()

# %% [markdown]
# ### Per class: what is right, what is missed, what is invented
#
# The pooled difference map calls a voxel "both" when the model puts *any* class there and the reference *any*
# class, so a "spleen" painted onto the vena cava looks like agreement. Two views that keep the classes apart:
#
# 1. the difference map of **one class at a time** (each on the axial slice where that class is largest);
# 2. a **confusion matrix** of overlaps, $|G_r \cap P_c|$ for every reference class $r$ and predicted class $c$
#    ("none / other": outside every mask). Left: the share of each reference organ covered by each predicted mask
#    (the diagonal is the recall $|G \cap P| / |G|$). Right: the share of each predicted mask lying on each
#    reference organ (the diagonal is the precision) - this is where invented organs show up. The model's masks
#    are one-vs-all and may overlap (a tumour is also liver), so a row can sum to more than 1.

# %%
by_index = sorted(set(found) | set(present), key=lambda n: universal.resolve_class(n).index)
per_class = by_index[:8]  # the first eight classes in taxonomy order
fig, axes = plt.subplots(2, 4, figsize=(14, 8.2), layout="constrained")
for ax, n in zip(axes.ravel(), per_class):
    p, r = seg.masks.get(n, np.zeros(volume.shape, bool)), gt.get(n, np.zeros(volume.shape, bool))
    z = int(np.argmax((p | r).sum(axis=(0, 1))))
    d = viz.difference_map({n: p}, {n: r}, "axial", z, volume_array=volume.array, spacing=volume.spacing)
    ax.imshow(d.square())
    dsc = metrics.dice(p, r) if n in annotated else float("nan")
    ax.set_title(f"{n} (z {z}): DSC {dsc:.2f}" if n in annotated else f"{n} (z {z}): not in reference")
for ax in axes.ravel():
    ax.axis("off")
fig.legend(
    handles=[
        Patch(facecolor=np.array(viz.DIFF_COLORS[k]) / 255, edgecolor="k", label=lab)
        for k, lab in [("both", "both (true positive)"), ("only_a", "model only (false positive)")]
        + [("only_b", "reference only (missed)")]
    ],
    loc="outside lower center",
    ncol=3,
)
plt.show()

# %%
# overlaps of one-vs-all masks: counts[r, c] = |reference r ∩ predicted c|; "none" = outside every mask
rows = sorted(present, key=universal.class_names().index)
cols = sorted(found, key=universal.class_names().index)
ref_masks = {**{r: gt[r] for r in rows}, "none / other": ~ref_any}
pred_masks = {**{c: seg.masks[c] for c in cols}, "none / other": ~pred_any}
counts = pd.DataFrame(
    [[int(np.count_nonzero(ref_masks[r] & pred_masks[c])) for c in pred_masks] for r in ref_masks],
    index=list(ref_masks),
    columns=list(pred_masks),
)
ref_sizes = pd.Series({r: int(np.count_nonzero(m)) for r, m in ref_masks.items()})
pred_sizes = pd.Series({c: int(np.count_nonzero(m)) for c, m in pred_masks.items()})
recall_view = counts.div(ref_sizes.replace(0, 1), axis=0)  # share of each reference class's voxels
precision_view = counts.div(pred_sizes.replace(0, 1), axis=1)  # share of each predicted class's voxels
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
heatmap(ax1, recall_view.values, counts.index, counts.columns, "share of each reference class's voxels")
heatmap(ax2, precision_view.values, counts.index, counts.columns, "share of each predicted class's voxels")
for ax in (ax1, ax2):
    ax.set_xlabel("model's label")
    ax.set_ylabel("reference label")
plt.tight_layout()
plt.show()
# in words. Per reference organ: the share its own mask covers, the share no mask covers, and the other mask that
# covers most of it. Per predicted class: the share on the same organ, on no reference organ, and the other organ
# it lies on most.
NONE = "none / other"
other_rec = recall_view.drop(columns=NONE).drop(index=NONE)
other_prec = precision_view.drop(index=NONE).drop(columns=NONE)
by_reference, by_prediction = {}, {}
for r in rows:
    others = other_rec.loc[r].drop(r, errors="ignore")
    by_reference[r] = {
        "own mask": recall_view.loc[r].get(r, 0.0),
        "no mask": recall_view.loc[r, NONE],
        "other mask covering most": f"{others.idxmax()} ({others.max():.2f})" if others.max() > 0 else "-",
    }
for c in cols:
    others = other_prec[c].drop(c, errors="ignore")
    by_prediction[c] = {
        "same organ": precision_view[c].get(c, np.nan),  # NaN: a class the reference does not have here
        "no reference organ": precision_view.loc[NONE, c],
        "other organ under most of it": f"{others.idxmax()} ({others.max():.2f})"
        if others.max() > 0
        else "-",
    }
by_reference = pd.DataFrame.from_dict(by_reference, orient="index")
by_prediction = pd.DataFrame.from_dict(by_prediction, orient="index")
print("reference organs: where their voxels went\n", by_reference.round(2).to_string(), "\n")
print("predicted classes: what lies under them\n", by_prediction.round(2).to_string())

# %% [markdown]
# ## 5.4 A 3-D view
#
# `viz.mesh_figure` turns masks into marching-cubes surfaces in world millimetres (capped in triangles so the figure
# stays fluid) as an interactive plotly figure; below it the same meshes (`viz.class_meshes`) as a static
# matplotlib image with a legend, for readers of a saved notebook. If the model finds nothing, the reference is
# shown instead. In a Jupyter session `itkwidgets` adds a full volume viewer; headless runs (CI) skip it.

# %%
show, what = (
    ({n: seg.masks[n] for n in found}, "built-in model")
    if found
    else ({n: gt[n] for n in present}, "reference")
)
fig3d = viz.mesh_figure(show, volume.affine, max_triangles=30_000, height=480)
fig3d.update_layout(title=f"{what}: {fig3d.layout.meta['triangles']:,} triangles")
fig3d.show()

meshes = viz.class_meshes(show, volume.affine, max_triangles=8_000)
fig = plt.figure(figsize=(9, 6))
ax = fig.add_subplot(projection="3d")
for m in meshes:
    ax.add_collection3d(
        Poly3DCollection(m.vertices[m.faces], facecolor=rgb(m.name), edgecolor="none", alpha=0.6)
    )
if meshes:  # equal millimetres on the three axes
    allv = np.concatenate([m.vertices for m in meshes])
    lo, hi = allv.min(axis=0), allv.max(axis=0)
    ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), zlim=(lo[2], hi[2]))
    ax.set_box_aspect(np.maximum(hi - lo, 1.0))
ax.set(xlabel="x (mm, patient's right →)", ylabel="y (mm, anterior →)", zlabel="z (mm, superior →)")
ax.view_init(elev=35 if meshes and hi[2] - lo[2] < 100 else 15, azim=-100)  # look down onto a thin slab
ax.legend(
    handles=[Patch(color=rgb(m.name), label=m.name) for m in meshes],
    loc="center left",
    bbox_to_anchor=(1.05, 0.5),
)
ax.set_title(f"{what}: static view of the same meshes")
plt.show()

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
# ## 5.5 Volumes, and a tumour nobody scores
#
# `Segmentation.volumes_ml` and `mean_hu` are measured on the original grid. Next to them, the reference's volumes
# (blank where the reference does not annotate the class).

# %%
voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
volumes = viz.results_frame(seg).set_index("class")
volumes["reference (mL)"] = [
    round(float(gt[n].sum()) * voxel_ml, 2) if n in annotated else np.nan for n in volumes.index
]
volumes

# %% [markdown]
# Look at the tumour rows. The reference is TotalSegmentator's whole-body task, which has **no tumour classes**: the
# evaluation below will list "liver tumor" as *not annotated by the reference* and leave it out - whatever the
# model paints there, no score moves. The built-in model has never seen a real tumour label (its only tumour labels
# are the phantoms', `MODEL_CARD.md`), so a large "liver tumor" on a real scan is almost certainly a false positive.
# Two checks that need no reference: how much of the predicted liver it claims, and whether it is darker than the
# rest of the liver, as a hypodense lesion would be. Then a *what-if*: if we knew the patient had no liver tumour,
# FLARE's `lesion` class would score it (present in the prediction, empty in the reference → DSC 0).

# %%
tumour_ml = seg.volumes_ml.get("liver tumor", 0.0)
tumour_check = {
    "liver tumor (mL)": round(tumour_ml, 1),
    "annotated by the reference": "liver tumor" in annotated,
}
if tumour_ml > 0 and seg.masks["liver"].any():
    rest_of_liver = seg.masks["liver"] & ~seg.masks["liver tumor"]
    tumour_check["share of the predicted liver"] = round(tumour_ml / max(seg.volumes_ml["liver"], 1e-9), 3)
    tumour_check["mean HU, tumour"] = round(float(volume.array[seg.masks["liver tumor"]].mean()), 1)
    tumour_check["mean HU, rest of the liver"] = round(float(volume.array[rest_of_liver].mean()), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        no_tumour = universal.read_reference(
            {**{n: gt[n] for n in annotated}, "liver tumor": np.zeros(volume.shape, bool)}, like=volume
        )
        what_if = universal.evaluate(seg, no_tumour, preset="flare23")
    tumour_check["what-if lesion DSC"] = what_if["lesion"].dsc
    darker = tumour_check["mean HU, tumour"] < tumour_check["mean HU, rest of the liver"] - 10
    print(
        f"the predicted 'liver tumor' ({tumour_ml:.0f} mL, {tumour_check['share of the predicted liver']:.0%} of the "
        f"predicted liver) is {'darker' if darker else 'not darker'} than the rest of the predicted liver "
        f"({tumour_check['mean HU, tumour']:.0f} vs {tumour_check['mean HU, rest of the liver']:.0f} HU)"
        + (
            ""
            if darker
            else ": nothing in the image supports a hypodense lesion - a false positive the scores miss"
        )
    )
print(tumour_check)

# %% [markdown]
# ## 5.6 DSC and NSD with the FLARE 2023 rules
#
# `universal.evaluate(prediction, reference, preset="flare23")` scores the 13 FLARE organs and the `lesion` class
# with the rules of the introduction; classes the reference does not annotate are "not annotated" (left out of the
# means, not counted as misses), and the summary lists every class it skipped and why. First the rules on toy masks
# (`metrics.evaluate_case`, the engine underneath), then the real case.

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
result = universal.evaluate(seg, reference, preset="flare23", name=CASE)
print(result.summary())
print(result.table(3))
scores = result.to_frame()
# the masks as the FLARE rules see them: the 13 organs by name and "lesion" (the union of the tumour classes)
flare_gt, flare_pred = (
    metrics.flare23_masks_from_universal(gt),
    metrics.flare23_masks_from_universal(seg.masks),
)
in_ref = {n: bool(flare_gt[n].any()) if n in flare_gt else False for n in result.scored}
in_pred = {n: bool(flare_pred[n].any()) if n in flare_pred else False for n in result.scored}
both_empty = [n for n in result.scored if not in_ref[n] and not in_pred[n]]
mean_all = result.mean()["dsc"]
mean_present = result.mean([n for n in result.scored if in_ref[n]])["dsc"]
print(f"mean DSC over the {len(result.scored)} scored classes: {mean_all:.3f}")
print(f"  of which {len(both_empty)} score 1 only because both masks are empty (exercise 1: which?)")
print(f"mean DSC over the classes present in the reference: {mean_present:.3f}")

# %% [markdown]
# ## 5.7 Efficiency
#
# FLARE 2023 measures the wall time of the whole run, model loading included, and the GPU memory (tolerances 15 s
# and 4 GB per case). `Segmentation.timings` breaks the time down by stage; the first case of a `Predictor` also
# carries the model's loading time (`model`). Which stage dominates depends on the machine and on whether the model
# was already loaded: read it off the chart, the printout says it in words.

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
largest = stages.sort_values("seconds").iloc[-1]
print(
    f"largest stage: {largest.stage} ({largest.seconds:.1f} s, {largest.share:.0%} of the total); "
    f"model loading {seg.timings['model']:.1f} s vs inference {seg.timings['inference']:.1f} s"
)

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
if not QUICK:  # a second call: the model is loaded, so this is the warm time
    warm = predictor.predict(volume)
    efficiency["total s (warm model)"] = round(warm.timings["total"], 2)
print(efficiency)

# %% [markdown]
# ## 5.8 The same model on the scan it was trained on
#
# For contrast, the other real scan. `ts_abdomen_3mm` is in the built-in model's training set (its
# `labels_totalseg.nii.gz` *are* the training labels), so its scores measure how well the model fits data it has
# seen - not how it does on a new patient. That scan also has a second automatic reference,
# `labels_totalseg_fast` (TotalSegmentator's low-resolution model). Their agreement is **two versions of one
# model agreeing with each other**: it shows how sharply an automatic reference defines each organ (a ceiling on
# what agreement with such a reference can mean), not the level a good model reaches against manual labels.

# %%
comparison, reference_agreement = None, None
if OTHER is not None:
    other_volume, other_reference = loaded[OTHER]
    other_seg = predictor.predict(other_volume)
    other_result = universal.evaluate(other_seg, other_reference, preset="flare23", name=OTHER)
    tag = {c: "seen in training" if c in TRAINING_SCANS else "held out" for c in (CASE, OTHER)}
    comparison = pd.DataFrame(
        {
            f"{tag[CASE]}: {CASE}": scores.dsc,
            f"{tag[OTHER]}: {OTHER}": other_result.to_frame().dsc,
        }
    )
    fast_label = DATA_DIR / "ts_abdomen_3mm" / "labels_totalseg_fast.nii.gz"
    if fast_label.is_file():
        ts_volume, ts_reference = (
            (volume, reference) if CASE == "ts_abdomen_3mm" else (other_volume, other_reference)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            second = universal.read_reference(fast_label, "totalsegmentator_v2", like=ts_volume)
        # the second reference scored as if it were a prediction, on the classes the model was scored on
        reference_agreement = universal.evaluate(
            second.masks, ts_reference, preset="flare23", classes=result.scored
        )
        comparison["TS-fast vs TS (ts_abdomen_3mm)"] = reference_agreement.to_frame().dsc
    comparison = comparison.loc[[n for n in comparison.index if n in result.scored]]
    comparison.loc["mean"] = comparison.mean()
    ax = comparison.drop(index="mean").plot.bar(
        figsize=(11, 3.6), color=["#1f77b4", "#ff7f0e", "#bbbbbb"][: comparison.shape[1]]
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("DSC (FLARE 2023 rules)")
    ax.set_title("built-in model: held-out scan vs its own training scan; grey: two automatic references")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    plt.xticks(rotation=35, ha="right")
    plt.show()
    print(comparison.round(3).to_string())
else:
    print("(no real CTs: the comparison with the training scan is skipped)")

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer, a hidden solution (set `RUN_SOLUTIONS = True` in the parameters to run
# them) and a check that tells you whether your answer is right.
#
# **Exercise 1.** Which of the classes scored in 5.6 get DSC = 1 only because the model *and* the reference leave
# them empty? Set `answer_1` to a list of class names. (Then compare the two means printed in 5.6: which one would
# you report?)

# %% tags=["exercise"]
answer_1 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    answer_1 = [n for n in result.scored if not in_ref[n] and not in_pred[n]]
    print(answer_1, "- the mean over the classes present in the reference is the honest one")

# %% tags=["check"]
if answer_1 is None:
    print("exercise 1: not answered yet")
else:
    expected = {n for n in result.scored if result[n].dsc == 1.0 and not in_ref[n]}
    assert set(answer_1) == expected, (
        f"not quite: look for scored classes whose reference mask is empty (in_ref[n] is False) and that the "
        f"model leaves empty too; you gave {sorted(answer_1)}"
    )
    print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** `fast=False` is often described as "the slow, more accurate mode". At which voxel spacing (mm,
# a tuple of three numbers) does the built-in model segment with `fast=False`? Set `answer_2`. (The solution also
# segments with `fast=False` and says whether the masks change.)

# %% tags=["exercise"]
answer_2 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    slow = predictor.with_settings(fast=False)
    answer_2 = tuple(slow.resolved.preprocessing.spacing_mm)
    seg_slow = slow.predict(volume)
    same = all(np.array_equal(seg_slow.masks[n], seg.masks[n]) for n in seg.masks)
    print(
        f"fast=False works at {answer_2} mm, fast=True at {spacing_fast} mm; identical masks: {same}; "
        f"inference {seg_slow.timings['inference']:.1f} s vs {seg.timings['inference']:.1f} s"
    )

# %% tags=["check"]
if answer_2 is None:
    print("exercise 2: not answered yet")
else:
    assert np.allclose(answer_2, spacing_full), (
        f"{answer_2} is not it: the spacing comes from the model's spec, "
        "see predictor.with_settings(fast=False).resolved.preprocessing"
    )
    print(
        "the same grid as fast=True"
        if np.allclose(spacing_full, spacing_fast)
        else "a finer grid than fast=True"
    )
    print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** In the toy example the stomach reference is the cube shifted by 19 voxels, so its DSC is below
# 0.1 and its NSD is forced to 0. What is the **largest** shift (in voxels, along the first axis) at which the NSD
# is still computed, i.e. not forced to 0? Set `answer_3` to an integer. (Hint: overlap `20 - s` slices of 20.)

# %% tags=["exercise"]
answer_3 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    answer_3 = (
        18  # DSC = (20 - s) / 20 >= 0.1  <=>  s <= 18; at s = 18 DSC is exactly 0.1, which is not < 0.1
    )

# %% tags=["check"]
if answer_3 is None:
    print("exercise 3: not answered yet")
else:
    rules = {"preset": "flare23", "classes": ["stomach"], "annotated": ["stomach"]}
    at = metrics.evaluate_case(
        {"stomach": cube}, {"stomach": np.roll(cube, answer_3, axis=0)}, (1, 1, 1), **rules
    )
    beyond = metrics.evaluate_case(
        {"stomach": cube}, {"stomach": np.roll(cube, answer_3 + 1, axis=0)}, (1, 1, 1), **rules
    )
    assert at["stomach"].dsc >= 0.1 and beyond["stomach"].dsc < 0.1, (
        f"at shift {answer_3} the DSC is {at['stomach'].dsc:.3f} and at {answer_3 + 1} it is "
        f"{beyond['stomach'].dsc:.3f}: the NSD is forced to 0 exactly when DSC < 0.1"
    )
    print("exercise 3: correct")

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
for n in set(rows) & set(cols):  # the confusion matrix's diagonal gives back the DSC
    assert np.isclose(
        2 * counts.loc[n, n] / (ref_sizes[n] + pred_sizes[n]), metrics.dice(seg.masks[n], gt[n])
    )
if reference_agreement is not None:  # two automatic references of one scan agree: the metric pipeline is sane
    assert reference_agreement["liver"].dsc > 0.8
print(
    "CHECKS PASSED 05",
    {
        "case": CASE,
        "seen_in_training": seen_in_training,
        "segment_total_s": round(seg.timings["total"], 1),
        "mean_dsc": round(mean_all, 3),
        "mean_dsc_present": round(mean_present, 3),
        "whole_notebook_s": round(time.perf_counter() - t_start, 1),
    },
)
