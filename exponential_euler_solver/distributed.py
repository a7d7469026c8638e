"""Data parallelism across processes and machines with :mod:`torch.distributed`.

When a default process group is initialised (``torch.distributed.init_process_group``, e.g. under ``torchrun``),
every rank holds the same flat parameters and runs the same solver; only the dataset is split. Each rank
evaluates its contiguous shard of the examples, divides by the *global* number of examples, and one SUM
all-reduce per returned quantity (the loss and gradient packed into one buffer; a block of Hessian or
Gauss-Newton products) gives every rank the same global mean. Since the reduced values are identical on every
rank and the solvers are deterministic (the eigen-tracker draws its random start from its own seeded generator),
the ranks stay in lockstep without further communication; :meth:`DataParallel.check_replicas_agree` verifies that
cheaply every few steps.

This module uses nothing of the library but its exceptions, so the loss wrapper and the solvers may use it.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import RankDivergenceError

__all__ = ["DataParallel", "data_parallel_for", "shard_range", "parameter_checksum", "is_distributed",
           "get_rank", "get_world_size", "is_main_process", "barrier_if_distributed", "main_process_decides"]

# Integer views used to checksum parameter bit patterns, by element size in bytes (float64 is read as two
# int32 words, so the int64 sum of up to 2**32 words cannot overflow).
_BIT_VIEWS = {8: torch.int32, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def is_distributed() -> bool:
    """True when :mod:`torch.distributed` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 and when not distributed: the process that writes files and prints."""
    return get_rank() == 0


def barrier_if_distributed() -> None:
    """Wait until every rank reaches this point (e.g. until rank 0 has written a checkpoint); a no-op when not
    distributed."""
    if is_distributed():
        dist.barrier()


def main_process_decides(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (one small broadcast); ``flag`` itself when not distributed.

    For decisions that every rank must take alike but may see differently, such as a wall-clock "time to save a
    checkpoint?": a collective such as :func:`barrier_if_distributed` entered by some ranks only would hang or
    pair with another rank's all-reduce.
    """
    if not is_distributed():
        return bool(flag)
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def shard_range(n_examples: int, rank: int, world_size: int) -> range:
    """The contiguous block of example indices that ``rank`` evaluates.

    The first ``n_examples % world_size`` ranks get ``n_examples // world_size + 1`` examples, the others
    ``n_examples // world_size`` (possibly none), so every example belongs to exactly one rank.

    Raises:
        ValueError: ``n_examples`` is negative, ``world_size`` is not positive, or ``rank`` is not in
            ``[0, world_size)``.
    """
    if n_examples < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need n_examples >= 0, world_size >= 1 and 0 <= rank < world_size; got "
                         f"n_examples={n_examples}, rank={rank}, world_size={world_size}")
    base, extra = divmod(n_examples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def parameter_checksum(params: Tensor) -> Tensor:
    """The int64 sum of the bit patterns of ``params`` (read as int32 words; int16/int8 for narrower dtypes).

    Integer addition is exact and associative, so the checksum does not depend on the reduction order (nor on
    the device that computed it), and it changes when any single entry changes by a single ulp.
    """
    flat = params.detach().contiguous().reshape(-1)
    return torch.sum(flat.view(_BIT_VIEWS[flat.element_size()]), dtype=torch.int64)


def data_parallel_for(n_examples: int, distributed: Optional[bool]) -> Optional["DataParallel"]:
    """The :class:`DataParallel` helper a loss over ``n_examples`` examples uses, or None.

    Args:
        n_examples: the global number of examples.
        distributed: None: data-parallel exactly when a default process group is initialised; True: required
            (raises without a group); False: never (every process evaluates the whole dataset on its own).

    Raises:
        ValueError: ``distributed`` is not None or a bool, or it is True without an initialised process group.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed must be None, True or False; got {distributed!r}")
    if distributed and not is_distributed():
        raise ValueError("distributed=True needs an initialised default process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun); got none. Pass "
                         "distributed=None to use one only when it exists")
    if distributed is False or not is_distributed():
        return None
    return DataParallel(n_examples)


class DataParallel:
    """This process's part in a data-parallel evaluation over the default process group.

    Args:
        n_examples: the global number of examples, split by :func:`shard_range`.

    Attributes:
        rank, world_size: this process's rank and the group's size, read at construction.
        shard: the example indices this rank evaluates (a ``range``; may be empty).
        bytes_all_reduced: bytes this process has contributed to all-reduces so far (payload only: the element
            count times the element size of each reduced buffer, not the transport's own traffic).
        n_all_reduces: number of all-reduce calls so far.
        all_reduce_seconds: wall-clock seconds spent in them (waiting for the slowest rank included).

    Raises:
        RuntimeError: no default process group is initialised.
    """

    def __init__(self, n_examples: int):
        if not is_distributed():
            raise RuntimeError("DataParallel needs an initialised default process group "
                               "(torch.distributed.init_process_group)")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.shard = shard_range(n_examples, self.rank, self.world_size)
        self.bytes_all_reduced = 0
        self.n_all_reduces = 0
        self.all_reduce_seconds = 0.0

    def _all_reduce(self, buffer: Tensor, op) -> Tensor:
        start = time.perf_counter()
        dist.all_reduce(buffer, op=op)
        self.all_reduce_seconds += time.perf_counter() - start
        self.bytes_all_reduced += buffer.numel() * buffer.element_size()
        self.n_all_reduces += 1
        return buffer

    def all_reduce_sum(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Sum each tensor over the ranks in one all-reduce (the tensors are packed into one flat buffer).

        Args:
            tensors: tensors of one dtype on one device; each rank passes the same shapes in the same order.

        Returns:
            New tensors (views of the reduced buffer) shaped like the inputs, identical on every rank; the
            inputs are not modified.

        Raises:
            ValueError: no tensors, or mixed dtypes or devices.
        """
        if not tensors:
            raise ValueError("all_reduce_sum needs at least one tensor; got none")
        if len({(t.dtype, t.device) for t in tensors}) != 1:
            raise ValueError("all_reduce_sum packs tensors of one dtype and device; got "
                             f"{[(t.dtype, str(t.device)) for t in tensors]}")
        buffer = self._all_reduce(torch.cat([t.detach().reshape(-1) for t in tensors]), dist.ReduceOp.SUM)
        out, offset = [], 0
        for t in tensors:
            out.append(buffer[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
        return tuple(out)

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``tensor`` **in place** with rank ``src``'s, on every rank; returns it."""
        dist.broadcast(tensor, src=src)
        return tensor

    def check_replicas_agree(self, params: Tensor, *, step: int, t: float) -> None:
        """Raise unless every rank holds bit-identical ``params``.

        One all-reduce (MAX) of 16 bytes: ``(c, -c)`` with ``c`` the :func:`parameter_checksum`, which gives the
        largest and smallest checksum over the ranks; they differ exactly when some rank's checksum differs.
        Every rank calls this at the same step and every rank raises.

        Raises:
            RankDivergenceError: the checksums differ, carrying ``step`` and ``t``.
        """
        c = parameter_checksum(params)
        extremes = self._all_reduce(torch.stack([c, -c]), dist.ReduceOp.MAX)
        largest, smallest = int(extremes[0]), -int(extremes[1])
        if largest != smallest:
            raise RankDivergenceError(
                f"the parameters differ across the {self.world_size} ranks (checksums of their bit patterns range "
                f"from {smallest} to {largest}; this rank's is {int(c)}); every rank must start from the same "
                "parameters (LossFunction.initialize_parameters broadcasts rank 0's) and take the same steps",
                step=step, t=t)
