"""Checkpoints: a solver's state and its trajectory in one file, written atomically, so that a run killed at any
moment continues from its last checkpoint to the same parameters, bit for bit, as a run that was never interrupted.

:func:`save_checkpoint` writes a solver's :meth:`~exponential_euler_solver.solvers.base.Solver.state_dict` and a
:class:`~exponential_euler_solver.Trajectory` to one file (see :mod:`.files`); :func:`resume` puts them back;
:class:`Checkpointer` saves from a loop at most every so many seconds (pass it to
:func:`~exponential_euler_solver.integrate` through ``SaveAt(checkpoint=...)``).
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

from torch import Tensor

from .distributed import main_process_decides
from .errors import CheckpointError
from .files import FORMAT_VERSION, PathLike, check_plain, library_version, torch_load, torch_save
from .trajectory import Trajectory

__all__ = ["save_checkpoint", "load_checkpoint", "resume", "Checkpointer", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "exponential_euler_solver/checkpoint"


def save_checkpoint(path: PathLike, solver, trajectory: Optional[Trajectory] = None,
                    extra: Optional[dict] = None) -> None:
    """Write the solver's state (and a trajectory) to ``path`` so that :func:`resume` continues the run exactly.

    The file holds ``{"format": CHECKPOINT_FORMAT, "format_version", "library_version", "solver":
    solver.state_dict(), "trajectory": trajectory.to_dict() or None, "extra": extra}``. It is written
    atomically: to a temporary file in the same folder, flushed and fsynced, renamed over ``path`` with
    :func:`os.replace`, and the folder fsynced. A crash or kill at any moment leaves ``path`` holding either the
    previous checkpoint or the new one, complete; never a part. A process killed during a write may leave its
    temporary file, ``.NAME.*.tmp`` beside ``path``, which is safe to delete. The file gets an ordinary
    file's mode (0666 less the umask).

    Args:
        path: the checkpoint file.
        solver: a :class:`~exponential_euler_solver.solvers.base.Solver`.
        trajectory: a :class:`Trajectory` to store alongside, or None.
        extra: anything else to store (e.g. the run's configuration), made of tensors, dicts, lists, tuples and
            primitives only.

    Raises:
        TypeError: ``trajectory`` is not a Trajectory, or the state or ``extra`` holds something other than
            tensors, plain containers and primitives (it could not be loaded with ``weights_only=True``).
        OSError: the file could not be written (``path`` is then unchanged).
    """
    if trajectory is not None and not isinstance(trajectory, Trajectory):
        raise TypeError(f"trajectory must be a Trajectory or None; got {type(trajectory).__name__}")
    payload = {
        "format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "library_version": library_version(),
        "solver": solver.state_dict(),
        "trajectory": None if trajectory is None else trajectory._state(copy=False),
        "extra": extra,
    }
    check_plain(payload, "checkpoint")
    torch_save(payload, path)


def load_checkpoint(path: PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``torch.load(weights_only=True)`` onto the CPU.

    Returns:
        The dict described in :func:`save_checkpoint` (``"trajectory"`` as plain containers; rebuild it with
        :meth:`Trajectory.from_dict`).

    Raises:
        CheckpointError: the file is missing, empty, truncated or otherwise damaged, not a torch file, holds
            other objects than tensors and plain containers, or is not a checkpoint of this library (no format
            marker, a newer format version, or no solver state). The message names the file and the problem; the
            underlying exception is chained.
    """
    state = torch_load(path, CHECKPOINT_FORMAT, "checkpoint")
    if not isinstance(state.get("solver"), dict):
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds no solver state")
    return state


def resume(path: PathLike, solver, trajectory: Optional[Trajectory] = None) -> dict:
    """Restore ``solver`` (and ``trajectory``) from a checkpoint, in place.

    ``solver`` must be built as the one that was saved (same class, loss, options; its parameter vector of the
    same size and dtype, on any device); its parameters, flow time, counters, cached gradient, controller and
    eigen-tracker state are overwritten. ``trajectory``, when given, is replaced by the stored one (settings,
    records and kept parameters).

    Returns:
        The checkpoint dict (see :func:`load_checkpoint`), e.g. for its ``"extra"``.

    Raises:
        CheckpointError: as :func:`load_checkpoint`; or the checkpoint was saved by another solver class, for
            another parameter size or dtype, or holds no trajectory while ``trajectory`` is given.
    """
    state = load_checkpoint(path)
    where = os.fspath(path)
    saved = state["solver"]
    params = saved.get("params")
    if isinstance(params, Tensor) and params.dtype != solver.params.dtype:
        raise CheckpointError(f"checkpoint {where!r} holds {params.dtype} parameters; the solver's are "
                              f"{solver.params.dtype}")
    if trajectory is not None and state.get("trajectory") is None:
        raise CheckpointError(f"checkpoint {where!r} holds no trajectory; pass trajectory=None")
    try:
        solver.load_state_dict(saved)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {where!r} does not fit this solver: {exc}") from exc
    if trajectory is not None:
        try:
            trajectory._restore(state["trajectory"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {where!r} holds a malformed trajectory: {exc}") from exc
    return state


class Checkpointer:
    """Saves a checkpoint from a loop at most every ``every_seconds`` of wall-clock time.

    ::

        checkpointer = Checkpointer("run.pt", every_seconds=60)
        trajectory = integrate(solver, Stop(steps=10_000), SaveAt(checkpoint=checkpointer))
        checkpointer.save(solver, trajectory)  # the final state

    Args:
        path: the checkpoint file (overwritten atomically by each save).
        every_seconds: the least wall-clock time between two saves (:func:`time.monotonic`), counted from the
            construction for the first; 0 saves at every call.
        extra: passed to :func:`save_checkpoint` with each save.
        save_at_end: whether :func:`~exponential_euler_solver.integrate` saves the final state when the run ends
            (False for a caller that saves it itself).

    Raises:
        ValueError: ``every_seconds`` is negative or not a finite number.
    """

    def __init__(self, path: PathLike, every_seconds: float, extra: Optional[dict] = None, save_at_end: bool = True):
        if isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float)) or not (
                math.isfinite(every_seconds) and every_seconds >= 0):
            raise ValueError(f"every_seconds must be a finite number >= 0; got {every_seconds!r}")
        self.path = os.fspath(path)
        self.every_seconds = float(every_seconds)
        self.extra = extra
        self.save_at_end = bool(save_at_end)
        self.n_saves = 0
        self.last_save = time.monotonic()

    def maybe_save(self, solver, trajectory: Optional[Trajectory] = None) -> bool:
        """Save when at least ``every_seconds`` passed since the last save; returns whether it saved."""
        # Rank 0's clock decides for all ranks, so they all reach the save's barrier together.
        if not main_process_decides(time.monotonic() - self.last_save >= self.every_seconds):
            return False
        self.save(solver, trajectory)
        return True

    def save(self, solver, trajectory: Optional[Trajectory] = None) -> None:
        """Save now (see :func:`save_checkpoint`)."""
        save_checkpoint(self.path, solver, trajectory, self.extra)
        self.n_saves += 1
        self.last_save = time.monotonic()
