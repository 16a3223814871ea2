"""Benchmark: one training step of the Universal Model, vectorised heads + masked loss vs per-class loops.

A training step is forward (backbone, controller, dynamic heads of all K classes), masked BCE + Dice over the
available (case, class) pairs, backward and an AdamW update, for a batch of ``B`` patches of ``S³`` voxels. Two
implementations of the class-specific part are compared on the same model, weights and data:

- ``vectorised``: the package's code: :func:`universal.model.dynamic_heads` (three batched matrix products for all
  (item, class) pairs) and :func:`universal.loss.masked_bce_dice` (one gather of the available pairs);
- ``per-class loop``: defined here: three ``F.conv3d`` calls per (batch item, class) for the heads and a Python loop
  over (item, class) pairs for the loss (the habit of the official code).

A second table (``--heads``; default on a GPU) times the heads + loss alone (features given, forward + backward),
where the difference lives. Times are medians over ``--repeats`` steps after ``--warmup`` steps (CPU default: one
step, no warm-up). Peak memory: ``torch.cuda.max_memory_allocated`` above the baseline on a GPU; on a CPU the
high-water resident memory (``ru_maxrss``) above the resident memory before the step, each CPU measurement in a
fresh subprocess.

Default: B = 2, S = 96, K = 32 (the paper's setting), SegResNet (the FLARE 2023 backbone). On a 2-core CPU this takes
about 3-6 minutes (one step per variant, ~9 GB of memory); ``--size 64`` is a quick run. Measured anchors (official
code, H200, B = 2 × 96³ × 32): Swin UNETR 0.208 s/step at 18.8 GB, U-Net 0.168 s/step at 15.1 GB; target for
SegResNet: ≤ 0.05 s at ≤ 5 GB.

    python bench/train.py                 # 96³, CPU or the GPU when present
    python bench/train.py --size 64       # quick
    python bench/train.py --device cuda --repeats 20 --backbone unet
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from universal.loss import masked_bce_dice
from universal.model import create_model, split_controller_params

ANCHORS = [
    ("official Swin UNETR (H200)", "0.208", "18.8 GB"),
    ("official U-Net (H200)", "0.168", "15.1 GB"),
    ("target: SegResNet (H200)", "≤ 0.05", "≤ 5 GB"),
]


# ------------------------------------------------------------------------------------------ per-class loop versions
def loop_heads(features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Dynamic heads with one ``F.conv3d`` per layer, batch item and class (features (B, 8, ...), params (B, K, 153))."""
    b, k = params.shape[:2]
    w1, w2, w3, b1, b2, b3 = split_controller_params(params)
    rows = []
    for i in range(b):
        per_class = []
        for j in range(k):
            h = F.relu(F.conv3d(features[i : i + 1], w1[i, j][..., None, None, None], b1[i, j]))
            h = F.relu(F.conv3d(h, w2[i, j][..., None, None, None], b2[i, j]))
            per_class.append(F.conv3d(h, w3[i, j][..., None, None, None], b3[i, j]))
        rows.append(torch.cat(per_class, dim=1))
    return torch.cat(rows, dim=0)


def loop_loss(
    logits: torch.Tensor, target: torch.Tensor, available: torch.Tensor, smooth: float = 1e-5
) -> torch.Tensor:
    """Masked BCE + soft Dice with a Python loop over (batch item, class) pairs."""
    terms = []
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            if not bool(available[i, j]):
                continue
            x, t = logits[i, j].float(), target[i, j].float()
            bce = F.binary_cross_entropy_with_logits(x, t)
            p = torch.sigmoid(x)
            dice = 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
            terms.append(bce + dice)
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


def forward_loop(model, x: torch.Tensor) -> torch.Tensor:
    """The model's forward with the per-class loop heads (same backbone, GAP, controller)."""
    bottleneck, decoded = model.backbone(x)
    global_feature = model.GAP(bottleneck).flatten(1)
    features = model.precls_conv(decoded)
    return loop_heads(features, model.controller_params(global_feature))


# -------------------------------------------------------------------------------------------------- measurement
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> tuple[float, int]:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls, and its peak memory.

    Peak memory: on CUDA the allocator's peak above what was allocated before; on CPU the process's high-water
    resident memory (``ru_maxrss``) above the resident memory before the first call, which is only meaningful in a
    fresh process (the CPU measurements run one per subprocess).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        gc.collect()
        base = _rss()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return statistics.median(times), peak


def gb(n: int) -> str:
    return f"{n / 1024**3:.2f} GB"


# --------------------------------------------------------------------------------------------------------- main
MEASUREMENTS = {
    "step_vectorised": "vectorised heads + masked loss",
    "step_loop": "per-class loop heads + loop loss",
    "heads_vectorised": "vectorised",
    "heads_loop": "per-class loop",
}


def _data(args, device):
    rng = np.random.default_rng(0)
    b, s, k = args.batch, args.size, args.classes
    target = torch.from_numpy(rng.random((b, k, s, s, s)) < 0.1).to(device)
    available = torch.from_numpy(rng.random((b, k)) < 0.5).to(device)  # partial labels
    available[:, 0] = True
    return target, available


def _model(args, device):
    from universal.taxonomy import class_names

    torch.manual_seed(0)
    emb = (
        np.random.default_rng(1).standard_normal((args.classes, 512)).astype(np.float32)
    )  # CLIP-sized prompts
    return create_model(
        args.backbone, classes=class_names()[: args.classes], encoder="bench", embeddings=emb
    ).to(device)


def measure(
    which: str, args, device: torch.device, repeats: int, warmup: int, amp: bool
) -> tuple[float, int]:
    """Time one of :data:`MEASUREMENTS` in this process."""
    b, s, k = args.batch, args.size, args.classes
    target, available = _data(args, device)
    vectorised = which.endswith("vectorised")
    loss_fn = masked_bce_dice if vectorised else loop_loss
    if which.startswith("step"):
        model = _model(args, device)
        x = torch.rand(b, 1, s, s, s, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp)

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = model(x) if vectorised else forward_loop(model, x)
            scaler.scale(loss_fn(logits.float(), target, available)).backward()
            scaler.step(optimizer)
            scaler.update()

    else:
        from universal.model import dynamic_heads

        feats = torch.randn(b, 8, s, s, s, device=device, requires_grad=True)
        params = (0.3 * torch.randn(b, k, 153, device=device)).requires_grad_(True)

        def run() -> None:
            feats.grad = params.grad = None
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = dynamic_heads(feats, params) if vectorised else loop_heads(feats, params)
            loss_fn(logits.float(), target, available).backward()

    return timed(run, device, warmup, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=96, help="patch edge in voxels (96 = the paper; 64 = quick)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--classes", type=int, default=32)
    ap.add_argument("--backbone", default="segresnet")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default: 1 on CPU, 20 on a GPU)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 0 on CPU, 5 on a GPU)"
    )
    ap.add_argument(
        "--no-amp", action="store_true", help="float32 on CUDA too (default: float16 autocast on CUDA)"
    )
    ap.add_argument("--skip-full", action="store_true", help="only the heads + loss table")
    ap.add_argument(
        "--heads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the heads + loss alone (default: on a GPU yes, on a CPU no: it adds minutes)",
    )
    ap.add_argument(
        "--only", choices=list(MEASUREMENTS), help=argparse.SUPPRESS
    )  # one measurement (subprocess)
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    repeats = args.repeats or (20 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 0)
    amp = cuda and not args.no_amp
    if args.only:
        sec, peak = measure(args.only, args, device, repeats, warmup, amp)
        print(json.dumps({"sec": sec, "peak": peak}))
        return

    b, s, k = args.batch, args.size, args.classes
    model = _model(args, torch.device("cpu"))
    n_params = sum(p.numel() for p in model.parameters())
    cpu_name = platform.processor() or platform.machine()
    where = (
        torch.cuda.get_device_name(device) if cuda else f"CPU ({cpu_name}, {torch.get_num_threads()} threads)"
    )
    _, available = _data(args, torch.device("cpu"))
    print(
        f"# training step: batch {b} x {s}^3 x {k} classes, {args.backbone} ({n_params / 1e6:.2f} M parameters)"
    )
    print(
        f"# device: {where}; AMP: {'float16' if amp else 'off'}; median of {repeats} after {warmup} warm-up"
    )
    print(f"# torch {torch.__version__}; available (case, class) pairs: {int(available.sum())}/{b * k}")
    if not cuda:
        print("# CPU peak memory: high-water resident memory of a fresh process per measurement")

    # sanity: both implementations give the same logits and loss
    with torch.no_grad():
        xs = torch.rand(b, 1, 32, 32, 32)
        target, available = _data(argparse.Namespace(batch=b, size=32, classes=k), torch.device("cpu"))
        lv, ll = model(xs), forward_loop(model, xs)
        dv = float((lv - ll).abs().max())
        dl = abs(float(masked_bce_dice(lv, target, available)) - float(loop_loss(lv, target, available)))
    print(f"# check (32^3): max |logits vectorised - loop| = {dv:.1e}, |loss difference| = {dl:.1e}\n")
    del model

    def run(which: str) -> tuple[float, int]:
        if cuda:
            return measure(which, args, device, repeats, warmup, amp)
        argv = [a for a in sys.argv[1:]]
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--only", which], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise SystemExit(f"{which} failed:\n{out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        return res["sec"], res["peak"]

    tables = []
    if not args.skip_full:
        tables.append(
            ("training step (fwd + loss + bwd + AdamW)", "s/step", ["step_vectorised", "step_loop"])
        )
    if args.heads or (args.heads is None and cuda) or args.skip_full:
        tables.append(
            (f"heads + masked loss only ({k} classes, fwd + bwd)", "s", ["heads_vectorised", "heads_loop"])
        )
    for title, unit, names in tables:
        results = [(MEASUREMENTS[n], *run(n)) for n in names]
        print(f"| {title} | {unit} | peak memory |")
        print("|---|---:|---:|")
        for name, sec, peak in results:
            print(f"| {name} | {sec:.3f} | {gb(peak)} |")
        print(f"| speed-up of vectorised | {results[1][1] / results[0][1]:.2f}x | |\n", flush=True)

    print("| anchor (batch 2 x 96^3 x 32 classes) | s/step | peak memory |")
    print("|---|---:|---:|")
    for name, sec, mem in ANCHORS:
        print(f"| {name} | {sec} | {mem} |")
    if not cuda:
        print("\n(CPU numbers are not comparable with the GPU anchors; run with a GPU for those.)")


if __name__ == "__main__":
    main()
