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
# # 1 · The universal label space and partial labels
#
# The Universal Model segments **32 classes** (organs and tumours) with one network, although no public dataset
# annotates more than a few of them. This notebook shows the two facts the whole method is built on:
#
# 1. a **universal label space** (`universal.taxonomy`): every class has one name, an index, a colour, a prompt, and
#    every public dataset has a *label map* saying which universal classes its label values mean;
# 2. **partial labels**: a liver dataset says nothing about the spleen. Its label `0` does *not* mean "no spleen
#    here" - it means "not annotated". And labels are **one-vs-all**: a liver-tumour voxel is also a liver voxel.
#
# We look at three real CT scans from `../shared/data`, each from a dataset with a different label set:
#
# | scan | dataset | annotates |
# |---|---|---|
# | `ts_abdomen_3mm` | TotalSegmentator v2 | many organs (21 universal classes) |
# | `dcmqi_liver_3slice` | dcmqi test data | the liver only |
# | `radiomics_lung_tumor/lung1` | pyradiomics test data | the lung tumour only |
#
# Without `../shared/data` the notebook builds the same situation from the synthetic phantom
# (`universal.make_phantom`). Runs top to bottom on a laptop CPU in well under a minute.

# %% tags=["parameters"]
QUICK = True  # CI-sized run (this notebook is small either way)
DATA_DIR = None  # folder with the real CTs; None = $UNIVERSAL_DATA_DIR or the nearest shared/data above

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import universal
from universal import data, taxonomy, viz
from universal.data import find_sample_data
from universal.errors import ClassNameError

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
# ## 1.1 The 32 universal classes
#
# `taxonomy.CLASSES` holds one frozen `ClassInfo` per class, in the official index order (1..32). The canonical
# **name** (lower case) is the identity used everywhere in the package; the index is only used where a file format
# needs integers.

# %%
table = pd.DataFrame(
    [
        {
            "index": c.index,
            "name": c.name,
            "kind": c.kind,
            "parent": ", ".join(c.parent) or "",
            "side": c.side or "",
            "prompt": c.prompt_name,
            "official prompt": c.official_prompt,
        }
        for c in taxonomy.CLASSES
    ]
).set_index("index")
print(
    taxonomy.NUM_CLASSES,
    "classes:",
    (table.kind == "organ").sum(),
    "organs,",
    (table.kind == "tumor").sum(),
    "tumours/cysts",
)
table

# %% [markdown]
# Every class has a display colour; all figures of the project (notebooks and the dashboard) use these colours,
# so the liver is always the same brown and the liver tumour always the same cyan.

# %%
fig, ax = plt.subplots(figsize=(11, 3.2))
for c in taxonomy.CLASSES:
    col, row = (c.index - 1) % 8, (c.index - 1) // 8
    ax.add_patch(plt.Rectangle((col, -row), 0.95, 0.9, color=rgb(c.name)))
    light = sum(c.color) > 380
    ax.text(
        col + 0.05,
        -row + 0.45,
        f"{c.index} {c.name}",
        fontsize=7.5,
        va="center",
        color="black" if light else "white",
    )
ax.set_xlim(0, 8)
ax.set_ylim(-3.1, 0.95)
ax.axis("off")
ax.set_title("taxonomy.colormap(): one colour per universal class")
plt.show()
assert taxonomy.colormap().shape == (33, 3)  # row 0 = background (black)

# %% [markdown]
# ### Names, aliases and the official spellings
#
# `resolve_class` accepts any reasonable spelling: case, `_`/`-` for spaces, aliases (`"IVC"`), integers, and even the
# typos baked into the official release's prompts (`"Arota"`, `"Celiac Truck"`). An unknown name raises a
# `ClassNameError` whose message suggests the closest valid names - try it.

# %%
for spelling in ["IVC", "Arota", "celiac_truck", "Liver-Tumour", 27, "postcava"]:
    c = universal.resolve_class(spelling)
    print(f"{spelling!r:16} -> {c.index:2d} {c.name!r:28} prompt text: {c.prompt_name!r}")

try:
    universal.resolve_class("livr tumour")
except ClassNameError as err:  # a mistake a user can make: a clear sentence, no traceback
    print("\nClassNameError:", err)

# %% [markdown]
# ### The FLARE 2023 view
#
# The FLARE 2023 challenge scores 13 organs plus one `lesion` class (the union of the cancer classes). The
# taxonomy carries that view, including the NSD tolerance of each class that notebook 5 uses.

# %%
pd.DataFrame(
    {
        "universal class": taxonomy.flare23_classes(),
        "NSD tolerance (mm)": taxonomy.flare23_tolerances_mm(),
    }
).rename_axis("FLARE id")

# %% [markdown]
# ## 1.2 Dataset label maps: who annotates what
#
# Each public dataset numbers its labels its own way. `taxonomy.dataset(name)` returns its `DatasetLabelMap`:
# `labels` (source value → universal classes), `split_lr` (values that label *both* sides of a paired organ and are
# split by world x), and `annotated` (the universal classes the dataset annotates at all).

# %%
msd_liver, kits = taxonomy.dataset("msd_liver"), taxonomy.dataset("kits19")
print(msd_liver.full_name)
print("  labels:", dict(msd_liver.labels), "| annotated:", msd_liver.annotated)
print(kits.full_name)
print("  labels:", dict(kits.labels), "| split_lr:", dict(kits.split_lr), "| annotated:", kits.annotated)
print("\nregistered datasets:", ", ".join(taxonomy.list_datasets()))

# %% [markdown]
# Stack the `annotated` sets of all registered datasets into one matrix: no row is full. This is the
# **partial-label** problem in one picture - the model has to learn all 32 columns from rows that each fill a few.

# %%
names = taxonomy.class_names()
datasets = taxonomy.list_datasets()
annotated = np.array([taxonomy.dataset(d).availability(names) for d in datasets])  # (datasets, 32) bool

fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), height_ratios=[3, 1.3], sharex=True)
img = np.ones((*annotated.shape, 3))
for j, n in enumerate(names):
    img[annotated[:, j], j] = rgb(n)
ax.imshow(img, aspect="auto", interpolation="nearest")
ax.set_yticks(range(len(datasets)), datasets)
ax.set_title("classes each dataset annotates (coloured) - white = not annotated, i.e. unknown")
counts = annotated.sum(0)
ax2.bar(range(len(names)), counts, color=[rgb(n) for n in names], edgecolor="k", linewidth=0.3)
ax2.set_ylabel("# datasets")
ax2.set_xticks(range(len(names)), names, rotation=90)
plt.tight_layout()
plt.show()
print("classes annotated by exactly one registered dataset:", [n for n, k in zip(names, counts) if k == 1])

# %% [markdown]
# ## 1.3 Partial labels on real scans
#
# We list the three scans in a **manifest** (`universal.data`): each case names its CT, its label file and its
# dataset - dataset identity is stated, never guessed from file names. `Case.load(classes)` reads the CT (RAS+,
# HU) and turns the dataset's label values into one-vs-all universal masks; `Case.availability(classes)` says which
# of those masks carry information.

# %%
CLASSES = [
    "liver",
    "spleen",
    "right kidney",
    "left kidney",
    "stomach",
    "pancreas",
    "aorta",
    "right lung",
    "left lung",
    "liver tumor",
    "lung tumor",
]

if DATA_DIR is not None:
    manifest = data.manifest_from_dict(
        {
            "cases": [
                {
                    "name": "ts_abdomen_3mm",
                    "image": "ts_abdomen_3mm/ct.nii.gz",
                    "label": "ts_abdomen_3mm/labels_totalseg.nii.gz",
                    "dataset": "totalsegmentator_v2",
                },
                {
                    "name": "dcmqi_liver_3slice",
                    "image": "dcmqi_liver_3slice",
                    "label": "dcmqi_liver_3slice/liver_seg.nrrd",
                    "dataset": "dcmqi_liver",
                },
                {
                    "name": "radiomics_lung1",
                    "image": "radiomics_lung_tumor/lung1_image.nrrd",
                    "label": "radiomics_lung_tumor/lung1_label.nrrd",
                    "dataset": "radiomics_lung_tumor",
                },
            ]
        },
        root=DATA_DIR,
    )
else:  # the same situation on synthetic scans: three phantoms, each "dataset" keeping only its own classes
    import tempfile

    phantom_sets = {
        "many_organs": [
            "liver",
            "spleen",
            "right kidney",
            "left kidney",
            "stomach",
            "pancreas",
            "aorta",
            "right lung",
            "left lung",
        ],
        "liver_only": ["liver"],
        "lung_tumour_only": ["lung tumor"],
    }
    path = data.write_phantom_dataset(
        tempfile.mkdtemp(prefix="nb01-"), 3, (96, 96, 72), (2.0, 2.0, 2.0), phantom_sets
    )
    manifest = data.load_manifest(path)

scans = {}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e.g. "only 3 slices" for the dcmqi case: expected here
    for case in manifest.cases:
        volume, masks = case.load(CLASSES)
        scans[case.name] = {
            "case": case,
            "volume": volume,
            "masks": dict(zip(CLASSES, masks)),
            "available": case.availability(CLASSES),
        }
for name, s in scans.items():
    v = s["volume"]
    print(
        f"{name:20} {s['case'].dataset:22} shape {v.shape}  spacing {tuple(round(x, 2) for x in v.spacing)} mm"
        f"  annotates {len(s['case'].annotated_classes())} universal classes"
    )

# %% [markdown]
# One slice of each scan, with the masks its dataset provides (taxonomy colours). Each scan shows organs its
# dataset does not draw: the lung-tumour scan has lungs, the liver scan has a stomach and a spine.

# %%
fig, axes = plt.subplots(1, len(scans), figsize=(13, 4.6))
for ax, (name, s) in zip(axes, scans.items()):
    shown = {n: m for n, m in s["masks"].items() if m.any()}
    union = np.any(list(shown.values()), axis=0) if shown else np.zeros(s["volume"].shape, bool)
    n_visible = np.sum([m.any(axis=(0, 1)) for m in shown.values()], axis=0) if shown else 0
    z = int(np.argmax(n_visible * union.size + union.sum(axis=(0, 1))))  # most classes, then most voxels
    window = "lung" if "lung tumor" in shown and len(shown) == 1 else "abdomen"
    im = viz.slice_overlay(s["volume"].array, shown, "axial", z, window=window, spacing=s["volume"].spacing)
    ax.imshow(im.square())
    ax.set_title(f"{name}\n({s['case'].dataset}) axial {z}")
    ax.axis("off")
    for n in [n for n, m in shown.items() if m[:, :, z].any()]:  # legend: the classes on this slice
        ax.plot([], [], "s", color=rgb(n), label=n)
    ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Annotated-absent is not the same as not annotated
#
# For every (scan, class) pair there are three states, and a training loss must treat them differently:
#
# * **present** - the dataset annotates the class and draws voxels;
# * **absent** - the dataset annotates the class and draws none (a true negative: e.g. no tumour in a scan of a
#   tumour dataset);
# * **unknown** - the dataset does not annotate the class. The mask is empty, but that means nothing.

# %%
STATE = {"present": (0.2, 0.65, 0.3), "absent": (0.75, 0.75, 0.75), "unknown": (1.0, 1.0, 1.0)}
states = pd.DataFrame(
    {
        name: [
            "present" if (a and s["masks"][c].any()) else "absent" if a else "unknown"
            for c, a in zip(CLASSES, s["available"])
        ]
        for name, s in scans.items()
    },
    index=CLASSES,
).T
fig, ax = plt.subplots(figsize=(11, 2.2))
ax.imshow([[STATE[v] for v in row] for row in states.values], aspect="auto")
ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30, ha="right")
ax.set_yticks(range(len(states)), states.index)
for (i, j), v in np.ndenumerate(states.values):
    ax.text(j, i, v, ha="center", va="center", fontsize=7)
ax.set_title("per scan and class: present / absent (annotated) / unknown (not annotated)")
plt.show()
states

# %% [markdown]
# ## 1.4 Background inconsistency, counted
#
# Label `0` means "none of *my* classes". So the same tissue is "background" in one dataset and an organ in another.
# Two ways to see it on real data:
#
# 1. **The many-organ scan through a liver-only dataset's eyes.** Keep only what a liver dataset would draw
#    (the liver) and count how many voxels of the other organs become label `0`.
# 2. **A liver dataset whose background contains annotated organs.** The dcmqi test data ship a heart and a spine
#    segmentation of the very same three slices; in the liver dataset's label file those voxels are `0`.

# %%
first = next(iter(scans.values()))  # the many-organ scan (real, or phantom fallback)
liver_only_view = {"liver": first["masks"]["liver"]}  # what a liver-only dataset would have drawn
voxel_ml = float(np.prod(first["volume"].spacing)) / 1000.0
rows = []
for c, a in zip(CLASSES, first["available"]):
    m = first["masks"][c]
    if a and c != "liver" and m.any():
        rows.append(
            {
                "class": c,
                "voxels": int(m.sum()),
                "mL": round(m.sum() * voxel_ml, 1),
                "label in a liver-only dataset": 0,
            }
        )
hidden = pd.DataFrame(rows).set_index("class")
print(
    f"{hidden.voxels.sum()} voxels ({hidden.mL.sum():.0f} mL) of annotated organs would be 'background' "
    f"if {next(iter(scans))} came from a liver-only dataset"
)

z = int(np.argmax(sum(first["masks"][c] for c in hidden.index).sum(axis=(0, 1))))
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), width_ratios=[1, 1, 1.1])
for ax, (title, masks) in zip(
    axes,
    [
        ("many-organ dataset", {c: first["masks"][c] for c in ["liver", *hidden.index]}),
        ("same CT, liver-only dataset", liver_only_view),
    ],
):
    ax.imshow(
        viz.slice_overlay(first["volume"].array, masks, "axial", z, spacing=first["volume"].spacing).square()
    )
    ax.set_title(f"{title} (axial {z})")
    ax.axis("off")
axes[2].barh(hidden.index, hidden.mL, color=[rgb(c) for c in hidden.index], edgecolor="k", linewidth=0.3)
axes[2].invert_yaxis()
axes[2].set_xlabel("mL labelled 0 ('background') by a liver-only dataset")
plt.tight_layout()
plt.show()
hidden

# %%
if DATA_DIR is not None:
    liver_case = scans["dcmqi_liver_3slice"]
    liver_label = liver_case["masks"]["liver"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = {
            f: universal.load_label(DATA_DIR / "dcmqi_liver_3slice" / f, like=liver_case["volume"]) > 0
            for f in ["heart_seg.nrrd", "spine_seg.nrrd"]
        }
    inside_background = {f: int((m & ~liver_label).sum()) for f, m in other.items()}
    print("voxels the dcmqi liver dataset labels 0 although another file of the same scan annotates them:")
    for f, n in inside_background.items():
        print(f"  {f:15} {n:7d} of {int(other[f].sum()):7d}")
    k = 1
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    masks = {
        "liver": liver_label,
        "heart (dcmqi)": other["heart_seg.nrrd"],
        "spine (dcmqi)": other["spine_seg.nrrd"],
    }
    ax.imshow(
        viz.slice_overlay(
            liver_case["volume"].array,
            masks,
            "axial",
            k,
            colors={"heart (dcmqi)": (220, 40, 40), "spine (dcmqi)": (240, 240, 240)},
            spacing=liver_case["volume"].spacing,
        ).square()
    )
    ax.set_title("dcmqi: liver label (brown); heart and spine\nare label 0 in the liver dataset")
    ax.axis("off")
    plt.show()
else:
    inside_background = {}
    print("(real dcmqi data not found: skipped)")

# %% [markdown]
# A model trained naively - treating every `0` as "absent" - is told that the spleen is absent in every liver
# dataset scan, although it is right there. Notebook 3 measures what that does to a model; the remedy is to
# compute the loss only for the classes each dataset annotates (**masked back-propagation**).
#
# ## 1.5 Label orthogonality: a tumour voxel is also its organ
#
# The universal masks are **one-vs-all**: one binary mask per class, and classes may overlap. A liver-tumour voxel
# belongs to the *liver tumor* mask **and** to the *liver* mask. Single-valued label maps cannot say that, so
# datasets draw the tumour *over* the organ (MSD Liver: `1` liver, `2` tumour) and the taxonomy's label map restores
# the overlap: value `2` means `("liver tumor", "liver")`.

# %%
ph = universal.make_phantom(shape=(96, 96, 72), spacing=(2.0, 2.0, 2.0), seed=0)
liver, tumour = ph.masks["liver"], ph.masks["liver tumor"]
# an MSD-Liver-style label file: 1 = liver, 2 = tumour (drawn over the liver)
msd_label = np.where(tumour, 2, np.where(liver, 1, 0)).astype(np.int16)
liver_u, tumour_u = taxonomy.transfer_labels(msd_label, "msd_liver", ph.affine, ["liver", "liver tumor"])
naive_liver = msd_label == 1  # reading the label file as "value 1 = liver" loses the tumour voxels

overlap = pd.DataFrame(
    {
        "voxels": [
            int(tumour_u.sum()),
            int((tumour_u & liver_u).sum()),
            int(liver_u.sum()),
            int(naive_liver.sum()),
        ],
    },
    index=[
        "liver tumor (one-vs-all)",
        "... of which also liver",
        "liver (one-vs-all)",
        "liver read as value == 1",
    ],
)
print(overlap)
print(f"fraction of tumour voxels that are liver voxels: {(tumour_u & liver_u).sum() / tumour_u.sum():.3f}")
print(f"a 'value == 1' liver misses {int(liver_u.sum() - naive_liver.sum())} voxels: exactly the tumour")

z = int(np.argmax(tumour.sum(axis=(0, 1))))
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
panels = [
    ("label file (1 liver, 2 tumour)", None),
    ("one-vs-all: liver", {"liver": liver_u}),
    ("one-vs-all: liver tumor", {"liver tumor": tumour_u}),
]
for ax, (title, masks) in zip(axes, panels):
    if masks is None:
        ax.imshow(viz.orient_slice(msd_label, "axial", z), cmap="viridis", vmin=0, vmax=2)
    else:
        ax.imshow(viz.slice_overlay(ph.volume.array, masks, "axial", z, spacing=ph.spacing).square())
    ax.set_title(title)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Tumours whose organ comes in pairs have two candidate parents; the taxonomy records both and the side is decided
# from the anatomy (world x: in RAS+ the patient's right is the *larger* x):

# %%
for n in ["liver tumor", "kidney tumor", "lung tumor", "kidney cyst", "pancreas tumor"]:
    c = universal.resolve_class(n)
    print(f"{n:16} parent candidates: {c.parent}")
print("right kidney pairs with:", universal.resolve_class("right kidney").paired)

# %% [markdown]
# ## Exercises
#
# 1. Which registered datasets annotate the **pancreas tumor**? How many datasets annotate the *pancreas* but not
#    its tumour, and what does that mean for a pancreas tumour inside such a scan?
# 2. `taxonomy.dataset("word")` has a `split_lr` entry. Which label value is split, and into which classes?
# 3. Run `universal.resolve_class("Right Head of Femur")`. Which canonical name does it resolve to, and why does the
#    taxonomy keep the official prompt text separately from the prompt name?

# %% [markdown]
# <details><summary>Solution (click to open)</summary>
#
# 1. `[d for d in taxonomy.list_datasets() if taxonomy.dataset(d).annotates("pancreas tumor")]`. Datasets that
#    annotate the pancreas only (e.g. BTCV, AMOS) label a pancreas tumour as *pancreas* (one-vs-all: correct) and
#    say nothing about the tumour class - it is *unknown* there, not absent.
# 2. `dict(taxonomy.dataset("word").split_lr)`: WORD labels both adrenal glands with one value, split into
#    `("right adrenal gland", "left adrenal gland")` by world x.
# 3. `right femoral head`. The official prompts use spellings such as "Right Head of Femur", "Arota" and
#    "Celiac Truck"; `official_prompt` keeps them so the official CLIP table and checkpoints can be matched, while
#    `prompt_name` is the correctly spelled text our prompts use.
#
# </details>

# %% [markdown]
# ## Checks
#
# The last cell asserts what this notebook shows, so that CI fails if the behaviour ever changes.

# %%
assert taxonomy.NUM_CLASSES == 32 and len(table) == 32
assert not annotated.all(axis=1).any(), "some dataset annotates every class?"
avail = np.array([s["available"] for s in scans.values()])
assert len({tuple(a) for a in avail}) == len(scans), "the three scans should have three different label sets"
assert "unknown" in states.values and "present" in states.values
assert hidden.voxels.sum() > 0  # annotated organs that a liver-only dataset calls background
assert all(n > 0 for n in inside_background.values())
assert (tumour_u & liver_u).sum() == tumour_u.sum() > 0  # every tumour voxel is a liver voxel
assert liver_u.sum() - naive_liver.sum() == tumour_u.sum()
print(
    "CHECKS PASSED 01",
    {
        "real_data": DATA_DIR is not None,
        "hidden_organ_voxels": int(hidden.voxels.sum()),
        "tumour_voxels_in_liver": int(tumour_u.sum()),
    },
)
