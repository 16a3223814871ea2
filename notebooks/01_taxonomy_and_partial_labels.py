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
# annotates more than a few of them. This notebook is about the two facts the whole method is built on: one
# **universal label space**, and **partial labels** - a dataset that says nothing about a class.
#
# **What you will learn**
#
# 1. the universal label space (`universal.taxonomy`): each class has one name, an index, a colour and a prompt, and
#    why the official release has 32 classes where the paper counts 25 organs and 6 tumours;
# 2. how a dataset's label values become one-vs-all masks (*label transfer*), so that a liver-tumour voxel is also a
#    liver voxel (*label orthogonality*);
# 3. the **availability mask** $a_{n,k}$, and the three states of a (scan, class) pair: present, absent, unknown;
# 4. *background inconsistency*, counted on real CT scans: label `0` means "none of **my** classes", not "nothing";
# 5. what happens to a class that no dataset annotates (the celiac trunk), and how it could be learnt.
#
# ## The step in equations
#
# Let $\mathcal{C} = \{c_1, \dots, c_K\}$, $K = 32$, be the universal label space and let dataset $d$ annotate only
# the classes $\mathcal{C}_d \subset \mathcal{C}$. A label file of case $n$ (from dataset $d(n)$) stores one integer
# $\ell_n(x)$ per voxel $x$, and the dataset's **label map** $M_d(v) \subseteq \mathcal{C}$ says which universal
# classes the value $v$ means. The model is trained on one binary (one-vs-all) target per class:
#
# $$Y_{n,k}(x) = \mathbb{1}\big[\, c_k \in M_{d(n)}(\ell_n(x)) \,\big], \qquad k = 1, \dots, K,$$
#
# so classes may overlap: MSD Liver's value 2 means $M(2) = \{\text{liver tumor}, \text{liver}\}$. Which targets
# carry information is the **availability mask**
#
# $$a_{n,k} = \mathbb{1}\big[\, c_k \in \mathcal{C}_{d(n)} \,\big],$$
#
# and the loss (notebook 3) is computed only where $a_{n,k} = 1$ (*masked back-propagation*), for predictions
# $P_{n,k}$:
#
# $$\mathcal{L} = \frac{1}{\sum_{n,k} a_{n,k}} \sum_{n} \sum_{k=1}^{K} a_{n,k}\,
#   \Big[\mathrm{BCE}(P_{n,k}, Y_{n,k}) + 1 - \mathrm{Dice}(P_{n,k}, Y_{n,k})\Big].$$
#
# A pair $(n, k)$ is **present** when $a_{n,k} = 1$ and $Y_{n,k} \neq 0$, **absent** (a true negative) when
# $a_{n,k} = 1$ and $Y_{n,k} = 0$, and **unknown** when $a_{n,k} = 0$: then $Y_{n,k} = 0$ means nothing, and the
# pair gets no gradient.
#
# ## The paper, and how this toolkit differs
#
# * J. Liu, Y. Zhang, J.-N. Chen, J. Xiao, Y. Lu, B. A. Landman, Y. Yuan, A. Yuille, Y. Tang, Z. Zhou:
#   **CLIP-Driven Universal Model for Organ Segmentation and Tumor Detection**, ICCV 2023 (arXiv:2301.00785).
# * J. Liu, A. Yuille, Y. Tang, Z. Zhou: **CLIP-Driven Universal Model for Partially Labeled Organ and Pan-Cancer
#   Segmentation**, the FLARE 2023 challenge version (MICCAI 2023 FLARE): the same method with a SegResNet backbone,
#   scored on FLARE's 13 organs plus one pan-cancer `lesion` class.
#
# |  | paper (ICCV 2023) and its official release | this toolkit's default (the built-in model) | the paper's setting in this toolkit |
# |---|---|---|---|
# | backbone | Swin UNETR (62.6 M parameters) or U-Net (19.4 M) | SegResNet, 4.9 M (as the FLARE 2023 version) | `create_model("swinunetr")`, `"unet"`; official weights `load_pretrained("universal-swinunetr")` |
# | text encoder | CLIP ViT-B/32 text tower, 512-d | MiniLM (all-MiniLM-L6-v2), 384-d, offline | `encoder="clip"` (weights fetched once), or `table:` with the official 32×512 embeddings |
# | prompt | "A computerized tomography of a {class}" | the same (template `ct`) | - |
# | voxel spacing | 1.5 mm isotropic | 3 mm isotropic (the `fast` resolution) | the official weights' spec: 1.5 mm |
# | HU window | [-175, 250] → [0, 1] | the same | - |
# | sliding window | 96×96×96, overlap 0.5, Gaussian | 96×96×48, overlap 0.25 | the official weights' spec |
# | classes | 25 organs + 6 tumours (release: 32, with the kidney cyst) | 19 of the 32 | the taxonomy always has all 32 |
# | training data | 14 public datasets, 3,410 CT scans | a few public scans (`../shared/data`) and synthetic phantoms, minutes on one GPU (`MODEL_CARD.md`) | `universal train` on your data |
#
# Notebook 2 reads the built-in model's column from the model itself and checks it.
#
# ## Running the tutorials on a fresh laptop
#
# ```bash
# make test      # creates .venv, installs requirements.txt and the package, runs the test suite (these notebooks too)
# make demo      # the same install, then the dashboard at http://localhost:8501
# # or by hand (Python >= 3.10):
# python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/pip install -e .
# .venv/bin/jupyter notebook notebooks/      # or JupyterLab / VS Code with the .venv kernel
# ```
#
# The real CTs are found in `$UNIVERSAL_DATA_DIR` or a `shared/data` folder above this one; without them this
# notebook builds the same situation from the synthetic phantom (`universal.make_phantom`). It runs top to bottom on
# a laptop CPU in seconds.
#
# **Exercises** end each notebook: write your answer into the `answer_N = None` cell, run the next (folded) cell
# only if you want the solution (set `RUN_SOLUTIONS = True` in the parameters cell), and run the check cell below
# it: it says `exercise N: correct`, or what is wrong.
#
# We look at three real CT scans, each from a dataset with a different label set:
#
# | scan | dataset | annotates |
# |---|---|---|
# | `ts_abdomen_3mm` | TotalSegmentator v2 | many organs (21 universal classes) |
# | `dcmqi_liver_3slice` | dcmqi test data | the liver only |
# | `radiomics_lung_tumor/lung1` | pyradiomics test data | the lung tumour only |

# %% tags=["parameters"]
QUICK = True  # CI-sized run (this notebook is small either way)
DATA_DIR = None  # folder with the real CTs; None = $UNIVERSAL_DATA_DIR or the nearest shared/data above
RUN_SOLUTIONS = False  # True: the solution cells fill in the answers of the exercises

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

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
rgb = viz.class_rgb  # the taxonomy colour of a class as a matplotlib RGB tuple (0-1)


# %% [markdown]
# ## 1.1 The 32 universal classes
#
# `taxonomy.CLASSES` holds one frozen `ClassInfo` per class, in the official index order (1..32). The canonical
# **name** (lower case) is the identity used everywhere in the package; the index is only used where a file format
# needs integers.
#
# The paper counts **25 organs and 6 tumour types**; the official release has a 32nd class, the **kidney cyst**.
# A cyst is benign, so it is not a tumour type, but it is a lesion inside an organ and is labelled like one
# (datasets such as KiTS23 and TotalSegmentator draw cysts separately): the taxonomy files it with `kind == "tumor"`
# and parents `(right kidney, left kidney)`, so a cyst voxel is also a kidney voxel. FLARE 2023's `lesion` class
# (pan-cancer) leaves it out.

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
is_cyst = table.name.str.contains("cyst")
n_organs = int((table.kind == "organ").sum())
n_tumours = int(((table.kind == "tumor") & ~is_cyst).sum())
print(
    f"{taxonomy.NUM_CLASSES} classes: {n_organs} organs, {n_tumours} tumour types "
    f"and {int(is_cyst.sum())} cyst ({', '.join(table.name[is_cyst])}), filed with the tumours"
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
# typos baked into the official release's prompts (`"Arota"`, `"Celiac Truck"`). The taxonomy keeps those as
# `official_prompt` (to match the official CLIP table and checkpoints) while `prompt_name` is the correctly spelled
# text our prompts use. An unknown name raises a `ClassNameError` whose message suggests the closest valid names.

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
# Each public dataset numbers its labels its own way. `taxonomy.dataset(name)` returns its `DatasetLabelMap`, the
# $M_d$ of the equations: `labels` (source value → universal classes), `split_lr` (values that label *both* sides
# of a paired organ and are split by world x), and `annotated` (the universal classes the dataset annotates at all,
# $\mathcal{C}_d$).

# %%
msd_liver, kits = taxonomy.dataset("msd_liver"), taxonomy.dataset("kits19")
print(msd_liver.full_name)
print("  labels:", dict(msd_liver.labels), "| annotated:", msd_liver.annotated)
print(kits.full_name)
print("  labels:", dict(kits.labels), "| split_lr:", dict(kits.split_lr), "| annotated:", kits.annotated)
print("\nregistered datasets:", ", ".join(taxonomy.list_datasets()))

# %% [markdown]
# Stack the `annotated` sets of all registered datasets into one matrix - row $d$ is the availability
# $a_{n,\cdot}$ of every case from dataset $d$. No row is full: this is the **partial-label** problem in one
# picture. The model has to learn all 32 columns from rows that each fill a few.

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
ax.set_title("classes each dataset annotates (coloured, a = 1) - white = not annotated, i.e. unknown (a = 0)")
counts = annotated.sum(0)
ax2.bar(range(len(names)), counts, color=[rgb(n) for n in names], edgecolor="k", linewidth=0.3)
ax2.set_ylabel("# datasets")
ax2.set_xticks(range(len(names)), names, rotation=90)
plt.tight_layout()
plt.show()
never_annotated = [n for n, k in zip(names, counts) if k == 0]
print("classes annotated by no registered dataset:", never_annotated)

# %% [markdown]
# ### A class nobody annotates: the celiac trunk
#
# One column of the matrix is empty: the **celiac trunk**. It is one of the official release's 32 classes, but no
# dataset registered here draws it. For every case $n$ its $a_{n,k} = 0$, so $P_{n,k}$ never enters the loss and
# its head receives **no gradient at all**. The model still produces a head for it - the controller turns the
# celiac trunk's prompt embedding into head parameters (notebook 2) - but that head is only what the controller,
# trained on the other classes, makes of a new prompt: zero-shot transfer through the text embedding, which is the
# paper's argument for text prompts, not a trained segmentation.
#
# To learn the class, some case needs $a_{n,k} = 1$ in that column:
#
# * a dataset that draws it. `../shared/data/ts_aorta_1p5mm/celiac_trunk.nii.gz` is such a mask (TotalSegmentator
#   model output, not manual). A manifest can describe it with an inline label map - below - and a training run
#   on that manifest would then supervise the class;
# * or pseudo-labels (notebook 4) from a teacher that segments it, e.g. the official weights.

# %%
if DATA_DIR is not None:
    celiac_case = data.manifest_from_dict(
        {
            "datasets": {"ts_celiac_trunk": {"labels": {"1": ["celiac trunk"]}}},  # an inline label map
            "cases": [
                {
                    "name": "ts_aorta_1p5mm",
                    "image": "ts_aorta_1p5mm/ct.nii.gz",
                    "label": "ts_aorta_1p5mm/celiac_trunk.nii.gz",
                    "dataset": "ts_celiac_trunk",
                }
            ],
        },
        root=DATA_DIR,
    ).cases[0]
    celiac_available = celiac_case.availability(names)
    celiac_volume, (celiac_mask,) = celiac_case.load(["celiac trunk"])
    print("this case's a_{n,k} = 1 for:", [n for n, a in zip(names, celiac_available) if a])
    print(
        f"celiac trunk: {int(celiac_mask.sum())} voxels, "
        f"{celiac_mask.sum() * np.prod(celiac_volume.spacing) / 1000:.1f} mL"
    )
else:
    celiac_available = None
    print("(real data not found: the celiac trunk example is skipped)")

# %% [markdown]
# ## 1.3 Partial labels on real scans
#
# We list the three scans in a **manifest** (`universal.data`): each case names its CT, its label file and its
# dataset - dataset identity is stated, never guessed from file names. `Case.load(classes)` reads the CT (RAS+,
# HU) and turns the dataset's label values into the one-vs-all masks $Y_{n,k}$; `Case.availability(classes)` gives
# $a_{n,k}$. The class list includes the kidney cyst, which TotalSegmentator annotates.

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
    "kidney cyst",
    "liver tumor",
    "lung tumor",
    "pancreas tumor",
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
            "pancreas tumor",  # annotated, but the phantom draws none: a true negative ("absent")
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
# * **present** - $a_{n,k} = 1$ and the mask has voxels;
# * **absent** - $a_{n,k} = 1$ and the mask is empty: a true negative (TotalSegmentator annotates kidney cysts, and
#   this scan shows none);
# * **unknown** - $a_{n,k} = 0$: the dataset does not annotate the class. The mask is empty, but that means nothing.
#
# First $a_{n,k}$ itself, then the three states:

# %%
avail = np.array([s["available"] for s in scans.values()])  # (scans, classes) bool: a_{n,k}
pd.DataFrame(avail.astype(int), index=list(scans), columns=CLASSES).rename_axis("a_{n,k}")

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
fig, ax = plt.subplots(figsize=(11, 2.4))
ax.imshow([[STATE[v] for v in row] for row in states.values], aspect="auto")
ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30, ha="right")
ax.set_yticks(range(len(states)), states.index)
ax.set_xticks(np.arange(len(CLASSES) + 1) - 0.5, minor=True)
ax.set_yticks(np.arange(len(states) + 1) - 0.5, minor=True)
ax.grid(which="minor", color="0.4", linewidth=0.5)
ax.tick_params(which="minor", length=0)
for (i, j), v in np.ndenumerate(states.values):
    ax.text(j, i, v, ha="center", va="center", fontsize=7)
ax.legend(
    handles=[Patch(facecolor=c, edgecolor="0.4", label=k) for k, c in STATE.items()],
    loc="upper left",
    bbox_to_anchor=(1.01, 1.0),
    fontsize=8,
)
ax.set_title("per scan and class: present / absent (annotated, a = 1) / unknown (not annotated, a = 0)")
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
    on_slice = [c for c, m in masks.items() if m[:, :, z].any()]
    ax.legend(
        handles=[Patch(facecolor=rgb(c), label=c) for c in on_slice],
        loc="lower left",
        fontsize=7,
        framealpha=0.7,
    )
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
    k = int(
        np.argmax((other["heart_seg.nrrd"] | other["spine_seg.nrrd"]).sum(axis=(0, 1)))
    )  # the fullest slice
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    extra_colors = {"heart (dcmqi)": (220, 40, 40), "spine (dcmqi)": (255, 215, 0)}
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
            colors=extra_colors,
            spacing=liver_case["volume"].spacing,
        ).square()
    )
    legend_colors = {"liver": rgb("liver"), **{n: tuple(v / 255 for v in c) for n, c in extra_colors.items()}}
    ax.legend(
        handles=[Patch(facecolor=c, edgecolor="0.3", label=n) for n, c in legend_colors.items()],
        loc="lower left",
        fontsize=7,
        framealpha=0.8,
    )
    ax.set_title("dcmqi: only the liver is labelled;\nheart and spine are label 0 in the liver dataset")
    ax.axis("off")
    plt.show()
else:
    inside_background = {}
    print("(real dcmqi data not found: skipped)")

# %% [markdown]
# A model trained naively - treating every `0` as "absent" - is told that the spleen is absent in every liver
# dataset scan, although it is right there. Notebook 3 measures what that does to a model; the remedy is the
# $a_{n,k}$ in the loss (**masked back-propagation**).
#
# ## 1.5 Label orthogonality: a tumour voxel is also its organ
#
# The universal masks are **one-vs-all**: one binary mask per class, and classes may overlap. A liver-tumour voxel
# belongs to the *liver tumor* mask **and** to the *liver* mask. Single-valued label maps cannot say that, so
# datasets draw the tumour *over* the organ (MSD Liver: `1` liver, `2` tumour) and the taxonomy's label map restores
# the overlap: value `2` means $M(2) = \{\text{liver tumor}, \text{liver}\}$.

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

# %% [markdown]
# On the slice with the most tumour, zoomed on the liver: the label file; the liver read as `value == 1` (a hole
# where the tumour is); the one-vs-all liver (no hole); and where the two one-vs-all masks overlap - every tumour
# voxel is in **both** masks, none is tumour only.

# %%
z = int(np.argmax(tumour.sum(axis=(0, 1))))
both, liver_only, tumour_only = tumour_u & liver_u, liver_u & ~tumour_u, tumour_u & ~liver_u
label_colors = ["black", rgb("liver"), rgb("liver tumor")]
overlap_colors = {  # magenta and yellow are no class's colour: "in both masks", "tumour only"
    "liver only": universal.resolve_class("liver").color,
    "liver AND liver tumor": (255, 0, 200),
    "liver tumor only": (255, 255, 0),
}
panels = [
    ("label file: 0, 1 liver, 2 tumour", None, None),
    ("liver read as value == 1", {"liver": naive_liver}, None),
    ("one-vs-all: liver mask", {"liver": liver_u}, None),
    (
        "one-vs-all: liver and liver tumor masks",
        {"liver only": liver_only, "liver AND liver tumor": both, "liver tumor only": tumour_only},
        overlap_colors,
    ),
]
ys, xs = np.nonzero(viz.orient_slice(liver_u, "axial", z))  # zoom on the liver (display coordinates)
box = (xs.min() - 6, xs.max() + 6, ys.max() + 6, ys.min() - 6)
fig, axes = plt.subplots(1, 4, figsize=(14, 4.2))
for ax, (title, masks, colors) in zip(axes, panels):
    if masks is None:
        ax.imshow(viz.orient_slice(msd_label, "axial", z), cmap=ListedColormap(label_colors), vmin=0, vmax=2)
        handles = [
            Patch(facecolor=c, edgecolor="0.5", label=t)
            for c, t in zip(label_colors, ["0 background", "1 liver", "2 liver tumour"])
        ]
    else:
        shown = viz.slice_overlay(
            ph.volume.array, masks, "axial", z, colors=colors, opacity=0.6, spacing=ph.spacing
        )
        ax.imshow(shown.square())
        handles = [
            Patch(
                facecolor=tuple(v / 255 for v in (colors or {}).get(n, viz.class_color(n))),
                label=f"{n} ({int(m.sum())} voxels)",
            )
            for n, m in masks.items()
        ]
    ax.set_xlim(box[0], box[1])
    ax.set_ylim(box[2], box[3])
    ax.set_title(title)
    ax.axis("off")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7, frameon=False)
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
# Write each answer into its `answer_N = ...` cell and run the check cell below it. The solution cells (folded)
# fill in the answers only when `RUN_SOLUTIONS = True`.
#
# **Exercise 1.** Which registered datasets annotate the **pancreas tumor**? Set `answer_1` to a set of dataset
# names. (What does a pancreas tumour inside a scan of a dataset that annotates only the *pancreas* count as?)

# %% tags=["exercise"]
answer_1 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    answer_1 = {d for d in taxonomy.list_datasets() if taxonomy.dataset(d).annotates("pancreas tumor")}
    # In a pancreas-only dataset (BTCV, AMOS, ...) a tumour inside the pancreas is labelled pancreas - correct,
    # one-vs-all - and says nothing about the tumour class: there it is *unknown*, not absent.

# %% tags=["check"]
if answer_1 is None:
    print("exercise 1: not answered yet")
else:
    expected = {d for d in datasets if taxonomy.dataset(d).annotates("pancreas tumor")}
    given = {answer_1} if isinstance(answer_1, str) else set(answer_1)
    assert given == expected, (
        f"not quite: missing {sorted(expected - given)}, not annotating it {sorted(given - expected)} "
        "(hint: taxonomy.dataset(name).annotates('pancreas tumor'))"
    )
    print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** `taxonomy.dataset("word")` has a `split_lr` entry: one label value that WORD uses for both sides
# of a paired organ. Set `answer_2` to a dict `{value: (right class, left class)}`.

# %% tags=["exercise"]
answer_2 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    answer_2 = dict(taxonomy.dataset("word").split_lr)  # the adrenal glands, split by world x

# %% tags=["check"]
if answer_2 is None:
    print("exercise 2: not answered yet")
else:
    expected = {int(v): tuple(pair) for v, pair in taxonomy.dataset("word").split_lr.items()}
    given = {
        int(v): tuple(universal.resolve_class(c).name for c in pair) for v, pair in dict(answer_2).items()
    }
    assert given == expected, f"{given} is not WORD's split: look at taxonomy.dataset('word').split_lr"
    print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** Which universal classes are annotated by **exactly one** registered dataset? Set `answer_3` to a
# set of class names. For those classes the model learns from one source only.

# %% tags=["exercise"]
answer_3 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    answer_3 = {n for n, k in zip(names, annotated.sum(axis=0)) if k == 1}

# %% tags=["check"]
if answer_3 is None:
    print("exercise 3: not answered yet")
else:
    per_class = {
        n: sum(taxonomy.dataset(d).annotates(n) for d in taxonomy.list_datasets())
        for n in taxonomy.class_names()
    }
    expected = {n for n, k in per_class.items() if k == 1}
    given = {universal.resolve_class(c).name for c in ([answer_3] if isinstance(answer_3, str) else answer_3)}
    assert given == expected, (
        f"missing {sorted(expected - given)}; annotated by 0 or 2+ datasets: "
        f"{ {n: per_class[n] for n in sorted(given - expected)} }"
    )
    print("exercise 3: correct")

# %% [markdown]
# **Exercise 4.** In the present / absent / unknown table of section 1.3, how many (scan, class) pairs does the
# masked loss skip ($a_{n,k} = 0$), and how many are true negatives? Set `answer_4` to a dict
# `{"unknown": ..., "absent": ...}` of counts - computed from `scans`, not counted by eye.

# %% tags=["exercise"]
answer_4 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    answer_4 = {
        "unknown": int(sum((~s["available"]).sum() for s in scans.values())),
        "absent": int(
            sum(
                a and not s["masks"][c].any() for s in scans.values() for c, a in zip(CLASSES, s["available"])
            )
        ),
    }

# %% tags=["check"]
if answer_4 is None:
    print("exercise 4: not answered yet")
else:
    a_nk = np.array([s["available"] for s in scans.values()])
    empty = np.array([[not s["masks"][c].any() for c in CLASSES] for s in scans.values()])
    expected = {"unknown": int((~a_nk).sum()), "absent": int((a_nk & empty).sum())}
    given = {k: int(v) for k, v in dict(answer_4).items()}
    assert given == expected, (
        f"{given}: unknown pairs are those with a_nk = 0 (s['available'] is False); absent pairs have a_nk = 1 "
        "and an empty mask"
    )
    print("exercise 4: correct")

# %% [markdown]
# ## Checks
#
# The last cell asserts what this notebook shows, so that CI fails if the behaviour ever changes.

# %%
assert taxonomy.NUM_CLASSES == 32 and len(table) == 32
assert (n_organs, n_tumours, int(is_cyst.sum())) == (25, 6, 1)  # the paper's 25 + 6, plus the release's cyst
assert not annotated.all(axis=1).any(), "some dataset annotates every class?"
assert never_annotated == ["celiac trunk"]  # the class no registered dataset annotates (section 1.2)
assert celiac_available is None or [n for n, a in zip(names, celiac_available) if a] == ["celiac trunk"]
assert len({tuple(a) for a in avail}) == len(scans), "the three scans should have three different label sets"
assert {"present", "absent", "unknown"} <= set(states.values.ravel())  # all three states appear
assert hidden.voxels.sum() > 0  # annotated organs that a liver-only dataset calls background
assert all(n > 0 for n in inside_background.values())
assert (
    tumour_u & liver_u
).sum() == tumour_u.sum() > 0 and not tumour_only.any()  # every tumour voxel is liver
assert liver_u.sum() - naive_liver.sum() == tumour_u.sum()
print(
    "CHECKS PASSED 01",
    {
        "real_data": DATA_DIR is not None,
        "hidden_organ_voxels": int(hidden.voxels.sum()),
        "tumour_voxels_in_liver": int(tumour_u.sum()),
    },
)
