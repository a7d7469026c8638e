"""One checkpoint file for a whole benchmark grid, from which an interrupted grid continues (``--checkpoint``,
``--resume``)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

from ..checkpoint import Checkpointer, load_checkpoint, save_checkpoint
from ..errors import CheckpointError
from .results import RunResult

__all__ = ["GridCheckpoint", "CheckpointMismatchError", "DEFAULT_CHECKPOINT_SECONDS", "GRID_CHECKPOINT_KIND",
           "GRID_CHECKPOINT_VERSION"]

DEFAULT_CHECKPOINT_SECONDS = 60.0  # least wall-clock time between two checkpoints within a run
GRID_CHECKPOINT_KIND = "exponential_euler_solver.benchmark/grid"  # marks the ``extra`` of a grid checkpoint
# Version 1 was written before the one integration driver (its finished runs hold the old step records).
GRID_CHECKPOINT_VERSION = 2

RunKey = Tuple[int, int, int, str]  # (n_train, n_classes, seed, solver)


class CheckpointMismatchError(CheckpointError):
    """A grid checkpoint was written for another grid or configuration than the one asked to resume."""


def _run_key(data: dict) -> RunKey:
    return int(data["n_train"]), int(data["n_classes"]), int(data["seed"]), str(data["solver"])


class GridCheckpoint:
    """One checkpoint file for a whole benchmark grid, from which an interrupted grid continues.

    The file is a :func:`~exponential_euler_solver.save_checkpoint` file (written atomically, by rank 0 only).
    Its solver state and trajectory are those of the run in progress, or of the last run that ended; its
    ``extra`` holds, as plain containers::

        {"kind": GRID_CHECKPOINT_KIND, "version": GRID_CHECKPOINT_VERSION,
         "config": the grid's configuration (compared on resume, see check_config),
         "finished": [RunResult.to_dict() of every run that ended, in grid order],
         "current": {"n_train", "n_classes", "seed", "solver", "done"}}

    ``current`` names the run that the solver state belongs to, ``done`` whether it has ended (it is then in
    ``finished`` too). The run's wall time so far is its trajectory's (each step timed itself, so saving is not
    counted). The suite saves when the first run of a fresh grid starts (so the file exists from then on), after
    each accepted step through a :class:`~exponential_euler_solver.Checkpointer` (at most every
    ``every_seconds``), and when each run ends.

    Resuming (:meth:`load`): finished runs are taken from the file instead of being run again (:meth:`result`);
    the interrupted run is rebuilt from its grid point and solver, its solver state is loaded and its trajectory
    restored, so it continues from its last saved step to the numbers of an uninterrupted run (steps taken after
    that save are taken again).

    Args:
        path: the checkpoint file.
        config: the grid's configuration, plain data (e.g. the grid values, target, solvers, dtype).
        every_seconds: the least wall-clock time between two saves within a run; 0 saves after every step.

    Raises:
        ValueError: ``every_seconds`` is negative or not finite.
    """

    def __init__(self, path, config: dict, every_seconds: float = DEFAULT_CHECKPOINT_SECONDS):
        if isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float)) or not (
                math.isfinite(every_seconds) and every_seconds >= 0):
            raise ValueError(f"every_seconds must be a finite number >= 0; got {every_seconds!r}")
        self.path = path
        self.every_seconds = float(every_seconds)
        self.config = config
        self.extra: dict = {"kind": GRID_CHECKPOINT_KIND, "version": GRID_CHECKPOINT_VERSION, "config": config,
                            "finished": [], "current": None}
        self._finished: Dict[RunKey, RunResult] = {}
        self._interrupted: Optional[dict] = None  # the loaded checkpoint, when it holds an unfinished run
        self._written = False

    @classmethod
    def load(cls, path, every_seconds: float = DEFAULT_CHECKPOINT_SECONDS) -> "GridCheckpoint":
        """Read a grid checkpoint to continue its grid.

        Raises:
            CheckpointError: the file is missing, damaged, not a checkpoint of this library, not a benchmark
                grid checkpoint, or of a grid-checkpoint version this library does not read (the message names
                it).
        """
        state = load_checkpoint(path)
        extra = state.get("extra")
        if not isinstance(extra, dict) or extra.get("kind") != GRID_CHECKPOINT_KIND:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a benchmark grid checkpoint (written by "
                                  "euler-benchmark --checkpoint): its extra has no 'kind': "
                                  f"{GRID_CHECKPOINT_KIND!r}")
        version = extra.get("version")
        if not isinstance(version, int) or version != GRID_CHECKPOINT_VERSION:
            raise CheckpointError(f"benchmark grid checkpoint {str(path)!r} has version {version!r}; this library "
                                  f"reads version {GRID_CHECKPOINT_VERSION} only (version 1 was written by "
                                  "exponential_euler_solver 0.1); rerun the grid without --resume")
        ckpt = cls(path, extra.get("config"), every_seconds)
        try:
            finished = [RunResult.from_dict(d) for d in extra["finished"]]
            current = extra["current"]
            done = current is None or bool(current["done"])
            if not done:
                _run_key(current)
                if state.get("trajectory") is None:
                    raise KeyError("trajectory")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"benchmark grid checkpoint {str(path)!r} is malformed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        ckpt.extra.update(finished=list(extra["finished"]), current=current)
        ckpt._finished = {(r.n_train, r.n_classes, r.seed, r.solver): r for r in finished}
        ckpt._interrupted = None if done else state
        ckpt._written = True
        return ckpt

    def check_config(self, config: dict) -> None:
        """Raise unless ``config`` equals the configuration stored in the file.

        Raises:
            CheckpointMismatchError: naming every differing key (as a command option, ``--n-train``) with its
                value in the checkpoint and in ``config``.
        """
        stored = self.config if isinstance(self.config, dict) else {}
        diffs = [f"--{key.replace('_', '-')}: {stored.get(key)!r} in the checkpoint, {config.get(key)!r} now"
                 for key in sorted(set(stored) | set(config), key=str) if stored.get(key) != config.get(key)]
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {str(self.path)!r} was written for another grid or configuration: "
                + "; ".join(diffs) + ". Resume with the checkpoint's options, or start afresh without --resume "
                "(and another --checkpoint path)")

    @property
    def finished(self) -> list:
        """The runs that have ended, in grid order."""
        return list(self._finished.values())

    def result(self, n_train: int, n_classes: int, seed: int, solver: str) -> Optional[RunResult]:
        """The saved result of a run that has ended, or None."""
        return self._finished.get((n_train, n_classes, seed, solver))

    def interrupted(self, n_train: int, n_classes: int, seed: int, solver: str) -> Optional[dict]:
        """The loaded checkpoint (:func:`~exponential_euler_solver.load_checkpoint`'s dict) when it holds this
        run unfinished, else None."""
        state = self._interrupted
        if state is None or _run_key(state["extra"]["current"]) != (n_train, n_classes, seed, solver):
            return None
        return state

    # -- used by the suite -------------------------------------------------------------------------------------
    def start(self, key: RunKey, solver, trajectory) -> Checkpointer:
        """Mark ``key`` as the run in progress (saving now when the file has not been written yet) and return
        the checkpointer that its steps are offered to."""
        n, c, s, name = key
        self.extra["current"] = {"n_train": n, "n_classes": c, "seed": s, "solver": name, "done": False}
        if not self._written:
            save_checkpoint(self.path, solver, trajectory, self.extra)
            self._written = True
        # The run's end is saved by finish(), with the run marked done.
        return Checkpointer(self.path, self.every_seconds, extra=self.extra, save_at_end=False)

    def finish(self, result: RunResult, solver, trajectory) -> None:
        """Record ``result`` as ended and save."""
        self.extra["current"]["done"] = True
        self.extra["finished"].append(result.to_dict())
        self._finished[(result.n_train, result.n_classes, result.seed, result.solver)] = result
        if self._interrupted is not None and _run_key(self._interrupted["extra"]["current"]) == _run_key(
                self.extra["current"]):
            self._interrupted = None
        save_checkpoint(self.path, solver, trajectory, self.extra)
