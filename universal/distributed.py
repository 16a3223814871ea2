"""Ranks of a batch run under ``torchrun`` or Slurm: who am I, which cases are mine, which device, one barrier.

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``);
Slurm's ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` (the torchrun names win when both are
set). With one rank nothing is initialised. With more, :func:`init` starts ``torch.distributed`` (``nccl`` when the
rank uses CUDA, else ``gloo``) for :func:`barrier`. The rendezvous is ``MASTER_ADDR``/``MASTER_PORT`` (torchrun sets
them); under Slurm without them, :func:`rendezvous` derives them as every rank of the job can: the first host of
``SLURM_JOB_NODELIST`` (Slurm's hostlist syntax, ``gpu[03-05,09],login1`` → ``gpu03``) and port
``15000 + SLURM_JOB_ID % 17000``. Two job steps of one job running at once need their own ``MASTER_PORT``.

Each rank takes the cases ``i`` with ``i % world == rank`` (:meth:`Ranks.mine`): deterministic, disjoint, together
all of them, and balanced in count.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from universal.errors import InputError, UniversalError

__all__ = [
    "BARRIER_TIMEOUT_S",
    "Ranks",
    "barrier",
    "detect",
    "device_for",
    "first_host",
    "init",
    "on_main_first",
    "rendezvous",
    "shutdown",
]

T = TypeVar("T")

#: how long a rank waits for the others at the barrier (a long batch's ranks finish at different times)
BARRIER_TIMEOUT_S = 6 * 3600

_VARIABLES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: ``rank`` of ``world`` ranks, ``local_rank`` on its machine, and from which
    environment (``"torchrun"``, ``"slurm"`` or ``"single"``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    source: str = "single"

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world or self.local_rank < 0:
            raise InputError(
                f"rank {self.rank} of world size {self.world} (local rank {self.local_rank}) is not a valid "
                "placement: check RANK/WORLD_SIZE/LOCAL_RANK (or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID)"
            )

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world``-th one from index ``rank``.

        >>> Ranks(1, 3, 1).mine(list(range(8)))
        [1, 4, 7]
        """
        return list(items[self.rank :: self.world])


def detect(environ: Mapping[str, str] | None = None) -> Ranks:
    """The :class:`Ranks` of this process from the torchrun or Slurm variables (none: a single rank).

    Raises:
        InputError: A variable that is not a whole number, or an impossible rank.

    >>> detect({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"})
    Ranks(rank=1, world=2, local_rank=1, source='slurm')
    """
    env = os.environ if environ is None else environ
    for (rank_var, world_var, local_var), source in zip(_VARIABLES, ("torchrun", "slurm")):
        if world_var not in env:
            continue
        values = []
        for var, default in ((rank_var, "0"), (world_var, "1"), (local_var, None)):
            text = env.get(var, default if default is not None else env.get(rank_var, "0"))
            try:
                values.append(int(str(text).strip()))
            except ValueError:
                raise InputError(
                    f"{var}={text!r} is not a whole number; fix the launcher's environment"
                ) from None
        return Ranks(*values, source=source)
    return Ranks()


def device_for(ranks: Ranks, device: str | None) -> str | None:
    """The device of this rank: with several ranks and ``device`` unset, ``auto`` or ``cuda``, each rank takes
    ``cuda:LOCAL_RANK`` when CUDA is available (else the CPU); any other choice is kept."""
    if not ranks.distributed or (device is not None and device.strip().lower() not in ("auto", "cuda")):
        return device
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if ranks.local_rank >= n:
            raise InputError(
                f"local rank {ranks.local_rank} has no GPU of its own: this machine has {n}; start at most "
                f"{n} ranks per machine (--nproc_per_node {n})"
            )
        return f"cuda:{ranks.local_rank}"
    return "cpu" if device is not None and device.strip().lower() == "auto" else device


#: the Slurm variables naming the job's hosts, in the order they are tried
_NODELIST_VARIABLES = ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST")
#: the derived port is ``SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN``: 15000-31999, unprivileged and below
#: Linux's ephemeral ports (32768 and up), so no outgoing connection of the node holds it by chance
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 17000


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: the first comma-separated item (outside brackets), each bracket replaced
    by the first number of its first range, leading zeros kept.

    Raises:
        InputError: An empty or malformed list.

    >>> first_host("gpu[03-05,09],login1"), first_host("a[1-2]b[08-09]"), first_host("node7,node8")
    ('gpu03', 'a1b08', 'node7')
    """
    text, depth, item = str(nodelist).strip(), 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            depth = -1
            break
        item += ch
    host, rest = "", item
    while rest and depth == 0:
        head, bracket, tail = rest.partition("[")
        host += head
        if not bracket:
            break
        inside, closed, rest = tail.partition("]")
        first = inside.split(",")[0].split("-")[0].strip()
        if not closed or not first.isdigit():
            depth = -1
            break
        host += first
    if depth != 0 or not host or any(c in host for c in "[], "):
        raise InputError(
            f"cannot read the first host of the Slurm node list {nodelist!r}; export MASTER_ADDR (the first "
            "node's host name) and MASTER_PORT (a free port) in the job"
        )
    return host


def rendezvous(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``MASTER_ADDR`` and ``MASTER_PORT`` for :func:`init`: the environment's when set, else derived from Slurm's
    ``SLURM_JOB_NODELIST`` (:func:`first_host`) and ``SLURM_JOB_ID`` (port ``15000 + id % 17000``).

    Raises:
        InputError: Neither given nor derivable (not under torchrun or Slurm), or a bad Slurm value.

    >>> rendezvous({"SLURM_JOB_NODELIST": "gpu[03-05]", "SLURM_JOB_ID": "123456"})
    {'MASTER_ADDR': 'gpu03', 'MASTER_PORT': '19456'}
    """
    env = os.environ if environ is None else environ
    out = {v: str(env[v]).strip() for v in ("MASTER_ADDR", "MASTER_PORT") if str(env.get(v, "")).strip()}
    nodelist = next((env[v] for v in _NODELIST_VARIABLES if str(env.get(v, "")).strip()), None)
    if "MASTER_ADDR" not in out and nodelist is not None:
        out["MASTER_ADDR"] = first_host(nodelist)
    job = str(env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", ""))).strip()
    if "MASTER_PORT" not in out and job:
        if not job.isdigit():
            raise InputError(f"SLURM_JOB_ID={job!r} is not a whole number; export MASTER_PORT (a free port)")
        out["MASTER_PORT"] = str(SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in out]
    if missing:
        raise InputError(
            f"{' and '.join(missing)} not set for a run of several ranks: launch with torchrun or srun, or export "
            "MASTER_ADDR (the first node's host name) and MASTER_PORT (a free port)"
        )
    return out


def init(ranks: Ranks, device: Any) -> bool:
    """Start ``torch.distributed`` for a run of several ranks (``nccl`` on CUDA, else ``gloo``); nothing for one
    rank or when it is already started. Returns whether this call started it.

    Raises:
        InputError: No rendezvous (:func:`rendezvous`).
    """
    if not ranks.distributed:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    os.environ.update(rendezvous())  # torch's env:// reads them there
    on_cuda = getattr(torch.device(device), "type", "cpu") == "cuda"
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        "nccl" if on_cuda else "gloo",
        init_method="env://",
        rank=ranks.rank,
        world_size=ranks.world,
        timeout=datetime.timedelta(seconds=BARRIER_TIMEOUT_S),
    )
    return True


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (nothing for a single rank or before :func:`init`)."""
    if not ranks.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_backend() == "nccl":  # the rank's own GPU (else NCCL guesses one and warns)
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def on_main_first(ranks: Ranks, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 while the other ranks wait, then tell them whether it worked (e.g. a weights download
    that every rank would otherwise start at once). One rank: just ``fn()``. Returns ``fn()``'s value on rank 0,
    ``None`` elsewhere.

    Raises:
        On rank 0, what ``fn`` raises; on the others, ``InputError`` with rank 0's one-line message (a project
        error), so that no rank waits at a later barrier for a rank that has stopped.
    """
    if not ranks.distributed:
        return fn()
    error, value = "", None
    if ranks.main:
        try:
            value = fn()
        except UniversalError as exc:
            error = str(exc) or type(exc).__name__
            _broadcast_text(ranks, error)
            raise
    message = _broadcast_text(ranks, error)
    if message:
        raise InputError(f"rank 0 stopped: {message}")
    return value


def _broadcast_text(ranks: Ranks, text: str) -> str:
    """Rank 0's ``text`` on every rank (UTF-8 bytes in tensors: no pickled objects cross the process group)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return text
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    data = text.encode("utf-8") if ranks.main else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    n = int(size.item())
    if n == 0:
        return ""
    buf = torch.zeros(n, dtype=torch.uint8, device=device)
    if ranks.main:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode("utf-8", errors="replace")


def shutdown(started: bool) -> None:
    """End the process group that :func:`init` started."""
    if started:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
