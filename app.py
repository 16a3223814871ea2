"""The `universal` dashboard: upload a CT, choose organs and prompts, see 2-D/3-D overlays, compare DSC/NSD.

Run it with ``make demo`` or ``streamlit run app.py``. This file only wires Streamlit widgets to the package:
the session's actions (``universal.dashboard``), its state (``universal.app_state``: one ``DashboardState``
in ``st.session_state["state"]``), samples, models and uploads (``universal.app_logic``), figures
(``universal.viz``). Shared by all sessions (``st.cache_resource``): one base Predictor per (weights, device)
and the samples, found in ``$UNIVERSAL_DATA_DIR`` (default: ``../shared/data`` beside this file).
Research software, not for clinical use.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
from PIL import Image

from universal import app_logic as al
from universal import correct_session as fix
from universal import dashboard as dash
from universal import viz
from universal import weights_panel as wp
from universal.app_state import DashboardState, RunSettings
from universal.errors import UniversalError
from universal.finetune import FinetuneConfig

APP_TITLE = "universal — text-prompted organ and tumour segmentation in CT"
VIEWS = ["axial", "coronal", "sagittal"]
SOURCES = ["Built-in sample", "Upload a file", "Path on the server"]
TABS = ["Segmentation", "Correct", "3-D", "Evaluate", "Compare prompts", "Download"]
CONFIG = al.DashboardConfig.from_env(project_root=Path(__file__).resolve().parent)
ERROR, PLAY = ":material/error:", ":material/play_arrow:"
PAGE = {"persist_state": "page"}  # widgets of a tab keep their value while another tab is open
PLOTLY = {"displaylogo": False}
T = dash.TEXT

st.set_page_config(page_title="universal · CT segmentation", page_icon=":material/radiology:", layout="wide")


# ============================================================================================ shared caches
@st.cache_resource(show_spinner=False)
def _warm_up() -> dash.WarmUp:
    return dash.WarmUp()


@st.cache_resource(show_spinner=False)
def _sample(key: str) -> al.SampleData:
    return al.load_sample(key, data_dir=CONFIG.data_dir)


@st.cache_resource(show_spinner=False, max_entries=6)
def _predictor(weights: al.WeightsChoice, device: str) -> Any:
    """The base Predictor of ``weights`` on ``device``, shared by all sessions (a run: ``with_settings``)."""
    return _warm_up().take(weights, device) or al.base_predictor(weights, device)


@st.cache_data(show_spinner=False, ttl=300)
def _options() -> tuple[list[al.ModelChoice], list[str]]:
    return al.model_choices(), al.available_devices()


# ============================================================================================ session state
ss = st.session_state
state = DashboardState.of(ss)
warm_up, limit_mb = _warm_up(), al.upload_limit_mb()


def _in_box(what: str, work: Any) -> None:
    """Run ``work(box)`` in a bordered box (its progress bars, removed after); errors become messages."""
    slot = st.empty()
    try:
        work(slot.container(border=True))
    except UniversalError as exc:
        st.error(str(exc) or type(exc).__name__, icon=ERROR)
    except (RuntimeError, MemoryError, OSError) as exc:  # e.g. out of memory on a large scan
        st.error(f"{what} failed: {type(exc).__name__}: {exc}", icon=ERROR)
    finally:
        slot.empty()


def _radio(label: str, options: list[str], key: str, **kw: Any) -> Any:
    return st.radio(label, options, horizontal=True, key=key, **PAGE, **kw)


def _template_picker(where: Any, key: str, label: str, index: int, text: str, **kw: Any) -> str | None:
    k = where.selectbox(label, dash.template_options(), index, format_func=dash.template_label, key=key, **kw)
    if k != dash.CUSTOM:
        return dash.template_of(k)
    return where.text_input(f"{label} ({{}} = the class name)", text, key=key.replace("_key", "_text"), **kw)


def _encoder_picker(where: Any, label: str, own: str, key: str, **kw: Any) -> str | None:
    options, help_ = dash.encoder_options(own), T["encoder_help"]
    e = where.selectbox(label, options, format_func=dash.encoder_label, key=key, help=help_, **kw)
    if e == dash.CUSTOM:
        e = where.text_input(f"{label} spec", key=f"{key}_spec", placeholder=T["encoder_spec"], **kw).strip()
    return None if e in (own, "") else e


def _download_box(offer: wp.WeightsOffer) -> None:
    """The Download control of a registry source: licence and acceptance, size, progress bar, sha256."""
    if offer.cached:
        st.caption(f"{offer.name}: downloaded; {offer.sha_line}")
        return
    with st.expander(offer.title, expanded=True, icon=":material/download:"):
        for line in offer.lines:
            st.caption(line)
        accepted = True
        if offer.needs_checkbox:
            accepted = st.checkbox(offer.accept_label, key=f"accept_{offer.name}")
        if not st.button("Download", key=f"download_{offer.name}", disabled=not accepted, width="stretch"):
            return
        bar = st.progress(0.0, text=f"Connecting for {offer.name}…")
        try:
            sha = wp.download(offer.name, accepted, lambda f, text: bar.progress(f, text=text))
        except UniversalError as exc:
            st.error(str(exc), icon=ERROR)
            return
        st.success(f"Downloaded {offer.name}; sha256 `{sha}`")
        _options.clear()  # the Model selector lists it as available now
        st.rerun()


# ============================================================================================ sidebar: input
samples = {s.key: s for s in al.list_samples(CONFIG.data_dir)}
with st.sidebar:
    st.header("1 · CT scan")
    source = st.radio("Source", SOURCES, key="source")
    ref: dash.InputRef | None = None
    if source == SOURCES[0]:
        key = st.selectbox("Sample", list(samples), format_func=lambda k: samples[k].label, key="sample")
        st.caption(samples[key].description)
        ref = dash.InputRef("sample", key)
    elif source == SOURCES[1]:
        up = st.file_uploader(T["upload"].format(limit=limit_mb), key="upload", help=T["upload_help"])
        ref = dash.InputRef("upload", up) if up is not None else None
    else:
        path = st.text_input(T["server_path"], key="server_path", placeholder=T["path_example"]).strip()
        ref = dash.InputRef("path", path) if path else None
    if series := dash.series_choices(state.input, ref):  # a DICOM folder / zip with several CT series
        ref = dash.with_series(ref, state.input, st.selectbox("DICOM series", *series))

if state.input.id != (ref.id if ref else None):  # a new input: the state clears what came from the old one
    state.set_input(dash.load_input(ref, state.ensure_folder(), limit_mb, _sample))
    if state.input.volume is not None:
        ss["classes"] = dash.initial_classes(state.input)
    if dash.after_new_input(ss, state.input, ref):  # sliders start again; a series choice is drawn at once
        st.rerun()
inp, volume = state.input, state.input.volume

# ========================================================================================== sidebar: controls
with st.sidebar:
    st.header("2 · Model and prompts")
    model_choices, devices = _options()
    choices = {c.key: c for c in model_choices}
    label = functools.partial(al.choice_label, choices)
    model_key = st.selectbox("Model", [*choices, al.CHECKPOINT], format_func=label, key="model")
    checkpoint = None
    if model_key == al.CHECKPOINT:
        checkpoint = st.text_input(T["checkpoint_input"], key="checkpoint").strip() or None
    for kind, note, kw in al.model_notes(choices, model_key):
        getattr(st, kind)(note, **kw)
    if offer := wp.offer(model_key):
        _download_box(offer)
    encoder = _encoder_picker(st, "Text encoder", "model's own", "encoder")
    template = _template_picker(st, "template_key", "Prompt template", 0, "A computerized tomography of a {}")
    quick = dash.class_groups(inp.classes)

    def _apply_quick() -> None:
        if ss.get("quick_pick") in quick:
            ss["classes"] = quick[ss["quick_pick"]]

    ss.setdefault("classes", list(dash.COMMON_CLASSES))
    st.selectbox(
        "Quick pick", [*quick], None, key="quick_pick", on_change=_apply_quick, placeholder=T["pick"]
    )
    options = dash.class_options()
    classes = st.multiselect("Classes (type to search)", options, format_func=dash.class_label, key="classes")
    fast = st.toggle("Fast mode (3 mm)", value=True, key="fast",
                     help="About 8× faster, coarser masks, for a model made at 1.5 mm (the official ones); the "
                     "built-in model already works at 3 mm, and the run says so.")  # fmt: skip
    device = st.selectbox("Device", devices, key="device", help="auto: the GPU if there is one, else the CPU")
    precision = dash.precision_of(st.selectbox("Precision", dash.precision_options(), key="precision"))
    weights = al.WeightsChoice(model_key, checkpoint, encoder)
    settings = RunSettings(weights, device, tuple(classes), bool(fast), template, precision)
    usable = model_key == al.CHECKPOINT or choices[model_key].available
    ready = volume is not None and bool(classes) and weights.ready and usable
    run = st.button("Segment", type="primary", key="run", disabled=not ready, width="stretch", icon=PLAY)

# ========================================================================================== main: header, run
st.markdown(f"### {APP_TITLE}")
st.caption(T["subtitle"])
for kind, text, kw in dash.input_messages(inp):
    getattr(st, kind)(text, **kw)


def _run_a(box: Any) -> None:
    box.markdown("**Running…**")
    t0 = time.perf_counter()
    with box, st.spinner("Loading the model (once per server)…"):
        base = _predictor(weights, device)
    model_seconds = time.perf_counter() - t0
    state.set_run(dash.segment(base, volume, settings, inp.id, dash.StageProgress.of(box), model_seconds))


if run and ready:
    state.clear_results()
    _in_box("The segmentation", _run_a)

result = state.run
seg = result.seg if result else None
for kind, text, kw in dash.run_messages(state, settings):
    getattr(st, kind)(text, **kw)

# ============================================================================================ tabs
# stateful tabs: only the open tab's code runs, so a 3-D mesh or an evaluation is computed when looked at
tab_seg, tab_fix, tab_3d, tab_eval, tab_cmp, tab_dl = st.tabs(TABS, key="tab", on_change="rerun")


def _view_controls(prefix: str, shape: tuple[int, ...]) -> tuple[str, int]:
    view = _radio("View", VIEWS, f"{prefix}_view")
    n = viz.num_slices(shape, view)
    default = state.view_defaults.get(prefix, {}).get(view, n // 2)
    idx = st.slider("Slice", 0, max(n - 1, 1), min(int(default), n - 1), key=f"{prefix}_slice_{view}", **PAGE)
    return view, min(int(idx), n - 1)


def _table(frame: Any, **kw: Any) -> None:
    st.dataframe(frame, hide_index=True, height=min(36 * (len(frame) + 1) + 3, 640), **kw)


def _class_toggles(masks: dict[str, np.ndarray]) -> list[str]:
    if masks:
        st.markdown("**Show classes**")
    cols = st.columns(2)
    labels = {n: f"{n}{'' if m.any() else ' (empty)'}" for n, m in masks.items()}
    return [n for i, n in enumerate(masks) if cols[i % 2].checkbox(labels[n], True, key=f"show_{n}", **PAGE)]


@st.fragment
def slice_viewer() -> None:
    """The 2-D viewer: reruns on its own when a slider moves (the segmentation is never recomputed)."""
    sources = dash.overlay_sources(result, inp)
    left, right = st.columns([3, 2], gap="medium")
    with right:
        source = next(iter(sources), None)
        if len(sources) > 1:
            source = _radio("Overlay", list(sources), "overlay_source", help=T["overlay_help"])
        elif sources:
            st.caption(f"Overlay: the {source}" + ("" if seg else " (run a segmentation to see yours)"))
        masks = sources.get(source, {})
        view, idx = _view_controls("viewer", volume.array.shape)
        opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key="opacity", **PAGE)
        window = _radio("CT window", list(viz.window_presets()), "window", format_func=dash.window_label)
        shown = _class_toggles(masks)
    with left:
        t0 = time.perf_counter()
        shown_masks = {n: masks[n] for n in shown}
        draw = {"opacity": opacity, "window": window, "spacing": volume.spacing}
        img = viz.slice_overlay(volume.array, shown_masks, view, idx, **draw)
        st.image(img.square(min_size=560), caption=dash.slice_caption(view, idx), width="stretch")
        if shown:
            st.markdown(dash.legend_html(shown), unsafe_allow_html=True)
        state.last_render_s = time.perf_counter() - t0


with tab_seg:
    if tab_seg.open and volume is None:
        st.info("No CT loaded yet.")
    elif tab_seg.open:
        if "viewer" not in state.view_defaults:  # start each view on the slice through the masks' centre
            state.view_defaults["viewer"] = dash.mask_centres(seg.masks if seg else inp.gt_masks)
        slice_viewer()
        if seg is not None:
            c1, c2 = st.columns([3, 2], gap="medium")
            with c1, st.container(key="volume_table"):
                st.subheader("Volumes and mean HU")
                _table(viz.results_frame(seg))
            with c2, st.container(key="timing_table"):
                st.subheader("Timing")
                share = st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="percent")
                columns = {"seconds": st.column_config.NumberColumn(format="%.2f s"), "share": share}
                st.dataframe(dash.timings_table(result), hide_index=True, column_config=columns)
                st.dataframe(dash.efficiency_table(result), hide_index=True)  # FLARE's per-case numbers


# -------------------------------------------------------------------------------------------- 3-D
@st.fragment
def mesh_view() -> None:
    source = _radio("Surfaces of", ["segmentation", "reference"], "mesh_source") if inp.gt_masks else None
    masks = inp.gt_masks if source == "reference" else seg.masks
    nonempty = [n for n, m in masks.items() if m.any()]
    if not nonempty:
        st.info("All masks are empty: nothing to draw.")
        return
    c1, c2, c3 = st.columns([4, 1, 1])
    key = f"mesh_classes_{result.id}_{source or 'segmentation'}"
    names = c1.multiselect("Classes in 3-D", nonempty, nonempty, key=key, **PAGE)
    cap = c2.select_slider("Max triangles", dash.TRIANGLE_CAPS, 60_000, key="mesh_cap", **PAGE)
    opacity = c3.slider("Opacity", 0.2, 1.0, 1.0, 0.1, key="mesh_opacity", **PAGE)
    if not names:
        st.info("Choose at least one class.")
        return
    with st.spinner("Building surfaces…"):
        record = dash.mesh(state, masks, volume.affine, (result.id, source, tuple(names), cap))
    record.fig.update_traces(opacity=opacity)  # no new surfaces for a new opacity
    with st.container(key="mesh_chart"):
        st.plotly_chart(record.fig, config=PLOTLY)
    triangles = record.fig.layout.meta["triangles"]
    st.caption(T["mesh"].format(triangles=triangles, cap=cap, seconds=record.seconds))


with tab_3d:
    if tab_3d.open and seg is None:
        st.info("Run a segmentation to see the 3-D view.")
    elif tab_3d.open:
        mesh_view()


# -------------------------------------------------------------------------------------------- correct
def _draw(img: np.ndarray, key: str, name: str, tool: str, size: int, view: str, idx: int) -> int:
    """The drawing surface of the tool on the slice image; applies what was drawn or clicked (voxels changed)."""
    from streamlit_drawable_canvas import st_canvas
    from streamlit_image_coordinates import streamlit_image_coordinates

    hw = img.shape[:2]
    if fix.TOOLS[tool] == "component":
        click = streamlit_image_coordinates(img, key=f"{key}_click", width=hw[1], cursor="crosshair")
        point = fix.click_point(click, hw)
        return fix.remove_component(state, name, view, idx, point, hw) if point else 0
    drawn = st_canvas(stroke_width=size, stroke_color=fix.stroke_css(name, tool), background_image=Image.fromarray(img),
                      height=hw[0], width=hw[1], drawing_mode="freedraw", key=f"{key}_canvas")  # fmt: skip
    strokes = fix.canvas_strokes(drawn.json_data)
    return fix.apply_strokes(state, name, view, idx, strokes, fix.TOOLS[tool], hw) if strokes else 0


def _edit_buttons(name: str, view: str, idx: int) -> int:
    record = fix.correction_of(state)
    c1, c2 = st.columns(2)
    changed = c1.button("Undo", key="fix_undo", icon=":material/undo:", disabled=not record.history.can_undo,
                        width="stretch") and fix.undo(state)  # fmt: skip
    changed |= c2.button("Redo", key="fix_redo", icon=":material/redo:", disabled=not record.history.can_redo,
                         width="stretch") and fix.redo(state)  # fmt: skip
    n = st.number_input("Neighbour slices (each side)", 1, 20, 2, key="fix_n", **PAGE)
    if st.button(f"Copy this slice of {name} to {n} neighbours each side", key="fix_copy", width="stretch"):
        changed |= bool(fix.copy_to_neighbours(state, name, view, idx, int(n)))
    with st.container(key="fix_volume"):
        st.markdown(fix.volume_text(state, name))
    st.caption(record.last or fix.TEXT["help"])
    return int(bool(changed))


def correct_editor() -> None:
    """Brush / eraser / remove-component on the current slice; every edit updates the run's masks."""
    record = fix.correction_of(state)
    left, right = st.columns([3, 2], gap="medium")
    with right:
        name = st.selectbox("Class to correct", list(seg.masks), key="fix_class", **PAGE)
        tool = _radio("Tool", list(fix.TOOLS), "fix_tool")
        size = st.slider("Brush size (pixels)", 2, 60, 14, key="fix_brush", **PAGE)
        view, idx = _view_controls("fix", volume.array.shape)
        changed = _edit_buttons(name, view, idx)
    with left:
        draw = {"opacity": 0.35, "window": ss.get("window", "abdomen"), "spacing": volume.spacing}
        img = viz.slice_overlay(volume.array, seg.masks, view, idx, **draw).square(min_size=512)
        changed |= _draw(img, f"fix_{record.run_id}_{record.version}_{view}_{idx}", name, tool, size, view, idx)
        st.caption(dash.slice_caption(view, idx))
    if changed:
        st.rerun()  # the overlay, the volumes and every other view show the edited masks


def _save_case(record: Any) -> None:
    st.subheader("Save as training case")
    corrected = record.history.corrected
    options = list(seg.masks)
    pick = st.multiselect("Classes to annotate (the corrected ones; the others stay unannotated)", options,
                          corrected, key=f"fix_annotate_{record.run_id}_{len(corrected)}")  # fmt: skip
    if st.button("Save as training case", key="fix_save", disabled=not pick, icon=":material/save:"):
        try:
            case = fix.save_training_case(state, pick)
            st.success(fix.TEXT["saved"].format(name=case.name, classes=", ".join(case.annotated)))
        except (UniversalError, OSError) as exc:
            st.error(str(exc), icon=ERROR)
    rows = fix.cases_table()
    st.markdown(f"**Corrections dataset** `{fix.corrections_root() / 'dataset'}`: {len(rows)} case(s)")
    if rows:
        _table(rows)


def _finetune_status() -> None:
    job = ss.get("finetune_job")
    if job is None:
        return
    kind, text = fix.job_message(job)
    getattr(st, kind)(text)
    if job.running:
        st.progress(job.fraction)
        st.button("Stop", key="ft_stop", on_click=job.stop, icon=":material/stop:")
    elif ss.get("finetune_shown") is not job:  # finished: the Model box lists the new model after a rerun
        ss["finetune_shown"] = job
        _options.clear()
        st.rerun()


def _finetune_panel() -> None:
    st.subheader("Fine-tune on the saved cases")
    job, defaults = ss.get("finetune_job"), FinetuneConfig()
    c1, c2, c3, c4 = st.columns([1, 1, 1, 1], vertical_alignment="bottom")
    steps = c1.number_input("Steps", 1, 5000, defaults.steps, key="ft_steps", **PAGE)
    mix = c2.number_input("Phantom cases mixed in", 0, 8, defaults.mix_phantom, key="ft_mix", **PAGE)
    anchor = c3.checkbox("Anchor the other classes", defaults.anchor, key="ft_anchor", help=fix.TEXT["anchor"])
    busy = job is not None and job.running
    if c4.button("Fine-tune", key="ft_start", disabled=busy or not fix.cases_table(), icon=PLAY):
        try:
            weights = fix.finetune_weights(result.settings.weights)
            config = FinetuneConfig(steps=int(steps), mix_phantom=int(mix), anchor=bool(anchor))
            ss["finetune_job"] = fix.FinetuneJob(fix.corrections_root() / "dataset", weights,
                                                 fix.new_model_path(weights=weights), config).start()  # fmt: skip
        except UniversalError as exc:
            st.error(str(exc), icon=ERROR)
    running = ss.get("finetune_job") is not None and ss["finetune_job"].running
    st.fragment(_finetune_status, run_every=1.0 if running else None)()


with tab_fix:
    if tab_fix.open and seg is None:
        st.info("Run a segmentation to correct it.")
    elif tab_fix.open:
        if "fix" not in state.view_defaults:  # start each view on the slice through the masks' centre
            state.view_defaults["fix"] = dash.mask_centres(seg.masks)
        correct_editor()
        _save_case(fix.correction_of(state))
        _finetune_panel()


# -------------------------------------------------------------------------------------------- evaluate
def _gt_input() -> dash.GroundTruthRef | None:
    options = (["The sample's reference"] if inp.gt_masks else []) + ["Upload a label map", SOURCES[2]]
    src = _radio("Ground truth", options, "gt_source")
    if src == "The sample's reference":
        st.caption(inp.gt_label)
        return dash.GroundTruthRef("sample", inp.id)
    conventions = al.gt_conventions()
    convention = st.selectbox("Label values are…", conventions, key="gt_convention", help=T["gt"], **PAGE)
    if src == SOURCES[2]:
        p = st.text_input("Label map on the server", key="gt_path", **PAGE).strip()
        return dash.GroundTruthRef("path", p, convention) if p else None
    up = st.file_uploader("Label map (NIfTI, NRRD, MHA) on the CT's grid", key="gt_upload")
    if up is not None:
        return dash.GroundTruthRef("upload", up, convention)
    kept = dash.kept_upload(state)  # the uploader forgets its file when its tab closes; the reference stays
    if kept is not None:
        st.caption(f"Using the label map uploaded before: {kept.name}")
    return dash.GroundTruthRef("kept", kept.id) if kept is not None else None


def _scores(ev: Any) -> None:
    res = ev.result
    for col, (label, value) in zip(st.columns(3), dash.score_summary(res)):
        col.metric(label, value)
    c1, c2 = st.columns([2, 3])
    with c1, st.container(key="metrics_table"):
        number = st.column_config.NumberColumn
        columns = {"dsc": number("DSC", format="%.3f"), "nsd": number("NSD", format="%.3f")}
        columns["tolerance_mm"] = number("NSD tol. (mm)", format="%g")
        _table(dash.metrics_table(res), column_config=columns)
        st.caption(dash.evaluation_caption(ev))
    with c2, st.container(key="metrics_chart"):
        st.plotly_chart(viz.metrics_bar_chart(res), config=PLOTLY)


with tab_eval:
    if tab_eval.open and volume is None:
        st.info("No CT loaded yet.")
    elif tab_eval.open:
        gt_ref = _gt_input()
        rules = dash.evaluation_rules()
        rule = _radio("Rules", list(rules), "eval_preset")
        gt = dash.ground_truth(state, gt_ref, limit_mb)
        if gt is not None and gt.error:
            st.error(gt.error, icon=ERROR)
        if seg is None:
            st.info(T["evaluate_first"])
        elif gt is not None and not gt.error:
            with st.spinner("Computing DSC and NSD…"):
                ev = dash.evaluation(state, gt, rules[rule])
            if ev.error:
                st.error(ev.error, icon=ERROR)
            else:
                _scores(ev)


# -------------------------------------------------------------------------------------------- compare prompts
@st.fragment
def compare_viewer(seg_b: Any) -> None:
    c0, c1 = st.columns([1, 3])
    with c0:
        view, idx = _view_controls("cmp", volume.array.shape)
        window = ss.get("window", "abdomen")
    with c1:
        for col, (img, caption) in zip(st.columns(3), dash.compare_images(seg, seg_b, view, idx, window)):
            col.image(img.square(min_size=360), caption=caption, width="stretch")


def _run_b(box: Any, encoder_b: str | None, template_b: str | None) -> None:
    w = result.settings.weights
    with box, st.spinner("Loading the model…"):
        weights_b = al.WeightsChoice(w.key, w.checkpoint, encoder_b or w.encoder)
        base_b = _predictor(weights_b, result.settings.device)
    state.set_compare(dash.compare_run(result, base_b, template_b, dash.StageProgress.of(box)))


def _comparison(cmp: Any) -> None:
    template_b, encoder_b = cmp.seg.info.get("template"), cmp.seg.info.get("encoder")
    total = cmp.seg.timings.get("total", float("nan"))
    st.markdown(f"**Run B**: template “{template_b}”, encoder `{encoder_b}` ({total:.1f} s).")
    compare_viewer(cmp.seg)
    d1, d2 = st.columns([2, 3])
    with d1, st.container(key="compare_table"):
        st.markdown("**Agreement per class** (DSC between run A and run B)")
        st.dataframe(cmp.table, hide_index=True)
    with d2, st.container(key="similarity_chart"):
        if cmp.sim is None:
            st.info(cmp.sim_error)
            return
        title = "prompt similarity: rows template A, columns template B"
        st.plotly_chart(viz.similarity_heatmap(cmp.sim, list(seg.masks), title=title), config=PLOTLY)
        st.caption(f"Same class, A vs B: mean cosine similarity {float(np.diag(cmp.sim).mean()):.3f}.")


with tab_cmp:
    if tab_cmp.open and seg is None:
        st.info(T["compare_first"])
    elif tab_cmp.open:
        st.markdown(f"**Run A**: template “{seg.info.get('template')}”, encoder `{seg.info.get('encoder')}`.")
        c1, c2, c3 = st.columns([3, 2, 1], vertical_alignment="bottom")
        template_b = _template_picker(c1, "template_b_key", "Template B", 1, "There is {} in this CT", **PAGE)
        encoder_b = _encoder_picker(c2, "Encoder B", "same as A", "encoder_b", **PAGE)
        if c3.button("Run B", key="run_b", icon=PLAY):
            _in_box("Run B", lambda box: _run_b(box, encoder_b, template_b))
        if state.current_compare() is not None:
            _comparison(state.current_compare())


# -------------------------------------------------------------------------------------------- download
with tab_dl:
    if tab_dl.open and seg is None:
        st.info("Run a segmentation first.")
    elif tab_dl.open:
        st.markdown(T["downloads"])
        files, cols = dash.downloads(state), st.columns(4)  # the NIfTI files are written on the first click
        for i, f in enumerate(files):
            cols[i % 4].download_button(f.label, f.data, f.file_name, f.mime, key=f.key, on_click="ignore")
        if "dl_metrics" not in {f.key for f in files}:
            cols[-1].caption("metrics.csv: evaluate first (Evaluate tab).")


warm_up.page_drawn.set()  # the page is drawn: the warm-up may now build the default Predictor
