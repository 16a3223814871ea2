"""Benchmark: the vectorised dynamic heads against per-class loops (forward, no grad).

Compares, for B = 2 batch items, k ∈ {1, 8, 32} classes and 8-channel head inputs of 48³ and 96³ voxels:

- ``loop``: a Python loop over batch items and classes with three ``F.conv3d`` calls (1×1×1) per class;
- ``grouped``: a loop over batch items only, the k heads of one item as one grouped ``F.conv3d`` per layer
  (the scheme of the official release);
- ``vectorised``: ``universal.model.dynamic_heads``: three batched matrix products for all (item, class) pairs.

- ``vectorised, chunks of 8``: the same over chunks of 8 classes (``chunk_size=8``), bounding the memory.

Times are medians of repeats (after a warm-up; repeated until about ``--budget`` seconds per cell, so the slow
loops on 96³ run once or twice); peak memory is the largest increase of the process's resident memory during one
call (sampled every millisecond; the allocator may reuse freed memory, so small values read as 0) or
``torch.cuda.max_memory_allocated`` on a GPU. About 1.5 minutes on an idle 2-core CPU:
``python bench/heads.py`` (``--device cuda`` for a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from universal.model.universal_model import dynamic_heads, split_controller_params


def loop_heads(features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One F.conv3d per layer, class and batch item."""
    b, k = params.shape[:2]
    w1, w2, w3, b1, b2, b3 = split_controller_params(params)
    out = []
    for i in range(b):
        for j in range(k):
            h = F.relu(F.conv3d(features[i : i + 1], w1[i, j][..., None, None, None], b1[i, j]))
            h = F.relu(F.conv3d(h, w2[i, j][..., None, None, None], b2[i, j]))
            out.append(F.conv3d(h, w3[i, j][..., None, None, None], b3[i, j]))
    return torch.cat(out, dim=0).reshape(b, k, *features.shape[2:])


def grouped_heads(features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Per batch item: the k heads as grouped 1×1×1 convolutions over the input repeated k times."""
    b, k = params.shape[:2]
    w1, w2, w3, b1, b2, b3 = split_controller_params(params)
    out = []
    for i in range(b):
        x = features[i : i + 1].repeat(1, k, 1, 1, 1)  # (1, k*8, X, Y, Z)
        h = F.relu(F.conv3d(x, w1[i].reshape(k * 8, 8, 1, 1, 1), b1[i].reshape(-1), groups=k))
        h = F.relu(F.conv3d(h, w2[i].reshape(k * 8, 8, 1, 1, 1), b2[i].reshape(-1), groups=k))
        out.append(F.conv3d(h, w3[i].reshape(k, 8, 1, 1, 1), b3[i].reshape(-1), groups=k))
    return torch.cat(out, dim=0)


class PeakRSS:
    """Largest resident-memory increase of this process while the block runs (Linux /proc, 1 ms sampling)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, self._rss())
        self._stop.set()
        self._thread.join()

    @property
    def increase_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def measure(fn: Callable[[], torch.Tensor], device: torch.device, budget_s: float, max_repeats: int = 5):
    """(median seconds, number of repeats, peak memory MiB) of ``fn``.

    Repeats until ``budget_s`` seconds are spent (at least once, at most ``max_repeats`` times); the peak memory is
    taken during the first repeat.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    peak = 0.0
    while len(times) < max_repeats and (not times or sum(times) < budget_s):
        if not times and device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        mem = PeakRSS() if (not times and device.type == "cpu") else contextlib.nullcontext()
        with mem:
            start = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - start)
        if isinstance(mem, PeakRSS):
            peak = mem.increase_mib
        elif len(times) == 1 and device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out
    return statistics.median(times), len(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 96])
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per method and setting")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "loop": loop_heads,
        "grouped": grouped_heads,
        "vectorised": dynamic_heads,
        "vectorised, chunks of 8": lambda f, p: dynamic_heads(f, p, chunk_size=8),
    }

    total = time.perf_counter()
    with torch.inference_mode():  # warm-up and correctness on a small input
        features = torch.randn(args.batch, 8, 16, 16, 16, generator=gen).to(device)
        params = torch.randn(args.batch, 12, 153, generator=gen).to(device)
        ref = loop_heads(features, params)
        for name, fn in methods.items():
            torch.testing.assert_close(fn(features, params), ref, atol=1e-4, rtol=1e-4, msg=name)

    print(
        f"Dynamic heads, B={args.batch}, 8 channels, forward without grad, device={device}, threads={args.threads}"
    )
    memory_kind = "CUDA allocator" if device.type == "cuda" else "resident memory, 1 ms sampling"
    print(
        f"ms: median over n repeats (repeated until ~{args.budget:.0f} s per cell); "
        f"MiB: peak memory increase during one call ({memory_kind})\n"
    )
    print(
        "| input | k | loop ms | grouped ms | vectorised ms | vectorised chunks-of-8 ms | vectorised speed-up vs loop "
        "| vs grouped | loop MiB | grouped MiB | vectorised MiB | chunks-of-8 MiB | n |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for size in args.sizes:
        for k in args.classes:
            features = torch.randn(args.batch, 8, size, size, size, generator=gen).to(device)
            params = (torch.randn(args.batch, k, 153, generator=gen) * 0.3).to(device)
            results = {}
            with torch.inference_mode():
                for name, fn in methods.items():
                    results[name] = measure(functools.partial(fn, features, params), device, args.budget)
            (t_l, n_l, m_l), (t_g, n_g, m_g) = results["loop"], results["grouped"]
            (t_v, n_v, m_v), (t_c, n_c, m_c) = results["vectorised"], results["vectorised, chunks of 8"]
            print(
                f"| {size}³ | {k} | {t_l * 1e3:.1f} | {t_g * 1e3:.1f} | {t_v * 1e3:.1f} | {t_c * 1e3:.1f} | "
                f"{t_l / t_v:.2f}× | {t_g / t_v:.2f}× | {m_l:.0f} | {m_g:.0f} | {m_v:.0f} | {m_c:.0f} | "
                f"{n_l}/{n_g}/{n_v}/{n_c} |",
                flush=True,
            )
            del features, params
    print(f"\n(total benchmark time {time.perf_counter() - total:.0f} s)")


if __name__ == "__main__":
    main()
