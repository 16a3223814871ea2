"""The `universal` dashboard: upload a CT, choose organs and prompts, see 2-D/3-D overlays, compare DSC/NSD.

Run it with ``make demo`` or ``streamlit run app.py``. This file only wires Streamlit widgets to the package:
loading (``universal.io``), segmentation (``universal.segment``), metrics (``universal.metrics``), figures
(``universal.viz``) and the app's non-UI helpers (``universal.app_logic``). Research software, not for clinical use.

State: everything a user uploads or computes lives in ``st.session_state`` (one browser session each; uploads
in a private temporary folder removed with the session); only read-only things are shared between sessions
through ``st.cache_resource`` (models, the built-in samples).
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from universal import app_logic as al
from universal import viz
from universal.errors import UniversalError

APP_TITLE = "universal — text-prompted organ and tumour segmentation in CT"
DEFAULT_CLASSES = [
    "liver", "spleen", "right kidney", "left kidney", "pancreas", "stomach", "gallbladder", "aorta",
    "inferior vena cava", "liver tumor",
]  # fmt: skip
VIEWS = ["axial", "coronal", "sagittal"]

st.set_page_config(page_title="universal · CT segmentation", page_icon=":material/radiology:", layout="wide")


# ============================================================================================ shared caches
@st.cache_resource(show_spinner=False)
def _warm_up() -> dict[str, Any]:
    """Once per server: a background thread imports torch while the first page loads the sample, then (once
    that page is drawn) imports MONAI and loads the default model, so the first "Segment" does not wait."""
    holder: dict[str, Any] = {"key": None, "model": None, "page_drawn": threading.Event()}

    def work() -> None:
        try:
            import universal.model  # noqa: F401 - torch: the sidebar's model list needs it too

            holder["page_drawn"].wait(timeout=20)
            import universal.inference  # noqa: F401

            key = next(c.key for c in al.model_choices() if c.available)
            holder["key"] = (key, None, None)
            holder["model"] = al.load_model(key)
        except Exception:  # noqa: BLE001 - a failed warm-up only costs time later
            holder["key"] = None

    holder["thread"] = thread = threading.Thread(target=work, name="universal-warm-up", daemon=True)
    thread.start()
    return holder


@st.cache_resource(show_spinner=False)
def _sample(key: str) -> al.SampleData:
    return al.load_sample(key)


@st.cache_resource(show_spinner=False, max_entries=6)
def _model(key: str, checkpoint: str | None, encoder: str | None) -> Any:
    """A model shared by all sessions (never modified: ``segment`` re-prompts a copy)."""
    warm = _warm_up()
    if warm["thread"].is_alive():
        warm["thread"].join()  # it may be loading this very model: do not load it twice
    if warm["key"] == (key, checkpoint, encoder) and warm["model"] is not None:
        return warm["model"]
    if key == al.DEMO_MODEL:
        return al.load_model(key, encoder=encoder or "minilm")
    base = al.load_model(key, checkpoint=checkpoint)
    return al.model_with_prompts(base, encoder=encoder) if encoder else base


@st.cache_data(show_spinner=False, ttl=300)
def _model_choices() -> list[al.ModelChoice]:
    return al.model_choices()


@st.cache_data(show_spinner=False)
def _templates() -> dict[str, str]:
    from universal.prompts import TEMPLATES

    return dict(TEMPLATES)


@st.cache_data(show_spinner=False)
def _class_kinds() -> dict[str, str]:
    from universal.taxonomy import CLASSES

    return {c.name: c.kind for c in CLASSES}


@st.cache_data(show_spinner=False)
def _gt_conventions() -> list[str]:
    return al.gt_conventions()


@st.cache_resource(show_spinner=False)
def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


# ============================================================================================ session state
ss = st.session_state
ss.setdefault("_n_segment_runs", 0)
if "_folder" not in ss or ss["_folder"].closed:
    ss["_folder"] = al.SessionFolder()
folder: al.SessionFolder = ss["_folder"]
warm_up = _warm_up()


def _reset_results() -> None:
    for k in ("result", "compare", "evaluation", "mesh", "downloads"):
        ss.pop(k, None)


def _show_error(exc: BaseException, where: Any = st) -> None:
    where.error(str(exc) or type(exc).__name__, icon=":material/error:")


# ============================================================================================ sidebar: input
limit_mb = al.upload_limit_mb()
samples = {s.key: s for s in al.list_samples()}
with st.sidebar:
    st.header("1 · CT scan")
    source = st.radio(
        "Source", ["Built-in sample", "Upload a file", "Path on the server"], key="source", horizontal=False
    )
    input_ref: tuple[str, Any] | None = None
    if source == "Built-in sample":
        key = st.selectbox("Sample", list(samples), format_func=lambda k: samples[k].label, key="sample")
        st.caption(samples[key].description)
        input_ref = ("sample", key)
    elif source == "Upload a file":
        up = st.file_uploader(
            f"NIfTI (.nii, .nii.gz), NRRD, MHA or a DICOM series as .zip — up to {limit_mb} MB",
            key="upload",
            help=f"The limit is Streamlit's server.maxUploadSize ({limit_mb} MB) in .streamlit/config.toml.",
        )
        if up is not None:
            input_ref = ("upload", up)
    else:
        path = st.text_input(
            "CT on the server: a file, a DICOM folder or a .zip",
            key="server_path",
            placeholder="/data/case01/ct.nii.gz",
        ).strip()
        if path:
            input_ref = ("path", path)


def _input_id(ref: tuple[str, Any] | None) -> str | None:
    if ref is None:
        return None
    kind, value = ref
    if kind == "upload":
        return f"upload:{value.file_id}:{value.name}:{value.size}"
    if kind == "path":
        p = Path(value).expanduser()
        try:
            return f"path:{p.resolve()}:{p.stat().st_mtime_ns}"
        except OSError:
            return f"path:{p}"
    return f"sample:{value}"


def _load_input(ref: tuple[str, Any]) -> dict[str, Any]:
    """Read the CT (and a sample's reference); errors and warnings become readable messages."""
    from universal.io import load_volume

    kind, value = ref
    out: dict[str, Any] = {"gt_masks": {}, "annotated": [], "classes": [], "warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "sample":
            data = _sample(value)
            out.update(
                volume=data.volume, gt_masks=data.gt_masks, annotated=data.annotated, classes=data.classes
            )
            out["gt_label"] = f"reference of the sample ({data.sample.gt_dataset or 'phantom truth'})"
        elif kind == "upload":
            al.check_upload(value.name, value.size, limit_mb)
            folder.clear("uploads")
            saved = folder.save(value.name, value.getvalue())
            out["volume"] = load_volume(saved)
        else:
            out["volume"] = load_volume(Path(value).expanduser())
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return out


input_id = _input_id(input_ref)
if ss.get("input", {}).get("id") != input_id:
    _reset_results()
    ss.pop("gt", None)
    if input_ref is None:
        ss["input"] = {"id": None}
    else:
        t0 = time.perf_counter()
        try:
            loaded = _load_input(input_ref)
            loaded.update(id=input_id, seconds=time.perf_counter() - t0)
            ss["input"] = loaded
            kinds = _class_kinds()
            ss["classes"] = [c for c in loaded["classes"] if c in kinds] or list(DEFAULT_CLASSES)
        except UniversalError as exc:
            ss["input"] = {"id": input_id, "error": str(exc)}
        except (OSError, ValueError) as exc:  # a file the loaders could not make sense of
            ss["input"] = {"id": input_id, "error": f"could not read this input: {exc}"}
inp: dict[str, Any] = ss["input"]
volume = inp.get("volume")

# ============================================================================================ sidebar: controls
with st.sidebar:
    st.header("2 · Model and prompts")
    choices = {c.key: c for c in _model_choices()}
    model_keys = [*choices, "checkpoint"]

    def _model_label(k: str) -> str:
        if k == "checkpoint":
            return "a local checkpoint file…"
        c = choices[k]
        return c.label if c.available else f"{c.label} — unavailable"

    model_key = st.selectbox("Model", model_keys, format_func=_model_label, key="model")
    checkpoint = None
    if model_key == "checkpoint":
        checkpoint = st.text_input("Checkpoint on the server (.pt/.pth)", key="checkpoint").strip() or None
    elif not choices[model_key].available:
        st.warning(choices[model_key].note)
    if "builtin" in choices and not choices["builtin"].available:
        st.caption(f"Built-in weights: {choices['builtin'].note}.")
    if model_key == al.DEMO_MODEL:
        st.info(
            "Random weights: the masks are meaningless. Use it to try the interface.",
            icon=":material/science:",
        )

    encoder_opt = st.selectbox(
        "Text encoder",
        ["model's own", "minilm", "clip", "onehot", "other"],
        format_func=lambda e: "other (a spec)…" if e == "other" else e,
        key="encoder",
        help="The encoder that turns prompts into embeddings. A trained model only works with an encoder of the "
        "width it was trained with; the demo model is built with the one chosen here.",
    )
    if encoder_opt == "other":
        encoder_opt = (
            st.text_input(
                "Encoder spec",
                key="encoder_spec",
                placeholder="clip:ViT-B-32:/path/weights.safetensors or table:/path/emb.npy",
            ).strip()
            or "model's own"
        )
    templates = _templates()
    tmpl_key = st.selectbox(
        "Prompt template",
        [*templates, "custom"],
        format_func=lambda k: "free text…" if k == "custom" else f"{templates[k].replace('{}', '…')}",
        key="template_key",
    )
    template = templates.get(tmpl_key)
    if tmpl_key == "custom":
        template = st.text_input(
            "Template ({} = the class name)", value="A computerized tomography of a {}", key="template_text"
        )

    kinds = _class_kinds()
    organs = [n for n, k in kinds.items() if k != "tumor"]
    tumours = [n for n, k in kinds.items() if k == "tumor"]
    quick = {
        "this scan's reference classes": inp.get("classes") or DEFAULT_CLASSES,
        "common abdominal organs": DEFAULT_CLASSES,
        "all organs": organs,
        "all tumours": tumours,
        "all 32 classes": organs + tumours,
    }

    def _apply_quick() -> None:
        pick = ss.get("quick_pick")
        if pick in quick:
            ss["classes"] = [c for c in quick[pick] if c in kinds]

    ss.setdefault("classes", list(DEFAULT_CLASSES))
    st.selectbox("Quick pick", list(quick), index=None, placeholder="choose a group…", key="quick_pick",
                 on_change=_apply_quick)  # fmt: skip
    classes = st.multiselect(
        "Classes (type to search)",
        organs + tumours,
        format_func=lambda n: f"{n}  ·  {'tumour' if kinds[n] == 'tumor' else 'organ'}",
        key="classes",
    )
    fast = st.toggle("Fast mode (3 mm)", value=True, key="fast", help="About 8× faster, coarser masks.")
    devices = ["auto", "cpu", *(["cuda"] if _cuda_available() else [])]
    device = st.selectbox(
        "Device", devices, key="device", help="auto: the GPU when there is one, else the CPU"
    )
    ready = volume is not None and bool(classes) and (model_key != "checkpoint" or bool(checkpoint))
    ready = ready and (model_key == "checkpoint" or choices[model_key].available)
    run = st.button(
        "Segment",
        type="primary",
        key="run",
        disabled=not ready,
        width="stretch",
        icon=":material/play_arrow:",
    )

encoder = None if encoder_opt == "model's own" else encoder_opt


# ============================================================================================ main: header
st.markdown(f"### {APP_TITLE}")
st.caption(
    "The CLIP-Driven Universal Model, re-implemented: one network, one text prompt per class. "
    "**Research software, not for clinical use.**"
)

if inp.get("error"):
    st.error(inp["error"], icon=":material/error:")
for w in inp.get("warnings", []):
    st.warning(w, icon=":material/warning:")
if volume is not None:
    sx, sy, sz = volume.spacing
    st.caption(
        f"**{getattr(volume, 'name', 'CT')}** — {' × '.join(map(str, volume.array.shape))} voxels, "
        f"{sx:.2f} × {sy:.2f} × {sz:.2f} mm, HU {float(volume.array.min()):.0f} … {float(volume.array.max()):.0f}"
    )
elif not inp.get("error"):
    st.info("Choose a built-in sample, upload a CT or give a path in the sidebar.")


# ============================================================================================ run
def _progress_callback(box: Any):
    """``segment``'s ``progress(stage, fraction)`` → one progress bar per stage."""
    from universal import inference

    starts: dict[str, float] = dict(getattr(inference, "_STAGE_START", {}))
    order = list(starts)
    bars: dict[str, Any] = {}

    def local(stage: str, overall: float) -> float:
        if stage not in starts:
            return max(0.0, min(1.0, overall))
        i = order.index(stage)
        end = starts[order[i + 1]] if i + 1 < len(order) else 1.0
        span = max(end - starts[stage], 1e-9)
        return max(0.0, min(1.0, (overall - starts[stage]) / span))

    def callback(stage: str, overall: float) -> None:
        for s, bar in bars.items():
            if s != stage and bar is not None:
                bar.progress(1.0, text=f"{s} ✓")
        if stage == "done":
            return
        if stage not in bars:
            bars[stage] = box.progress(0.0, text=stage)
        frac = local(stage, overall)
        bars[stage].progress(frac, text=f"{stage} — {frac:.0%}")

    return callback


def _segment(model: Any, tmpl: str | None, box: Any, wanted: list[str]) -> Any:
    from universal.inference import segment

    seg = segment(
        volume,
        classes=list(wanted),
        model=model,
        template=tmpl,
        device=None if device == "auto" else device,
        fast=bool(fast),
        progress=_progress_callback(box),
    )
    ss["_n_segment_runs"] = int(ss.get("_n_segment_runs", 0)) + 1
    return seg


if run and ready:
    _reset_results()
    slot = st.empty()
    box = slot.container(border=True)
    box.markdown("**Running…**")
    try:
        t0 = time.perf_counter()
        with box:
            with st.spinner("Loading the model (once per server)…"):
                model = _model(model_key, checkpoint, encoder)
        t_model = time.perf_counter() - t0
        wanted, skipped = al.split_supported_classes(model, classes)
        if skipped:
            st.warning(
                f"This model was not trained for {', '.join(skipped)}: skipped. Choose another model "
                "(e.g. an official checkpoint) to segment those classes.",
                icon=":material/warning:",
            )
        if not wanted:
            raise UniversalError("none of the chosen classes is one this model segments; choose others")
        seg = _segment(model, template, box, wanted)
        ss["result"] = {
            "id": uuid.uuid4().hex,
            "seg": seg,
            "input_id": input_id,
            "model_key": model_key,
            "checkpoint": checkpoint,
            "encoder": encoder,
            "template": template,
            "model_seconds": t_model,
            "demo": model_key == al.DEMO_MODEL,
        }
        slot.empty()
    except UniversalError as exc:
        slot.empty()
        _show_error(exc)
    except (RuntimeError, MemoryError, OSError) as exc:  # e.g. out of memory on a large scan
        slot.empty()
        st.error(f"The segmentation failed: {type(exc).__name__}: {exc}", icon=":material/error:")

result: dict[str, Any] | None = ss.get("result")
seg = result["seg"] if result else None
if result is not None:
    total = float(seg.timings.get("total", float("nan")))
    st.success(
        f"Segmented {len(seg.masks)} classes in {total:.1f} s "
        f"(model load {result['model_seconds']:.1f} s) — {seg.info.get('device', '')}, "
        f"{'fast (3 mm)' if seg.info.get('fast') else 'standard (1.5 mm)'}, template “{seg.info.get('template')}”.",
        icon=":material/check_circle:",
    )
    if result["demo"]:
        st.warning(
            "These masks come from the untrained demo model (random weights): they are meaningless.",
            icon=":material/science:",
        )


# ============================================================================================ tabs
# stateful tabs: only the open tab's code runs, so a 3-D mesh or an evaluation is computed when looked at
TABS = ["Segmentation", "3-D", "Evaluate", "Compare prompts", "Download"]
tab_seg, tab_3d, tab_eval, tab_cmp, tab_dl = st.tabs(TABS, key="tab", on_change="rerun")


def _legend(names: list[str]) -> str:
    items = []
    for i, n in enumerate(names):
        r, g, b = viz.class_color(n, i)
        items.append(
            f"<span style='display:inline-block;margin:0 10px 4px 0;white-space:nowrap'>"
            f"<span style='display:inline-block;width:12px;height:12px;background:rgb({r},{g},{b});"
            f"border:1px solid #555;margin-right:4px;vertical-align:middle'></span>{n}</span>"
        )
    return "<div style='font-size:0.85em'>" + "".join(items) + "</div>"


def _view_controls(prefix: str, shape: tuple[int, ...], default_view: str = "axial") -> tuple[str, int]:
    view = st.radio(
        "View",
        VIEWS,
        horizontal=True,
        key=f"{prefix}_view",
        persist_state="page",
        index=VIEWS.index(default_view),
    )
    n = viz.num_slices(shape, view)
    default = ss.get(f"{prefix}_default_{view}", n // 2)
    idx = st.slider(
        "Slice",
        0,
        max(n - 1, 1),
        min(int(default), n - 1),
        key=f"{prefix}_slice_{view}",
        persist_state="page",
    )
    return view, min(int(idx), n - 1)


def _mask_centre_defaults(prefix: str, masks: dict[str, np.ndarray]) -> None:
    """Start each view on the slice through the centre of the segmented voxels."""
    if not masks or f"{prefix}_default_axial" in ss:
        return
    union = np.zeros(next(iter(masks.values())).shape, bool)
    for m in masks.values():
        union |= m
    if not union.any():
        return
    idx = np.argwhere(union).mean(axis=0).round().astype(int)
    for view, ax in viz.AXES.items():
        ss[f"{prefix}_default_{view}"] = int(idx[ax])


@st.fragment
def slice_viewer() -> None:
    """The 2-D viewer: reruns on its own when a slider moves (the segmentation is never recomputed)."""
    sources = (["segmentation"] if seg is not None else []) + (["reference"] if inp.get("gt_masks") else [])
    left, right = st.columns([3, 2], gap="medium")
    with right:
        source = None
        if len(sources) > 1:
            source = st.radio("Overlay", sources, horizontal=True, key="overlay_source", persist_state="page",
                              help="The model's masks, or the reference (ground truth) of the sample.")  # fmt: skip
        elif sources:
            source = sources[0]
            st.caption(
                f"Overlay: the {source}"
                + (" (run a segmentation to see yours)" if source == "reference" else "")
            )
        if source == "segmentation":
            masks = seg.masks
        elif source == "reference":
            masks = {n: m for n, m in inp["gt_masks"].items() if m.any()}
        else:
            masks = {}
        view, idx = _view_controls("viewer", volume.array.shape)
        opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key="opacity", persist_state="page")
        presets = viz.window_presets()
        window = st.radio(
            "CT window",
            list(presets),
            horizontal=True,
            key="window",
            persist_state="page",
            format_func=lambda w: f"{w} ({presets[w][0]:g}/{presets[w][1]:g})",
        )
        shown = []
        if masks:
            st.markdown("**Show classes**")
            cols = st.columns(2)
            for i, name in enumerate(masks):
                empty = "" if masks[name].any() else " (empty)"
                if cols[i % 2].checkbox(
                    f"{name}{empty}", value=True, key=f"show_{name}", persist_state="page"
                ):
                    shown.append(name)
    with left:
        t0 = time.perf_counter()
        img = viz.slice_overlay(
            volume.array,
            {n: masks[n] for n in shown},
            view,
            idx,
            opacity=opacity,
            window=window,
            spacing=volume.spacing,
        )
        st.image(
            img.square(min_size=560),
            caption=f"{view} slice {idx} — patient's right on the image's left"
            + (", anterior at the top" if view == "axial" else ", superior at the top"),
            width="stretch",
        )
        if shown:
            st.markdown(_legend(shown), unsafe_allow_html=True)
        ss["_last_render_s"] = time.perf_counter() - t0


with tab_seg:
    if tab_seg.open:
        if volume is None:
            st.info("No CT loaded yet.")
        else:
            _mask_centre_defaults("viewer", seg.masks if seg is not None else inp.get("gt_masks", {}))
            slice_viewer()
            if seg is not None:
                c1, c2 = st.columns([3, 2], gap="medium")
                with c1, st.container(key="volume_table"):
                    st.subheader("Volumes and mean HU")
                    vt = viz.results_frame(seg)
                    st.dataframe(vt, hide_index=True, height=min(36 * (len(vt) + 1) + 3, 640))
                with c2, st.container(key="timing_table"):
                    st.subheader("Timing")
                    tf = viz.timings_frame({**seg.timings})
                    tf.loc[len(tf)] = ["model load (app)", result["model_seconds"], np.nan]
                    st.dataframe(
                        tf,
                        hide_index=True,
                        column_config={
                            "seconds": st.column_config.NumberColumn(format="%.2f s"),
                            "share": st.column_config.ProgressColumn(
                                min_value=0.0, max_value=1.0, format="percent"
                            ),
                        },
                    )


# -------------------------------------------------------------------------------------------- 3-D
@st.fragment
def mesh_view() -> None:
    source = "segmentation"
    if inp.get("gt_masks"):
        source = st.radio("Surfaces of", ["segmentation", "reference"], horizontal=True, key="mesh_source",
                          persist_state="page")  # fmt: skip
    masks = seg.masks if source == "segmentation" else inp["gt_masks"]
    nonempty = [n for n, m in masks.items() if m.any()]
    if not nonempty:
        st.info("All masks are empty: nothing to draw.")
        return
    c1, c2, c3 = st.columns([4, 1, 1])
    names = c1.multiselect(
        "Classes in 3-D",
        nonempty,
        default=nonempty,
        key=f"mesh_classes_{result['id']}_{source}",
        persist_state="page",
    )
    cap = c2.select_slider(
        "Max triangles",
        [20_000, 40_000, 60_000, 100_000, 150_000],
        60_000,
        key="mesh_cap",
        persist_state="page",
    )
    opacity = c3.slider("Opacity", 0.2, 1.0, 1.0, 0.1, key="mesh_opacity", persist_state="page")
    if not names:
        st.info("Choose at least one class.")
        return
    key = (result["id"], source, tuple(names), cap)
    cached = ss.get("mesh")
    if cached is None or cached["key"] != key:
        with st.spinner("Building surfaces…"):
            t0 = time.perf_counter()
            fig = viz.mesh_figure(masks, volume.affine, names, max_triangles=cap)
            ss["mesh"] = cached = {"key": key, "fig": fig, "seconds": time.perf_counter() - t0}
    cached["fig"].update_traces(opacity=opacity)  # no new surfaces for a new opacity
    with st.container(key="mesh_chart"):
        st.plotly_chart(cached["fig"], config={"displaylogo": False})
    st.caption(
        f"World coordinates in mm (RAS+). Surfaces from marching cubes on downsampled masks, "
        f"{cached['fig'].layout.meta['triangles']:,} triangles (cap {cap:,}), built in {cached['seconds']:.1f} s."
    )


with tab_3d:
    if tab_3d.open:
        if seg is None:
            st.info("Run a segmentation to see the 3-D view.")
        else:
            mesh_view()


# -------------------------------------------------------------------------------------------- evaluate
def _gt_input() -> tuple[str, Any] | None:
    options = (["The sample's reference"] if inp.get("gt_masks") else []) + [
        "Upload a label map",
        "Path on the server",
    ]
    src = st.radio("Ground truth", options, horizontal=True, key="gt_source", persist_state="page")
    if src == "The sample's reference":
        st.caption(inp.get("gt_label", ""))
        return ("sample", inp["id"])
    convention = st.selectbox(
        "Label values are…",
        _gt_conventions(),
        key="gt_convention",
        persist_state="page",
        help="Universal ids 1-32, FLARE 2023 ids 1-14, or the ids of a public dataset (mapped through the "
        "taxonomy; classes it does not annotate are shown as 'not annotated').",
    )
    if src == "Upload a label map":
        up = st.file_uploader("Label map (NIfTI, NRRD, MHA) on the CT's grid", key="gt_upload")
        if up is not None:
            return ("upload", (up, convention))
        prev = ss.get("gt") or {}
        if str(prev.get("id", "")).startswith("upload:") and not prev.get("error"):
            # the uploader forgets its file when the tab is closed; the loaded reference is kept
            st.caption(f"Using the label map uploaded before: {prev.get('name', '')}")
            return ("kept", prev["id"])
        return None
    p = st.text_input("Label map on the server", key="gt_path", persist_state="page").strip()
    return ("path", (p, convention)) if p else None


def _load_gt(ref: tuple[str, Any]) -> dict[str, Any]:
    kind, value = ref
    if kind == "sample":
        return {"masks": inp["gt_masks"], "annotated": inp["annotated"]}
    src, convention = value
    if kind == "upload":
        al.check_upload(src.name, src.size, limit_mb)
        path = folder.save(src.name, src.getvalue(), subfolder="labels")
    else:
        path = Path(src).expanduser()
    masks, annotated = al.ground_truth_from_file(path, volume, convention)
    return {"masks": masks, "annotated": annotated}


def _gt_id(ref: tuple[str, Any]) -> str:
    kind, value = ref
    if kind == "kept":
        return value
    if kind == "sample":
        return f"sample:{value}"
    src, convention = value
    if kind == "upload":
        return f"upload:{src.file_id}:{convention}"
    return f"path:{src}:{convention}"


with tab_eval:
    if tab_eval.open:
        if volume is None:
            st.info("No CT loaded yet.")
        else:
            gt_ref = _gt_input()
            preset_label = st.radio(
                "Rules",
                [
                    "FLARE 2023 (classes, tolerances, rules)",
                    "all segmented classes (NSD tolerance 2 mm or FLARE's)",
                ],
                horizontal=True,
                key="eval_preset",
                persist_state="page",
            )
            preset = "flare23" if preset_label.startswith("FLARE") else None
            gt = None
            if gt_ref is not None:
                gid = _gt_id(gt_ref)
                if ss.get("gt", {}).get("id") != gid:
                    try:
                        name = gt_ref[1][0].name if gt_ref[0] == "upload" else str(gt_ref[1])
                        ss["gt"] = {"id": gid, "name": name, **_load_gt(gt_ref)}
                    except UniversalError as exc:
                        ss["gt"] = {"id": gid, "error": str(exc)}
                    except (OSError, ValueError) as exc:
                        ss["gt"] = {"id": gid, "error": f"could not read this label map: {exc}"}
                gt = ss["gt"]
                if gt.get("error"):
                    st.error(gt["error"], icon=":material/error:")
                    gt = None
            if seg is None:
                st.info("Run a segmentation first; its masks are then scored against the ground truth.")
            elif gt is not None:
                ekey = (result["id"], gt["id"], preset)
                ev = ss.get("evaluation")
                if ev is None or ev["key"] != ekey:
                    try:
                        with st.spinner("Computing DSC and NSD…"):
                            t0 = time.perf_counter()
                            res = al.evaluate_segmentation(
                                seg, gt["masks"], gt["annotated"], volume.spacing, preset=preset
                            )
                            ev = {
                                "key": ekey,
                                "result": res,
                                "seconds": time.perf_counter() - t0,
                                "error": None,
                            }
                    except UniversalError as exc:
                        ev = {"key": ekey, "result": None, "error": str(exc)}
                    ss["evaluation"] = ev
                if ev["error"]:
                    st.error(ev["error"], icon=":material/error:")
                else:
                    res = ev["result"]
                    frame = viz.metrics_frame(res)
                    means = res.mean()
                    m1, m2, m3 = st.columns(3)
                    m1.metric("Mean DSC", "–" if np.isnan(means["dsc"]) else f"{means['dsc']:.3f}")
                    m2.metric("Mean NSD", "–" if np.isnan(means["nsd"]) else f"{means['nsd']:.3f}")
                    m3.metric("Classes scored", f"{len(res.evaluated)} / {len(res.scores)}")
                    c1, c2 = st.columns([2, 3])
                    with c1, st.container(key="metrics_table"):
                        show = frame[
                            [c for c in ("class", "dsc", "nsd", "tolerance_mm", "status") if c in frame]
                        ]
                        st.dataframe(
                            show,
                            hide_index=True,
                            height=min(36 * (len(show) + 1) + 3, 640),
                            column_config={
                                "dsc": st.column_config.NumberColumn("DSC", format="%.3f"),
                                "nsd": st.column_config.NumberColumn("NSD", format="%.3f"),
                                "tolerance_mm": st.column_config.NumberColumn("NSD tol. (mm)", format="%g"),
                            },
                        )
                        st.caption(
                            "Classes the ground truth does not annotate are shown as *not annotated* and are left out "
                            f"of the means (computed in {ev['seconds']:.1f} s)."
                        )
                    with c2, st.container(key="metrics_chart"):
                        st.plotly_chart(viz.metrics_bar_chart(res), config={"displaylogo": False})


# -------------------------------------------------------------------------------------------- compare prompts
@st.fragment
def compare_viewer(seg_b: Any) -> None:
    c0, c1 = st.columns([1, 3])
    with c0:
        view, idx = _view_controls("cmp", volume.array.shape)
        window = ss.get("window", "abdomen")
    with c1:
        a_img = viz.slice_overlay(volume.array, seg.masks, view, idx, window=window, spacing=volume.spacing)
        b_img = viz.slice_overlay(volume.array, seg_b.masks, view, idx, window=window, spacing=volume.spacing)
        d_img = viz.difference_map(seg.masks, seg_b.masks, view, idx, volume.array, window, volume.spacing)
        ca, cb, cd = st.columns(3)
        ca.image(a_img.square(min_size=360), caption="A", width="stretch")
        cb.image(b_img.square(min_size=360), caption="B", width="stretch")
        cd.image(d_img.square(min_size=360), caption="difference: white both, orange only A, cyan only B",
                 width="stretch")  # fmt: skip


with tab_cmp:
    if tab_cmp.open:
        if seg is None:
            st.info(
                "Run a segmentation first (run A); then choose a second template or encoder here (run B)."
            )
        else:
            st.markdown(
                f"**Run A**: template “{seg.info.get('template')}”, encoder `{seg.info.get('encoder')}`."
            )
            c1, c2, c3 = st.columns([3, 2, 1])
            tkey_b = c1.selectbox(
                "Template B",
                [*templates, "custom"],
                index=min(1, len(templates) - 1),
                format_func=lambda k: "free text…" if k == "custom" else templates[k].replace("{}", "…"),
                key="template_b_key",
                persist_state="page",
            )
            template_b = templates.get(tkey_b)
            if tkey_b == "custom":
                template_b = c1.text_input(
                    "Template B ({} = class name)",
                    "There is {} in this CT",
                    key="template_b",
                    persist_state="page",
                )
            enc_b_opt = c2.selectbox(
                "Encoder B",
                ["same as A", "minilm", "clip", "onehot", "other"],
                key="encoder_b",
                persist_state="page",
            )
            if enc_b_opt == "other":
                enc_b_opt = (
                    c2.text_input("Encoder B spec", key="encoder_b_spec", persist_state="page").strip()
                    or "same as A"
                )
            encoder_b = None if enc_b_opt == "same as A" else enc_b_opt
            c3.write("")
            run_b = c3.button("Run B", key="run_b", icon=":material/play_arrow:")
            if run_b:
                slot = st.empty()
                box = slot.container(border=True)
                try:
                    enc_model = encoder_b if encoder_b is not None else result["encoder"]
                    with box, st.spinner("Loading the model…"):
                        model_b = _model(result["model_key"], result["checkpoint"], enc_model)
                    seg_b = _segment(model_b, template_b, box, list(seg.masks))
                    enc_a = str(seg.info.get("encoder") or "minilm")
                    enc_b = str(seg_b.info.get("encoder") or enc_a)
                    try:
                        sim = al.prompt_similarity_matrix(
                            list(seg.masks),
                            seg.info.get("template"),
                            seg_b.info.get("template"),
                            enc_a,
                            enc_b,
                        )
                        sim_error = None
                    except UniversalError as exc:
                        sim, sim_error = None, str(exc)
                    ss["compare"] = {
                        "result_id": result["id"],
                        "seg": seg_b,
                        "sim": sim,
                        "sim_error": sim_error,
                        "table": al.compare_segmentations(seg, seg_b),
                    }
                    slot.empty()
                except UniversalError as exc:
                    slot.empty()
                    _show_error(exc)
                except (RuntimeError, MemoryError, OSError) as exc:
                    slot.empty()
                    st.error(f"Run B failed: {type(exc).__name__}: {exc}", icon=":material/error:")
            cmp = ss.get("compare")
            if cmp is not None and cmp["result_id"] == result["id"]:
                seg_b = cmp["seg"]
                st.markdown(
                    f"**Run B**: template “{seg_b.info.get('template')}”, encoder `{seg_b.info.get('encoder')}` "
                    f"({seg_b.timings.get('total', float('nan')):.1f} s)."
                )
                compare_viewer(seg_b)
                d1, d2 = st.columns([2, 3])
                with d1, st.container(key="compare_table"):
                    st.markdown("**Agreement per class** (DSC between run A and run B)")
                    st.dataframe(cmp["table"], hide_index=True)
                with d2, st.container(key="similarity_chart"):
                    if cmp["sim"] is not None:
                        names = list(seg.masks)
                        diag = np.diag(cmp["sim"])
                        st.plotly_chart(
                            viz.similarity_heatmap(
                                cmp["sim"],
                                names,
                                title="prompt similarity: rows template A, columns template B",
                            ),
                            config={"displaylogo": False},
                        )
                        st.caption(f"Same class, A vs B: mean cosine similarity {float(diag.mean()):.3f}.")
                    else:
                        st.info(cmp["sim_error"])


# -------------------------------------------------------------------------------------------- download
with tab_dl:
    if tab_dl.open:
        if seg is None:
            st.info("Run a segmentation first.")
        else:
            # the NIfTI files are written only when a download button is clicked (once per result)
            if ss.get("downloads", {}).get("result_id") != result["id"]:
                ss["downloads"] = {"result_id": result["id"], "files": None, "lock": threading.Lock()}
            dl = ss["downloads"]

            def _files(seg: Any = seg, dl: dict = dl) -> dict[str, bytes]:
                with dl["lock"]:
                    if dl["files"] is None:
                        dl["files"] = viz.saved_files(seg)
                return dl["files"]

            def _labels() -> bytes:
                return _files()["labels.nii.gz"]

            def _masks_zip() -> bytes:
                return viz.zip_bytes({k: v for k, v in _files().items() if k.startswith("masks/")})

            name = getattr(volume, "name", "ct") or "ct"
            report = seg.report()
            ev = ss.get("evaluation")
            if ev is not None and ev.get("result") is not None and ev["key"][0] == result["id"]:
                report["evaluation"] = ev["result"].to_dict()
            st.markdown(
                "Masks and labels are written on the **input file's own grid and affine** (the same files as "
                "`universal segment`)."
            )
            c1, c2, c3, c4 = st.columns(4)
            c1.download_button("labels.nii.gz", _labels, f"{name}_labels.nii.gz", "application/gzip",
                               key="dl_labels", on_click="ignore")  # fmt: skip
            c2.download_button("masks (zip)", _masks_zip, f"{name}_masks.zip", "application/zip",
                               key="dl_masks", on_click="ignore")  # fmt: skip
            c3.download_button("report.json", viz.to_json_bytes(report), f"{name}_report.json", "application/json",
                               key="dl_report", on_click="ignore")  # fmt: skip
            if ev is not None and ev.get("result") is not None and ev["key"][0] == result["id"]:
                c4.download_button("metrics.csv", viz.metrics_csv(ev["result"]), f"{name}_metrics.csv", "text/csv",
                                   key="dl_metrics", on_click="ignore")  # fmt: skip
            else:
                c4.caption("metrics.csv: evaluate first (Evaluate tab).")


# the page is drawn: the warm-up may now load MONAI and the default model
warm_up["page_drawn"].set()
