"""Benchmark: the vectorised dynamic heads against per-class loops (forward, no grad).

Compares, for B = 2 batch items, k ∈ {1, 8, 32} classes and 8-channel head inputs of 48³ and 96³ voxels:

- ``loop``: a Python loop over batch items and classes with three ``F.conv3d`` calls (1×1×1) per class;
- ``grouped``: a loop over batch items only, the k heads of one item as one grouped ``F.conv3d`` per layer
  (the scheme of the official release);
- ``vectorised``: ``universal.model.dynamic_heads``: three batched matrix products for all (item, class) pairs.

Times are medians of several repeats after a warm-up; peak memory is the largest increase of the process's resident
memory during a call (sampled every millisecond on CPU) or ``torch.cuda.max_memory_allocated`` on a GPU. Runs in
about a minute on a 2-core CPU: ``python bench/heads.py`` (``--device cuda`` to use a GPU).
"""

from __future__ import annotations

import argparse
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


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory MiB) of ``fn``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
        del out
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out
    else:
        with PeakRSS() as mem:
            out = fn()
        peak = mem.increase_mib
        del out
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 96])
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)

    header = (
        "| input | k | loop ms | grouped ms | vectorised ms | speed-up vs loop | speed-up vs grouped "
        "| loop MiB | grouped MiB | vectorised MiB |"
    )
    print(f"Dynamic heads, B={args.batch}, 8 channels, forward without grad, device={device}, threads={args.threads}")
    print("(median of repeats; MiB = peak memory increase during one call)\n")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    total = time.perf_counter()
    for size in args.sizes:
        for k in args.classes:
            features = torch.randn(args.batch, 8, size, size, size, generator=gen).to(device)
            params = (torch.randn(args.batch, k, 153, generator=gen) * 0.3).to(device)
            voxels = args.batch * k * size**3
            repeats = 3 if voxels > 2e7 else 5
            with torch.inference_mode():
                ref = loop_heads(features, params)
                assert torch.allclose(dynamic_heads(features, params), ref, atol=1e-4, rtol=1e-4)
                assert torch.allclose(grouped_heads(features, params), ref, atol=1e-4, rtol=1e-4)
                del ref
                t_loop, m_loop = measure(lambda: loop_heads(features, params), device, repeats)
                t_grp, m_grp = measure(lambda: grouped_heads(features, params), device, repeats)
                t_vec, m_vec = measure(lambda: dynamic_heads(features, params), device, repeats)
            print(
                f"| {size}³ | {k} | {t_loop * 1e3:.1f} | {t_grp * 1e3:.1f} | {t_vec * 1e3:.1f} | "
                f"{t_loop / t_vec:.2f}× | {t_grp / t_vec:.2f}× | {m_loop:.0f} | {m_grp:.0f} | {m_vec:.0f} |",
                flush=True,
            )
            del features, params
    print(f"\n(total benchmark time {time.perf_counter() - total:.0f} s)")


if __name__ == "__main__":
    main()
