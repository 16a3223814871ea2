"""The :class:`Predictor`: weights and settings taken once, validated once, then one method per entry point.

In the spirit of nnU-Net's predictor: everything a run needs is decided at construction, *before* any weights are
read — the settings (:class:`PredictorSettings`: device, precision, overlap, threshold, fast mode, post-processing,
classes, template, window) are checked where they enter, the device is checked to exist, and only then is the model
loaded (once; by name through a per-process cache) and the classes resolved against it. What the weights expect
(spacing, HU window, crop, grid convention, window size, default overlap, threshold and precision) is read from the
model's :class:`~universal.spec.ModelSpec` and nowhere else; a setting left at ``None`` takes the spec's value, and
:attr:`Predictor.resolved` shows the values a run uses.

>>> import universal  # doctest: +SKIP
>>> predictor = universal.Predictor("builtin", fast=True, classes=["liver", "spleen"])  # doctest: +SKIP
>>> seg = predictor.predict("ct.nii.gz")  # doctest: +SKIP
>>> for case in predictor.predict_many(["a.nii.gz", "b.nii.gz"]):  # doctest: +SKIP
...     print(case.source, case.error or case.segmentation.volumes_ml)

Front-ends (CLI, dashboard, pseudo-labelling, notebooks, bench) build a Predictor; :func:`universal.segment` is a
thin wrapper around one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from universal.errors import ClassNameError, InputError, UniversalError
from universal.postprocess import PostprocessConfig
from universal.preprocess import CONVENTIONS, PreprocessConfig, spacing_text
from universal.spec import PRECISIONS, InferenceDefaults, ModelSpec
from universal.taxonomy import resolve_class

__all__ = [
    "DEVICE_CHOICES",
    "DEVICE_NAMES",
    "CaseResult",
    "Predictor",
    "PredictorSettings",
    "device_name",
    "resolve_device",
]

#: what ``device`` accepts (besides ``None`` / ``"auto"``): ``cpu``, ``cuda``, ``cuda:N``, ``mps``
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
#: the device names allowed, in words (error messages, help)
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def device_name(device: Any, what: str = "device") -> str:
    """``device`` stripped and in lower case when it names one of :data:`DEVICE_CHOICES` or ``cuda:N``.

    Only the name is checked (where a setting enters); whether this machine has the device is
    :func:`resolve_device`'s part.

    >>> device_name(" CUDA:1 ")
    'cuda:1'

    Raises:
        InputError: any other value (``"gpu"``, ``"cuda:x"``, a number), naming ``what`` and the names allowed.
    """
    text = device.strip().lower() if isinstance(device, str) else ""
    index = text.removeprefix("cuda:") if text.startswith("cuda:") else None
    if text in DEVICE_CHOICES or (index is not None and index.isascii() and index.isdecimal()):
        return text
    raise InputError(f"{what} is {device!r}; use {DEVICE_NAMES}")


ProgressFn = Callable[[str, float], None]


def _check_number(name: str, value: Any, low: float, high: float, closed_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"{name} is {value!r}; it must be a number")
    v = float(value)
    ok = math.isfinite(v) and (v >= low if closed_low else v > low) and v < high
    if not ok:
        bracket = "[" if closed_low else "("
        raise InputError(f"{name} is {value!r}; it must be in {bracket}{low:g}, {high:g})")
    return v


@dataclass(frozen=True)
class PredictorSettings:
    """How a :class:`Predictor` runs; ``None`` = the model spec's value. Checked here, where settings enter.

    Attributes:
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        precision: Arithmetic of the forward passes (:data:`universal.spec.PRECISIONS`).
        overlap: Overlap of neighbouring windows, in [0, 1).
        threshold: Probability threshold of the masks, in (0, 1).
        fast: Work at the spec's fast spacing (3 mm) instead of the model's own (a model that already works there:
            an ``InputWarning``, and the run is reported as the standard one).
        postprocess: ``True`` (default rules), ``False`` (raw thresholded masks) or a ``PostprocessConfig``.
        classes: Class names (any spelling ``resolve_class`` accepts); ``None`` = all of the model's classes.
        template: Prompt template (key or text with ``{}``); ``None`` = the model's own.
        sw_batch_size: Windows per forward pass (default 4 on CUDA, 1 elsewhere).
        patch_size: Window size in voxels, overriding the spec's training window (e.g. small windows in tests).
        preprocessing: A ``PreprocessConfig`` replacing the spec's preprocessing (not with ``fast``: refused).
        convention: Grid convention (:data:`universal.preprocess.CONVENTIONS`) replacing the preprocessing's:
            ``"official"`` runs the official release's MONAI chain (the default of its checkpoints),
            ``"universal"`` the project's own.
        return_probabilities: Also return probabilities on the input grid (float16; float32 under the official
            convention, as its chain gives them).
        max_voxels: Most voxels the prepared grid of one CT may hold (``None``:
            :data:`universal.preprocess.MAX_PREPARED_VOXELS`); a larger one is refused before it is allocated.
    """

    device: str | None = None
    precision: str | None = None
    overlap: float | None = None
    threshold: float | None = None
    fast: bool = False
    postprocess: bool | PostprocessConfig = True
    classes: tuple[str, ...] | None = None
    template: str | None = None
    sw_batch_size: int | None = None
    patch_size: tuple[int, int, int] | None = None
    preprocessing: PreprocessConfig | None = None
    return_probabilities: bool = False
    convention: str | None = None
    max_voxels: int | None = None

    def __post_init__(self) -> None:
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"precision is {self.precision!r}; it must be one of {', '.join(PRECISIONS)}")
        if self.overlap is not None:
            object.__setattr__(self, "overlap", _check_number("overlap", self.overlap, 0.0, 1.0, True))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", _check_number("threshold", self.threshold, 0.0, 1.0, False))
        for name in ("fast", "return_probabilities"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name} is {getattr(self, name)!r}; it must be True or False")
        if not isinstance(self.postprocess, (bool, PostprocessConfig)) and self.postprocess is not None:
            raise InputError(
                f"postprocess is {self.postprocess!r}; it must be True, False or a universal.postprocess.PostprocessConfig"
            )
        if self.postprocess is None:
            object.__setattr__(self, "postprocess", False)
        if self.fast and self.preprocessing is not None:
            raise InputError(
                "fast and preprocessing both set the grid: give the fast spacing in the PreprocessConfig "
                "(spacing_mm) and leave fast out"
            )
        if self.convention is not None and self.convention not in CONVENTIONS:
            raise InputError(f"convention is {self.convention!r}; it must be one of {', '.join(CONVENTIONS)}")
        self._check_lists()

    def _check_lists(self) -> None:
        if self.classes is not None:
            classes = (
                (self.classes,) if isinstance(self.classes, str) else tuple(str(c) for c in self.classes)
            )
            if not classes:
                raise InputError("classes is empty; name at least one class (or None for all of the model's)")
            object.__setattr__(self, "classes", classes)
        if self.sw_batch_size is not None and (
            isinstance(self.sw_batch_size, bool)
            or not isinstance(self.sw_batch_size, int)
            or self.sw_batch_size < 1
        ):
            raise InputError(f"sw_batch_size is {self.sw_batch_size!r}; it must be a positive integer")
        if self.max_voxels is not None and (
            isinstance(self.max_voxels, bool)
            or not isinstance(self.max_voxels, (int, np.integer))
            or self.max_voxels < 1
        ):
            raise InputError(
                f"max_voxels is {self.max_voxels!r}; it must be a positive integer (None: the default limit)"
            )
        if self.max_voxels is not None:
            object.__setattr__(self, "max_voxels", int(self.max_voxels))
        if self.patch_size is not None:  # validated by the same rule as the spec's window
            object.__setattr__(self, "patch_size", InferenceDefaults(patch_size=self.patch_size).patch_size)
        if self.preprocessing is not None and not isinstance(self.preprocessing, PreprocessConfig):
            raise InputError(
                f"preprocessing is a {type(self.preprocessing).__name__}; it must be a universal.preprocess.PreprocessConfig"
            )

    def replace(self, **changes: Any) -> PredictorSettings:
        return dataclasses.replace(self, **changes)


def resolve_device(device: Any = None):
    """The ``torch.device`` for ``device``, checked to exist here (``InputError`` naming what is available).

    >>> str(resolve_device("cpu"))
    'cpu'
    """
    import torch

    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device is {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(
                f"device {device!r} was asked for, but this machine has no usable CUDA GPU; use cpu"
            )
        if dev.index is not None and dev.index >= n:
            raise InputError(
                f"device {device!r} does not exist: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}"
            )
        return dev
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(
                f"device {device!r} was asked for, but Apple's MPS is not available here; use cpu"
            )
        return dev
    raise InputError(f"device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")


@dataclass(frozen=True)
class CaseResult:
    """One case of :meth:`Predictor.predict_many`: its source, and the segmentation or the error (one line)."""

    source: Any
    segmentation: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Resolved:
    """The values one run of a :class:`Predictor` uses (settings over the spec), recorded in every report."""

    classes: tuple[str, ...]
    preprocessing: PreprocessConfig
    patch_size: tuple[int, int, int]
    overlap: float
    threshold: float
    precision: str
    sw_batch_size: int
    fast: bool
    postprocess: PostprocessConfig | None
    return_probabilities: bool


class Predictor:
    """A model ready to segment CTs with fixed, validated settings.

    Args:
        weights: A pretrained name (``"builtin"``, ``"universal-unet"``, ...), a checkpoint path, or a model object
            (a ``UniversalModel``; it is never modified: a re-prompted or moved copy is used when needed).
        settings: A :class:`PredictorSettings`; or give its fields as keywords (``device=``, ``fast=``, ...).

    Raises:
        InputError: An invalid setting or an absent device (before any weights are read).
        ClassNameError: A class the model does not segment.
        CheckpointError / DownloadError: Weights that cannot be read or fetched.
    """

    def __init__(
        self, weights: Any = "builtin", settings: PredictorSettings | None = None, **kwargs: Any
    ) -> None:
        if settings is not None and kwargs:
            raise TypeError("pass either settings= or keyword settings, not both")
        settings = settings if settings is not None else PredictorSettings(**kwargs)
        device = resolve_device(settings.device)  # before any weights are read
        t0 = time.perf_counter()
        self._build(weights, *_load_base(weights), settings, device)
        self._load_seconds = time.perf_counter() - t0

    def _build(self, weights: Any, base: Any, label: str, settings: PredictorSettings, device: Any) -> None:
        """Place the loaded ``base`` model for ``settings`` and resolve the values every run uses."""
        self.settings, self.device = settings, device
        self._weights, self._base, self.model_label = weights, base, label
        self.model = _placed(base, settings.template, device, cached=not _is_module(weights))
        self.resolved = self._resolve()

    def with_settings(self, **changes: Any) -> Predictor:
        """A Predictor with some settings changed, sharing the loaded weights (no reload)."""
        settings = self.settings.replace(**changes)
        new = Predictor.__new__(Predictor)
        new._build(self._weights, self._base, self.model_label, settings, resolve_device(settings.device))
        new._load_seconds = 0.0
        return new

    # ------------------------------------------------------------------------------------------- properties
    @property
    def spec(self) -> ModelSpec | None:
        """The model's contract (``None`` for a bare network without one)."""
        return getattr(self.model, "spec", None)

    @property
    def classes(self) -> list[str]:
        return list(self.resolved.classes)

    def _resolve(self) -> Resolved:
        s, net = self.settings, self.model
        inference = getattr(net, "inference_defaults", None) or InferenceDefaults()
        spec = self.spec
        fast = bool(s.fast)
        if s.preprocessing is not None:
            prep = s.preprocessing
        else:
            prep = (spec or _bare_spec(net)).prepare_config(fast)
            if fast and prep == (spec or _bare_spec(net)).prepare_config(False):
                import warnings

                from universal.errors import InputWarning

                warnings.warn(
                    InputWarning(
                        f"fast changes nothing for {self.model_label}: it already works at the fast spacing "
                        f"({spacing_text(prep.target_spacing())}); the run is the standard one and is reported so"
                    ),
                    stacklevel=3,
                )
                fast = False
        if s.convention is not None and s.convention != prep.convention:
            prep = dataclasses.replace(prep, convention=s.convention)
        patch = s.patch_size or inference.patch_size
        divisor = int(getattr(net, "size_divisor", 1) or 1)
        if any(p % divisor for p in patch):
            raise InputError(
                f"patch_size {list(patch)} does not fit the {getattr(net, 'backbone_name', 'model')} backbone: "
                f"every side must be a multiple of {divisor}"
            )
        precision = s.precision or inference.precision
        return Resolved(
            classes=tuple(_resolve_classes(s.classes, net)),
            preprocessing=prep,
            patch_size=tuple(patch),
            overlap=inference.overlap if s.overlap is None else s.overlap,
            threshold=inference.threshold if s.threshold is None else s.threshold,
            precision=precision,
            sw_batch_size=s.sw_batch_size or (4 if self.device.type == "cuda" else 1),
            fast=fast,
            postprocess=_postprocess_config(s.postprocess),
            return_probabilities=bool(s.return_probabilities),
        )

    def take_load_seconds(self) -> float:
        """Seconds spent building this Predictor (loading, moving, re-prompting the model), reported once: in the
        timings of its first case; later cases report 0."""
        seconds, self._load_seconds = self._load_seconds, 0.0
        return seconds

    # ---------------------------------------------------------------------------------------------- running
    def predict(self, volume_or_path: Any, progress: ProgressFn | None = None, *, series: str | None = None):
        """Segment one CT (a :class:`~universal.io.Volume` or a path ``load_volume`` reads; ``series``: which DICOM
        series of a folder / zip, a SeriesInstanceUID or SeriesNumber) → ``Segmentation``."""
        from universal import inference

        return inference.run_pipeline(self, volume_or_path, progress, series=series)

    def prepare(self, volume_or_path: Any, progress: ProgressFn | None = None, *, series: str | None = None):
        """The first half of :meth:`predict` (read and preprocess; no model call, safe in a worker thread) →
        ``inference.PreparedCase`` for :meth:`infer`. ``predict(x)`` is ``infer(prepare(x))``."""
        from universal import inference

        return inference.prepare_case(self, volume_or_path, progress, series=series)

    def infer(self, prepared: Any, progress: ProgressFn | None = None):
        """The second half of :meth:`predict` (sliding window, post-processing, mapping back) → ``Segmentation``."""
        from universal import inference

        return inference.finish_case(self, prepared, progress)

    def run_network(self, prepared: Any, progress: ProgressFn | None = None):
        """The device's part of :meth:`infer` (the sliding window) → ``inference.InferredCase`` for :meth:`finish`.
        ``infer(p)`` is ``finish(run_network(p))``."""
        from universal import inference

        return inference.network_case(self, prepared, progress)

    def finish(self, inferred: Any, progress: ProgressFn | None = None):
        """The CPU's part of :meth:`infer` (post-processing, mapping back; no model call, safe in a worker thread
        while the device runs the next case) → ``Segmentation``."""
        from universal import inference

        return inference.complete_case(self, inferred, progress)

    def predict_many(
        self,
        inputs: Iterable[Any],
        progress: Callable[[int, Any, str, float], None] | None = None,
        *,
        series: str | None = None,
    ) -> Iterator[CaseResult]:
        """Segment each input in turn, yielding a :class:`CaseResult` per case; a failing case (a project error:
        unreadable file, not a CT, ...) is reported in its result and the next case runs. ``progress(i, source,
        stage, fraction)``."""
        for i, source in enumerate(inputs):
            report = None if progress is None else (lambda st, f, i=i, src=source: progress(i, src, st, f))
            try:
                yield CaseResult(source, self.predict(source, report, series=series))
            except UniversalError as exc:
                yield CaseResult(source, None, str(exc))

    def describe(self) -> dict[str, Any]:
        """The resolved settings and the model's identity as plain values (the ``settings`` of a report)."""
        r = self.resolved
        return {
            "model": self.model_label,
            "device": str(self.device),
            "classes": list(r.classes),
            "patch_size": list(r.patch_size),
            "overlap": r.overlap,
            "threshold": r.threshold,
            "precision": r.precision,
            "sw_batch_size": r.sw_batch_size,
            "fast": r.fast,
            "postprocess": postprocess_record(r.postprocess),
            "preprocessing": dataclasses.asdict(r.preprocessing),
            "weights_sha256": self.weights_sha256,
        }

    @property
    def weights_sha256(self) -> str | None:
        """The sha256 of the checkpoint file the weights were read from (``None`` for a model built in memory)."""
        return weights_sha256(self._base)

    def __repr__(self) -> str:
        r = self.resolved
        return (
            f"Predictor({self.model_label!r}, device={str(self.device)!r}, classes={len(r.classes)}, "
            f"fast={r.fast}, overlap={r.overlap}, precision={r.precision!r})"
        )


# ------------------------------------------------------------------------------------------------- loading
_MODEL_CACHE: dict[tuple, Any] = {}


def clear_model_cache() -> None:
    """Forget the models loaded by name (frees their memory)."""
    _MODEL_CACHE.clear()


def _is_module(weights: Any) -> bool:
    return not (weights is None or isinstance(weights, (str, os.PathLike)))


def _load_base(weights: Any) -> tuple[Any, str]:
    """The model on the CPU as loaded (cached per process for names and paths) and a label for reports."""
    if _is_module(weights):
        return weights, type(weights).__name__
    name = "builtin" if weights is None else str(weights)
    key = (name, "cpu", None, _file_identity(name))  # a checkpoint replaced on disk is read again
    if key not in _MODEL_CACHE:
        from universal.model import load_pretrained

        _MODEL_CACHE[key] = load_pretrained(name).eval()
    return _MODEL_CACHE[key], name


def _file_identity(name: str) -> tuple | None:
    """``(real path, size, modification time)`` of a checkpoint path; ``None`` for names (registry, Hub)."""
    try:
        path = os.path.realpath(os.path.expanduser(name))
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (path, st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None


_SHA_CACHE: dict[tuple, str] = {}


def weights_sha256(model: Any) -> str | None:
    """The sha256 of the checkpoint file ``model`` was read from (``weights_file``; once per file version and
    process), ``None`` for a model built in memory."""
    file = getattr(model, "weights_file", None)
    ident = _file_identity(file) if file else None
    if ident is None:
        return None
    if ident not in _SHA_CACHE:
        from universal.model.sources import sha256_of

        _SHA_CACHE[ident] = sha256_of(file)
    return _SHA_CACHE[ident]


def _placed(base: Any, template: str | None, device: Any, cached: bool) -> Any:
    """``base`` with ``template`` on ``device``: ``base`` itself when nothing changes, else a copy (cached for
    loaded-by-name models)."""
    needs_prompt = _needs_template(base, template)
    if not needs_prompt and _same_device(model_device(base), device):
        return base
    key = (id(base), str(device), template)
    if cached and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    net = copy.deepcopy(base)
    if needs_prompt:
        net.set_prompts(template=template)
    net = net.to(device).eval()
    if cached:
        _MODEL_CACHE[key] = net
    return net


def _needs_template(net: Any, template: str | None) -> bool:
    if template is None:
        return False
    from universal.prompts import resolve_template  # prompts imports the encoders' registry: kept lazy

    return resolve_template(template) != getattr(net, "template", None)


def model_device(model: Any):
    """The device of a model's first parameter (or buffer); CPU for a model without either."""
    import torch

    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _same_device(a: Any, b: Any) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        import torch

        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


def _bare_spec(net: Any) -> ModelSpec:
    """A spec with the default contract for a network that carries none (e.g. a test double)."""
    names = tuple(getattr(net, "class_names", ()) or ("object",))
    return ModelSpec(backbone="unknown", classes=names, encoder="unknown", template="{}", embed_dim=1)


def _resolve_classes(classes: Sequence[str] | None, net: Any) -> list[str]:
    available = list(net.class_names)
    if classes is None:
        return available
    names: list[str] = []
    for c in classes:
        name = resolve_class(c).name
        if name not in available:
            raise ClassNameError(
                f"the model does not segment {name!r}; its classes are: {', '.join(available)}. "
                "Choose among these or load a model trained for that class."
            )
        if name not in names:
            names.append(name)
    return names


def _postprocess_config(postprocess: Any) -> PostprocessConfig | None:
    if postprocess is False or postprocess is None:
        return None
    config = PostprocessConfig() if postprocess is True else postprocess
    return config if config.enabled else None  # PostprocessConfig(enabled=False): none, and reported so


def postprocess_record(config: PostprocessConfig | None) -> Any:
    """How reports state the post-processing: ``False``, or the rules as plain values (so that a run with other
    rules is told apart, e.g. when a batch resumes)."""
    return False if config is None else dataclasses.asdict(config)
