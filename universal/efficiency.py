"""Per-case efficiency numbers in the manner of FLARE 2023: wall time, peak GPU memory, GPU memory-time area, CPU RSS.

FLARE 2023 scores each case by its running time, its peak GPU memory and the area under its GPU memory curve
(MB·s), sampled every 0.1 s while the case runs. :class:`EfficiencySampler` does that in a background thread:

- **GPU memory** of a CUDA device, through NVML (``pynvml`` from the ``nvidia-ml-py`` package) when it is installed
  and its library loads — the memory this process uses on the device when NVML can see the process, else the
  device's used memory, as FLARE's ``nvidia-smi`` reading — else ``torch.cuda.memory_allocated`` (peak: also
  ``torch.cuda.max_memory_allocated``); on a CPU, MPS or no device the GPU fields are :data:`NO_GPU`.
- **Area**: the trapezoid rule over the (time, MB) samples (:func:`memory_time_area`).
- **CPU RSS**: the resident set size sampled with the GPU (``/proc/self/statm``), its peak, and the process's
  high-water mark (``resource.getrusage``).
- **Wall time**: from :meth:`EfficiencySampler.start` to :meth:`EfficiencySampler.stop`, plus ``extra_wall_s``
  (a batch adds the model's loading to its first case, as FLARE's per-case container start does).
- **Overlapping cases** (a batch's pipeline post-processes a case while the next one runs the network): the GPU
  numbers of a case end with its network (:meth:`EfficiencySampler.end_gpu`), since the device then belongs to
  the next case; its wall time still runs until its last file is written. RSS is the process's, shared by both.

The interval and the clock are injectable (``interval_s``, ``clock``), as is the GPU reader (``probe``), so tests
run on a fake clock with a fake GPU; no number here is ever asserted against the machine's speed.

>>> s = EfficiencySampler(None, clock=iter([0.0, 0.0, 1.0, 1.0]).__next__, rss=lambda: 100.0)
>>> e = s.start(thread=False).stop()
>>> (e.wall_s, e.gpu, e.to_dict()["gpu_peak_mb"], e.cpu_peak_rss_mb)
(1.0, 'no GPU', 'no GPU', 100.0)
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from universal.errors import InputError

__all__ = [
    "DEFAULT_INTERVAL_S",
    "NO_GPU",
    "Efficiency",
    "EfficiencySampler",
    "gpu_probe",
    "memory_time_area",
    "rss_mb",
]

#: FLARE 2023's sampling interval (seconds)
DEFAULT_INTERVAL_S = 0.1
#: what the GPU fields say when no CUDA device is used
NO_GPU = "no GPU"
#: the keys of :meth:`Efficiency.to_dict` (``report.json``'s ``"efficiency"``, the batch summary's columns)
FIELDS = (
    "wall_s",
    "gpu",
    "gpu_peak_mb",
    "gpu_area_mb_s",
    "cpu_peak_rss_mb",
    "process_peak_rss_mb",
    "samples",
    "interval_s",
)


def memory_time_area(times: Sequence[float], values: Sequence[float]) -> float:
    """Area under a memory curve (MB·s) by the trapezoid rule over samples ``(times[i], values[i])``.

    >>> memory_time_area([0.0, 0.1, 0.3], [100.0, 200.0, 200.0])
    55.0
    """
    if len(times) != len(values):
        raise ValueError("times and values must have the same length")
    area = 0.0
    for i in range(1, len(times)):
        area += (times[i] - times[i - 1]) * (values[i] + values[i - 1]) / 2.0
    return round(area, 6)


def rss_mb() -> float:
    """This process's resident set size in MB now (``/proc/self/statm``; elsewhere the peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    """The process's RSS high-water mark in MB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class GpuProbe(Protocol):
    """Reads one GPU's memory: ``name`` (how), ``read()`` (MB now), ``peak()`` (MB since ``reset()``, or None)."""

    name: str

    def reset(self) -> None: ...

    def read(self) -> float: ...

    def peak(self) -> float | None: ...


class _TorchCudaProbe:
    """``torch.cuda.memory_allocated`` of one device (the tensors of this process; no CUDA context)."""

    name = "torch.cuda"

    def __init__(self, device: Any) -> None:
        import torch

        self._cuda, self._device = torch.cuda, device

    def reset(self) -> None:
        self._cuda.reset_peak_memory_stats(self._device)

    def read(self) -> float:
        return self._cuda.memory_allocated(self._device) / 2**20

    def peak(self) -> float | None:
        return self._cuda.max_memory_allocated(self._device) / 2**20


class _NvmlProbe:
    """NVML's reading of one device: this process's used memory when NVML lists it, else the device's used memory."""

    def __init__(self, pynvml: Any, device: Any) -> None:
        self._nvml = pynvml
        _nvml_init(pynvml)
        self._handle = _nvml_handle(pynvml, device)
        self.name = "nvml"

    def reset(self) -> None:
        pass

    def read(self) -> float:
        nvml, pid = self._nvml, os.getpid()
        try:
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    self.name = "nvml (process)"
                    return proc.usedGpuMemory / 2**20
        except nvml.NVMLError:
            pass
        self.name = "nvml (device)"  # in a container NVML sees the host's process ids: the device total
        return nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20

    def peak(self) -> float | None:
        return None


@functools.cache
def _nvml_init(pynvml: Any) -> None:
    """``nvmlInit`` once per process (it raises when the driver's library is absent)."""
    pynvml.nvmlInit()


def _nvml_handle(pynvml: Any, device: Any) -> Any:
    """The NVML handle of a torch CUDA device: by UUID, else by the index after ``CUDA_VISIBLE_DEVICES``."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if uuid:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = int(visible[index]) if index < len(visible) and visible[index].isdigit() else index
    return pynvml.nvmlDeviceGetHandleByIndex(physical)


def gpu_probe(device: Any) -> GpuProbe | None:
    """The GPU memory reader for ``device`` (a ``torch.device`` or its name): NVML when ``nvidia-ml-py`` is
    installed and its library loads, else ``torch.cuda``; ``None`` for a device that is not CUDA (CPU, MPS)."""
    if device is None:
        return None
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind != "cuda":
        return None
    import torch

    device = torch.device(device)
    try:
        import pynvml

        return _NvmlProbe(pynvml, device)
    except Exception:  # noqa: BLE001 - not installed, no driver library, a handle NVML does not know
        return _TorchCudaProbe(device)


@dataclass(frozen=True)
class Efficiency:
    """The efficiency numbers of one case (MB = 2**20 bytes); GPU fields ``None`` when no GPU was used."""

    wall_s: float
    gpu: str
    gpu_peak_mb: float | None
    gpu_area_mb_s: float | None
    cpu_peak_rss_mb: float
    process_peak_rss_mb: float
    samples: int
    interval_s: float

    def to_dict(self) -> dict[str, Any]:
        """Plain values (:data:`FIELDS`), rounded; the GPU fields say :data:`NO_GPU` when no GPU was used."""

        def num(x: float | None, nd: int = 3) -> Any:
            return NO_GPU if x is None else round(float(x), nd)

        return {
            "wall_s": round(self.wall_s, 4),
            "gpu": self.gpu,
            "gpu_peak_mb": num(self.gpu_peak_mb, 1),
            "gpu_area_mb_s": num(self.gpu_area_mb_s, 1),
            "cpu_peak_rss_mb": round(self.cpu_peak_rss_mb, 1),
            "process_peak_rss_mb": round(self.process_peak_rss_mb, 1),
            "samples": self.samples,
            "interval_s": self.interval_s,
        }


class EfficiencySampler:
    """Samples GPU memory and RSS every ``interval_s`` in a daemon thread between :meth:`start` and :meth:`stop`.

    Args:
        device: The device the case runs on (``torch.device``, its name, or ``None``); not CUDA → "no GPU".
        interval_s: Seconds between samples (FLARE: 0.1).
        clock: Seconds now (monotonic), e.g. a fake clock in tests.
        probe: The GPU reader (default :func:`gpu_probe` of ``device``); ``None`` with a CUDA device → auto.
        rss: RSS reader in MB (default :func:`rss_mb`).
        extra_wall_s: Seconds added to the wall time (e.g. the model's loading, for a batch's first case).

    Raises:
        InputError: ``interval_s`` not a positive number.

    Also usable as ``with EfficiencySampler(device) as s: ...`` then ``s.result``.
    """

    def __init__(
        self,
        device: Any = None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.perf_counter,
        probe: GpuProbe | None = None,
        rss: Callable[[], float] = rss_mb,
        extra_wall_s: float = 0.0,
    ) -> None:
        if (
            isinstance(interval_s, bool)
            or not isinstance(interval_s, (int, float))
            or not (math.isfinite(interval_s) and interval_s > 0)
        ):
            raise InputError(f"interval_s is {interval_s!r}; it must be a positive number of seconds")
        self.interval_s, self._clock, self._rss = float(interval_s), clock, rss
        self._probe = probe if probe is not None else gpu_probe(device)
        self.extra_wall_s = float(extra_wall_s)
        self.times: list[float] = []
        self.gpu_mb: list[float] = []
        self.rss_mb: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu_peak_at_end: float | None = None  # set by end_gpu()
        self._lock = threading.Lock()
        self._t0 = self._t1 = 0.0
        self.result: Efficiency | None = None

    def sample(self) -> None:
        """Take one sample now (the thread calls this every ``interval_s``); after :meth:`end_gpu`, RSS only."""
        gpu = self._probe.read() if self._probe is not None and self._gpu_peak_at_end is None else None
        rss = self._rss()
        with self._lock:
            self.times.append(self._clock())
            self.rss_mb.append(rss)
            if gpu is not None:
                self.gpu_mb.append(gpu)

    def start(self, thread: bool = True) -> EfficiencySampler:
        """Start the wall clock, take the first sample and (``thread=True``) start sampling in the background."""
        if self._probe is not None:
            self._probe.reset()
        self._t0 = self._clock()
        self.sample()
        if thread:
            self._thread = threading.Thread(target=self._loop, name="efficiency-sampler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def end_gpu(self) -> None:
        """The case's device work is over (a batch's pipeline: its network has ended and the device now runs the
        next case): take a last GPU sample and keep the peak as it is now; later samples record RSS only, so that
        the next case's memory is not counted for this one. No effect without a GPU or when called again."""
        if self._probe is None or self._gpu_peak_at_end is not None:
            return
        self.sample()
        with self._lock:
            gpu = list(self.gpu_mb)
        self._gpu_peak_at_end = max(max(gpu, default=0.0), self._probe.peak() or 0.0)

    def stop(self) -> Efficiency:
        """Stop sampling (one last sample), stop the wall clock → :class:`Efficiency` (also in :attr:`result`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self._t1 = self._clock()
        self.result = self.summary()
        return self.result

    def summary(self) -> Efficiency:
        """The numbers of the samples so far; before :meth:`stop`, one more sample is taken now, so the numbers
        always cover the span up to this call (at least two samples, however short the span)."""
        if not self._stop.is_set() and self.times:
            self.sample()
        with self._lock:
            times, gpu, rss = list(self.times), list(self.gpu_mb), list(self.rss_mb)
        gpu_peak = area = None
        if self._probe is not None and gpu:
            ended = self._gpu_peak_at_end
            gpu_peak = ended if ended is not None else max(max(gpu), self._probe.peak() or 0.0)
            area = memory_time_area(times[: len(gpu)], gpu)
        end = self._t1 if self._stop.is_set() else self._clock()  # before stop(): up to now
        return Efficiency(
            wall_s=max(0.0, end - self._t0) + self.extra_wall_s,
            gpu=self._probe.name if self._probe is not None else NO_GPU,
            gpu_peak_mb=gpu_peak,
            gpu_area_mb_s=area,
            cpu_peak_rss_mb=max(rss) if rss else 0.0,
            process_peak_rss_mb=max(_peak_rss_mb(), max(rss) if rss else 0.0),
            samples=len(times),
            interval_s=self.interval_s,
        )

    def __enter__(self) -> EfficiencySampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
