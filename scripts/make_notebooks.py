"""Write the tutorial notebooks in ``notebooks/`` (outputs stripped) from the sources below.

    .venv/bin/python scripts/make_notebooks.py            # all five
    .venv/bin/python scripts/make_notebooks.py 03          # only those whose file name starts with 03

The notebooks are generated so that their code stays reviewable as plain Python here, and so that every notebook
gets the same parameters cell (tagged ``parameters``: papermill/nbclient inject ``QUICK`` etc. after it) and the
same way of finding ``../shared/data``. They call only the ``universal`` API; the code cells hold small plotting
glue and prose, never library logic. The written notebooks carry no outputs; their code cells are formatted and
linted with the project's ruff settings when ruff is installed next to this interpreter.
``tests/test_notebooks.py`` executes them and checks that the saved files carry no outputs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "notebooks"


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str, tags: list[str] | None = None):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def solution(text: str):
    """A collapsed markdown solution (HTML <details>: closed until clicked in Jupyter and on GitHub)."""
    return md(
        "<details><summary>Solution (click to open)</summary>\n\n" + text.strip("\n") + "\n\n</details>"
    )


# Shared by every notebook: find ../shared/data robustly (parameter, env var, then walk up from the notebook).
FIND_DATA = """
# where the real CTs are: the DATA_DIR parameter, else $UNIVERSAL_SHARED_DATA, else the first shared/data found
# walking up from this notebook's folder (the repository keeps them in ../shared/data beside the project)
if DATA_DIR is None:
    DATA_DIR = os.environ.get("UNIVERSAL_SHARED_DATA")
if DATA_DIR is None:
    DATA_DIR = next(
        (p / "shared" / "data" for p in [Path.cwd(), *Path.cwd().parents] if (p / "shared" / "data").is_dir()), None
    )
DATA_DIR = Path(DATA_DIR) if DATA_DIR is not None and Path(DATA_DIR).is_dir() else None
print(f"universal {universal.__version__} | real CTs: {DATA_DIR or 'not found - using the synthetic phantom'}")
"""

# the parameters cell of the notebooks that only read data (01, 02)
SMALL_NOTEBOOK_PARAMETERS = code(
    """
QUICK = True  # CI-sized run (this notebook is small either way)
DATA_DIR = None  # folder with the real CTs; None = $UNIVERSAL_SHARED_DATA or the nearest shared/data above
""",
    tags=["parameters"],
)

PLOT_SETUP = '''
plt.rcParams.update({"figure.dpi": 80, "axes.titlesize": 10, "font.size": 9})


def rgb(name):
    """The taxonomy colour of a class as a matplotlib RGB tuple (0-1)."""
    return tuple(c / 255 for c in universal.resolve_class(name).color)
'''


# ----------------------------------------------------------------------------------------------------------------
# 01 taxonomy and partial labels
# ----------------------------------------------------------------------------------------------------------------
def nb01():
    return [
        md("""
# 1 · The universal label space and partial labels

The Universal Model segments **32 classes** (organs and tumours) with one network, although no public dataset
annotates more than a few of them. This notebook shows the two facts the whole method is built on:

1. a **universal label space** (`universal.taxonomy`): every class has one name, an index, a colour, a prompt, and
   every public dataset has a *label map* saying which universal classes its label values mean;
2. **partial labels**: a liver dataset says nothing about the spleen. Its label `0` does *not* mean "no spleen
   here" - it means "not annotated". And labels are **one-vs-all**: a liver-tumour voxel is also a liver voxel.

We look at three real CT scans from `../shared/data`, each from a dataset with a different label set:

| scan | dataset | annotates |
|---|---|---|
| `ts_abdomen_3mm` | TotalSegmentator v2 | many organs (21 universal classes) |
| `dcmqi_liver_3slice` | dcmqi test data | the liver only |
| `radiomics_lung_tumor/lung1` | pyradiomics test data | the lung tumour only |

Without `../shared/data` the notebook builds the same situation from the synthetic phantom
(`universal.make_phantom`). Runs top to bottom on a laptop CPU in well under a minute.
"""),
        SMALL_NOTEBOOK_PARAMETERS,
        code(
            """
import os
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import universal
from universal import data, taxonomy, viz
from universal.errors import ClassNameError
"""
            + FIND_DATA
            + PLOT_SETUP
        ),
        md("""
## 1.1 The 32 universal classes

`taxonomy.CLASSES` holds one frozen `ClassInfo` per class, in the official index order (1..32). The canonical
**name** (lower case) is the identity used everywhere in the package; the index is only used where a file format
needs integers.
"""),
        code("""
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
print(taxonomy.NUM_CLASSES, "classes:", (table.kind == "organ").sum(), "organs,", (table.kind == "tumor").sum(),
      "tumours/cysts")
table
"""),
        md("""
Every class has a display colour; all figures of the project (notebooks and the dashboard) use these colours,
so the liver is always the same brown and the liver tumour always the same cyan.
"""),
        code("""
fig, ax = plt.subplots(figsize=(11, 3.2))
for c in taxonomy.CLASSES:
    col, row = (c.index - 1) % 8, (c.index - 1) // 8
    ax.add_patch(plt.Rectangle((col, -row), 0.95, 0.9, color=rgb(c.name)))
    light = sum(c.color) > 380
    ax.text(col + 0.05, -row + 0.45, f"{c.index} {c.name}", fontsize=7.5, va="center",
            color="black" if light else "white")
ax.set_xlim(0, 8)
ax.set_ylim(-3.1, 0.95)
ax.axis("off")
ax.set_title("taxonomy.colormap(): one colour per universal class")
plt.show()
assert taxonomy.colormap().shape == (33, 3)  # row 0 = background (black)
"""),
        md("""
### Names, aliases and the official spellings

`resolve_class` accepts any reasonable spelling: case, `_`/`-` for spaces, aliases (`"IVC"`), integers, and even the
typos baked into the official release's prompts (`"Arota"`, `"Celiac Truck"`). An unknown name raises a
`ClassNameError` whose message suggests the closest valid names - try it.
"""),
        code("""
for spelling in ["IVC", "Arota", "celiac_truck", "Liver-Tumour", 27, "postcava"]:
    c = universal.resolve_class(spelling)
    print(f"{spelling!r:16} -> {c.index:2d} {c.name!r:28} prompt text: {c.prompt_name!r}")

try:
    universal.resolve_class("livr tumour")
except ClassNameError as err:  # a mistake a user can make: a clear sentence, no traceback
    print("\\nClassNameError:", err)
"""),
        md("""
### The FLARE 2023 view

The FLARE 2023 challenge scores 13 organs plus one `lesion` class (the union of the cancer classes). The
taxonomy carries that view, including the NSD tolerance of each class that notebook 5 uses.
"""),
        code("""
pd.DataFrame(
    {
        "universal class": taxonomy.flare23_classes(),
        "NSD tolerance (mm)": taxonomy.flare23_tolerances_mm(),
    }
).rename_axis("FLARE id")
"""),
        md("""
## 1.2 Dataset label maps: who annotates what

Each public dataset numbers its labels its own way. `taxonomy.dataset(name)` returns its `DatasetLabelMap`:
`labels` (source value → universal classes), `split_lr` (values that label *both* sides of a paired organ and are
split by world x), and `annotated` (the universal classes the dataset annotates at all).
"""),
        code("""
msd_liver, kits = taxonomy.dataset("msd_liver"), taxonomy.dataset("kits19")
print(msd_liver.full_name)
print("  labels:", dict(msd_liver.labels), "| annotated:", msd_liver.annotated)
print(kits.full_name)
print("  labels:", dict(kits.labels), "| split_lr:", dict(kits.split_lr), "| annotated:", kits.annotated)
print("\\nregistered datasets:", ", ".join(taxonomy.list_datasets()))
"""),
        md("""
Stack the `annotated` sets of all registered datasets into one matrix: no row is full. This is the
**partial-label** problem in one picture - the model has to learn all 32 columns from rows that each fill a few.
"""),
        code("""
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
"""),
        md("""
## 1.3 Partial labels on real scans

We list the three scans in a **manifest** (`universal.data`): each case names its CT, its label file and its
dataset - dataset identity is stated, never guessed from file names. `Case.load(classes)` reads the CT (RAS+,
HU) and turns the dataset's label values into one-vs-all universal masks; `Case.availability(classes)` says which
of those masks carry information.
"""),
        code("""
CLASSES = ["liver", "spleen", "right kidney", "left kidney", "stomach", "pancreas", "aorta", "right lung",
           "left lung", "liver tumor", "lung tumor"]

if DATA_DIR is not None:
    manifest = data.manifest_from_dict(
        {
            "cases": [
                {"name": "ts_abdomen_3mm", "image": "ts_abdomen_3mm/ct.nii.gz",
                 "label": "ts_abdomen_3mm/labels_totalseg.nii.gz", "dataset": "totalsegmentator_v2"},
                {"name": "dcmqi_liver_3slice", "image": "dcmqi_liver_3slice",
                 "label": "dcmqi_liver_3slice/liver_seg.nrrd", "dataset": "dcmqi_liver"},
                {"name": "radiomics_lung1", "image": "radiomics_lung_tumor/lung1_image.nrrd",
                 "label": "radiomics_lung_tumor/lung1_label.nrrd", "dataset": "radiomics_lung_tumor"},
            ]
        },
        root=DATA_DIR,
    )
else:  # the same situation on synthetic scans: three phantoms, each "dataset" keeping only its own classes
    import tempfile

    phantom_sets = {
        "many_organs": ["liver", "spleen", "right kidney", "left kidney", "stomach", "pancreas", "aorta",
                        "right lung", "left lung"],
        "liver_only": ["liver"],
        "lung_tumour_only": ["lung tumor"],
    }
    path = data.write_phantom_dataset(tempfile.mkdtemp(prefix="nb01-"), 3, (96, 96, 72), (2.0, 2.0, 2.0),
                                      phantom_sets)
    manifest = data.load_manifest(path)

scans = {}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e.g. "only 3 slices" for the dcmqi case: expected here
    for case in manifest.cases:
        volume, masks = case.load(CLASSES)
        scans[case.name] = {"case": case, "volume": volume, "masks": dict(zip(CLASSES, masks)),
                            "available": case.availability(CLASSES)}
for name, s in scans.items():
    v = s["volume"]
    print(f"{name:20} {s['case'].dataset:22} shape {v.shape}  spacing {tuple(round(x, 2) for x in v.spacing)} mm"
          f"  annotates {len(s['case'].annotated_classes())} universal classes")
"""),
        md("""
One slice of each scan, with the masks its dataset provides (taxonomy colours). Each scan shows organs its
dataset does not draw: the lung-tumour scan has lungs, the liver scan has a stomach and a spine.
"""),
        code("""
fig, axes = plt.subplots(1, len(scans), figsize=(13, 4.6))
for ax, (name, s) in zip(axes, scans.items()):
    shown = {n: m for n, m in s["masks"].items() if m.any()}
    union = np.any(list(shown.values()), axis=0) if shown else np.zeros(s["volume"].shape, bool)
    n_visible = np.sum([m.any(axis=(0, 1)) for m in shown.values()], axis=0) if shown else 0
    z = int(np.argmax(n_visible * union.size + union.sum(axis=(0, 1))))  # most classes, then most voxels
    window = "lung" if "lung tumor" in shown and len(shown) == 1 else "abdomen"
    im = viz.slice_overlay(s["volume"].array, shown, "axial", z, window=window, spacing=s["volume"].spacing)
    ax.imshow(im.square())
    ax.set_title(f"{name}\\n({s['case'].dataset}) axial {z}")
    ax.axis("off")
    for n in [n for n, m in shown.items() if m[:, :, z].any()]:  # legend: the classes on this slice
        ax.plot([], [], "s", color=rgb(n), label=n)
    ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
plt.tight_layout()
plt.show()
"""),
        md("""
### Annotated-absent is not the same as not annotated

For every (scan, class) pair there are three states, and a training loss must treat them differently:

* **present** - the dataset annotates the class and draws voxels;
* **absent** - the dataset annotates the class and draws none (a true negative: e.g. no tumour in a scan of a
  tumour dataset);
* **unknown** - the dataset does not annotate the class. The mask is empty, but that means nothing.
"""),
        code("""
STATE = {"present": (0.2, 0.65, 0.3), "absent": (0.75, 0.75, 0.75), "unknown": (1.0, 1.0, 1.0)}
states = pd.DataFrame(
    {
        name: ["present" if (a and s["masks"][c].any()) else "absent" if a else "unknown"
               for c, a in zip(CLASSES, s["available"])]
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
"""),
        md("""
## 1.4 Background inconsistency, counted

Label `0` means "none of *my* classes". So the same tissue is "background" in one dataset and an organ in another.
Two ways to see it on real data:

1. **The many-organ scan through a liver-only dataset's eyes.** Keep only what a liver dataset would draw
   (the liver) and count how many voxels of the other organs become label `0`.
2. **A liver dataset whose background contains annotated organs.** The dcmqi test data ship a heart and a spine
   segmentation of the very same three slices; in the liver dataset's label file those voxels are `0`.
"""),
        code("""
first = next(iter(scans.values()))  # the many-organ scan (real, or phantom fallback)
liver_only_view = {"liver": first["masks"]["liver"]}  # what a liver-only dataset would have drawn
voxel_ml = float(np.prod(first["volume"].spacing)) / 1000.0
rows = []
for c, a in zip(CLASSES, first["available"]):
    m = first["masks"][c]
    if a and c != "liver" and m.any():
        rows.append({"class": c, "voxels": int(m.sum()), "mL": round(m.sum() * voxel_ml, 1),
                     "label in a liver-only dataset": 0})
hidden = pd.DataFrame(rows).set_index("class")
print(f"{hidden.voxels.sum()} voxels ({hidden.mL.sum():.0f} mL) of annotated organs would be 'background' "
      f"if {next(iter(scans))} came from a liver-only dataset")

z = int(np.argmax(sum(first["masks"][c] for c in hidden.index).sum(axis=(0, 1))))
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), width_ratios=[1, 1, 1.1])
for ax, (title, masks) in zip(axes, [("many-organ dataset", {c: first["masks"][c] for c in ["liver", *hidden.index]}),
                                     ("same CT, liver-only dataset", liver_only_view)]):
    ax.imshow(viz.slice_overlay(first["volume"].array, masks, "axial", z, spacing=first["volume"].spacing).square())
    ax.set_title(f"{title} (axial {z})")
    ax.axis("off")
axes[2].barh(hidden.index, hidden.mL, color=[rgb(c) for c in hidden.index], edgecolor="k", linewidth=0.3)
axes[2].invert_yaxis()
axes[2].set_xlabel("mL labelled 0 ('background') by a liver-only dataset")
plt.tight_layout()
plt.show()
hidden
"""),
        code("""
if DATA_DIR is not None:
    liver_case = scans["dcmqi_liver_3slice"]
    liver_label = liver_case["masks"]["liver"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = {f: universal.load_label(DATA_DIR / "dcmqi_liver_3slice" / f, like=liver_case["volume"]) > 0
                 for f in ["heart_seg.nrrd", "spine_seg.nrrd"]}
    inside_background = {f: int((m & ~liver_label).sum()) for f, m in other.items()}
    print("voxels the dcmqi liver dataset labels 0 although another file of the same scan annotates them:")
    for f, n in inside_background.items():
        print(f"  {f:15} {n:7d} of {int(other[f].sum()):7d}")
    k = 1
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    masks = {"liver": liver_label, "heart (dcmqi)": other["heart_seg.nrrd"], "spine (dcmqi)": other["spine_seg.nrrd"]}
    ax.imshow(viz.slice_overlay(liver_case["volume"].array, masks, "axial", k,
                                colors={"heart (dcmqi)": (220, 40, 40), "spine (dcmqi)": (240, 240, 240)},
                                spacing=liver_case["volume"].spacing).square())
    ax.set_title("dcmqi: liver label (brown); heart and spine\\nare label 0 in the liver dataset")
    ax.axis("off")
    plt.show()
else:
    inside_background = {}
    print("(real dcmqi data not found: skipped)")
"""),
        md("""
A model trained naively - treating every `0` as "absent" - is told that the spleen is absent in every liver
dataset scan, although it is right there. Notebook 3 measures what that does to a model; the remedy is to
compute the loss only for the classes each dataset annotates (**masked back-propagation**).

## 1.5 Label orthogonality: a tumour voxel is also its organ

The universal masks are **one-vs-all**: one binary mask per class, and classes may overlap. A liver-tumour voxel
belongs to the *liver tumor* mask **and** to the *liver* mask. Single-valued label maps cannot say that, so
datasets draw the tumour *over* the organ (MSD Liver: `1` liver, `2` tumour) and the taxonomy's label map restores
the overlap: value `2` means `("liver tumor", "liver")`.
"""),
        code("""
ph = universal.make_phantom(shape=(96, 96, 72), spacing=(2.0, 2.0, 2.0), seed=0)
liver, tumour = ph.masks["liver"], ph.masks["liver tumor"]
# an MSD-Liver-style label file: 1 = liver, 2 = tumour (drawn over the liver)
msd_label = np.where(tumour, 2, np.where(liver, 1, 0)).astype(np.int16)
liver_u, tumour_u = taxonomy.transfer_labels(msd_label, "msd_liver", ph.affine, ["liver", "liver tumor"])
naive_liver = msd_label == 1  # reading the label file as "value 1 = liver" loses the tumour voxels

overlap = pd.DataFrame(
    {
        "voxels": [int(tumour_u.sum()), int((tumour_u & liver_u).sum()), int(liver_u.sum()), int(naive_liver.sum())],
    },
    index=["liver tumor (one-vs-all)", "... of which also liver", "liver (one-vs-all)", "liver read as value == 1"],
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
"""),
        md("""
Tumours whose organ comes in pairs have two candidate parents; the taxonomy records both and the side is decided
from the anatomy (world x: in RAS+ the patient's right is the *larger* x):
"""),
        code("""
for n in ["liver tumor", "kidney tumor", "lung tumor", "kidney cyst", "pancreas tumor"]:
    c = universal.resolve_class(n)
    print(f"{n:16} parent candidates: {c.parent}")
print("right kidney pairs with:", universal.resolve_class("right kidney").paired)
"""),
        md("""
## Exercises

1. Which registered datasets annotate the **pancreas tumor**? How many datasets annotate the *pancreas* but not
   its tumour, and what does that mean for a pancreas tumour inside such a scan?
2. `taxonomy.dataset("word")` has a `split_lr` entry. Which label value is split, and into which classes?
3. Run `universal.resolve_class("Right Head of Femur")`. Which canonical name does it resolve to, and why does the
   taxonomy keep the official prompt text separately from the prompt name?
"""),
        solution("""
1. `[d for d in taxonomy.list_datasets() if taxonomy.dataset(d).annotates("pancreas tumor")]`. Datasets that
   annotate the pancreas only (e.g. BTCV, AMOS) label a pancreas tumour as *pancreas* (one-vs-all: correct) and
   say nothing about the tumour class - it is *unknown* there, not absent.
2. `dict(taxonomy.dataset("word").split_lr)`: WORD labels both adrenal glands with one value, split into
   `("right adrenal gland", "left adrenal gland")` by world x.
3. `right femoral head`. The official prompts use spellings such as "Right Head of Femur", "Arota" and
   "Celiac Truck"; `official_prompt` keeps them so the official CLIP table and checkpoints can be matched, while
   `prompt_name` is the correctly spelled text our prompts use.
"""),
        md("""
## Checks

The last cell asserts what this notebook shows, so that CI fails if the behaviour ever changes.
"""),
        code("""
assert taxonomy.NUM_CLASSES == 32 and len(table) == 32
assert not annotated.all(axis=1).any(), "some dataset annotates every class?"
avail = np.array([s["available"] for s in scans.values()])
assert len({tuple(a) for a in avail}) == len(scans), "the three scans should have three different label sets"
assert "unknown" in states.values and "present" in states.values
assert hidden.voxels.sum() > 0  # annotated organs that a liver-only dataset calls background
assert all(n > 0 for n in inside_background.values())
assert (tumour_u & liver_u).sum() == tumour_u.sum() > 0  # every tumour voxel is a liver voxel
assert liver_u.sum() - naive_liver.sum() == tumour_u.sum()
print("CHECKS PASSED 01", {"real_data": DATA_DIR is not None, "hidden_organ_voxels": int(hidden.voxels.sum()),
                           "tumour_voxels_in_liver": int(tumour_u.sum())})
"""),
    ]


# ----------------------------------------------------------------------------------------------------------------
# 02 prompts and text embeddings
# ----------------------------------------------------------------------------------------------------------------
def nb02():
    return [
        md("""
# 2 · Prompts, text embeddings and the text-driven controller

The Universal Model does not have one output channel per class. It has **one tiny segmentation head per class
whose weights are computed from a text prompt**:

1. a **template** turns a class into a sentence: *"A computerized tomography of a Liver Tumor"*;
2. a **text encoder** turns the sentence into an embedding `w_k` (`universal.prompts`);
3. the **controller** maps `[f ⊕ w_k]` (the global image feature and the embedding) to the 153 parameters of
   three 1×1×1 convolutions (8→8, 8→8, 8→1), which turn the shared dense features `F` into the class's logits.

Because related classes get related sentences, the encoder can put them close together - the paper's argument for
CLIP over one-hot labels. This notebook looks at templates, four encoders (MiniLM live, CLIP when its weights are
available, the official CLIP table, one-hot), their similarity structure, and the controller of a real model.
"""),
        SMALL_NOTEBOOK_PARAMETERS,
        code(
            """
import copy
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import universal
from universal import prompts, taxonomy, viz
from universal.errors import EncoderUnavailableError
from universal.model import dynamic_heads, split_controller_params
from universal.preprocess import PreprocessConfig, preprocess  # the preprocessing segment() uses
"""
            + FIND_DATA
            + PLOT_SETUP
            + """
REFERENCE_DIR = DATA_DIR.parent / "reference" if DATA_DIR is not None else None
print("embedding cache:", prompts.default_cache_dir())
"""
        ),
        md("""
## 2.1 Templates

`prompts.TEMPLATES` holds the paper's three templates (the paper uses `ct`) and the bare class name.
`format_prompt` fills in the class's correctly spelled `prompt_name`; a free text without `{}` gets the class name
appended.
"""),
        code("""
for key, template in prompts.TEMPLATES.items():
    print(f"{key:9} {template!r:48} -> {prompts.format_prompt(template, 'IVC')!r}")
print()
print(prompts.resolve_template("Contrast-enhanced abdominal CT showing"))
"""),
        md("""
## 2.2 MiniLM, live

`encode_prompts(classes, template, encoder)` returns a `(K, D)` float32 array, one row per class. MiniLM
(all-MiniLM-L6-v2, 384-d, shipped inside a pip package) runs offline. Rows are cached on disk, one `.npy` per
(encoder, template, class), so the second call runs no text model at all.
"""),
        code("""
names = taxonomy.class_names()
t0 = time.perf_counter()
emb_minilm = universal.encode_prompts(names, template="ct", encoder="minilm")
t_first = time.perf_counter() - t0
t0 = time.perf_counter()
again = universal.encode_prompts(names, template="ct", encoder="minilm")
t_cached = time.perf_counter() - t0
cache_files = sorted(prompts.default_cache_dir().rglob("*.npy"))  # one small .npy per (encoder, template, class)
print(f"shape {emb_minilm.shape}, dtype {emb_minilm.dtype}; row norms {np.linalg.norm(emb_minilm, axis=1).round(3)[:4]}...")
print(f"first call {t_first:.2f} s (loads the model), cached call {t_cached * 1000:.1f} ms; "
      f"{len(cache_files)} cached rows")
"""),
        md("""
### Similarity between classes

`prompts.prompt_similarity` gives the cosine similarity of every pair of rows. Sentences that differ in one word
are close for any sentence encoder, so the scale is compressed: what matters is the *structure* - left/right
pairs, tumours and their organs, the vessels.
"""),
        code("""
sim_minilm = prompts.prompt_similarity(emb_minilm)


def heatmap(ax, m, labels, title, vmin=None):
    im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    for t, n in zip(ax.get_yticklabels(), labels):
        t.set_color(rgb(n) if n in names else "black")
    ax.set_title(title)
    return im


fig, ax = plt.subplots(figsize=(8, 7))
plt.colorbar(heatmap(ax, sim_minilm, names, "MiniLM: cosine similarity of the 32 'ct' prompts"), ax=ax, shrink=0.7)
plt.tight_layout()
plt.show()


def closest_pairs(sim, k=6):
    iu = np.triu_indices(len(names), 1)
    order = np.argsort(sim[iu])[::-1][:k]
    return [(names[iu[0][i]], names[iu[1][i]], round(float(sim[iu][i]), 3)) for i in order]


off_diag = sim_minilm[~np.eye(len(names), dtype=bool)]
print(f"mean off-diagonal similarity {off_diag.mean():.3f}; most similar pairs:")
for a, b, s in closest_pairs(sim_minilm):
    print(f"  {a:24} {b:24} {s}")
"""),
        md("""
The same matrix as an interactive plotly figure (`viz.similarity_heatmap`, also used by the dashboard) - hover to
read the pairs:
"""),
        code("""
fig = viz.similarity_heatmap(sim_minilm, names, title="MiniLM, template 'ct'", height=560)
fig.show()
"""),
        md("""
### Similarity between templates

Does the template matter? Encode all classes with each template and compare *across* templates: entry (i, j) of
`prompt_similarity(E_ct, E_photo)` compares class i written one way with class j written the other way. A strong
diagonal means the class name, not the template, dominates the embedding.
"""),
        code("""
template_keys = ["ct", "photo", "there_is", "name"]
emb_by_template = {k: universal.encode_prompts(names, template=k, encoder="minilm") for k in template_keys}
cross = prompts.prompt_similarity(emb_by_template["ct"], emb_by_template["photo"])

summary = np.zeros((len(template_keys), len(template_keys)))
for i, a in enumerate(template_keys):
    for j, b in enumerate(template_keys):
        s = prompts.prompt_similarity(emb_by_template[a], emb_by_template[b])
        summary[i, j] = np.diag(s).mean() - s[~np.eye(len(names), dtype=bool)].mean()

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), width_ratios=[1.6, 1])
heatmap(ax1, cross, names, "'ct' prompts (rows) vs 'photo' prompts (columns)")
im = ax2.imshow(summary, cmap="magma")
ax2.set_xticks(range(4), template_keys)
ax2.set_yticks(range(4), template_keys)
for (i, j), v in np.ndenumerate(summary):
    ax2.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < summary.max() / 2 else "k")
ax2.set_title("same-class minus other-class similarity\\n(higher: classes stay apart across templates)")
plt.tight_layout()
plt.show()
print(f"ct vs photo: same class {np.diag(cross).mean():.3f}, different classes {cross[~np.eye(32, dtype=bool)].mean():.3f}")
"""),
        md("""
## 2.3 CLIP - the paper's encoder

`encoder="clip"` is open_clip's ViT-B/32 with OpenAI weights, as in the paper. The weights are downloaded once;
here the machine is **offline**, so the encoder raises `EncoderUnavailableError` - a project error whose message
says what to do (use `minilm`, a precomputed `table:`, `onehot`, or fetch the weights once). We catch it and carry
on. (Set `HF_HUB_OFFLINE=1` to make the offline check instantaneous instead of a 5-second network probe.)
"""),
        code("""
emb_clip, clip_error = None, None
t0 = time.perf_counter()
try:
    emb_clip = universal.encode_prompts(names, template="ct", encoder="clip")
    print("CLIP is available:", emb_clip.shape)
except EncoderUnavailableError as err:
    clip_error = err
    print(f"EncoderUnavailableError after {time.perf_counter() - t0:.1f} s:\\n")
    print(err)
"""),
        md("""
### The official CLIP table

The official release stores the 32 CLIP ViT-B/32 embeddings of *"A computerized tomography of a {class}"* inside
its checkpoints; `../shared/reference` has them as a `.npy`. A `table:` encoder serves such a precomputed table
(only for the template it was made with). Is its similarity structure like MiniLM's?
"""),
        code("""
table_path = REFERENCE_DIR / "clip_vitb32_official_prompt_embeddings.npy" if REFERENCE_DIR else None
emb_table = None
if table_path is not None and table_path.is_file():
    emb_table = universal.encode_prompts(names, template="ct", encoder=f"table:{table_path}")
    sim_table = prompts.prompt_similarity(emb_table)
    iu = np.triu_indices(len(names), 1)
    agreement = float(np.corrcoef(sim_table[iu], sim_minilm[iu])[0, 1])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), width_ratios=[1.4, 1])
    heatmap(ax1, sim_table, names, "official CLIP table: cosine similarity")
    ax2.scatter(sim_minilm[iu], sim_table[iu], s=6, alpha=0.5)
    ax2.set_xlabel("MiniLM similarity of a class pair")
    ax2.set_ylabel("CLIP similarity of the same pair")
    ax2.set_title(f"do the encoders agree? Pearson r = {agreement:.2f}")
    plt.tight_layout()
    plt.show()
    print(f"table {emb_table.shape}; CLIP off-diagonal mean {sim_table[iu].mean():.3f}; most similar pairs:")
    for a, b, s in closest_pairs(sim_table):
        print(f"  {a:24} {b:24} {s}")
else:
    agreement = None
    print("(../shared/reference not found: the official CLIP table is skipped)")
"""),
        md("""
### One-hot: the ablation baseline

`onehot` gives class k the unit vector e_k: every pair of classes is equally unrelated (similarity 0), so nothing
learnt for the liver can transfer to the liver tumour through the prompt. The template is ignored.
"""),
        code("""
emb_onehot = universal.encode_prompts(names, template="ct", encoder="onehot")
sim_onehot = prompts.prompt_similarity(emb_onehot)
print(emb_onehot.shape, "identity similarity:", np.array_equal(sim_onehot, np.eye(32, dtype=np.float32)))
"""),
        md("""
## 2.4 From an embedding to a segmentation head: the controller

We take the project's built-in model (`universal.load_pretrained("builtin")`: SegResNet, MiniLM prompts; its
weights are a small, weak model trained in minutes, which does not matter for looking at the mechanics) and run one
CT patch through it step by step:

* backbone → bottleneck features → `GAP` → global image feature `f` (256);
* backbone → decoder features → `precls_conv` → dense head input `F` (8 channels at full resolution);
* `controller_params(f)`: for each class, `controller([f, relu(text_to_vision(w_k))])` → 153 numbers;
* `split_controller_params` → the weights and biases of the three 1×1×1 convolutions;
* `dynamic_heads(F, θ)` → the logits of all classes at once.
"""),
        code("""
model = universal.load_pretrained("builtin").eval()
print(model.extra_repr())
print("classes:", model.class_names)
print("template:", repr(model.template), "| preprocessing:", model.preprocessing)

ph = universal.make_phantom(shape=(64, 64, 48), spacing=(3.0, 3.0, 3.0), seed=0)

prepared = preprocess(ph.volume, PreprocessConfig(spacing_mm=3.0, crop_foreground=False))
x = torch.from_numpy(prepared.array[None, None, :64, :64, :48].copy())  # (1, 1, 64, 64, 48), a multiple of 8
with torch.no_grad():
    bottleneck, decoded = model.backbone(x)
    f = model.GAP(bottleneck).flatten(1)  # (1, 256) global image feature
    F = model.precls_conv(decoded)  # (1, 8, 64, 64, 48) head input
    theta = model.controller_params(f)  # (1, K, 153): one head per class
    w1, w2, w3, b1, b2, b3 = split_controller_params(theta)
    logits_heads = dynamic_heads(F, theta)
    logits_forward = model(x)
print(f"f {tuple(f.shape)}, F {tuple(F.shape)}, theta {tuple(theta.shape)}")
print("head of one class: w1", tuple(w1.shape[2:]), "w2", tuple(w2.shape[2:]), "w3", tuple(w3.shape[2:]),
      "b1", tuple(b1.shape[2:]), "b2", tuple(b2.shape[2:]), "b3", tuple(b3.shape[2:]),
      "=", 8 * 8 + 8 * 8 + 8 + 8 + 8 + 1, "numbers")
same = torch.allclose(logits_heads, logits_forward, atol=1e-5)
print("dynamic_heads(F, θ) reproduces model(x):", same)
"""),
        md("""
The controller output is `θ_k = A·f + B·relu(text_to_vision(w_k)) + c`: the image part `A·f` is **shared** by all
classes of one image, so what makes the heads differ is the text part. Below: θ_k minus the mean head over classes
(the class-specific part), and how the similarity of two prompts relates to the similarity of their heads - for
the trained model and for the same architecture freshly initialised (a random linear map keeps similar prompts
similar; training moves heads apart where the anatomy needs it).
"""),
        code("""
th = theta[0].numpy()
specific = th - th.mean(axis=0)  # remove the part shared by all classes (image feature, bias)
torch.manual_seed(0)
fresh = universal.create_model("segresnet", classes=model.class_names, encoder="minilm").eval()
with torch.no_grad():
    th_fresh = fresh.controller_params(f)[0].numpy()

sim_e = prompts.prompt_similarity(model.organ_embedding.numpy())
iu = np.triu_indices(model.num_classes, 1)
sim_trained = prompts.prompt_similarity(specific)[iu]
sim_fresh = prompts.prompt_similarity(th_fresh - th_fresh.mean(axis=0))[iu]
r_params = float(np.corrcoef(sim_e[iu], sim_trained)[0, 1])
r_fresh = float(np.corrcoef(sim_e[iu], sim_fresh)[0, 1])

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), width_ratios=[2.2, 1])
lim = np.percentile(np.abs(specific), 99)
ax1.imshow(specific, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
for b in np.cumsum([64, 64, 8, 8, 8]):
    ax1.axvline(b - 0.5, color="k", lw=0.8)
ax1.set_yticks(range(model.num_classes), model.class_names, fontsize=7)
for t, n in zip(ax1.get_yticklabels(), model.class_names):
    t.set_color(rgb(n))
ax1.set_xlabel("w1 (64) | w2 (64) | w3 (8) | b1 (8) | b2 (8) | b3 (1)")
ax1.set_title("θ_k minus the mean head: the class-specific part of each head (trained model)")
ax2.scatter(sim_e[iu], sim_fresh, s=8, label=f"freshly initialised (r = {r_fresh:.2f})", alpha=0.7)
ax2.scatter(sim_e[iu], sim_trained, s=8, label=f"trained built-in (r = {r_params:.2f})", alpha=0.7)
ax2.set_xlabel("prompt similarity of a class pair")
ax2.set_ylabel("similarity of their class-specific head parts")
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()
"""),
        md("""
### The prompt is part of the model

Re-encoding the prompts with another template (`set_prompts`) changes every head without touching a single
trained weight. Models are trained with one template; a different one at inference is an *input shift*
(exercise 3 measures it on a CT).
"""),
        code("""
photo_model = copy.deepcopy(model).set_prompts(template="photo")
with torch.no_grad():
    theta_photo = photo_model.controller_params(f)
    logits_photo = photo_model(x)
change = (theta_photo - theta).norm(dim=-1) / theta.norm(dim=-1)
print("relative change of each class's 153 head parameters, 'ct' -> 'photo':")
print({n: round(float(c), 3) for n, c in zip(model.class_names, change[0])})
print(f"max |Δ logit| over the patch: {float((logits_photo - logits_forward).abs().max()):.3f}")
"""),
        md("""
## Exercises

1. Write your own template (e.g. `"Contrast-enhanced CT of the {}"`) and compute its `ct`-vs-yours diagonal
   similarity with MiniLM. Is it closer to `ct` than `photo` is?
2. Which class pairs are among the five most similar for **both** MiniLM and the official CLIP table? Which pair
   does CLIP find similar but MiniLM does not?
3. Segment the phantom with the built-in model under the `ct` and the `photo` template
   (`universal.segment(ph.volume, model=model, template="photo", fast=True)`) and compare the liver volumes.
"""),
        solution("""
1. `mine = universal.encode_prompts(names, template="Contrast-enhanced CT of the {}", encoder="minilm")`, then
   `np.diag(prompts.prompt_similarity(emb_by_template["ct"], mine)).mean()` and compare with
   `np.diag(cross).mean()`. Medical wording usually stays closer to `ct` than `photo` does.
2. `set(p[:2] for p in closest_pairs(sim_minilm, 5)) & set(p[:2] for p in closest_pairs(sim_table, 5))`;
   left/right pairs are typically shared. Sort `sim_table[iu] - sim_minilm[iu]` to find the pair CLIP rates
   relatively higher.
3. `a = universal.segment(ph.volume, model=model, fast=True)`, `b = universal.segment(ph.volume, model=model,
   template="photo", fast=True)`, then `a.volumes_ml["liver"], b.volumes_ml["liver"]`. The model was trained with
   `ct` prompts, so changing the template changes (usually degrades) the masks.
"""),
        md("## Checks"),
        code("""
assert emb_minilm.shape == (32, 384) and np.allclose(np.linalg.norm(emb_minilm, axis=1), 1.0, atol=1e-4)
assert np.array_equal(again, emb_minilm) and len(cache_files) >= 32  # the second call came from the disk cache
i_r, i_l = names.index("right kidney"), names.index("left kidney")
assert sim_minilm[i_r, i_l] > np.percentile(off_diag, 90)  # left/right pairs are among the closest
assert np.diag(cross).mean() > cross[~np.eye(32, dtype=bool)].mean()  # the class name dominates the template
assert (clip_error is not None and "minilm" in str(clip_error)) or (emb_clip is not None and emb_clip.shape[0] == 32)
assert emb_table is None or emb_table.shape == (32, 512)
assert np.array_equal(sim_onehot, np.eye(32, dtype=np.float32))
assert theta.shape == (1, model.num_classes, 153) and same
assert r_fresh > 0.3 and float(change.min()) > 0  # similar prompts -> similar heads at initialisation
print("CHECKS PASSED 02", {"clip": "available" if emb_clip is not None else "offline (error caught)",
                           "clip_minilm_agreement": None if agreement is None else round(agreement, 2),
                           "prompt_vs_head_r": {"fresh": round(r_fresh, 2), "trained": round(r_params, 2)}})
"""),
    ]


# ----------------------------------------------------------------------------------------------------------------
# 03 masked back-propagation
# ----------------------------------------------------------------------------------------------------------------
def nb03():
    return [
        md("""
# 3 · Masked back-propagation: learning 32 classes from partially labelled datasets

Notebook 1 showed that a dataset's label `0` means "none of *my* classes". Two ways to train one model on several
such datasets:

* **naive**: treat every voxel a dataset does not label as background - for *every* class. A liver dataset then
  teaches "there is no spleen here", although the spleen is in the image;
* **masked back-propagation** (the Universal Model's way): compute the loss only for the (case, class) pairs the
  case's dataset annotates. Every other pair contributes exactly zero gradient.

With one-vs-all logits `z`, targets `y` and an availability mask `a[b, k]` (does case b's dataset annotate
class k?), the loss of `universal.loss.masked_bce_dice` is

$$\\mathcal{L} = \\frac{1}{\\sum_{b,k} a_{bk}} \\sum_{b,k} a_{bk} \\big( \\mathrm{BCE}(z_{bk}, y_{bk}) + 1 - \\mathrm{Dice}(\\sigma(z_{bk}), y_{bk}) \\big)$$

We first look at the gradient of that loss, then run a small experiment: four synthetic "datasets" that each
annotate one organ, trained naively and with masking (`universal.train`), scored on held-out fully labelled scans.
In `QUICK` mode the whole notebook takes about two to three minutes on a 2-core CPU.
"""),
        code(
            """
QUICK = True  # CI-sized run: 300 training steps per model (False: 800 steps, about 2.5x longer)
WORK_DIR = None  # where the synthetic datasets and training runs are written; None = a temporary folder
SEED = 0  # training seed (the same for both models)
""",
            tags=["parameters"],
        ),
        code(
            """
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
"""
            + PLOT_SETUP
        ),
        md("""
## 3.1 The gradient of the masked loss

A batch of three cases from three real datasets: BTCV (many organs), MSD Liver (liver + tumour) and MSD Lung (lung
tumour). Their availability rows come straight from the taxonomy. Random logits and targets are enough to look at
the gradient: it is non-zero exactly where the availability is `True` - and the naive loss (everything
"available") sends gradient everywhere.
"""),
        code("""
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
for ax, (title, m) in zip(axes, [("availability (taxonomy)", available.float()),
                                 ("|gradient|, masked loss", grads["masked"]),
                                 ("|gradient|, naive loss", grads["naive"])]):
    ax.imshow(m, cmap="Greens" if "avail" in title else "magma", aspect="auto")
    ax.set_xticks(range(len(toy_classes)), toy_classes, rotation=35, ha="right")
    ax.set_yticks(range(3), toy_datasets)
    ax.set_title(title)
plt.tight_layout()
plt.show()
zero_where_unavailable = bool((grads["masked"][~available] == 0).all())
print("masked: gradient exactly zero for every pair the dataset does not annotate:", zero_where_unavailable)
"""),
        md("""
## 3.2 Four partially labelled datasets

`data.write_phantom_dataset` writes synthetic CTs (`universal.make_phantom`, a different random anatomy per case)
and label files in which each "dataset" keeps only its own classes - like the Medical Segmentation Decathlon,
where every task annotates one organ. The scans are small (8 mm voxels) so that training takes seconds per model
on a CPU. A second call writes held-out, **fully** labelled scans for scoring.
"""),
        code("""
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
"""),
        md("""
## 3.3 The naive manifest

The *only* difference between the two experiments is what the manifest says each dataset annotates. The naive
manifest claims that every dataset annotates every class, so the label `0` of the liver dataset becomes "no
spleen, no kidneys, no stomach". Same files, same model, same seed.
"""),
        code("""
spec = json.loads(Path(train_manifest).read_text())
for dataset_spec in spec["datasets"].values():
    dataset_spec["annotated"] = CLASSES  # "unlabelled = background" for every class
naive_manifest = WORK_DIR / "train" / "naive_manifest.json"
naive_manifest.write_text(json.dumps(spec, indent=2))

avail_masked = np.array([c.availability(CLASSES) for c in data.load_manifest(train_manifest).cases])
avail_naive = np.array([c.availability(CLASSES) for c in data.load_manifest(naive_manifest).cases])
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
for ax, (title, a) in zip(axes, [("masked: availability per case", avail_masked),
                                 ("naive: everything 'available'", avail_naive)]):
    ax.imshow(a, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=20)
    ax.set_yticks(range(len(manifest.cases)), [f"{c.name} ({c.dataset})" for c in manifest.cases], fontsize=7)
    ax.set_title(title)
plt.tight_layout()
plt.show()
labelled_share = pd.Series(avail_masked.mean(0), index=CLASSES)
print("share of training cases whose dataset annotates each class:", labelled_share.round(2).to_dict())
"""),
        md("""
## 3.4 Train both models

`universal.train.train(config)` runs the whole loop - cached preprocessed cases, patch sampling, the masked loss,
AdamW with warm-up and cosine decay, checkpoints and CSV logs - and validates on the held-out scans at the end
(DSC per class). A tiny SegResNet (~0.5 M parameters) and one-hot prompts keep it fast; whole 8 mm scans fit one
patch.
"""),
        code("""
STEPS = 300 if QUICK else 800
PATCH = [24, 24, 20]  # one patch holds a whole (cropped) scan


def config(manifest_path, out_dir):
    return {
        "model": {"backbone": "segresnet", "classes": CLASSES, "encoder": "onehot",
                  "kwargs": {"init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}},
        "data": {"train": str(manifest_path), "val": str(val_manifest), "spacing_mm": SPACING[0],
                 "patch_size": PATCH, "samples_per_case": 1, "pos_neg_ratio": [1, 0],
                 "augment": {"intensity_prob": 0.0}},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "min_lr_ratio": 0.1},
        "train": {"steps": STEPS, "batch_size": 4, "seed": SEED, "out_dir": str(out_dir), "ckpt_every": 0,
                  "resume": False, "progress": False, "tensorboard": False, "device": "cpu"},
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
"""),
        md("""
## 3.5 Which model segments the held-out scans?

The validation DSC per class, on three held-out phantoms where every class is labelled:
"""),
        code("""
dsc = pd.DataFrame({mode: run.validation[-1]["dsc"] for mode, run in runs.items()})
dsc.insert(0, "labelled share", labelled_share)
dsc["masked - naive"] = dsc["masked"] - dsc["naive"]
print(dsc.round(3))
print("mean DSC:", dsc[["masked", "naive"]].mean().round(3).to_dict())

fig, ax = plt.subplots(figsize=(8, 3.4))
xs = np.arange(len(CLASSES))
ax.bar(xs - 0.2, dsc["masked"], 0.4, color=[rgb(c) for c in CLASSES], edgecolor="k", label="masked")
ax.bar(xs + 0.2, dsc["naive"], 0.4, color=[rgb(c) for c in CLASSES], edgecolor="k", hatch="//", alpha=0.5,
       label="naive")
ax.set_xticks(xs, CLASSES)
ax.set_ylim(0, 1)
ax.set_ylabel("validation DSC")
ax.legend()
ax.set_title("held-out phantoms: masked (solid) vs naive (hatched)")
plt.show()
"""),
        md("""
Look inside: segment one held-out scan with both models (`universal.segment`, probabilities kept) and compare the
masks and the probability of one class. The naive model has learnt that the organs are *usually* labelled
background, so its probabilities are pushed down wherever the anatomy is.
"""),
        code("""
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    val_case = data.load_manifest(val_manifest).cases[0]
    volume, gt = val_case.load(CLASSES)
    gt = dict(zip(CLASSES, gt))
    segs = {mode: universal.segment(volume, model=run.model, return_probabilities=True, patch_size=PATCH,
                                    device="cpu")
            for mode, run in runs.items()}

mean_prob = pd.DataFrame({mode: {c: float(np.asarray(s.probabilities[c], np.float32)[gt[c]].mean()) for c in CLASSES}
                          for mode, s in segs.items()})
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
"""),
        md("""
**What happened.** In the naive run each class is positive in one case out of four and "background" in the
other three, in images that look the same. Early in training the background cases win: the BCE term pushes the
logits of every class down everywhere, the sigmoid saturates, and the Dice term of the few positive cases can no
longer pull them back - the classes are **suppressed** (often all the way to empty masks). The masked model never
hears "absent" from a dataset that did not look, so it learns every class from the one dataset that labels it.

The size of the effect depends on the seed and the schedule of this tiny experiment (try `SEED = 1, 2`): the
naive model sometimes keeps part of a class, but it stays behind the masked model on the classes other datasets
leave unlabelled. The paper's setting is the same problem at scale: 14 datasets, 32 classes, each class labelled
by a few of them.

## Exercises

1. Make the liver annotated by two datasets (e.g. add `"liver"` to `kidney_ds`) and re-run 3.2-3.5. What happens
   to the naive model's liver DSC, and why?
2. Train the naive model with `"loss": {"bce_weight": 0.0}` in its config (Dice only). Does it still suppress the
   classes? Explain with the gradient of the soft Dice of an empty target.
3. `train_log.csv` in each run folder has a `pairs` column. How many (case, class) pairs feed the masked loss per
   step on average, and how many the naive one?
"""),
        solution("""
1. The liver becomes positive in half of the naive training cases instead of a quarter; the conflict is weaker,
   so the naive model's liver usually recovers a good part of its DSC, while spleen and stomach (still one dataset
   each) stay suppressed. The harm grows with the share of cases that leave a class unlabelled.
2. For an empty target the soft Dice is `smooth / (Σp + smooth)`, whose gradient is ≈ 0 unless the prediction is
   already empty, so Dice alone hardly punishes "present" in the unlabelled cases: without BCE the naive model
   suppresses much less. The conflict is carried by the BCE term.
3. `pd.read_csv(WORK_DIR / "run_masked" / "train_log.csv")["pairs"].mean()`: about 1.25 classes per case × 4 cases
   = 5 for masked; always 4 × 5 = 20 for naive.
"""),
        md("## Checks"),
        code("""
assert zero_where_unavailable and bool((grads["naive"] > 0).all())
assert avail_naive.all() and not avail_masked.all() and (avail_masked.sum(1) >= 1).all()
assert all(run.step == STEPS for run in runs.values())
unlabelled_somewhere = [c for c in CLASSES if labelled_share[c] < 1.0]  # classes some dataset leaves unlabelled
masked_mean = float(dsc.loc[unlabelled_somewhere, "masked"].mean())
naive_mean = float(dsc.loc[unlabelled_somewhere, "naive"].mean())
assert masked_mean > 0.3, f"the masked model did not learn: mean DSC {masked_mean:.3f}"
assert masked_mean > naive_mean + 0.2, (masked_mean, naive_mean)
assert float(mean_prob["masked"].mean()) > float(mean_prob["naive"].mean())
print("CHECKS PASSED 03", {"masked_mean_dsc": round(masked_mean, 3), "naive_mean_dsc": round(naive_mean, 3),
                           "train_seconds": {k: round(v) for k, v in seconds.items()}})
"""),
    ]


# ----------------------------------------------------------------------------------------------------------------
# 04 pseudo-labels
# ----------------------------------------------------------------------------------------------------------------
def nb04():
    return [
        md("""
# 4 · Pseudo-labels: letting a teacher fill in what the datasets left out

Masked back-propagation (notebook 3) learns every class from the datasets that annotate it, but it throws away the
unannotated classes of every scan - and unlabelled scans entirely. The Universal Model's second ingredient fills
them in: a **teacher** model trained with the masked loss predicts the missing classes; confident predictions
become **pseudo-labels**, ground truth is kept wherever it exists, and a **student** is trained on the result.

`universal.pseudo.pseudo_label(manifest, model, out_dir)` does the whole round:

1. predict every case with `universal.segment` (probabilities kept);
2. keep the ground truth of every class the case annotates, **voxel for voxel**;
3. accept a predicted class when its mean probability inside the mask reaches `min_confidence`; a class that does
   not stays *unannotated* (the masked loss ignores it, rather than learning "absent");
4. write one label map per case, a new manifest (what is ground truth, what is pseudo) and a quality report with
   review flags.

Everything here runs on small synthetic scans in about two minutes on a CPU (`QUICK`).
"""),
        code(
            """
QUICK = True  # CI-sized run: short teacher and student training (False: about 3x longer, plus a real CT)
WORK_DIR = None  # where datasets, runs and pseudo-labels are written; None = a temporary folder
DATA_DIR = None  # real CTs (used when QUICK is False); None = $UNIVERSAL_SHARED_DATA or the nearest shared/data
STUDENT_FROM_SCRATCH = False  # False: the student starts from the teacher's weights (a cheaper second round)
""",
            tags=["parameters"],
        ),
        code(
            """
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import universal
from universal import data, pseudo, viz
from universal.train import train

warnings.filterwarnings("ignore", message=".*thick slices.*")  # 8 mm phantoms on purpose
WORK_DIR = Path(WORK_DIR) if WORK_DIR is not None else Path(tempfile.mkdtemp(prefix="universal-nb04-"))
WORK_DIR.mkdir(parents=True, exist_ok=True)
"""
            + FIND_DATA
            + PLOT_SETUP
        ),
        md("""
## 4.1 Partially labelled and unlabelled scans, and a teacher

A many-organ dataset (like BTCV), three single-organ datasets (like the Decathlon tasks) and two scans with no
labels at all. The teacher is a tiny SegResNet trained on the labelled cases with the masked loss
(`universal.train`, as in notebook 3).
"""),
        code("""
CLASSES = ["spleen", "right kidney", "left kidney", "liver", "stomach"]
LABEL_SETS = {
    "abdomen": CLASSES,
    "liver_ds": ["liver"],
    "kidney_ds": ["right kidney", "left kidney"],
    "spleen_ds": ["spleen"],
}
SHAPE, SPACING, PATCH = (24, 24, 18), (8.0, 8.0, 8.0), [24, 24, 20]
train_manifest = data.write_phantom_dataset(WORK_DIR / "data", 8, SHAPE, SPACING, LABEL_SETS, seed=0, unlabeled=2)
val_manifest = data.write_phantom_dataset(WORK_DIR / "val", 3, SHAPE, SPACING, {"all": None}, seed=1000)
manifest = data.load_manifest(train_manifest)
print(pd.DataFrame([{"case": c.name, "dataset": c.dataset, "annotated": ", ".join(c.annotated_classes()) or "-"}
                    for c in manifest.cases]).to_string(index=False))

TEACHER_STEPS = 250 if QUICK else 800
STUDENT_STEPS = (250 if STUDENT_FROM_SCRATCH else 120) if QUICK else 800


def config(manifest_path, out_dir, steps, init=None):
    return {
        "model": {"classes": CLASSES, "encoder": "onehot", "init": init,
                  "kwargs": {"init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}},
        "data": {"train": str(manifest_path), "val": str(val_manifest), "spacing_mm": SPACING[0],
                 "patch_size": PATCH, "samples_per_case": 1, "pos_neg_ratio": [1, 0],
                 "augment": {"intensity_prob": 0.0}},
        "optim": {"lr": 3e-3 if init is None else 3e-4, "warmup_steps": 5, "min_lr_ratio": 0.1},
        "train": {"steps": steps, "batch_size": 4, "seed": 0, "out_dir": str(out_dir), "ckpt_every": 0,
                  "resume": False, "progress": False, "tensorboard": False, "device": "cpu"},
    }


t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "2 unlabeled case(s) skipped": the teacher only sees labelled cases
    teacher_run = train(config(train_manifest, WORK_DIR / "teacher", TEACHER_STEPS))
teacher = teacher_run.model.eval()
teacher_dsc = teacher_run.validation[-1]["dsc"]
print(f"teacher: {TEACHER_STEPS} steps in {time.perf_counter() - t0:.0f} s; held-out DSC",
      {k: round(v, 2) for k, v in teacher_dsc.items()})
"""),
        md("""
## 4.2 The teacher's predictions and its confidence

On an unlabelled scan the teacher gives a probability per voxel and class. The mask is the probability
thresholded at 0.5; the **confidence** of a predicted class is the mean probability inside its mask. Thin,
uncertain borders show up as intermediate probabilities.
"""),
        code("""
unlabeled_case = next(c for c in manifest.cases if not c.labeled)
volume = universal.load_volume(unlabeled_case.image)
seg = universal.segment(volume, model=teacher, return_probabilities=True, patch_size=PATCH, device="cpu")
confidence = {c: float(np.asarray(seg.probabilities[c], np.float32)[seg.masks[c]].mean()) if seg.masks[c].any()
              else float("nan") for c in CLASSES}
print("confidence (mean probability inside the predicted mask):", {k: round(v, 3) for k, v in confidence.items()})

z = int(np.argmax(np.sum([m.sum(axis=(0, 1)) for m in seg.masks.values()], axis=0)))
fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
axes[0].imshow(viz.slice_overlay(volume.array, {}, "axial", z, spacing=volume.spacing).square(min_size=240))
axes[0].set_title(f"{unlabeled_case.name}: no labels")
axes[1].imshow(viz.slice_overlay(volume.array, seg.masks, "axial", z, spacing=volume.spacing).square(min_size=240))
axes[1].set_title("teacher's masks")
top = np.max([np.asarray(seg.probabilities[c], np.float32) for c in CLASSES], axis=0)
for ax, (title, img) in zip(axes[2:], [("max over classes of P(class)", top),
                                      ("P(liver)", np.asarray(seg.probabilities["liver"], np.float32))]):
    im = ax.imshow(viz.square_pixels(viz.orient_slice(img, "axial", z), 1.0, min_size=240), cmap="magma",
                   vmin=0, vmax=1)
    ax.set_title(title)
for ax in axes:
    ax.axis("off")
plt.colorbar(im, ax=axes[-1], shrink=0.8)
plt.tight_layout()
plt.show()
"""),
        md("""
## 4.3 Merging with ground truth

For a partially labelled case the teacher's masks meet real labels. `pseudo.merge_with_ground_truth` builds one
label map (universal ids, tumours over organs) in which the ground truth **always wins**: a pseudo organ never
paints over a ground-truth organ, a pseudo tumour is clipped to its ground-truth parent. It then decodes the label
map exactly as training will and checks that every ground-truth class comes back voxel for voxel.
"""),
        code("""
liver_case = next(c for c in manifest.cases if c.dataset == "liver_ds")
lvol, lmasks = liver_case.load(CLASSES)
gt = {c: m for c, m, a in zip(CLASSES, lmasks, liver_case.availability(CLASSES)) if a}
lseg = universal.segment(lvol, model=teacher, patch_size=PATCH, device="cpu")
proposed = {c: lseg.masks[c] for c in CLASSES if c not in gt}
label_map, decoded = pseudo.merge_with_ground_truth(gt, proposed, lvol.affine, CLASSES)
kept = {c: bool(np.array_equal(decoded[c], gt[c])) for c in gt}
changed = {c: int((lseg.masks[c] != gt[c]).sum()) for c in gt}
print("ground truth classes:", list(gt), "| kept voxel for voxel:", kept)
print("voxels where the teacher disagrees with that ground truth (overruled):", changed)

z = int(np.argmax(lmasks.any(0).sum(axis=(0, 1)) + gt["liver"].sum(axis=(0, 1))))
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
for ax, (title, masks) in zip(axes, [("ground truth (liver only)", gt), ("teacher", lseg.masks),
                                     ("merged: GT + pseudo", decoded)]):
    ax.imshow(viz.slice_overlay(lvol.array, masks, "axial", z, spacing=lvol.spacing).square(min_size=240))
    ax.set_title(title)
    ax.axis("off")
plt.tight_layout()
plt.show()
"""),
        md("""
## 4.4 A whole pseudo-labelling round and its quality report

`pseudo_label` does the above for every case of the manifest and writes a new manifest plus a quality report
(`quality_report.json` / `.csv`): per case and class the source (ground truth / pseudo / dropped), volume,
connected components, confidence, the teacher's agreement (DSC) with the ground truth where there is one, and flags
that send a case to human review (left/right implausible, fragmented organ, low confidence, disagreement).
"""),
        code("""
MIN_CONFIDENCE = 0.75
t0 = time.perf_counter()
pseudo_manifest, report = pseudo.pseudo_label(train_manifest, teacher, WORK_DIR / "pseudo",
                                              min_confidence=MIN_CONFIDENCE, patch_size=PATCH, device="cpu")
print(f"pseudo-labelled {len(report['cases'])} cases in {time.perf_counter() - t0:.1f} s -> {pseudo_manifest}")
quality = pd.read_csv(WORK_DIR / "pseudo" / "quality_report.csv")
print(quality.groupby("source").size().to_string())
quality.round(3).head(12)
"""),
        code("""
source_table = quality.pivot(index="case", columns="class", values="source")[CLASSES]
COLORS = {"ground truth": (0.2, 0.6, 0.3), "pseudo": (0.35, 0.55, 0.95), "dropped": (0.85, 0.3, 0.3)}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 3.8), width_ratios=[1.3, 1])
ax1.imshow([[COLORS[v] for v in row] for row in source_table.values], aspect="auto")
ax1.set_xticks(range(len(CLASSES)), CLASSES, rotation=20)
ax1.set_yticks(range(len(source_table)), [f"{c} ({manifest[c].dataset})" for c in source_table.index], fontsize=7)
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
"""),
        md("""
The new manifest is an ordinary training manifest: each case now annotates its ground-truth classes *and* its
accepted pseudo-labelled classes (listed under `"pseudo"`), so the masked loss uses far more (case, class) pairs:
"""),
        code("""
new_manifest = data.load_manifest(pseudo_manifest)
before = np.array([c.availability(CLASSES) for c in manifest.cases])
after = np.array([c.availability(CLASSES) for c in new_manifest.cases])
print(f"annotated (case, class) pairs: {int(before.sum())} before, {int(after.sum())} after "
      f"(of {before.size}); unlabelled cases now usable: {sum(not c.labeled for c in manifest.cases)}")
print(json.dumps(json.loads(Path(pseudo_manifest).read_text())["cases"][1], indent=1)[:600])
"""),
        md("""
## 4.5 The student

A second round of training on the pseudo-labelled manifest. To keep the notebook short the student starts from
the teacher's weights (`model.init`) and trains for a few more steps; set `STUDENT_FROM_SCRATCH = True` for the
paper's setting. Both are scored on the same held-out scans.
"""),
        code("""
t0 = time.perf_counter()
init = None if STUDENT_FROM_SCRATCH else str(teacher_run.checkpoint)
student_run = train(config(pseudo_manifest, WORK_DIR / "student", STUDENT_STEPS, init=init))
student_dsc = student_run.validation[-1]["dsc"]
print(f"student: {STUDENT_STEPS} steps in {time.perf_counter() - t0:.0f} s")
compare = pd.DataFrame({"teacher": teacher_dsc, "student": student_dsc})
compare.loc["mean"] = compare.mean()
print(compare.round(3))
"""),
        md("""
Do not expect the student to beat its teacher here. On this toy problem the teacher is already good, and every
pseudo-label is the teacher's own prediction: the student cannot learn anything the teacher did not know, and a
short second round mostly adds optimisation noise (when this notebook was written the student scored a few DSC
points *below* the teacher). The method pays off at scale: many unlabelled and partially labelled scans whose
missing classes a teacher trained on *other* datasets predicts well, and a long second round. The real work of a
pseudo-labelling round is quality control - review the flagged cases, raise `min_confidence`, leave doubtful
classes unannotated rather than wrong.
"""),
        code("""
if not QUICK and DATA_DIR is not None:
    # a real unlabelled CT, pseudo-labelled by the project's built-in model (its weights are a weak first version)
    real = {"cases": [{"name": "ts_abdomen_3mm_unlabeled", "image": str(DATA_DIR / "ts_abdomen_3mm_unlabeled" / "ct.nii.gz"),
                       "label": None, "dataset": "unlabeled"}], "datasets": {"unlabeled": {"labels": {}}}}
    real_path = WORK_DIR / "real.json"
    real_path.write_text(json.dumps(real))
    _, real_report = pseudo.pseudo_label(real_path, "builtin", WORK_DIR / "pseudo_real", fast=True)
    print(pd.DataFrame(real_report["cases"][0]["classes"]).T[["source", "volume_ml", "mean_confidence"]])
else:
    print("(QUICK: the real-CT example with the built-in teacher is skipped)")
"""),
        md("""
## Exercises

1. Re-run 4.4 with `MIN_CONFIDENCE = 0.95`. Which classes get dropped, and what does that do to the number of
   annotated pairs?
2. `PseudoLabelConfig(empty_as_negative=True)` (the default) turns an *empty* prediction into an annotated
   "absent". When is that right, and why is it dangerous with a weak teacher (think of notebook 3)?
3. Find a ground-truth class whose teacher DSC is lowest in the quality report. Is it flagged? Which setting of
   `PseudoLabelConfig` controls that flag?
"""),
        solution("""
1. `pseudo.pseudo_label(train_manifest, teacher, WORK_DIR / "pseudo95", min_confidence=0.95, patch_size=PATCH)`;
   classes whose mean probability stays below 0.95 become `dropped` and stay unannotated, so fewer pairs are
   available - less supervision, but none of it wrong.
2. Right when the teacher is reliable and the class really is absent (e.g. no tumour): the student learns true
   negatives. With a weak teacher that predicts nothing, every class becomes "annotated absent" - exactly the
   naive labels of notebook 3, and the student learns to suppress the classes.
3. `quality[quality.source == "ground truth"].sort_values("agreement_dsc").head(1)`; it is flagged
   "disagreement" when its DSC is below `review_min_dsc` (0.5 by default).
"""),
        md("## Checks"),
        code("""
old, new = data.load_manifest(train_manifest), data.load_manifest(pseudo_manifest)
assert new.names == old.names and len(quality) == len(old.cases) * len(CLASSES)
for o, n in zip(old.cases, new.cases):
    gt_names = [c for c in o.annotated_classes() if c in CLASSES]
    assert n.ground_truth_classes() == tuple(gt_names)
    assert set(n.pseudo) <= set(CLASSES) - set(gt_names)
    if gt_names:  # ground truth survives pseudo-labelling voxel for voxel
        vol = universal.load_volume(o.image)
        assert np.array_equal(data.case_targets(n, vol, gt_names), data.case_targets(o, vol, gt_names)), o.name
assert all(kept.values())
assert after.sum() > before.sum() and after[[not c.labeled for c in old.cases]].any()
assert set(quality.source) <= {"ground truth", "pseudo", "dropped"}
assert student_run.step == STUDENT_STEPS and all(np.isfinite(v) for v in student_dsc.values())
print("CHECKS PASSED 04", {"pairs_before": int(before.sum()), "pairs_after": int(after.sum()),
                           "teacher_mean_dsc": round(float(np.mean(list(teacher_dsc.values()))), 3),
                           "student_mean_dsc": round(float(np.mean(list(student_dsc.values()))), 3),
                           "flagged_cases": len(flagged)})
"""),
    ]


# ----------------------------------------------------------------------------------------------------------------
# 05 inference and evaluation
# ----------------------------------------------------------------------------------------------------------------
def nb05():
    return [
        md("""
# 5 · Inference and evaluation on a real CT

From a CT file to masks, volumes, metrics and timings:

1. `universal.segment(ct, fast=True)`: RAS+ reorientation → foreground crop → resampling (3 mm in `fast` mode,
   1.5 mm otherwise) → HU window → Gaussian-weighted sliding window → threshold → connected-component
   post-processing → masks back on the **original grid**;
2. slice overlays and a 3-D view (`universal.viz`);
3. volumes in mL;
4. DSC and NSD with the **FLARE 2023 rules** (`universal.metrics`, preset `flare23`);
5. efficiency: the timing breakdown `Segmentation.timings` returns, and memory.

**About the numbers.** The model is the project's built-in one (`universal/resources/builtin.pt`, see
`MODEL_CARD.md`): a small model trained in 8 GPU-minutes whose accuracy is far below the paper's. This notebook reports what
it gets, honestly, and asserts no accuracy. The reference labels of these scans are themselves TotalSegmentator
output, not manual annotations. Research software: not for clinical use.
"""),
        code(
            """
QUICK = True  # CI-sized run (one 3 mm scan; False adds a second inference to time a warm model)
DATA_DIR = None  # folder with the real CTs; None = $UNIVERSAL_SHARED_DATA or the nearest shared/data above
CASE = "ts_abdomen_3mm"  # or "ts_dicom_series" (a real 20-slice DICOM series, 512 x 512, held out from training)
SHOW_ITKWIDGETS = None  # None: only inside a Jupyter server session (and when itkwidgets is installed)
""",
            tags=["parameters"],
        ),
        code(
            """
import os
import resource
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import universal
from universal import data, metrics, taxonomy, viz
"""
            + FIND_DATA
            + PLOT_SETUP
        ),
        md("""
## 5.1 The CT and its reference labels

`load_volume` reads NIfTI, NRRD, MHA, DICOM folders or zips into a `Volume`: an `(X, Y, Z)` array in HU on a
RAS+ grid, with its affine and spacing. The reference (TotalSegmentator v2 ids) is read onto the same grid and
transferred to universal classes with the dataset's label map.
"""),
        code("""
SOURCES = {  # case -> (CT, reference label file), relative to DATA_DIR; both references use TotalSegmentator v2 ids
    "ts_abdomen_3mm": ("ts_abdomen_3mm/ct.nii.gz", "ts_abdomen_3mm/labels_totalseg.nii.gz"),
    "ts_dicom_series": ("ts_dicom_series/dicom", "ts_dicom_series/labels_totalseg.nii.gz"),
}
t_start = time.perf_counter()
if DATA_DIR is not None:
    image, label = SOURCES[CASE]
    case = data.manifest_from_dict(
        {"cases": [{"name": CASE, "image": image, "label": label, "dataset": "totalsegmentator_v2"}]}, root=DATA_DIR
    ).cases[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TotalSegmentator labels bones etc. that have no universal class
        volume, gt_array = case.load()
    annotated = list(case.annotated_classes())
    gt = {c.name: m for c, m in zip(taxonomy.CLASSES, gt_array) if c.name in annotated}
else:
    CASE = "phantom"
    ph = universal.make_phantom(shape=(128, 128, 96), spacing=(1.5, 1.5, 1.5), seed=0)
    volume, gt, annotated = ph.volume, dict(ph.masks), list(ph.masks)
present = [n for n in annotated if gt[n].any()]
print(f"{CASE}: shape {volume.shape}, spacing {tuple(round(s, 3) for s in volume.spacing)} mm, "
      f"HU range [{volume.array.min():.0f}, {volume.array.max():.0f}]")
print(f"reference annotates {len(annotated)} classes, {len(present)} present in this scan: {present}")
"""),
        md("""
## 5.2 Segment

`segment` with `model=None` uses the built-in model (loaded once per process and cached). `fast=True` works at
3 mm, the resolution the built-in model was trained at. The result's masks are on the input's own grid. We pass
the `Volume` loaded above, so the `load` stage is ~0 here; `universal.segment("ct.nii.gz")` times the reading too.
"""),
        code("""
seg = universal.segment(volume, fast=True)
print("model:", {k: seg.info[k] for k in ("model", "backbone", "encoder", "device") if k in seg.info})
print("classes:", seg.classes)
print("mask grid equals the CT grid:", all(m.shape == volume.shape for m in seg.masks.values()))
timings = viz.timings_frame(seg.timings)
timings.round(3)
"""),
        md("""
## 5.3 Slice overlays

`viz.slice_overlay` windows a slice, blends the masks in the taxonomy colours and orients it radiologically (the
patient's right on the image's left). Top: the built-in model; bottom: the reference. `viz.difference_map` shows
where they disagree.
"""),
        code("""
pred_any = np.any([m for m in seg.masks.values()], axis=0)
ref_any = np.any([gt[n] for n in present], axis=0) if present else np.zeros(volume.shape, bool)
centre = np.argwhere(ref_any | pred_any).mean(axis=0).round().astype(int) if (ref_any | pred_any).any() \\
    else np.array(volume.shape) // 2
views = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
fig, axes = plt.subplots(3, 3, figsize=(13, 11))
for col, (view, axis) in enumerate(views):
    idx = int(centre[axis])
    for row, (title, masks) in enumerate([("built-in model", seg.masks), ("reference", {n: gt[n] for n in present})]):
        im = viz.slice_overlay(volume.array, masks, view, idx, spacing=volume.spacing)
        axes[row, col].imshow(im.square())
        axes[row, col].set_title(f"{title}: {view} {idx}")
    diff = viz.difference_map(seg.masks, {n: gt[n] for n in present if n in seg.masks}, view, idx,
                              volume_array=volume.array, spacing=volume.spacing)
    axes[2, col].imshow(diff.square())
    axes[2, col].set_title("white both, orange model only, cyan reference only")
for ax in axes.ravel():
    ax.axis("off")
plt.tight_layout()
plt.show()
"""),
        md("""
## 5.4 A 3-D view

`viz.mesh_figure` turns masks into marching-cubes surfaces in world millimetres (capped in triangles so the figure
stays fluid) as a plotly figure. If the model finds nothing, the reference is shown instead, so the figure is never
empty. In a Jupyter session `itkwidgets` adds a full volume viewer; headless runs (CI) skip it.
"""),
        code("""
found = [n for n, m in seg.masks.items() if m.any()]
show, what = ({n: seg.masks[n] for n in found}, "built-in model") if found else ({n: gt[n] for n in present}, "reference")
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
"""),
        md("""
## 5.5 Volumes

`Segmentation.volumes_ml` and `mean_hu` are measured on the original grid. Next to them, the reference's volumes.
"""),
        code("""
voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
volumes = viz.results_frame(seg).set_index("class")
volumes["reference (mL)"] = [round(float(gt[n].sum()) * voxel_ml, 2) if n in gt else np.nan for n in volumes.index]
volumes
"""),
        md("""
## 5.6 DSC and NSD with the FLARE 2023 rules

`evaluate_case(pred, gt, spacing, preset="flare23")` scores the 13 FLARE organs and the `lesion` class with the
challenge's rules:

* **NSD** (normalised surface Dice) counts the surface within a class-specific tolerance (liver 5 mm, aorta 2 mm,
  ...), measured in mm with the reference's voxel spacing;
* both masks empty → DSC = NSD = 1; exactly one empty → 0;
* NSD is set to 0 where DSC < 0.1;
* aorta, IVC and oesophagus are cropped to the reference's z-range first;
* classes the reference does not annotate are "not annotated" (left out of the means, not counted as misses).

First the rules on toy masks, then the real case.
"""),
        code("""
cube = np.zeros((40, 40, 40), bool)
cube[10:30, 10:30, 10:30] = True  # a 20 mm cube on a 1 mm grid
shifted = np.roll(cube, 1, axis=0)  # one voxel (1 mm) off
empty = np.zeros_like(cube)
toy = metrics.evaluate_case(
    {"liver": shifted, "spleen": empty, "pancreas": empty, "stomach": cube},
    {"liver": cube, "spleen": empty, "pancreas": cube, "stomach": np.roll(cube, 19, axis=0)},
    (1.0, 1.0, 1.0), preset="flare23", classes=["liver", "spleen", "pancreas", "stomach"],
    annotated=["liver", "spleen", "pancreas", "stomach"],
)
print(toy.table(3))
print("liver: 1 mm shift, 5 mm tolerance -> NSD 1; spleen: both empty -> 1; pancreas: missed -> 0;")
print("stomach: overlap DSC < 0.1 -> NSD forced to 0")
"""),
        code("""
flare_names = list(taxonomy.flare23_classes().values())
scored = [n for n in flare_names if n in seg.masks]  # FLARE classes this model segments
result = universal.evaluate_case(seg.masks, gt, volume.spacing, preset="flare23", classes=scored,
                                 annotated=[n for n in scored if n in annotated], name=CASE)
print(result.table(3))
scores = result.to_frame()
"""),
        md("""
Read the table class by class: an organ outside the scan's field of view that the model also leaves empty scores
1 (both empty), so a mean can look better than the masks are.

For context, the same rules applied to two *different automatic* references of the same scan
(`labels_totalseg` vs `labels_totalseg_fast`, both TotalSegmentator): the level a good model reaches here.
"""),
        code("""
reference_agreement = None
fast_label = DATA_DIR / CASE / "labels_totalseg_fast.nii.gz" if DATA_DIR is not None else None
if fast_label is not None and fast_label.is_file():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = taxonomy.transfer_labels(universal.load_label(fast_label, like=volume), "totalsegmentator_v2",
                                         volume.affine, annotated)
    other = dict(zip(annotated, other))
    reference_agreement = universal.evaluate_case(other, gt, volume.spacing, preset="flare23", classes=scored,
                                                  annotated=[n for n in scored if n in annotated])
    both = pd.DataFrame({"built-in DSC": scores.dsc, "built-in NSD": scores.nsd,
                         "TS-fast vs TS DSC": reference_agreement.to_frame().dsc,
                         "TS-fast vs TS NSD": reference_agreement.to_frame().nsd})
    ax = both[["built-in DSC", "TS-fast vs TS DSC"]].plot.bar(figsize=(10, 3.2), color=["#1f77b4", "#bbbbbb"])
    ax.set_ylim(0, 1.05)
    ax.set_title("FLARE 2023 DSC per organ")
    plt.show()
    print(both.round(3))
else:
    print("(no second reference for this case)")
"""),
        md("""
## 5.7 Efficiency

FLARE 2023 measures the wall time of the whole run, model loading included, and the GPU memory (tolerances 15 s
and 4 GB per case). `Segmentation.timings` breaks the time down by stage; on a CPU the sliding-window inference
dominates.
"""),
        code("""
fig, ax = plt.subplots(figsize=(8, 2.6))
stages = timings[timings.stage != "total"]
ax.barh(stages.stage, stages.seconds, color="#4c72b0")
ax.invert_yaxis()
ax.set_xlabel("seconds")
ax.set_title(f"segment(fast=True) on {CASE}: {seg.timings['total']:.1f} s in total ({seg.info.get('device', 'cpu')})")
plt.show()

peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kB
efficiency = {"total s (first call, model load included)": round(seg.timings["total"], 2),
              "inference s": round(seg.timings["inference"], 2),
              "peak process memory GB (this kernel, CPU)": round(peak_rss_gb, 2)}
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
"""),
        md("""
## Exercises

1. Run the notebook with `CASE = "ts_dicom_series"` (a real DICOM series the built-in model never saw in
   training). Its 20 slices cover only part of the abdomen: which FLARE organs are absent from its reference, and
   what does the rule "both masks empty → DSC = NSD = 1" do to the mean scores of a model that finds little?
2. Segment with `fast=False` (1.5 mm). How much slower is it, and do the masks change? (The built-in model was
   trained at 3 mm.)
3. In the toy example, move the stomach reference so that it overlaps the prediction a little more (e.g.
   `np.roll(cube, 18, axis=0)`). At which shift does the NSD stop being forced to 0?
"""),
        solution("""
1. `[n for n in scored if not gt[n].any()]`: e.g. the kidneys, the gallbladder and the duodenum are outside its
   field of view. Every class that both the model and the reference leave empty scores 1, so the mean rises
   although nothing was found (a mean DSC of about 0.4 for an almost empty prediction when this was written).
   Read the per-class table, and say which classes are present in the reference.
2. `universal.segment(volume, fast=False)`: about 8× more voxels to infer. A model trained at 3 mm sees
   unfamiliar voxel sizes at 1.5 mm, so the masks change (usually for the worse).
3. With shift `s` the overlap is `20 - s` slices of 20, DSC = (20 - s)/20: shift 19 gives 0.05 (NSD forced to 0),
   shift 18 gives exactly 0.1, which is not < 0.1, so from there on the NSD is computed.
"""),
        md("## Checks"),
        code("""
assert set(seg.masks) == set(seg.classes) and all(m.shape == volume.shape and m.dtype == bool for m in seg.masks.values())
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
print("CHECKS PASSED 05", {"case": CASE, "segment_total_s": round(seg.timings["total"], 1),
                           "mean_dsc": round(result.mean()["dsc"], 3), "mean_nsd": round(result.mean()["nsd"], 3)})
"""),
    ]


NOTEBOOKS = {
    "01_taxonomy_and_partial_labels.ipynb": nb01,
    "02_prompts_and_text_embeddings.ipynb": nb02,
    "03_masked_backprop.ipynb": nb03,
    "04_pseudo_labels.ipynb": nb04,
    "05_inference_and_evaluation.ipynb": nb05,
}


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    written = []
    for name, make in NOTEBOOKS.items():
        if argv and not any(name.startswith(a) for a in argv):
            continue
        nbformat.write(build(make()), OUT / name)
        written.append(OUT / name)
        print("wrote", (OUT / name).relative_to(ROOT))
    ruff = Path(sys.executable).with_name("ruff")
    if written and ruff.exists():  # format the code cells like the package (line length 110) and lint them
        subprocess.run([str(ruff), "format", "--quiet", *map(str, written)], check=True)
        subprocess.run([str(ruff), "check", "--quiet", *map(str, written)], check=False)


if __name__ == "__main__":
    main(sys.argv[1:])
