"""Package a trained universal checkpoint as the built-in weights: float16 floating-point tensors, atomic write.

python scripts/package_builtin.py runs/builtin/round2/model.pt universal/resources/builtin.pt
"""

from __future__ import annotations

import hashlib
import sys

import torch

from universal.io import atomic_write


def package(src: str, dst: str) -> str:
    obj = torch.load(src, map_location="cpu", weights_only=True)
    obj["state_dict"] = {
        k: (v.to(torch.float16) if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in obj["state_dict"].items()
    }
    extra = dict(obj.get("extra") or {})
    extra["packaged_dtype"] = "float16"
    obj["extra"] = extra
    out = atomic_write(dst, lambda fh: torch.save(obj, fh))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, sha256 {digest}")
    return digest


if __name__ == "__main__":
    package(sys.argv[1], sys.argv[2])
