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
# # 2 · Prompts, text embeddings and the text-driven controller
#
# The Universal Model does not have one output channel per class. It has **one tiny segmentation head per class
# whose weights are computed from a text prompt**. Because related classes get related sentences, a text encoder
# can put them close together - the paper's argument for CLIP embeddings over one-hot labels.
#
# **What you will learn**
#
# 1. how a template turns a class into a prompt, and what a text encoder makes of it (MiniLM live, CLIP when its
#    weights are available, the official CLIP table, one-hot);
# 2. how to compare embeddings by cosine similarity - between classes and between templates;
# 3. how the controller turns an embedding and the image into the 153 parameters of a class's head, step by step
#    through a real model, and how to evaluate that head by hand;
# 4. that the prompt is part of the model: another template changes every head.
#
# ## The step in equations
#
# A template turns class $c_k$ into a sentence $t_k$ (*"A computerized tomography of a Liver Tumor"*), and the text
# encoder turns the sentence into an embedding $w_k = \mathrm{TextEncoder}(t_k) \in \mathbb{R}^{D}$ ($D = 512$ for
# CLIP ViT-B/32, 384 for MiniLM). Embeddings are compared by their **cosine similarity**
#
# $$\cos(w_i, w_j) = \frac{w_i^\top w_j}{\lVert w_i \rVert\, \lVert w_j \rVert}.$$
#
# For a CT patch $x$ the vision branch gives dense features $F \in \mathbb{R}^{8 \times X \times Y \times Z}$ (full
# resolution) and a global image feature $f = \mathrm{GAP}(\text{bottleneck}(x)) \in \mathbb{R}^{256}$. The
# **text-driven controller** maps the class embedding and the image feature to the parameters of class $k$'s head,
#
# $$\theta_k = \mathrm{controller}\big([\, w_k \,;\, f \,]\big) = (\theta_k^1, \theta_k^2, \theta_k^3),$$
#
# and the head is three 1×1×1 convolutions (8→8, 8→8, 8→1, with biases: $72 + 72 + 9 = 153$ numbers) followed by a
# sigmoid, one-vs-all:
#
# $$P_k = \sigma\Big(\mathrm{conv}_3\big(\mathrm{ReLU}(\mathrm{conv}_2(\mathrm{ReLU}(\mathrm{conv}_1(F;\,
#   \theta_k^1));\, \theta_k^2));\, \theta_k^3\big)\Big).$$
#
# In the official code, and here, the embedding first goes through a linear layer and a ReLU to 256-d, and the image
# feature comes first: $\theta_k = \mathrm{controller}([\, f \,;\, \mathrm{ReLU}(\mathrm{text\_to\_vision}(w_k))
# \,])$, where the controller is a linear map 512 → 153 (the order only matters for loading the official weights).
#
# The paper, its FLARE 2023 version and a table of how this toolkit's defaults differ from them are in notebook 1
# and in `notebooks/README.md`: J. Liu, Y. Zhang, J.-N. Chen, J. Xiao, Y. Lu, B. A. Landman, Y. Yuan, A. Yuille,
# Y. Tang, Z. Zhou, *CLIP-Driven Universal Model for Organ Segmentation and Tumor Detection*, ICCV 2023. Below,
# section 2.4 reads this toolkit's column of that table from the built-in model itself.
#
# Runs top to bottom on a laptop CPU in well under a minute. Exercises at the end: write `answer_N`, run the check
# cell; the folded solution cells fill in the answers when `RUN_SOLUTIONS = True`.

# %% tags=["parameters"]
QUICK = True  # CI-sized run (this notebook is small either way)
DATA_DIR = None  # folder with the real CTs; None = $UNIVERSAL_DATA_DIR or the nearest shared/data above
RUN_SOLUTIONS = False  # True: the solution cells fill in the answers of the exercises

# %%
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import universal
from universal import prompts, taxonomy, viz
from universal.data import find_sample_data
from universal.errors import EncoderUnavailableError, InputError
from universal.model import dynamic_heads, split_controller_params
from universal.preprocess import PreprocessConfig, preprocess  # the preprocessing segment() uses

# where the real CTs are: the DATA_DIR parameter, else $UNIVERSAL_DATA_DIR, else the first shared/data found
# walking up from this notebook's folder (the repository keeps them in ../shared/data beside the project)
DATA_DIR = find_sample_data(DATA_DIR)
print(
    f"universal {universal.__version__} | real CTs: {DATA_DIR or 'not found - using the synthetic phantom'}"
)

plt.rcParams.update({"figure.dpi": 80, "axes.titlesize": 10, "font.size": 9})
rgb = viz.class_rgb  # the taxonomy colour of a class as a matplotlib RGB tuple (0-1)


def heatmap(
    ax, m, labels, title, col_labels=None, vmin=None, vmax=1.0, cmap="viridis", cbar="cosine similarity"
):
    """Draw a matrix with a colour bar; class names are written on their class colour, in black or white.

    ``col_labels``: the column classes (None: the same as the rows; an empty list: no column labels).
    """
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
    cols = list(labels if col_labels is None else col_labels)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    if cols:
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    for tick, n in [*zip(ax.get_yticklabels(), labels), *zip(ax.get_xticklabels() if cols else [], cols)]:
        color = rgb(n)
        light = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 0.55
        tick.set_color("black" if light else "white")
        tick.set_bbox({"facecolor": color, "edgecolor": "none", "pad": 0.6})
    ax.set_title(title)
    plt.colorbar(im, ax=ax, shrink=0.8, label=cbar)
    return im


REFERENCE_DIR = DATA_DIR.parent / "reference" if DATA_DIR is not None else None
print("embedding cache:", prompts.default_cache_dir())

# %% [markdown]
# ## 2.1 Templates
#
# `prompts.TEMPLATES` holds the paper's three templates (the paper uses `ct`) and the bare class name.
# `format_prompt` fills in the class's correctly spelled `prompt_name`. Your own template is any text with `{}`
# where the class name goes; a text without `{}` (or a misspelt key) is refused with an `InputError` that says so.

# %%
for key, template in prompts.TEMPLATES.items():
    print(f"{key:9} {template!r:48} -> {prompts.format_prompt(template, 'IVC')!r}")
print()
print(prompts.format_prompt("Contrast-enhanced abdominal CT showing the {}", "IVC"))
try:
    prompts.resolve_template("Contrast-enhanced abdominal CT showing")
except InputError as err:
    print("InputError:", err)

# %% [markdown]
# ## 2.2 MiniLM, live
#
# `encode_prompts(classes, template, encoder)` returns a `(K, D)` float32 array, one row $w_k$ per class. MiniLM
# (all-MiniLM-L6-v2, 384-d, shipped inside a pip package) runs offline. Rows are cached on disk, one `.npy` per
# (encoder, template, class), so a second call - in this kernel or in a later run - runs no text model at all.

# %%
names = taxonomy.class_names()
rows_before = len(list(prompts.default_cache_dir().rglob("*.npy")))
t0 = time.perf_counter()
emb_minilm = universal.encode_prompts(names, template="ct", encoder="minilm")
t_first = time.perf_counter() - t0
t0 = time.perf_counter()
again = universal.encode_prompts(names, template="ct", encoder="minilm")
t_cached = time.perf_counter() - t0
cache_files = sorted(
    prompts.default_cache_dir().rglob("*.npy")
)  # one small .npy per (encoder, template, class)
computed = len(cache_files) - rows_before
print(
    f"shape {emb_minilm.shape}, dtype {emb_minilm.dtype}; row norms {np.linalg.norm(emb_minilm, axis=1).round(3)[:4]}..."
)
if computed:
    print(
        f"first call {t_first:.2f} s: MiniLM loaded and {computed} rows computed, then written to the disk cache"
    )
else:
    print(
        f"first call {t_first * 1000:.1f} ms: every row was already in the disk cache (an earlier run wrote it)"
    )
print(f"second call {t_cached * 1000:.1f} ms, from the cache; {len(cache_files)} cached rows in all")

# %% [markdown]
# ### Similarity between classes
#
# `prompts.prompt_similarity` gives the cosine similarity of every pair of rows. Sentences that differ in one word
# are close for any sentence encoder, so the scale is compressed: what matters is the *structure* - left/right
# pairs, tumours and their organs, the vessels.

# %%
sim_minilm = prompts.prompt_similarity(emb_minilm)
fig, ax = plt.subplots(figsize=(9, 7.5))
heatmap(ax, sim_minilm, names, "MiniLM: cosine similarity of the 32 'ct' prompts")
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

# %% [markdown]
# The same matrix as an interactive plotly figure (`viz.similarity_heatmap`, also used by the dashboard): hover to
# read the pairs. Plotly figures need JavaScript - GitHub and other static viewers show nothing for them, which is
# why the static matplotlib figure of the same matrix comes right above.

# %%
fig = viz.similarity_heatmap(sim_minilm, names, title="MiniLM, template 'ct'", height=560)
fig.show()

# %% [markdown]
# ### Similarity between templates
#
# Does the template matter? Encode all classes with each template and compare *across* templates: entry (i, j) of
# `prompt_similarity(E_ct, E_photo)` compares class i written one way with class j written the other way. A strong
# diagonal means the class name, not the template, dominates the embedding. The right panel summarises each pair of
# templates by *same-class minus other-class* similarity: the mean of the diagonal minus the mean off the diagonal.

# %%
template_keys = ["ct", "photo", "there_is", "name"]
emb_by_template = {k: universal.encode_prompts(names, template=k, encoder="minilm") for k in template_keys}
cross = prompts.prompt_similarity(emb_by_template["ct"], emb_by_template["photo"])

summary = np.zeros((len(template_keys), len(template_keys)))
for i, a in enumerate(template_keys):
    for j, b in enumerate(template_keys):
        s = prompts.prompt_similarity(emb_by_template[a], emb_by_template[b])
        summary[i, j] = np.diag(s).mean() - s[~np.eye(len(names), dtype=bool)].mean()

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6), width_ratios=[1.6, 1])
heatmap(ax1, cross, names, "'ct' prompts (rows) vs 'photo' prompts (columns)")
im = ax2.imshow(summary, cmap="magma")
ax2.set_xticks(range(4), template_keys)
ax2.set_yticks(range(4), template_keys)
for (i, j), v in np.ndenumerate(summary):
    r, g, b, _ = im.cmap(im.norm(v))  # write on the square's own colour: black on light, white on dark
    ax2.text(
        j,
        i,
        f"{v:.2f}",
        ha="center",
        va="center",
        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white",
    )
plt.colorbar(im, ax=ax2, shrink=0.8, label="same-class minus other-class similarity")
ax2.set_title("how well classes stay apart across two templates\n(higher: the class name dominates)")
plt.tight_layout()
plt.show()
print(
    f"ct vs photo: same class {np.diag(cross).mean():.3f}, different classes {cross[~np.eye(32, dtype=bool)].mean():.3f}"
)

# %% [markdown]
# ## 2.3 CLIP - the paper's encoder
#
# `encoder="clip"` is open_clip's ViT-B/32 with OpenAI weights, as in the paper. The weights are downloaded once;
# on a machine that is **offline** and has never fetched them, the encoder raises `EncoderUnavailableError` - a
# project error whose message says what to do (use `minilm`, a precomputed `table:`, `onehot`, or fetch the weights
# once). We catch it and carry on. (Set `HF_HUB_OFFLINE=1` to make the offline check instantaneous instead of a
# network probe of a few seconds.)

# %%
emb_clip, clip_error = None, None
t0 = time.perf_counter()
try:
    emb_clip = universal.encode_prompts(names, template="ct", encoder="clip")
    print("CLIP is available:", emb_clip.shape)
except EncoderUnavailableError as err:
    clip_error = err
    print(f"EncoderUnavailableError after {time.perf_counter() - t0:.1f} s:\n")
    print(err)

# %% [markdown]
# ### The official CLIP table
#
# The official release stores the 32 CLIP ViT-B/32 embeddings of *"A computerized tomography of a {class}"* inside
# its checkpoints; `../shared/reference` has them as a `.npy`. A `table:` encoder serves such a precomputed table
# (only for the template it was made with). Is its similarity structure like MiniLM's?

# %%
table_path = REFERENCE_DIR / "clip_vitb32_official_prompt_embeddings.npy" if REFERENCE_DIR else None
emb_table = None
if table_path is not None and table_path.is_file():
    emb_table = universal.encode_prompts(names, template="ct", encoder=f"table:{table_path}")
    sim_table = prompts.prompt_similarity(emb_table)
    iu = np.triu_indices(len(names), 1)
    agreement = float(np.corrcoef(sim_table[iu], sim_minilm[iu])[0, 1])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6), width_ratios=[1.5, 1])
    heatmap(ax1, sim_table, names, "official CLIP table: cosine similarity", vmin=float(sim_table.min()))
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

# %% [markdown]
# ### One-hot: the ablation baseline
#
# `onehot` gives class k the unit vector e_k: every pair of classes is equally unrelated (similarity 0), so nothing
# learnt for the liver can transfer to the liver tumour through the prompt. The template is ignored.

# %%
emb_onehot = universal.encode_prompts(names, template="ct", encoder="onehot")
sim_onehot = prompts.prompt_similarity(emb_onehot)
print(emb_onehot.shape, "identity similarity:", np.array_equal(sim_onehot, np.eye(32, dtype=np.float32)))

# %% [markdown]
# ## 2.4 From an embedding to a segmentation head: the controller
#
# We take the project's built-in model (`universal.load_pretrained("builtin")`; its weights are a small, weak model
# trained in minutes, which does not matter for looking at the mechanics). First, how it differs from the paper -
# this toolkit's column is read from the model's own spec, not typed:

# %%
model = universal.load_pretrained("builtin").eval()
spec = model.spec
n_parameters = sum(p.numel() for p in model.parameters())
paper_vs_toolkit = pd.DataFrame(
    {
        "paper (ICCV 2023, official release)": {
            "backbone": "Swin UNETR (62.6 M) or U-Net (19.4 M)",
            "text encoder": "CLIP ViT-B/32, 512-d",
            "template": "A computerized tomography of a {}",
            "voxel spacing (mm)": "1.5 isotropic",
            "HU window": "[-175, 250]",
            "sliding window, overlap": "96×96×96, 0.5",
            "classes": "32 (25 organs, 6 tumours, kidney cyst)",
        },
        "this model (model.spec)": {
            "backbone": f"{spec.backbone} ({n_parameters / 1e6:.1f} M)",
            "text encoder": f"{spec.encoder}, {spec.embed_dim}-d",
            "template": spec.template,
            "voxel spacing (mm)": " × ".join(f"{s:g}" for s in spec.preprocessing.spacing_mm),
            "HU window": str(list(spec.preprocessing.hu_window)),
            "sliding window, overlap": "×".join(map(str, spec.inference.patch_size))
            + f", {spec.inference.overlap:g}",
            "classes": f"{len(spec.classes)} of the 32",
        },
    }
)
paper_vs_toolkit

# %% [markdown]
# Now one CT patch through the model, step by step - the equations of the introduction, in code:
#
# * backbone → bottleneck features → `GAP` → global image feature `f` (256);
# * backbone → decoder features → `precls_conv` → dense head input `F` (8 channels at full resolution);
# * `controller_params(f)`: for each class, `controller([f, relu(text_to_vision(w_k))])` → θ_k, 153 numbers;
# * `split_controller_params` → the weights and biases of the three 1×1×1 convolutions (θ_k¹, θ_k², θ_k³);
# * `dynamic_heads(F, θ)` → the logits of all classes at once (the sigmoid comes outside the model).

# %%
print(model.extra_repr())
print("classes:", model.class_names)

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
shapes = {
    n: tuple(t.shape[2:]) for n, t in zip(["w1", "w2", "w3", "b1", "b2", "b3"], [w1, w2, w3, b1, b2, b3])
}
print("head of one class:", shapes, "=", sum(int(np.prod(s)) for s in shapes.values()), "numbers")
same = torch.allclose(logits_heads, logits_forward, atol=1e-5)
print("dynamic_heads(F, θ) reproduces model(x):", same)

# %% [markdown]
# Because the controller is linear, $\theta_k = A f + B\,\mathrm{ReLU}(\mathrm{text\_to\_vision}(w_k)) + c$: the
# image part $A f$ is **shared** by all classes of one image, so what makes the heads differ is the text part.
# Below: $\theta_k$ minus the mean head over classes (the class-specific part), and how the similarity of two
# prompts relates to the similarity of their heads - for the trained model and for the same architecture freshly
# initialised (a random linear map keeps similar prompts similar; training moves heads apart where the anatomy
# needs it).

# %%
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

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5), width_ratios=[2.4, 1])
lim = float(np.percentile(np.abs(specific), 99))
heatmap(
    ax1,
    specific,
    model.class_names,
    "θ_k minus the mean head: the class-specific part of each head (trained model)",
    col_labels=[],
    vmin=-lim,
    vmax=lim,
    cmap="coolwarm",
    cbar="parameter value (colours clipped at the 99th percentile)",
)
for b in np.cumsum([64, 64, 8, 8, 8]):
    ax1.axvline(b - 0.5, color="k", lw=0.8)
ax1.set_xticks(
    [32, 96, 132, 140, 148, 152.5], ["w1 (64)", "w2 (64)", "w3 (8)", "b1 (8)", "b2 (8)", "b3"], fontsize=7
)
ax2.scatter(sim_e[iu], sim_fresh, s=8, label=f"freshly initialised (r = {r_fresh:.2f})", alpha=0.7)
ax2.scatter(sim_e[iu], sim_trained, s=8, label=f"trained built-in (r = {r_params:.2f})", alpha=0.7)
ax2.set_xlabel("prompt similarity of a class pair")
ax2.set_ylabel("similarity of their class-specific head parts")
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### The prompt is part of the model
#
# Re-encoding the prompts with another template (`set_prompts`) changes every head without touching a single
# trained weight. Models are trained with one template; a different one at inference is an *input shift*.

# %%
photo_model = copy.deepcopy(model).set_prompts(template="photo")
with torch.no_grad():
    theta_photo = photo_model.controller_params(f)
    logits_photo = photo_model(x)
change = (theta_photo - theta).norm(dim=-1) / theta.norm(dim=-1)
print("relative change of each class's 153 head parameters, 'ct' -> 'photo':")
print({n: round(float(c), 3) for n, c in zip(model.class_names, change[0])})
print(f"max |Δ logit| over the patch: {float((logits_photo - logits_forward).abs().max()):.3f}")

# %% [markdown]
# ## Exercises
#
# Write each answer into its `answer_N = ...` cell and run the check cell below it. The solution cells (folded)
# fill in the answers only when `RUN_SOLUTIONS = True`.
#
# **Exercise 1.** Which of these templates gives MiniLM embeddings closest to the `ct` template - measured as the
# mean same-class similarity `np.diag(prompts.prompt_similarity(E_ct, E_t)).mean()`? Set `answer_1` to the key or
# the text of the winner. Does medical wording ("Contrast-enhanced CT of the {}") beat a sentence that only shares
# its words with `ct`?

# %%
candidate_templates = ["photo", "there_is", "name", "Contrast-enhanced CT of the {}"]

# %% tags=["exercise"]
answer_1 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    closeness = {
        t: float(
            np.diag(
                prompts.prompt_similarity(
                    emb_by_template["ct"], universal.encode_prompts(names, template=t, encoder="minilm")
                )
            ).mean()
        )
        for t in candidate_templates
    }
    print({t: round(v, 3) for t, v in closeness.items()})
    answer_1 = max(closeness, key=closeness.get)

# %% tags=["check"]
if answer_1 is None:
    print("exercise 1: not answered yet")
else:
    scores = {
        prompts.resolve_template(t): float(
            np.diag(
                prompts.prompt_similarity(
                    emb_by_template["ct"], universal.encode_prompts(names, template=t, encoder="minilm")
                )
            ).mean()
        )
        for t in candidate_templates
    }
    best = max(scores, key=scores.get)
    given = prompts.resolve_template(answer_1)
    assert given == best, (
        f"{given!r} scores {scores.get(given, float('nan')):.3f} against 'ct', but {best!r} scores "
        f"{scores[best]:.3f}: pick the highest mean same-class similarity among candidate_templates"
    )
    print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** The paper argues that text embeddings capture anatomy: a tumour's prompt should be close to its
# organ's. For each encoder, which of the 7 tumour classes (`kind == "tumor"`, the kidney cyst included) have one of
# their **parent organs** (`resolve_class(c).parent`) as their most similar other class? Set `answer_2` to a dict
# `{"minilm": set of tumour classes, "clip table": set of tumour classes}` (leave out `"clip table"` if the table
# was not found).

# %%
encoders_to_compare = {"minilm": emb_minilm, "clip table": emb_table}
tumour_classes = [c.name for c in taxonomy.CLASSES if c.kind == "tumor"]

# %% tags=["exercise"]
answer_2 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    answer_2 = {}
    for enc, emb in encoders_to_compare.items():
        if emb is None:
            continue
        sim = prompts.prompt_similarity(emb)
        np.fill_diagonal(sim, -np.inf)  # a class is not its own neighbour
        nearest = {c: names[int(np.argmax(sim[names.index(c)]))] for c in tumour_classes}
        print(enc, nearest)
        answer_2[enc] = {c for c, n in nearest.items() if n in universal.resolve_class(c).parent}

# %% tags=["check"]
if answer_2 is None:
    print("exercise 2: not answered yet")
else:
    for enc, emb in encoders_to_compare.items():
        if emb is None:
            continue
        sim = prompts.prompt_similarity(emb) - 2 * np.eye(
            len(names)
        )  # push each class's self-similarity away
        expected = {
            c
            for c in tumour_classes
            if names[int(np.argmax(sim[names.index(c)]))] in universal.resolve_class(c).parent
        }
        assert enc in answer_2, f"answer_2 has no entry for {enc!r}"
        given = {universal.resolve_class(c).name for c in answer_2[enc]}
        assert given == expected, (
            f"{enc}: missing {sorted(expected - given)}, wrongly included {sorted(given - expected)} - exclude each "
            "class itself, then compare its most similar class with resolve_class(c).parent"
        )
    print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** Evaluate the **liver** head by hand: apply the three 1×1×1 convolutions of the head equation to
# the head input `F` with the liver's weights and biases from `w1, w2, w3, b1, b2, b3` (row = output channel; a
# 1×1×1 convolution is a matrix product over channels, e.g. `torch.einsum("oc,cxyz->oxyz", W, F[0])`). Set
# `answer_3` to the liver's logit map, a tensor of shape `(64, 64, 48)`. Then `torch.sigmoid(answer_3)` is $P_k$.

# %% tags=["exercise"]
answer_3 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    k = model.class_names.index("liver")
    with torch.no_grad():
        h = torch.relu(torch.einsum("oc,cxyz->oxyz", w1[0, k], F[0]) + b1[0, k][:, None, None, None])
        h = torch.relu(torch.einsum("oc,cxyz->oxyz", w2[0, k], h) + b2[0, k][:, None, None, None])
        answer_3 = (torch.einsum("oc,cxyz->oxyz", w3[0, k], h) + b3[0, k][:, None, None, None])[0]

# %% tags=["check"]
if answer_3 is None:
    print("exercise 3: not answered yet")
else:
    reference = logits_forward[0, model.class_names.index("liver")]
    got = torch.as_tensor(answer_3).squeeze()
    assert tuple(got.shape) == tuple(reference.shape), (
        f"shape {tuple(got.shape)}, expected {tuple(reference.shape)}"
    )
    err = float((got - reference).abs().max())
    assert err < 1e-4, (
        f"your logits differ from model(x) by up to {err:.3g}: conv1 -> ReLU -> conv2 -> ReLU -> conv3, each with "
        "its bias, and no sigmoid (the model returns logits)"
    )
    print("exercise 3: correct")

# %% [markdown]
# **Exercise 4.** When the template changes from `ct` to `photo`, which class's head changes the most (the largest
# relative change of its 153 parameters, `change` above)? Set `answer_4` to its name.

# %% tags=["exercise"]
answer_4 = None  # your answer here

# %% jupyter={"source_hidden": true} tags=["solution"]
if RUN_SOLUTIONS:
    answer_4 = model.class_names[int(change[0].argmax())]

# %% tags=["check"]
if answer_4 is None:
    print("exercise 4: not answered yet")
else:
    relative = ((theta_photo - theta).norm(dim=-1) / theta.norm(dim=-1))[0]
    most = model.class_names[int(relative.argmax())]
    given = universal.resolve_class(answer_4).name
    assert given == most, (
        f"{given!r} changes by {float(relative[model.class_names.index(given)]):.3f}, but {most!r} by "
        f"{float(relative.max()):.3f} (relative norm of θ_photo - θ_ct)"
    )
    print("exercise 4: correct")

# %% [markdown]
# ## Checks

# %%
assert emb_minilm.shape == (32, 384) and np.allclose(np.linalg.norm(emb_minilm, axis=1), 1.0, atol=1e-4)
assert (
    np.array_equal(again, emb_minilm) and len(cache_files) >= 32
)  # the second call came from the disk cache
i_r, i_l = names.index("right kidney"), names.index("left kidney")
assert sim_minilm[i_r, i_l] > np.percentile(off_diag, 90)  # left/right pairs are among the closest
assert np.diag(cross).mean() > cross[~np.eye(32, dtype=bool)].mean()  # the class name dominates the template
assert (clip_error is not None and "minilm" in str(clip_error)) or (
    emb_clip is not None and emb_clip.shape[0] == 32
)
assert emb_table is None or emb_table.shape == (32, 512)
assert np.array_equal(sim_onehot, np.eye(32, dtype=np.float32))
assert theta.shape == (1, model.num_classes, 153) and same
assert sum(int(np.prod(s)) for s in shapes.values()) == 153
assert r_fresh > 0.3 and float(change.min()) > 0  # similar prompts -> similar heads at initialisation
# the toolkit column of the paper-vs-toolkit table in notebook 1 and notebooks/README.md
assert (spec.backbone, spec.encoder, spec.embed_dim, len(spec.classes)) == ("segresnet", "minilm", 384, 19)
assert tuple(spec.preprocessing.spacing_mm) == (3.0, 3.0, 3.0) and round(n_parameters / 1e6, 1) == 4.9
print(
    "CHECKS PASSED 02",
    {
        "clip": "available" if emb_clip is not None else "offline (error caught)",
        "clip_minilm_agreement": None if agreement is None else round(agreement, 2),
        "prompt_vs_head_r": {"fresh": round(r_fresh, 2), "trained": round(r_params, 2)},
    },
)
