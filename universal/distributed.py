"""Ranks of a batch run under ``torchrun`` or Slurm: who am I, which cases are mine, which device, one barrier.

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``);
Slurm's ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` (the torchrun names win when both are
set). With one rank nothing is initialised. With more, :func:`init` starts ``torch.distributed`` (``nccl`` when the
rank uses CUDA, else ``gloo``) for :func:`barrier`; a Slurm job must give ``MASTER_ADDR`` and ``MASTER_PORT``
(e.g. ``export MASTER_ADDR=$(scontrol show hostnames $SLURM_NODELIST | head -n1) MASTER_PORT=29500``).

Each rank takes the cases ``i`` with ``i % world == rank`` (:meth:`Ranks.mine`): deterministic, disjoint, together
all of them, and balanced in count.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from universal.errors import InputError

__all__ = ["BARRIER_TIMEOUT_S", "Ranks", "barrier", "detect", "device_for", "init", "shutdown"]

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


def init(ranks: Ranks, device: Any) -> bool:
    """Start ``torch.distributed`` for a run of several ranks (``nccl`` on CUDA, else ``gloo``); nothing for one
    rank or when it is already started. Returns whether this call started it.

    Raises:
        InputError: ``MASTER_ADDR``/``MASTER_PORT`` missing (e.g. under ``srun`` without them).
    """
    if not ranks.distributed:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise InputError(
            f"{' and '.join(missing)} not set for a run of {ranks.world} ranks: launch with torchrun, or export "
            "MASTER_ADDR (the first node's host name) and MASTER_PORT (a free port) in the Slurm job"
        )
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


def shutdown(started: bool) -> None:
    """End the process group that :func:`init` started."""
    if started:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
