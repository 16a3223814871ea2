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
# # 3 · Masked back-propagation: learning 32 classes from partially labelled datasets
#
# Notebook 1 showed that a dataset's label `0` means "none of *my* classes". Two ways to train one model on several
# such datasets:
#
# * **naive**: treat every voxel a dataset does not label as background - for *every* class. A liver dataset then
#   teaches "there is no spleen here", although the spleen is in the image;
# * **masked back-propagation** (the Universal Model's way): compute the loss only for the (case, class) pairs the
#   case's dataset annotates. Every other pair contributes exactly zero gradient.
#
# With one-vs-all logits `z`, targets `y` and an availability mask `a[b, k]` (does case b's dataset annotate
# class k?), the loss of `universal.loss.masked_bce_dice` is
#
# $$\mathcal{L} = \frac{1}{\sum_{b,k} a_{bk}} \sum_{b,k} a_{bk} \big( \mathrm{BCE}(z_{bk}, y_{bk}) + 1 - \mathrm{Dice}(\sigma(z_{bk}), y_{bk}) \big)$$
#
# We first look at the gradient of that loss, then run a small experiment: four synthetic "datasets" that each
# annotate one organ, trained naively and with masking (`universal.train`), scored on held-out fully labelled scans.
# In `QUICK` mode the whole notebook takes about two to three minutes on a 2-core CPU.

# %% tags=["parameters"]
QUICK = True  # CI-sized run: 300 training steps per model (False: 800 steps, about 2.5x longer)
WORK_DIR = None  # where the synthetic datasets and training runs are written; None = a temporary folder
SEED = 0  # training seed (the same for both models)

# %%
import json
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import universal
from universal import data, taxonomy, viz
from universal.loss import masked_bce_dice
from universal.train import train

WORK_DIR = Path(WORK_DIR) if WORK_DIR is not None else Path(tempfile.mkdtemp(prefix="universal-nb03-"))
WORK_DIR.mkdir(parents=True, exist_ok=True)
print(f"universal {universal.__version__} | torch threads {torch.get_num_threads()} | writing to {WORK_DIR}")

plt.rcParams.update({"figure.dpi": 80, "axes.titlesize": 10, "font.size": 9})


def rgb(name):
    """The taxonomy colour of a class as a matplotlib RGB tuple (0-1)."""
    return tuple(c / 255 for c in universal.resolve_class(name).color)


# %% [markdown]
# ## 3.1 The gradient of the masked loss
#
# A batch of three cases from three real datasets: BTCV (many organs), MSD Liver (liver + tumour) and MSD Lung (lung
# tumour). Their availability rows come straight from the taxonomy. Random logits and targets are enough to look at
# the gradient: it is non-zero exactly where the availability is `True` - and the naive loss (everything
# "available") sends gradient everywhere.

# %%
toy_classes = ["liver", "liver tumor", "spleen", "right kidney", "left kidney", "pancreas", "lung tumor"]
toy_datasets = ["btcv", "msd_liver", "msd_lung"]
available = torch.as_tensor(np.stack([taxonomy.dataset(d).availability(toy_classes) for d in toy_datasets]))

gen = torch.Generator().manual_seed(0)
logits = torch.randn(3, len(toy_classes), 8, 8, 8, generator=gen, requires_grad=True)
target = torch.rand(3, len(toy_classes), 8, 8, 8, generator=gen) > 0.7

grads = {}
for name, avail in [("masked", available), ("naive", torch.ones_like(available))]:
    logits.grad = None
    parts = masked_bce_dice(logits, target, avail, return_components=True)
    parts["loss"].backward()
    grads[name] = logits.grad.abs().flatten(2).sum(2)  # (cases, classes): total |gradient| per pair
    print(f"{name:6}: loss {parts['loss'].item():.3f} over {parts['n_available']} (case, class) pairs")

fig, axes = plt.subplots(1, 3, figsize=(13, 2.8))
for ax, (title, m) in zip(
    axes,
    [
        ("availability (taxonomy)", available.float()),
        ("|gradient|, masked loss", grads["masked"]),
        ("|gradient|, naive loss", grads["naive"]),
    ],
):
    ax.imshow(m, cmap="Greens" if "avail" in title else "magma", aspect="auto")
    ax.set_xticks(range(len(toy_classes)), toy_classes, rotation=35, ha="right")
    ax.set_yticks(range(3), toy_datasets)
    ax.set_title(title)
plt.tight_layout()
plt.show()
zero_where_unavailable = bool((grads["masked"][~available] == 0).all())
print("masked: gradient exactly zero for every pair the dataset does not annotate:", zero_where_unavailable)

# %% [markdown]
# ## 3.2 Four partially labelled datasets
#
# `data.write_phantom_dataset` writes synthetic CTs (`universal.make_phantom`, a different random anatomy per case)
# and label files in which each "dataset" keeps only its own classes - like the Medical Segmentation Decathlon,
# where every task annotates one organ. The scans are small (8 mm voxels) so that training takes seconds per model
# on a CPU. A second call writes held-out, **fully** labelled scans for scoring.

# %%
CLASSES = ["spleen", "right kidney", "left kidney", "liver", "stomach"]
LABEL_SETS = {  # dataset name -> the classes it annotates (everything else is label 0 in its files)
    "spleen_ds": ["spleen"],
    "kidney_ds": ["right kidney", "left kidney"],
    "liver_ds": ["liver"],
    "stomach_ds": ["stomach"],
}
SHAPE, SPACING = (24, 24, 18), (8.0, 8.0, 8.0)  # the phantom's 192 x 192 x 144 mm field of view at 8 mm
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "8 mm thick slices": intended here
    train_manifest = data.write_phantom_dataset(WORK_DIR / "train", 8, SHAPE, SPACING, LABEL_SETS, seed=0)
    val_manifest = data.write_phantom_dataset(WORK_DIR / "val", 3, SHAPE, SPACING, {"all": None}, seed=1000)
    manifest = data.load_manifest(train_manifest)
    shown = {}
    for case in manifest.cases[:4]:  # one case of each dataset
        volume, masks = case.load(CLASSES)
        shown[case.dataset] = (volume, dict(zip(CLASSES, masks)))
print(len(manifest.cases), "training cases:", [(c.name, c.dataset) for c in manifest.cases])

fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
for ax, (ds, (volume, masks)) in zip(axes, shown.items()):
    union = np.any([m for m in masks.values()], axis=0)
    z = int(np.argmax(union.sum(axis=(0, 1))))
    ax.imshow(viz.slice_overlay(volume.array, masks, "axial", z, spacing=volume.spacing).square(min_size=240))
    ax.set_title(f"{ds}: annotates {', '.join(LABEL_SETS[ds])}", fontsize=8)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3.3 The naive manifest
#
# The *only* difference between the two experiments is what the manifest says each dataset annotates. The naive
# manifest claims that every dataset annotates every class, so the label `0` of the liver dataset becomes "no
# spleen, no kidneys, no stomach". Same files, same model, same seed.

# %%
spec = json.loads(Path(train_manifest).read_text())
for dataset_spec in spec["datasets"].values():
    dataset_spec["annotated"] = CLASSES  # "unlabelled = background" for every class
naive_manifest = WORK_DIR / "train" / "naive_manifest.json"
naive_manifest.write_text(json.dumps(spec, indent=2))

avail_masked = np.array([c.availability(CLASSES) for c in data.load_manifest(train_manifest).cases])
avail_naive = np.array([c.availability(CLASSES) for c in data.load_manifest(naive_manifest).cases])
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
for ax, (title, a) in zip(
    axes, [("masked: availability per case", avail_masked), ("naive: everything 'available'", avail_naive)]
):
    ax.imshow(a, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=20)
    ax.set_yticks(range(len(manifest.cases)), [f"{c.name} ({c.dataset})" for c in manifest.cases], fontsize=7)
    ax.set_title(title)
plt.tight_layout()
plt.show()
labelled_share = pd.Series(avail_masked.mean(0), index=CLASSES)
print("share of training cases whose dataset annotates each class:", labelled_share.round(2).to_dict())

# %% [markdown]
# ## 3.4 Train both models
#
# `universal.train.train(config)` runs the whole loop - cached preprocessed cases, patch sampling, the masked loss,
# AdamW with warm-up and cosine decay, checkpoints and CSV logs - and validates on the held-out scans at the end
# (DSC per class). A tiny SegResNet (~0.5 M parameters) and one-hot prompts keep it fast; whole 8 mm scans fit one
# patch.

# %%
STEPS = 300 if QUICK else 800
PATCH = [24, 24, 20]  # one patch holds a whole (cropped) scan


def config(manifest_path, out_dir):
    return {
        "model": {
            "backbone": "segresnet",
            "classes": CLASSES,
            "encoder": "onehot",
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
        "optim": {"lr": 3e-3, "warmup_steps": 5, "min_lr_ratio": 0.1},
        "train": {
            "steps": STEPS,
            "batch_size": 4,
            "seed": SEED,
            "out_dir": str(out_dir),
            "ckpt_every": 0,
            "resume": False,
            "progress": False,
            "tensorboard": False,
            "device": "cpu",
        },
    }


runs, seconds = {}, {}
for mode, path in [("masked", train_manifest), ("naive", naive_manifest)]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs[mode] = train(config(path, WORK_DIR / f"run_{mode}"))
    seconds[mode] = time.perf_counter() - t0
    print(f"{mode:6}: {runs[mode].step} steps in {seconds[mode]:.0f} s -> {runs[mode].checkpoint}")

fig, ax = plt.subplots(figsize=(8, 3.2))
for mode, run in runs.items():
    loss = pd.Series([h["loss"] for h in run.history]).rolling(10, min_periods=1).mean()
    ax.plot(loss, label=f"{mode} (rolling mean of 10 steps)")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.legend()
ax.set_title("each curve is the loss its own objective optimises - not comparable in value")
plt.show()

# %% [markdown]
# ## 3.5 Which model segments the held-out scans?
#
# The validation DSC per class, on three held-out phantoms where every class is labelled:

# %%
dsc = pd.DataFrame({mode: run.validation[-1]["dsc"] for mode, run in runs.items()})
dsc.insert(0, "labelled share", labelled_share)
dsc["masked - naive"] = dsc["masked"] - dsc["naive"]
print(dsc.round(3))
print("mean DSC:", dsc[["masked", "naive"]].mean().round(3).to_dict())

fig, ax = plt.subplots(figsize=(8, 3.4))
xs = np.arange(len(CLASSES))
ax.bar(xs - 0.2, dsc["masked"], 0.4, color=[rgb(c) for c in CLASSES], edgecolor="k", label="masked")
ax.bar(
    xs + 0.2,
    dsc["naive"],
    0.4,
    color=[rgb(c) for c in CLASSES],
    edgecolor="k",
    hatch="//",
    alpha=0.5,
    label="naive",
)
ax.set_xticks(xs, CLASSES)
ax.set_ylim(0, 1)
ax.set_ylabel("validation DSC")
ax.legend()
ax.set_title("held-out phantoms: masked (solid) vs naive (hatched)")
plt.show()

# %% [markdown]
# Look inside: segment one held-out scan with both models (`universal.segment`, probabilities kept) and compare the
# masks and the probability of one class. The naive model has learnt that the organs are *usually* labelled
# background, so its probabilities are pushed down wherever the anatomy is.

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    val_case = data.load_manifest(val_manifest).cases[0]
    volume, gt = val_case.load(CLASSES)
    gt = dict(zip(CLASSES, gt))
    # a Predictor reads the window size, spacing and HU window from the trained model's spec
    segs = {
        mode: universal.Predictor(run.model, return_probabilities=True, device="cpu").predict(volume)
        for mode, run in runs.items()
    }

mean_prob = pd.DataFrame(
    {
        mode: {c: float(np.asarray(s.probabilities[c], np.float32)[gt[c]].mean()) for c in CLASSES}
        for mode, s in segs.items()
    }
)
print("mean predicted probability inside each ground-truth organ:")
print(mean_prob.round(3))

z = int(np.argmax(np.sum([m.sum(axis=(0, 1)) for m in gt.values()], axis=0)))
cls = "spleen"
fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
panels = [("ground truth", gt), ("masked", segs["masked"].masks), ("naive", segs["naive"].masks)]
for ax, (title, masks) in zip(axes, panels):
    ax.imshow(viz.slice_overlay(volume.array, masks, "axial", z, spacing=volume.spacing).square(min_size=240))
    ax.set_title(title)
    ax.axis("off")
for ax, mode in zip(axes[3:], segs):
    p = viz.orient_slice(np.asarray(segs[mode].probabilities[cls], np.float32), "axial", z)
    im = ax.imshow(viz.square_pixels(p, 1.0, min_size=240), cmap="magma", vmin=0, vmax=1)
    ax.set_title(f"P({cls}), {mode}")
    ax.axis("off")
plt.colorbar(im, ax=axes[-1], shrink=0.8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **What happened.** In the naive run each class is positive in one case out of four and "background" in the
# other three, in images that look the same. Early in training the background cases win: the BCE term pushes the
# logits of every class down everywhere, the sigmoid saturates, and the Dice term of the few positive cases can no
# longer pull them back - the classes are **suppressed** (often all the way to empty masks). The masked model never
# hears "absent" from a dataset that did not look, so it learns every class from the one dataset that labels it.
#
# The size of the effect depends on the seed and the schedule of this tiny experiment (try `SEED = 1, 2`): the
# naive model sometimes keeps part of a class, but it stays behind the masked model on the classes other datasets
# leave unlabelled. The paper's setting is the same problem at scale: 14 datasets, 32 classes, each class labelled
# by a few of them.
#
# ## Exercises
#
# 1. Make the liver annotated by two datasets (e.g. add `"liver"` to `kidney_ds`) and re-run 3.2-3.5. What happens
#    to the naive model's liver DSC, and why?
# 2. Train the naive model with `"loss": {"bce_weight": 0.0}` in its config (Dice only). Does it still suppress the
#    classes? Explain with the gradient of the soft Dice of an empty target.
# 3. `train_log.csv` in each run folder has a `pairs` column. How many (case, class) pairs feed the masked loss per
#    step on average, and how many the naive one?

# %% [markdown]
# <details><summary>Solution (click to open)</summary>
#
# 1. The liver becomes positive in half of the naive training cases instead of a quarter; the conflict is weaker,
#    so the naive model's liver usually recovers a good part of its DSC, while spleen and stomach (still one dataset
#    each) stay suppressed. The harm grows with the share of cases that leave a class unlabelled.
# 2. For an empty target the soft Dice is `smooth / (Σp + smooth)`, whose gradient is ≈ 0 unless the prediction is
#    already empty, so Dice alone hardly punishes "present" in the unlabelled cases: without BCE the naive model
#    suppresses much less. The conflict is carried by the BCE term.
# 3. `pd.read_csv(WORK_DIR / "run_masked" / "train_log.csv")["pairs"].mean()`: about 1.25 classes per case × 4 cases
#    = 5 for masked; always 4 × 5 = 20 for naive.
#
# </details>

# %% [markdown]
# ## Checks

# %%
assert zero_where_unavailable and bool((grads["naive"] > 0).all())
assert avail_naive.all() and not avail_masked.all() and (avail_masked.sum(1) >= 1).all()
assert all(run.step == STEPS for run in runs.values())
unlabelled_somewhere = [
    c for c in CLASSES if labelled_share[c] < 1.0
]  # classes some dataset leaves unlabelled
masked_mean = float(dsc.loc[unlabelled_somewhere, "masked"].mean())
naive_mean = float(dsc.loc[unlabelled_somewhere, "naive"].mean())
assert masked_mean > 0.3, f"the masked model did not learn: mean DSC {masked_mean:.3f}"
assert masked_mean > naive_mean + 0.2, (masked_mean, naive_mean)
assert float(mean_prob["masked"].mean()) > float(mean_prob["naive"].mean())
print(
    "CHECKS PASSED 03",
    {
        "masked_mean_dsc": round(masked_mean, 3),
        "naive_mean_dsc": round(naive_mean, 3),
        "train_seconds": {k: round(v) for k, v in seconds.items()},
    },
)
