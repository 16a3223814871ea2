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
# # 4 · Pseudo-labels: letting a teacher fill in what the datasets left out
#
# Masked back-propagation (notebook 3) learns every class from the datasets that annotate it, but it throws away the
# unannotated classes of every scan - and unlabelled scans entirely. The Universal Model's second ingredient fills
# them in: a **teacher** model trained with the masked loss predicts the missing classes; confident predictions
# become **pseudo-labels**, ground truth is kept wherever it exists, and a **student** is trained on the result.
#
# `universal.pseudo.pseudo_label(manifest, teacher, out_dir, config)` does the whole round (the teacher is a
# `universal.Predictor`; `config` a `PseudoLabelConfig` with the acceptance rules):
#
# 1. predict every case with `universal.segment` (probabilities kept);
# 2. keep the ground truth of every class the case annotates, **voxel for voxel**;
# 3. accept a predicted class when its mean probability inside the mask reaches `min_confidence`; a class that does
#    not stays *unannotated* (the masked loss ignores it, rather than learning "absent");
# 4. write one label map per case, a new manifest (what is ground truth, what is pseudo) and a quality report with
#    review flags.
#
# Everything here runs on small synthetic scans in about two minutes on a CPU (`QUICK`).

# %% tags=["parameters"]
QUICK = True  # CI-sized run: short teacher and student training (False: about 3x longer, plus a real CT)
WORK_DIR = None  # where datasets, runs and pseudo-labels are written; None = a temporary folder
DATA_DIR = None  # real CTs (used when QUICK is False); None = $UNIVERSAL_DATA_DIR or the nearest shared/data
STUDENT_FROM_SCRATCH = False  # False: the student starts from the teacher's weights (a cheaper second round)

# %%
import json
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import universal
from universal import data, pseudo, viz
from universal.data import find_sample_data
from universal.train import train

warnings.filterwarnings("ignore", message=".*thick slices.*")  # 8 mm phantoms on purpose
WORK_DIR = Path(WORK_DIR) if WORK_DIR is not None else Path(tempfile.mkdtemp(prefix="universal-nb04-"))
WORK_DIR.mkdir(parents=True, exist_ok=True)

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
# ## 4.1 Partially labelled and unlabelled scans, and a teacher
#
# A many-organ dataset (like BTCV), three single-organ datasets (like the Decathlon tasks) and two scans with no
# labels at all. The teacher is a tiny SegResNet trained on the labelled cases with the masked loss
# (`universal.train`, as in notebook 3).

# %%
CLASSES = ["spleen", "right kidney", "left kidney", "liver", "stomach"]
LABEL_SETS = {
    "abdomen": CLASSES,
    "liver_ds": ["liver"],
    "kidney_ds": ["right kidney", "left kidney"],
    "spleen_ds": ["spleen"],
}
SHAPE, SPACING, PATCH = (24, 24, 18), (8.0, 8.0, 8.0), [24, 24, 20]
train_manifest = data.write_phantom_dataset(
    WORK_DIR / "data", 8, SHAPE, SPACING, LABEL_SETS, seed=0, unlabeled=2
)
val_manifest = data.write_phantom_dataset(WORK_DIR / "val", 3, SHAPE, SPACING, {"all": None}, seed=1000)
manifest = data.load_manifest(train_manifest)
print(
    pd.DataFrame(
        [
            {"case": c.name, "dataset": c.dataset, "annotated": ", ".join(c.annotated_classes()) or "-"}
            for c in manifest.cases
        ]
    ).to_string(index=False)
)

TEACHER_STEPS = 250 if QUICK else 800
STUDENT_STEPS = (250 if STUDENT_FROM_SCRATCH else 120) if QUICK else 800


def config(manifest_path, out_dir, steps, init=None):
    return {
        "model": {
            "classes": CLASSES,
            "encoder": "onehot",
            "init": init,
            "kwargs": {"init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
        },
        "data": {
            "train": str(manifest_path),
            "val": str(val_manifest),
            "spacing_mm": SPACING[0],
            "patch_size": PATCH,
            "samples_per_case": 1,
            "pos_neg_ratio": [1, 0],
            "augment": {"intensity_prob": 0.0},
        },
        "optim": {"lr": 3e-3 if init is None else 3e-4, "warmup_steps": 5, "min_lr_ratio": 0.1},
        "train": {
            "steps": steps,
            "batch_size": 4,
            "seed": 0,
            "out_dir": str(out_dir),
            "ckpt_every": 0,
            "resume": False,
            "progress": False,
            "tensorboard": False,
            "device": "cpu",
        },
    }


t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "2 unlabeled case(s) skipped": the teacher only sees labelled cases
    teacher_run = train(config(train_manifest, WORK_DIR / "teacher", TEACHER_STEPS))
teacher = teacher_run.model.eval()
teacher_dsc = teacher_run.validation[-1]["dsc"]
print(
    f"teacher: {TEACHER_STEPS} steps in {time.perf_counter() - t0:.0f} s; held-out DSC",
    {k: round(v, 2) for k, v in teacher_dsc.items()},
)

# %% [markdown]
# ## 4.2 The teacher's predictions and its confidence
#
# On an unlabelled scan the teacher gives a probability per voxel and class. The mask is the probability
# thresholded at 0.5; the **confidence** of a predicted class is the mean probability inside its mask. Thin,
# uncertain borders show up as intermediate probabilities.

# %%
unlabeled_case = next(c for c in manifest.cases if not c.labeled)
volume = universal.load_volume(unlabeled_case.image)
# the teacher as a Predictor: settings fixed once; window, spacing and HU window come from the model's spec
predictor = universal.Predictor(teacher, device="cpu")
seg = predictor.with_settings(return_probabilities=True).predict(volume)
confidence = {
    c: float(np.asarray(seg.probabilities[c], np.float32)[seg.masks[c]].mean())
    if seg.masks[c].any()
    else float("nan")
    for c in CLASSES
}
print(
    "confidence (mean probability inside the predicted mask):",
    {k: round(v, 3) for k, v in confidence.items()},
)

z = int(np.argmax(np.sum([m.sum(axis=(0, 1)) for m in seg.masks.values()], axis=0)))
fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
axes[0].imshow(viz.slice_overlay(volume.array, {}, "axial", z, spacing=volume.spacing).square(min_size=240))
axes[0].set_title(f"{unlabeled_case.name}: no labels")
axes[1].imshow(
    viz.slice_overlay(volume.array, seg.masks, "axial", z, spacing=volume.spacing).square(min_size=240)
)
axes[1].set_title("teacher's masks")
top = np.max([np.asarray(seg.probabilities[c], np.float32) for c in CLASSES], axis=0)
for ax, (title, img) in zip(
    axes[2:],
    [("max over classes of P(class)", top), ("P(liver)", np.asarray(seg.probabilities["liver"], np.float32))],
):
    im = ax.imshow(
        viz.square_pixels(viz.orient_slice(img, "axial", z), 1.0, min_size=240), cmap="magma", vmin=0, vmax=1
    )
    ax.set_title(title)
for ax in axes:
    ax.axis("off")
plt.colorbar(im, ax=axes[-1], shrink=0.8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4.3 Merging with ground truth
#
# For a partially labelled case the teacher's masks meet real labels. `pseudo.merge_with_ground_truth` builds one
# label map (universal ids, tumours over organs) in which the ground truth **always wins**: a pseudo organ never
# paints over a ground-truth organ, a pseudo tumour is clipped to its ground-truth parent. It then decodes the label
# map exactly as training will and checks that every ground-truth class comes back voxel for voxel.

# %%
liver_case = next(c for c in manifest.cases if c.dataset == "liver_ds")
lvol, lmasks = liver_case.load(CLASSES)
gt = {c: m for c, m, a in zip(CLASSES, lmasks, liver_case.availability(CLASSES)) if a}
lseg = predictor.predict(lvol)
proposed = {c: lseg.masks[c] for c in CLASSES if c not in gt}
label_map, decoded = pseudo.merge_with_ground_truth(gt, proposed, lvol.affine, CLASSES)
kept = {c: bool(np.array_equal(decoded[c], gt[c])) for c in gt}
changed = {c: int((lseg.masks[c] != gt[c]).sum()) for c in gt}
print("ground truth classes:", list(gt), "| kept voxel for voxel:", kept)
print("voxels where the teacher disagrees with that ground truth (overruled):", changed)

z = int(np.argmax(lmasks.any(0).sum(axis=(0, 1)) + gt["liver"].sum(axis=(0, 1))))
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
for ax, (title, masks) in zip(
    axes, [("ground truth (liver only)", gt), ("teacher", lseg.masks), ("merged: GT + pseudo", decoded)]
):
    ax.imshow(viz.slice_overlay(lvol.array, masks, "axial", z, spacing=lvol.spacing).square(min_size=240))
    ax.set_title(title)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4.4 A whole pseudo-labelling round and its quality report
#
# `pseudo_label` does the above for every case of the manifest and writes a new manifest plus a quality report
# (`quality_report.json` / `.csv`): per case and class the source (ground truth / pseudo / dropped), volume,
# connected components, confidence, the teacher's agreement (DSC) with the ground truth where there is one, and flags
# that send a case to human review (left/right implausible, fragmented organ, low confidence, disagreement).

# %%
MIN_CONFIDENCE = 0.75
t0 = time.perf_counter()
pseudo_manifest, report = pseudo.pseudo_label(
    train_manifest, predictor, WORK_DIR / "pseudo", pseudo.PseudoLabelConfig(min_confidence=MIN_CONFIDENCE)
)
print(
    f"pseudo-labelled {len(report['cases'])} cases in {time.perf_counter() - t0:.1f} s -> {pseudo_manifest}"
)
quality = pd.read_csv(WORK_DIR / "pseudo" / "quality_report.csv")
print(quality.groupby("source").size().to_string())
quality.round(3).head(12)

# %%
source_table = quality.pivot(index="case", columns="class", values="source")[CLASSES]
COLORS = {"ground truth": (0.2, 0.6, 0.3), "pseudo": (0.35, 0.55, 0.95), "dropped": (0.85, 0.3, 0.3)}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 3.8), width_ratios=[1.3, 1])
ax1.imshow([[COLORS[v] for v in row] for row in source_table.values], aspect="auto")
ax1.set_xticks(range(len(CLASSES)), CLASSES, rotation=20)
ax1.set_yticks(
    range(len(source_table)), [f"{c} ({manifest[c].dataset})" for c in source_table.index], fontsize=7
)
for (i, j), v in np.ndenumerate(source_table.values):
    ax1.text(j, i, v, ha="center", va="center", fontsize=6.5, color="w")
ax1.set_title("where each label of the new manifest comes from")
g = quality[quality.source == "ground truth"]
ax2.scatter(g.mean_confidence, g.agreement_dsc, c=[rgb(c) for c in g["class"]], edgecolor="k")
ax2.set_xlabel("teacher's mean probability inside the ground truth")
ax2.set_ylabel("teacher vs ground truth DSC")
ax2.set_title("does confidence predict quality? (ground-truth classes)")
plt.tight_layout()
plt.show()
flagged = {c["case"]: c["flags"] for c in report["cases"] if c["flags"]}
print(f"{len(flagged)} of {len(report['cases'])} cases flagged for review")
for case_name, flags in list(flagged.items())[:6]:
    print(f"  {case_name}: " + "; ".join(flags))

# %% [markdown]
# The new manifest is an ordinary training manifest: each case now annotates its ground-truth classes *and* its
# accepted pseudo-labelled classes (listed under `"pseudo"`), so the masked loss uses far more (case, class) pairs:

# %%
new_manifest = data.load_manifest(pseudo_manifest)
before = np.array([c.availability(CLASSES) for c in manifest.cases])
after = np.array([c.availability(CLASSES) for c in new_manifest.cases])
print(
    f"annotated (case, class) pairs: {int(before.sum())} before, {int(after.sum())} after "
    f"(of {before.size}); unlabelled cases now usable: {sum(not c.labeled for c in manifest.cases)}"
)
print(json.dumps(json.loads(Path(pseudo_manifest).read_text())["cases"][1], indent=1)[:600])

# %% [markdown]
# ## 4.5 The student
#
# A second round of training on the pseudo-labelled manifest. To keep the notebook short the student starts from
# the teacher's weights (`model.init`) and trains for a few more steps; set `STUDENT_FROM_SCRATCH = True` for the
# paper's setting. Both are scored on the same held-out scans.

# %%
t0 = time.perf_counter()
init = None if STUDENT_FROM_SCRATCH else str(teacher_run.checkpoint)
student_run = train(config(pseudo_manifest, WORK_DIR / "student", STUDENT_STEPS, init=init))
student_dsc = student_run.validation[-1]["dsc"]
print(f"student: {STUDENT_STEPS} steps in {time.perf_counter() - t0:.0f} s")
compare = pd.DataFrame({"teacher": teacher_dsc, "student": student_dsc})
compare.loc["mean"] = compare.mean()
print(compare.round(3))

# %% [markdown]
# Do not expect the student to beat its teacher here. On this toy problem the teacher is already good, and every
# pseudo-label is the teacher's own prediction: the student cannot learn anything the teacher did not know, and a
# short second round mostly adds optimisation noise (when this notebook was written the student scored a few DSC
# points *below* the teacher). The method pays off at scale: many unlabelled and partially labelled scans whose
# missing classes a teacher trained on *other* datasets predicts well, and a long second round. The real work of a
# pseudo-labelling round is quality control - review the flagged cases, raise `min_confidence`, leave doubtful
# classes unannotated rather than wrong.

# %%
if not QUICK and DATA_DIR is not None:
    # a real unlabelled CT, pseudo-labelled by the project's built-in model (its weights are a weak first version)
    real = {
        "cases": [
            {
                "name": "ts_abdomen_3mm_unlabeled",
                "image": str(DATA_DIR / "ts_abdomen_3mm_unlabeled" / "ct.nii.gz"),
                "label": None,
                "dataset": "unlabeled",
            }
        ],
        "datasets": {"unlabeled": {"labels": {}}},
    }
    real_path = WORK_DIR / "real.json"
    real_path.write_text(json.dumps(real))
    builtin_teacher = universal.Predictor("builtin", fast=True)
    _, real_report = pseudo.pseudo_label(real_path, builtin_teacher, WORK_DIR / "pseudo_real")
    print(pd.DataFrame(real_report["cases"][0]["classes"]).T[["source", "volume_ml", "mean_confidence"]])
else:
    print("(QUICK: the real-CT example with the built-in teacher is skipped)")

# %% [markdown]
# ## Exercises
#
# 1. Re-run 4.4 with `MIN_CONFIDENCE = 0.95`. Which classes get dropped, and what does that do to the number of
#    annotated pairs?
# 2. `PseudoLabelConfig(empty_as_negative=True)` (the default) turns an *empty* prediction into an annotated
#    "absent". When is that right, and why is it dangerous with a weak teacher (think of notebook 3)?
# 3. Find a ground-truth class whose teacher DSC is lowest in the quality report. Is it flagged? Which setting of
#    `PseudoLabelConfig` controls that flag?

# %% [markdown]
# <details><summary>Solution (click to open)</summary>
#
# 1. `pseudo.pseudo_label(train_manifest, predictor, WORK_DIR / "pseudo95", pseudo.PseudoLabelConfig(min_confidence=0.95))`;
#    classes whose mean probability stays below 0.95 become `dropped` and stay unannotated, so fewer pairs are
#    available - less supervision, but none of it wrong.
# 2. Right when the teacher is reliable and the class really is absent (e.g. no tumour): the student learns true
#    negatives. With a weak teacher that predicts nothing, every class becomes "annotated absent" - exactly the
#    naive labels of notebook 3, and the student learns to suppress the classes.
# 3. `quality[quality.source == "ground truth"].sort_values("agreement_dsc").head(1)`; it is flagged
#    "disagreement" when its DSC is below `review_min_dsc` (0.5 by default).
#
# </details>

# %% [markdown]
# ## Checks

# %%
old, new = data.load_manifest(train_manifest), data.load_manifest(pseudo_manifest)
assert new.names == old.names and len(quality) == len(old.cases) * len(CLASSES)
for o, n in zip(old.cases, new.cases):
    gt_names = [c for c in o.annotated_classes() if c in CLASSES]
    assert n.ground_truth_classes() == tuple(gt_names)
    assert set(n.pseudo) <= set(CLASSES) - set(gt_names)
    if gt_names:  # ground truth survives pseudo-labelling voxel for voxel
        vol = universal.load_volume(o.image)
        assert np.array_equal(data.case_targets(n, vol, gt_names), data.case_targets(o, vol, gt_names)), (
            o.name
        )
assert all(kept.values())
assert after.sum() > before.sum() and after[[not c.labeled for c in old.cases]].any()
assert set(quality.source) <= {"ground truth", "pseudo", "dropped"}
assert student_run.step == STUDENT_STEPS and all(np.isfinite(v) for v in student_dsc.values())
print(
    "CHECKS PASSED 04",
    {
        "pairs_before": int(before.sum()),
        "pairs_after": int(after.sum()),
        "teacher_mean_dsc": round(float(np.mean(list(teacher_dsc.values()))), 3),
        "student_mean_dsc": round(float(np.mean(list(student_dsc.values()))), 3),
        "flagged_cases": len(flagged),
    },
)
