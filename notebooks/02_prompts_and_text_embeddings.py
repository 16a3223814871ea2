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
# whose weights are computed from a text prompt**:
#
# 1. a **template** turns a class into a sentence: *"A computerized tomography of a Liver Tumor"*;
# 2. a **text encoder** turns the sentence into an embedding `w_k` (`universal.prompts`);
# 3. the **controller** maps `[f ⊕ w_k]` (the global image feature and the embedding) to the 153 parameters of
#    three 1×1×1 convolutions (8→8, 8→8, 8→1), which turn the shared dense features `F` into the class's logits.
#
# Because related classes get related sentences, the encoder can put them close together - the paper's argument for
# CLIP over one-hot labels. This notebook looks at templates, four encoders (MiniLM live, CLIP when its weights are
# available, the official CLIP table, one-hot), their similarity structure, and the controller of a real model.

# %% tags=["parameters"]
QUICK = True  # CI-sized run (this notebook is small either way)
DATA_DIR = None  # folder with the real CTs; None = $UNIVERSAL_DATA_DIR or the nearest shared/data above

# %%
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import universal
from universal import prompts, taxonomy, viz
from universal.data import find_sample_data
from universal.errors import EncoderUnavailableError
from universal.model import dynamic_heads, split_controller_params
from universal.preprocess import PreprocessConfig, preprocess  # the preprocessing segment() uses

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


REFERENCE_DIR = DATA_DIR.parent / "reference" if DATA_DIR is not None else None
print("embedding cache:", prompts.default_cache_dir())

# %% [markdown]
# ## 2.1 Templates
#
# `prompts.TEMPLATES` holds the paper's three templates (the paper uses `ct`) and the bare class name.
# `format_prompt` fills in the class's correctly spelled `prompt_name`; a free text without `{}` gets the class name
# appended.

# %%
for key, template in prompts.TEMPLATES.items():
    print(f"{key:9} {template!r:48} -> {prompts.format_prompt(template, 'IVC')!r}")
print()
print(prompts.resolve_template("Contrast-enhanced abdominal CT showing"))

# %% [markdown]
# ## 2.2 MiniLM, live
#
# `encode_prompts(classes, template, encoder)` returns a `(K, D)` float32 array, one row per class. MiniLM
# (all-MiniLM-L6-v2, 384-d, shipped inside a pip package) runs offline. Rows are cached on disk, one `.npy` per
# (encoder, template, class), so the second call runs no text model at all.

# %%
names = taxonomy.class_names()
t0 = time.perf_counter()
emb_minilm = universal.encode_prompts(names, template="ct", encoder="minilm")
t_first = time.perf_counter() - t0
t0 = time.perf_counter()
again = universal.encode_prompts(names, template="ct", encoder="minilm")
t_cached = time.perf_counter() - t0
cache_files = sorted(
    prompts.default_cache_dir().rglob("*.npy")
)  # one small .npy per (encoder, template, class)
print(
    f"shape {emb_minilm.shape}, dtype {emb_minilm.dtype}; row norms {np.linalg.norm(emb_minilm, axis=1).round(3)[:4]}..."
)
print(
    f"first call {t_first:.2f} s (loads the model), cached call {t_cached * 1000:.1f} ms; "
    f"{len(cache_files)} cached rows"
)

# %% [markdown]
# ### Similarity between classes
#
# `prompts.prompt_similarity` gives the cosine similarity of every pair of rows. Sentences that differ in one word
# are close for any sentence encoder, so the scale is compressed: what matters is the *structure* - left/right
# pairs, tumours and their organs, the vessels.

# %%
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
plt.colorbar(
    heatmap(ax, sim_minilm, names, "MiniLM: cosine similarity of the 32 'ct' prompts"), ax=ax, shrink=0.7
)
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
# The same matrix as an interactive plotly figure (`viz.similarity_heatmap`, also used by the dashboard) - hover to
# read the pairs:

# %%
fig = viz.similarity_heatmap(sim_minilm, names, title="MiniLM, template 'ct'", height=560)
fig.show()

# %% [markdown]
# ### Similarity between templates
#
# Does the template matter? Encode all classes with each template and compare *across* templates: entry (i, j) of
# `prompt_similarity(E_ct, E_photo)` compares class i written one way with class j written the other way. A strong
# diagonal means the class name, not the template, dominates the embedding.

# %%
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
ax2.set_title("same-class minus other-class similarity\n(higher: classes stay apart across templates)")
plt.tight_layout()
plt.show()
print(
    f"ct vs photo: same class {np.diag(cross).mean():.3f}, different classes {cross[~np.eye(32, dtype=bool)].mean():.3f}"
)

# %% [markdown]
# ## 2.3 CLIP - the paper's encoder
#
# `encoder="clip"` is open_clip's ViT-B/32 with OpenAI weights, as in the paper. The weights are downloaded once;
# here the machine is **offline**, so the encoder raises `EncoderUnavailableError` - a project error whose message
# says what to do (use `minilm`, a precomputed `table:`, `onehot`, or fetch the weights once). We catch it and carry
# on. (Set `HF_HUB_OFFLINE=1` to make the offline check instantaneous instead of a 5-second network probe.)

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
# We take the project's built-in model (`universal.load_pretrained("builtin")`: SegResNet, MiniLM prompts; its
# weights are a small, weak model trained in minutes, which does not matter for looking at the mechanics) and run one
# CT patch through it step by step:
#
# * backbone → bottleneck features → `GAP` → global image feature `f` (256);
# * backbone → decoder features → `precls_conv` → dense head input `F` (8 channels at full resolution);
# * `controller_params(f)`: for each class, `controller([f, relu(text_to_vision(w_k))])` → 153 numbers;
# * `split_controller_params` → the weights and biases of the three 1×1×1 convolutions;
# * `dynamic_heads(F, θ)` → the logits of all classes at once.

# %%
model = universal.load_pretrained("builtin").eval()
print(model.extra_repr())
print("classes:", model.class_names)
print("template:", repr(model.template), "| preprocessing:", model.spec.preprocessing)

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
print(
    "head of one class: w1",
    tuple(w1.shape[2:]),
    "w2",
    tuple(w2.shape[2:]),
    "w3",
    tuple(w3.shape[2:]),
    "b1",
    tuple(b1.shape[2:]),
    "b2",
    tuple(b2.shape[2:]),
    "b3",
    tuple(b3.shape[2:]),
    "=",
    8 * 8 + 8 * 8 + 8 + 8 + 8 + 1,
    "numbers",
)
same = torch.allclose(logits_heads, logits_forward, atol=1e-5)
print("dynamic_heads(F, θ) reproduces model(x):", same)

# %% [markdown]
# The controller output is `θ_k = A·f + B·relu(text_to_vision(w_k)) + c`: the image part `A·f` is **shared** by all
# classes of one image, so what makes the heads differ is the text part. Below: θ_k minus the mean head over classes
# (the class-specific part), and how the similarity of two prompts relates to the similarity of their heads - for
# the trained model and for the same architecture freshly initialised (a random linear map keeps similar prompts
# similar; training moves heads apart where the anatomy needs it).

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

# %% [markdown]
# ### The prompt is part of the model
#
# Re-encoding the prompts with another template (`set_prompts`) changes every head without touching a single
# trained weight. Models are trained with one template; a different one at inference is an *input shift*
# (exercise 3 measures it on a CT).

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
# 1. Write your own template (e.g. `"Contrast-enhanced CT of the {}"`) and compute its `ct`-vs-yours diagonal
#    similarity with MiniLM. Is it closer to `ct` than `photo` is?
# 2. Which class pairs are among the five most similar for **both** MiniLM and the official CLIP table? Which pair
#    does CLIP find similar but MiniLM does not?
# 3. Segment the phantom with the built-in model under the `ct` and the `photo` template
#    (`universal.segment(ph.volume, model=model, template="photo", fast=True)`) and compare the liver volumes.

# %% [markdown]
# <details><summary>Solution (click to open)</summary>
#
# 1. `mine = universal.encode_prompts(names, template="Contrast-enhanced CT of the {}", encoder="minilm")`, then
#    `np.diag(prompts.prompt_similarity(emb_by_template["ct"], mine)).mean()` and compare with
#    `np.diag(cross).mean()`. Medical wording usually stays closer to `ct` than `photo` does.
# 2. `set(p[:2] for p in closest_pairs(sim_minilm, 5)) & set(p[:2] for p in closest_pairs(sim_table, 5))`;
#    left/right pairs are typically shared. Sort `sim_table[iu] - sim_minilm[iu]` to find the pair CLIP rates
#    relatively higher.
# 3. `a = universal.segment(ph.volume, model=model, fast=True)`, `b = universal.segment(ph.volume, model=model,
#    template="photo", fast=True)`, then `a.volumes_ml["liver"], b.volumes_ml["liver"]`. The model was trained with
#    `ct` prompts, so changing the template changes (usually degrades) the masks.
#
# </details>

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
assert r_fresh > 0.3 and float(change.min()) > 0  # similar prompts -> similar heads at initialisation
print(
    "CHECKS PASSED 02",
    {
        "clip": "available" if emb_clip is not None else "offline (error caught)",
        "clip_minilm_agreement": None if agreement is None else round(agreement, 2),
        "prompt_vs_head_r": {"fresh": round(r_fresh, 2), "trained": round(r_params, 2)},
    },
)
