"""Process groups for sequence parallelism (Ulysses x Ring), CFG parallelism and data-parallel replicas.

All process-group state lives in one small object, [`ParallelGroups`], built once after `torch.distributed` is
initialised and passed to whoever needs it (attention, split/gather hooks, caches). Nothing here is a module-level
global.

Rank layout (Ulysses ranks contiguous, so that the bandwidth-hungry all-to-all stays inside a node):

    rank = dp_idx * (cfg_degree * ring_degree * ulysses_degree)
           + cfg_idx * (ring_degree * ulysses_degree) + ring_idx * ulysses_degree + ulysses_idx

A *replica* is the `cfg_degree * ring_degree * ulysses_degree` contiguous ranks sharing a `dp_idx`: an independent
copy of the model that serves its own requests (`dp_degree` replicas in all; `dp_degree=1` is the whole world). The
sequence-parallel (SP) group of a rank is the `ring_degree * ulysses_degree` ranks sharing its `dp_idx` and `cfg_idx`;
inside it the rank's index is `sp_rank = ring_idx * ulysses_degree + ulysses_idx`, which is also the index of the
image chunk the rank holds. Every SP, Ulysses, Ring and CFG group lies inside one replica.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from diffusers.utils import logging


logger = logging.get_logger(__name__)

_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(timeout: float = 600.0, backend: str | None = None) -> None:
    r"""
    Initialise the default process group from the launcher environment, if it is not initialised yet.

    `torchrun` and `accelerate launch` set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. When
    CUDA is available the backend is NCCL and the current CUDA device is set to `LOCAL_RANK`; otherwise it is gloo.

    Args:
        timeout (`float`, defaults to `600.0`):
            Collective timeout in seconds, passed to `init_process_group`. A rank that waits longer on a collective
            raises instead of hanging forever.
        backend (`str`, *optional*):
            Force a backend (`"nccl"`, `"gloo"`, ...). Defaults to NCCL with CUDA, gloo without.

    Raises:
        `RuntimeError`: if no process group exists and the launcher environment variables are missing.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch.")
    if dist.is_initialized():
        local_rank = os.environ.get("LOCAL_RANK")
        if local_rank is not None and dist.get_backend() == "nccl" and torch.cuda.current_device() != int(local_rank):
            # A process group started by the user without set_device: NCCL needs one GPU per local rank.
            torch.cuda.set_device(int(local_rank))
        return
    missing = [name for name in _LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and the launcher environment variables {missing} are not set. "
            "Launch the script with `torchrun --nproc-per-node N script.py ...` or "
            "`accelerate launch --num_processes N script.py ...`, or call "
            "`torch.distributed.init_process_group` yourself before building the parallel groups."
        )
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and "nccl" in backend:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout), init_method="env://"
    )
    if rank == 0:
        logger.info(f"Initialised torch.distributed: backend={backend}, world_size={world_size}.")


def _new_group(ranks: list[int], world_size: int) -> dist.ProcessGroup | None:
    """A process group over `ranks`; the default group when it covers the world. Collective over all ranks."""
    if len(ranks) == world_size:
        return dist.group.WORLD
    # `new_group` does not inherit the default group's timeout (gloo subgroups would wait 30 minutes on a dead peer).
    seconds = collective_timeout()
    return dist.new_group(ranks=ranks, timeout=None if seconds is None else timedelta(seconds=seconds))


def collective_timeout(group: dist.ProcessGroup | None = None) -> float | None:
    r"""
    The collective timeout of `group` (default: the world) in seconds: how long a collective waits for the other ranks
    before it raises. `None` without an initialised process group or when the backend does not tell.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group if group is not None else dist.group.WORLD
    for device_type in ("cpu", "cuda"):
        try:
            timeout = group._get_backend(torch.device(device_type)).options._timeout
        except Exception:  # noqa: BLE001 - private API: no backend for this device, or another torch version
            continue
        if isinstance(timeout, timedelta):
            return timeout.total_seconds()
    return None



@dataclass(repr=False)
class ParallelGroups:
    r"""
    The process groups of a `dp x cfg x ring x ulysses` device mesh, seen from the current rank.

    Build it with [`ParallelGroups.create`]. A group of size 1 is `None` and the code using it must not issue
    collectives on it (its rank is 0 and its size 1).

    Attributes:
        ulysses_degree, ring_degree, cfg_degree (`int`): the mesh degrees.
        sp_group (`ProcessGroup` or `None`): the sequence-parallel group (`ring_degree * ulysses_degree` ranks).
        sp_rank, sp_world_size (`int`): the rank inside the SP group and its size. `sp_rank` is the index of the
            sequence chunk this rank holds.
        ulysses_group, ulysses_rank: the all-to-all group (contiguous ranks) and the rank inside it.
        ring_group, ring_rank: the ring group and the rank inside it.
        ring_ranks (`list[int]`): the global ranks of the ring, in ring order (for point-to-point sends).
        cfg_group, cfg_rank: the group across CFG branches and the rank inside it (the branch index).
        sp_ranks, ulysses_ranks, cfg_ranks (`list[int]`): the global ranks of each group.
        dp_degree, dp_rank (`int`): the number of data-parallel replicas and the index of this rank's replica.
        replica_group (`ProcessGroup` or `None`): the `cfg x ring x ulysses` ranks of this rank's replica (the world
            when `dp_degree == 1`; `None` when the replica is one process).
        replica_rank, replica_size (`int`): the rank inside the replica group and its size.
        replica_ranks (`list[int]`): the global ranks of the replica, in order; `replica_ranks[0]` is its leader.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    rank: int = 0
    world_size: int = 1
    sp_group: dist.ProcessGroup | None = None
    sp_rank: int = 0
    sp_ranks: list[int] = field(default_factory=lambda: [0])
    ulysses_group: dist.ProcessGroup | None = None
    ulysses_rank: int = 0
    ulysses_ranks: list[int] = field(default_factory=lambda: [0])
    ring_group: dist.ProcessGroup | None = None
    ring_rank: int = 0
    ring_ranks: list[int] = field(default_factory=lambda: [0])
    cfg_group: dist.ProcessGroup | None = None
    cfg_rank: int = 0
    cfg_ranks: list[int] = field(default_factory=lambda: [0])
    dp_degree: int = 1
    dp_rank: int = 0
    replica_group: dist.ProcessGroup | None = None
    replica_rank: int = 0
    replica_ranks: list[int] = field(default_factory=lambda: [0])

    @property
    def sp_world_size(self) -> int:
        """Size of the sequence-parallel group: `ring_degree * ulysses_degree`."""
        return self.ring_degree * self.ulysses_degree

    @property
    def replica_size(self) -> int:
        """Processes in one replica: `cfg_degree * ring_degree * ulysses_degree`."""
        return self.cfg_degree * self.ring_degree * self.ulysses_degree

    @classmethod
    def create(cls, ulysses_degree: int, ring_degree: int, cfg_degree: int = 1, dp_degree: int = 1) -> "ParallelGroups":
        r"""
        Build the groups of a `dp_degree x cfg_degree x ring_degree x ulysses_degree` mesh over the default process
        group.

        Every rank must call this with the same degrees, at the same point of the program: each `new_group` is a
        collective over all ranks and the groups are created in the same order on every rank.

        Args:
            ulysses_degree (`int`): all-to-all (head-sharding) degree; must divide the number of attention heads.
            ring_degree (`int`): ring-attention degree.
            cfg_degree (`int`, defaults to `1`): number of CFG branches run in parallel (1 or 2).
            dp_degree (`int`, defaults to `1`): number of independent replicas (data parallel); the SP and CFG groups
                are built inside each replica.

        Returns:
            [`ParallelGroups`] for the current rank. Without an initialised process group only the trivial mesh
            `(1, 1, 1, 1)` is accepted.

        Example:

        ```py
        >>> from diffusers_qwen_sp.distributed import ParallelGroups, init_distributed

        >>> init_distributed()  # under `torchrun --nproc-per-node 4 ...`
        >>> groups = ParallelGroups.create(ulysses_degree=2, ring_degree=2)
        >>> groups.sp_world_size
        4
        >>> # torchrun --nproc-per-node 4: two replicas of Ulysses 2, ranks (0, 1) and (2, 3)
        >>> groups = ParallelGroups.create(ulysses_degree=2, ring_degree=1, dp_degree=2)
        >>> groups.replica_ranks  # on rank 3
        [2, 3]
        ```
        """
        degrees = {
            "ulysses_degree": ulysses_degree,
            "ring_degree": ring_degree,
            "cfg_degree": cfg_degree,
            "dp_degree": dp_degree,
        }
        for name, value in degrees.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        initialised = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialised else 1
        product = dp_degree * cfg_degree * ring_degree * ulysses_degree
        if product != world_size:
            dp = ("dp_degree * ", f"{dp_degree} * ") if dp_degree > 1 else ("", "")
            raise ValueError(
                f"{dp[0]}cfg_degree * ring_degree * ulysses_degree = {dp[1]}{cfg_degree} * {ring_degree} * "
                f"{ulysses_degree} = {product}, but the world size is {world_size}"
                + ("" if initialised else " (torch.distributed is not initialised)")
                + ". Choose degrees whose product equals the number of processes, e.g. "
                f"ulysses_degree={world_size}, ring_degree=1, cfg_degree=1."
            )
        if not initialised:
            return cls()

        rank = dist.get_rank()
        sp_size = ring_degree * ulysses_degree
        replica_size = cfg_degree * sp_size
        dp_idx, replica_rank = divmod(rank, replica_size)
        cfg_idx, sp_rank = divmod(replica_rank, sp_size)
        ring_idx, ulysses_idx = divmod(sp_rank, ulysses_degree)

        def global_rank(cfg: int, ring: int, ulysses: int, dp: int = dp_idx) -> int:
            return dp * replica_size + cfg * sp_size + ring * ulysses_degree + ulysses

        groups = cls(
            ulysses_degree=ulysses_degree,
            ring_degree=ring_degree,
            cfg_degree=cfg_degree,
            rank=rank,
            world_size=world_size,
            sp_rank=sp_rank,
            ulysses_rank=ulysses_idx,
            ring_rank=ring_idx,
            cfg_rank=cfg_idx,
            sp_ranks=[global_rank(cfg_idx, r, u) for r in range(ring_degree) for u in range(ulysses_degree)],
            ulysses_ranks=[global_rank(cfg_idx, ring_idx, u) for u in range(ulysses_degree)],
            ring_ranks=[global_rank(cfg_idx, r, ulysses_idx) for r in range(ring_degree)],
            cfg_ranks=[global_rank(c, ring_idx, ulysses_idx) for c in range(cfg_degree)],
            dp_degree=dp_degree,
            dp_rank=dp_idx,
            replica_rank=replica_rank,
            replica_ranks=list(range(dp_idx * replica_size, (dp_idx + 1) * replica_size)),
        )

        # Every rank walks every group in the same order and keeps the one it belongs to; size-1 groups are skipped
        # on all ranks alike (no collective ever runs on them). With dp_degree == 1 the `dp` axis has one value, so
        # the groups (and the order of the `new_group` calls) are those of the `cfg x ring x ulysses` mesh.
        degrees = {"dp": dp_degree, "cfg": cfg_degree, "ring": ring_degree, "ulysses": ulysses_degree}
        mine = {"dp": dp_idx, "cfg": cfg_idx, "ring": ring_idx, "ulysses": ulysses_idx}

        def group_along(*varying: str) -> dist.ProcessGroup | None:
            if math.prod(degrees[axis] for axis in varying) == 1:
                return None
            fixed = [axis for axis in degrees if axis not in varying]
            kept = None
            for fixed_values in itertools.product(*(range(degrees[axis]) for axis in fixed)):
                coordinates = dict(zip(fixed, fixed_values))
                ranks = [
                    global_rank(**{**coordinates, **dict(zip(varying, values))})
                    for values in itertools.product(*(range(degrees[axis]) for axis in varying))
                ]
                group = _new_group(ranks, world_size)
                if all(mine[axis] == coordinates[axis] for axis in fixed):
                    kept = group
            return kept

        groups.sp_group = group_along("ring", "ulysses")
        groups.ulysses_group = group_along("ulysses")
        groups.ring_group = group_along("ring")
        groups.cfg_group = group_along("cfg")
        groups.replica_group = group_along("cfg", "ring", "ulysses")
        return groups

    def __repr__(self) -> str:
        replica = (
            f"dp={self.dp_degree}, dp_rank={self.dp_rank}, replica_ranks={self.replica_ranks}, "
            if self.dp_degree > 1
            else ""
        )
        return (
            f"{type(self).__name__}(rank={self.rank}/{self.world_size}, "
            + replica
            + f"cfg={self.cfg_degree}, ring={self.ring_degree}, "
            f"ulysses={self.ulysses_degree}; sp_rank={self.sp_rank}, ring_rank={self.ring_rank}, "
            f"ulysses_rank={self.ulysses_rank}, cfg_rank={self.cfg_rank}; sp_ranks={self.sp_ranks}, "
            f"ring_ranks={self.ring_ranks}, ulysses_ranks={self.ulysses_ranks}, cfg_ranks={self.cfg_ranks})"
        )

