"""Recording a run, and atomic checkpoints that let it be stopped and resumed exactly.

:class:`Trajectory` keeps what each accepted step did (flow time, step size, losses, costs, the curvature it
used) and, optionally, the parameters at chosen steps or flow times. :func:`save_checkpoint` writes a solver's
:meth:`~exponential_euler_solver.solvers.base.Solver.state_dict` and a trajectory to one file, atomically;
:func:`resume` puts them back, so that a run killed at any moment continues from its last checkpoint to the same
parameters, bit for bit, as a run that was never interrupted.

Files are written with :func:`torch.save` and read with ``torch.load(..., weights_only=True)``: they hold only
tensors, plain containers (dict, list, tuple) and primitives, so loading one never runs code from the file.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import re
import tempfile
import time
import zipfile
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from .distributed import barrier_if_distributed, is_main_process, main_process_decides
from .errors import CheckpointError

__all__ = ["Trajectory", "Checkpointer", "save_checkpoint", "load_checkpoint", "resume", "CHECKPOINT_FORMAT",
           "TRAJECTORY_FORMAT", "FORMAT_VERSION"]

CHECKPOINT_FORMAT = "exponential_euler_solver/checkpoint"
TRAJECTORY_FORMAT = "exponential_euler_solver/trajectory"
FORMAT_VERSION = 1  # raised when the layout of the files changes incompatibly

PathLike = Union[str, "os.PathLike[str]"]

# Per-step columns of a trajectory, in the order of to_dict().
_COLUMNS = ("step", "t", "dt", "loss", "new_loss", "rejections", "n_grad", "n_hvp", "n_rejected", "error_ratio",
            "sharpness", "eigenvalues")
# A requested flow time this many ulps of the flow time before a step's start still counts as inside the step
# (the start is recomputed as t - dt, which may differ from the previous step's end by rounding).
_TIME_SLACK_ULPS = 8


# ----------------------------------------------------------------------------------------------------------------
# files
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[Any], None]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one, never a part.

    ``write(f)`` fills a temporary file in the same folder; it is flushed and fsynced, renamed over ``path`` with
    :func:`os.replace` (atomic on POSIX and Windows), and the folder is fsynced so the rename itself survives a
    power cut. On any error (or interrupt) the temporary file is removed and ``path`` is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it an ordinary file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened, and need no fsync
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems do not support fsync on a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError unless ``obj`` is made of tensors, dicts, lists, tuples and primitives only (what
    ``torch.load(weights_only=True)`` reads back)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, Tensor, torch.dtype, torch.device)):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{where} has a key of type {type(key).__name__}; checkpoints hold only plain "
                                "keys (str, int, float, bool)")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, dicts, lists, tuples, "
                    "str, int, float, bool and None (convert it to one of these)")


def _torch_save(obj: Any, path: PathLike) -> None:
    # Data-parallel runs: every rank holds the same state; rank 0 writes, the others wait for it.
    if is_main_process():
        atomic_write(path, lambda f: torch.save(obj, f))
    barrier_if_distributed()


def _torch_load(path: PathLike, fmt: str, what: str) -> dict:
    """Load a file written by :func:`_torch_save` and check its format marker.

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a torch file, holds objects other than
            tensors and plain containers, or has no (or another) format marker.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} does not exist (or is not a file)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path!r} is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the very end
            reason = "it is truncated or corrupt, or not a file written by torch.save (no complete zip archive)"
        elif isinstance(exc, pickle.UnpicklingError) and "WeightsUnpickler" in str(exc):
            reason = "it holds objects other than tensors and plain containers (refused by weights_only=True)"
        else:
            reason = "it is truncated or corrupt"
        raise CheckpointError(f"cannot read {what} {path!r}: {reason} ({type(exc).__name__}: "
                              f"{_short_reason(exc)})") from exc
    problem = _format_problem(obj, fmt)
    if problem is not None:
        raise CheckpointError(f"{path!r} is not a {what} of exponential_euler_solver that this version reads: "
                              f"{problem}")
    return obj


def _format_problem(obj, fmt: str) -> Optional[str]:
    """Why ``obj`` is not data of format ``fmt`` at a version this library reads, or None if it is."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict)
                 else f"a {type(obj).__name__}")
        return f"it has no 'format': {fmt!r} marker (found {found})"
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return (f"it has format version {version!r}; this library reads versions up to {FORMAT_VERSION} "
                f"(upgrade exponential_euler_solver)")
    return None


def _short_reason(exc: Exception, limit: int = 160) -> str:
    """The gist of a loading error in one line: torch's weights_only errors wrap it in paragraphs of advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = " ".join(text.strip().split("\n\n", 1)[0].split(". ", 1)[0].split())  # the first sentence
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _library_version() -> str:
    from . import __version__  # at call time: the package imports this module
    return __version__


def _equal(a: Any, b: Any) -> bool:
    """Deep equality of plain containers: tensors by dtype, shape and values (NaN equal to NaN), floats with
    NaN equal to NaN."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
        return bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, type(a)) and len(a) == len(b)) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------------------------------------------
# the trajectory
class Trajectory:
    """What each accepted step of a solver did, and optionally the parameters along the way.

    Per step (one entry per :class:`~exponential_euler_solver.solvers.base.StepReport` recorded): ``step``
    (index), ``t`` (flow time at the end of the step), ``dt``, ``loss`` (at the start), ``new_loss`` (at the end),
    ``rejections`` (within the step), the cumulative counts ``n_grad``, ``n_hvp``, ``n_rejected``,
    ``error_ratio`` (None without error control), ``sharpness`` and ``eigenvalues`` (the curvature the step used,
    as the solver reports it; None when it reports none). The columns are returned as tensors by the properties
    of the same names.

    Parameters are kept (as copies, on their device) when asked for:

    * ``every_n``: whenever the number of accepted steps completed is a multiple of ``every_n``, i.e. after
      steps ``every_n - 1``, ``2 every_n - 1``, ... and, when recorded through :meth:`run`, at the starting point.
    * ``at_times``: at each requested flow time ``tau``. The point is interpolated linearly in theta between the
      start and the end of the accepted step that contains ``tau``::

          theta(tau) = theta_start + w (theta_end - theta_start),  w = (tau - t_start) / dt,  t_start = t - dt

      (:func:`torch.lerp`; ``w = 1`` gives ``theta_end`` exactly). This is first-order accurate inside a step,
      not the solver's own dense output; a step's end point is exact. The start of each step is needed:
      :meth:`run` provides it; a hand-written loop passes ``params`` at every :meth:`record` call (the trajectory
      keeps the previous end point while times are pending) or ``start_params``.

    The kept points are :attr:`params`, with their flow times :attr:`param_t` and the number of steps completed
    at each :attr:`param_step` (an interpolated point inside step ``s`` counts ``s``). A point at the same flow
    time as the last kept one is not kept twice.

    Args:
        every_n: keep the parameters every ``every_n`` accepted steps; None keeps none this way.
        at_times: flow times at which to keep the parameters (any order, duplicates removed).

    Raises:
        ValueError: ``every_n`` is not a positive int, or a time in ``at_times`` is negative or not finite.
    """

    def __init__(self, every_n: Optional[int] = None, at_times: Optional[Sequence[float]] = None):
        if every_n is not None and (isinstance(every_n, bool) or not isinstance(every_n, int) or every_n < 1):
            raise ValueError(f"every_n must be a positive int or None; got {every_n!r}")
        times = []
        for tau in (at_times if at_times is not None else []):
            if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
                raise ValueError(f"at_times must hold finite non-negative flow times; got {tau!r}")
            times.append(float(tau))
        self.every_n = every_n
        self.at_times = sorted(set(times))
        self._pending = list(self.at_times)  # requested times not reached yet
        self._columns: dict[str, list] = {name: [] for name in _COLUMNS}
        self._params: list[Tensor] = []
        self._param_t: list[float] = []
        self._param_step: list[int] = []
        self._previous: Optional[Tensor] = None  # the end point of the last recorded step, while times are pending
        self._previous_steps: Optional[int] = None  # number of steps completed at self._previous

    # -- recording -----------------------------------------------------------------------------------------------
    @property
    def stores_params(self) -> bool:
        """Whether this trajectory keeps parameters (``every_n`` or ``at_times`` given)."""
        return self.every_n is not None or bool(self.at_times)

    @property
    def pending_times(self) -> list[float]:
        """The requested flow times not reached yet."""
        return list(self._pending)

    def _keep(self, params: Tensor, t: float, steps: int) -> None:
        if self._param_t and self._param_t[-1] == t:
            return
        self._params.append(params.detach().clone())
        self._param_t.append(float(t))
        self._param_step.append(int(steps))

    def start(self, params: Tensor, t: float = 0.0, n_steps: int = 0) -> None:
        """Mark the starting point of a run: keeps ``params`` when ``n_steps`` is a multiple of ``every_n`` or
        ``t`` is a requested time, and remembers them as the start of the next step. :meth:`run` calls this.

        Args:
            params: the parameters at the start.
            t: their flow time.
            n_steps: the number of accepted steps completed before (a resumed solver's ``n_steps``).

        Raises:
            ValueError: a requested time lies before ``t`` and was never reached (it cannot be recorded).
        """
        slack = _TIME_SLACK_ULPS * math.ulp(max(1.0, abs(t)))
        if self._pending and self._pending[0] < t - slack:
            raise ValueError(f"at_times {self._pending[:3]} lie before the run's start at flow time {t:.6g} and "
                             "were not recorded; they cannot be reached")
        if self.every_n is not None and n_steps % self.every_n == 0 and n_steps not in self._param_step:
            self._keep(params, t, n_steps)
        while self._pending and self._pending[0] <= t + slack:
            self._keep(params, self._pending.pop(0), n_steps)
        if self._pending:
            self._previous, self._previous_steps = params.detach().clone(), n_steps

    def record(self, report, params: Optional[Tensor] = None, *, start_params: Optional[Tensor] = None) -> None:
        """Append one accepted step.

        Args:
            report: the :class:`~exponential_euler_solver.solvers.base.StepReport` of the step.
            params: the parameters at the end of the step (``solver.params`` right after ``step()``); needed when
                the trajectory keeps parameters, ignored otherwise.
            start_params: the parameters at the start of the step; needed only when a requested time falls in
                this step and ``params`` was not passed for the previous step.

        Raises:
            TypeError: ``report`` is not a StepReport-like object or ``params`` is not a tensor.
            ValueError: the trajectory keeps parameters and ``params`` is None; or a requested time falls in this
                step and its start is unknown; or a requested time lies before this step (earlier steps were
                recorded without parameters).
        """
        missing = [name for name in ("step", "t", "dt", "loss", "new_loss") if not hasattr(report, name)]
        if missing:
            raise TypeError(f"report must be a StepReport; got a {type(report).__name__} without {missing}")
        if params is not None and not isinstance(params, Tensor):
            raise TypeError(f"params must be a torch.Tensor or None; got {type(params).__name__}")
        if self.stores_params and params is None:
            raise ValueError(f"this trajectory keeps parameters (every_n={self.every_n}, at_times={self.at_times}); "
                             "pass params=solver.params after each step, or use run()")
        step, t, dt = int(report.step), float(report.t), float(report.dt)
        t_start = t - dt
        slack = _TIME_SLACK_ULPS * math.ulp(max(1.0, abs(t)))
        if params is not None and self._pending and self._pending[0] <= t:
            if self._pending[0] < t_start - slack:
                raise ValueError(f"requested flow time {self._pending[0]:.6g} lies before this step's start "
                                 f"{t_start:.6g}: earlier steps were recorded without parameters")
            if start_params is None:
                if self._previous is None or self._previous_steps != step:
                    raise ValueError(f"requested flow time {self._pending[0]:.6g} falls in step {step}, whose start "
                                     "is unknown: pass start_params, or params at every record() call, or use run()")
                start_params = self._previous
        self._append(report)
        if params is None:
            return
        while self._pending and self._pending[0] <= t:
            tau = self._pending.pop(0)
            w = min(1.0, max(0.0, (tau - t_start) / dt)) if dt > 0 else 1.0
            self._keep(torch.lerp(start_params.detach().to(params.dtype), params.detach(), w), tau, step)
        if self.every_n is not None and (step + 1) % self.every_n == 0:
            self._keep(params, t, step + 1)
        if self._pending:
            self._previous, self._previous_steps = params.detach().clone(), step + 1
        else:
            self._previous = self._previous_steps = None

    def _append(self, report) -> None:
        c = self._columns
        c["step"].append(int(report.step))
        c["t"].append(float(report.t))
        c["dt"].append(float(report.dt))
        c["loss"].append(float(report.loss))
        c["new_loss"].append(float(report.new_loss))
        c["rejections"].append(int(getattr(report, "rejections", 0)))
        for name in ("n_grad", "n_hvp", "n_rejected"):
            c[name].append(int(getattr(report, name, 0)))
        ratio = getattr(report, "error_ratio", None)
        c["error_ratio"].append(None if ratio is None else float(ratio))
        sharpness = getattr(report, "sharpness", None)
        c["sharpness"].append(None if sharpness is None else float(sharpness))
        eigvals = getattr(report, "eigvals", None)
        c["eigenvalues"].append(None if eigvals is None
                                else [float(v) for v in torch.as_tensor(eigvals).reshape(-1)])

    def run(self, solver, *, until_loss: Optional[float] = None, until_time: Optional[float] = None,
            max_steps: Optional[int] = None, checkpointer: Optional["Checkpointer"] = None,
            progress: bool = False) -> Iterator:
        """Step ``solver``, record each step, and yield its report: ``for report in trajectory.run(solver, ...)``.

        When the trajectory keeps parameters, the solver's current point is first passed to :meth:`start`. After
        each step the step is recorded (with ``solver.params`` when parameters are kept), then
        ``checkpointer.maybe_save(solver, self)`` is called, then the report is yielded. The run stops before a
        step when

        * ``solver.n_steps >= max_steps`` (the solver's total, which a resumed solver carries over: the same loop
          runs to the same end whether it starts fresh or from a checkpoint),
        * ``solver.t >= until_time`` (the last step may end past it), or
        * the loss at the current point is ``<= until_loss``,

        or when the caller stops iterating. The arguments are checked when ``run`` is called, not at the first
        step.

        Args:
            solver: a :class:`~exponential_euler_solver.solvers.base.Solver`.
            until_loss: stop once the loss is at or below this value.
            until_time: stop once the flow time reaches this value.
            max_steps: stop once the solver has completed this many accepted steps in total.
            checkpointer: a :class:`Checkpointer` to offer each step to.
            progress: show a tqdm progress bar (over ``max_steps`` when given).

        Returns:
            An iterator of :class:`~exponential_euler_solver.solvers.base.StepReport`.

        Raises:
            ValueError: none of ``until_loss``, ``until_time``, ``max_steps`` is given, or one is invalid; or a
                requested time lies before the solver's flow time (see :meth:`start`).
            TypeError: ``solver`` has no ``step()``/``params``.
            The solver's own errors propagate from the step that raised them.
        """
        if not (callable(getattr(solver, "step", None)) and isinstance(getattr(solver, "params", None), Tensor)):
            raise TypeError(f"solver must be a Solver with step() and params; got {type(solver).__name__}")
        if until_loss is None and until_time is None and max_steps is None:
            raise ValueError("give at least one of until_loss, until_time, max_steps; got none (the run would "
                             "never stop)")
        for name, value in (("until_loss", until_loss), ("until_time", until_time)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or math.isnan(value)):
                raise ValueError(f"{name} must be a number or None; got {value!r}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or max_steps < 0):
            raise ValueError(f"max_steps must be a non-negative int or None; got {max_steps!r}")
        if checkpointer is not None and not callable(getattr(checkpointer, "maybe_save", None)):
            raise TypeError(f"checkpointer must be a Checkpointer; got {type(checkpointer).__name__}")
        if self.stores_params:
            self.start(solver.params, float(solver.t), int(solver.n_steps))
        return self._run(solver, until_loss, until_time, max_steps, checkpointer, progress)

    def _run(self, solver, until_loss, until_time, max_steps, checkpointer, progress) -> Iterator:
        def done() -> bool:
            # The loss at the solver's current point (None before its first step).
            loss = solver.loss_value
            return ((max_steps is not None and solver.n_steps >= max_steps)
                    or (until_time is not None and solver.t >= until_time)
                    or (until_loss is not None and loss is not None and loss <= until_loss))

        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=max_steps, initial=solver.n_steps if max_steps is not None else 0, unit="step")
        try:
            while not done():
                report = solver.step()
                self.record(report, solver.params if self.stores_params else None)
                if checkpointer is not None:
                    checkpointer.maybe_save(solver, self)
                if bar is not None:
                    bar.set_postfix(loss=f"{report.new_loss:.4g}", t=f"{report.t:.4g}", refresh=False)
                    bar.update(1)
                yield report
        finally:
            if bar is not None:
                bar.close()

    # -- columns -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._columns["step"])

    def _ints(self, name: str) -> Tensor:
        return torch.tensor(self._columns[name], dtype=torch.int64)

    def _floats(self, name: str) -> Tensor:
        return torch.tensor([math.nan if v is None else v for v in self._columns[name]], dtype=torch.float64)

    @property
    def step(self) -> Tensor:
        """Step indices, int64."""
        return self._ints("step")

    @property
    def t(self) -> Tensor:
        """Flow time at the end of each step, float64."""
        return self._floats("t")

    @property
    def dt(self) -> Tensor:
        """Step sizes, float64."""
        return self._floats("dt")

    @property
    def loss(self) -> Tensor:
        """Loss at the start of each step, float64."""
        return self._floats("loss")

    @property
    def new_loss(self) -> Tensor:
        """Loss at the end of each step, float64."""
        return self._floats("new_loss")

    @property
    def rejections(self) -> Tensor:
        """Rejected proposals within each step, int64."""
        return self._ints("rejections")

    @property
    def n_grad(self) -> Tensor:
        """Cumulative gradient evaluations after each step, int64."""
        return self._ints("n_grad")

    @property
    def n_hvp(self) -> Tensor:
        """Cumulative Hessian-vector products after each step, int64."""
        return self._ints("n_hvp")

    @property
    def n_rejected(self) -> Tensor:
        """Cumulative rejected proposals after each step, int64."""
        return self._ints("n_rejected")

    @property
    def error_ratio(self) -> Tensor:
        """Each accepted step's error ratio, float64 (NaN without error control)."""
        return self._floats("error_ratio")

    @property
    def eigenvalues(self) -> Tensor:
        """``(len, k)`` float64: the eigenvalues each step used (largest magnitude first), NaN where a step
        reported fewer or none; ``k`` is the most any step reported (0 when none did)."""
        rows = self._columns["eigenvalues"]
        k = max((len(r) for r in rows if r is not None), default=0)
        out = torch.full((len(rows), k), math.nan, dtype=torch.float64)
        for i, r in enumerate(rows):
            if r:
                out[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
        return out

    @property
    def sharpness(self) -> Tensor:
        """``|lambda_1|`` each step used, float64: the reported ``sharpness``, else the largest magnitude of the
        reported eigenvalues, else NaN."""
        out = []
        for s, ev in zip(self._columns["sharpness"], self._columns["eigenvalues"]):
            out.append(s if s is not None else max(abs(v) for v in ev) if ev else math.nan)
        return torch.tensor(out, dtype=torch.float64)

    @property
    def params(self) -> list[Tensor]:
        """The kept parameter vectors, in order of flow time."""
        return list(self._params)

    @property
    def param_t(self) -> Tensor:
        """Flow time of each kept parameter vector, float64."""
        return torch.tensor(self._param_t, dtype=torch.float64)

    @property
    def param_step(self) -> Tensor:
        """Number of accepted steps completed at each kept parameter vector, int64."""
        return torch.tensor(self._param_step, dtype=torch.int64)

    # -- plain containers and files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The trajectory as plain containers (lists of numbers, tensors), with a format marker; the kept
        parameter vectors are copies.

        The end point kept for interpolation is not included: after :meth:`from_dict`, :meth:`run` (or
        ``start_params``) supplies the start of the next step.
        """
        return self._state(copy=True)

    def _state(self, copy: bool) -> dict:
        return {
            "format": TRAJECTORY_FORMAT, "format_version": FORMAT_VERSION,
            "every_n": self.every_n, "at_times": list(self.at_times), "pending_times": list(self._pending),
            "columns": {name: list(values) for name, values in self._columns.items()},
            "params": [p.detach().clone() if copy else p for p in self._params],
            "param_t": list(self._param_t), "param_step": list(self._param_step),
        }

    @classmethod
    def from_dict(cls, state: dict) -> "Trajectory":
        """Rebuild a trajectory from :meth:`to_dict`.

        Raises:
            ValueError: ``state`` is not a trajectory dict of a supported format version.
        """
        traj = cls()
        traj._restore(state)
        return traj

    def _restore(self, state: dict) -> None:
        problem = _format_problem(state, TRAJECTORY_FORMAT)
        if problem is not None:
            raise ValueError(f"state must be a dict from Trajectory.to_dict(): {problem}")
        columns = state.get("columns", {})
        if set(columns) != set(_COLUMNS) or len({len(v) for v in columns.values()}) > 1:
            raise ValueError(f"trajectory columns must be {list(_COLUMNS)} of one length; got "
                             f"{ {k: len(v) for k, v in columns.items()} }")
        if not len(state["params"]) == len(state["param_t"]) == len(state["param_step"]):
            raise ValueError("trajectory params, param_t and param_step must have one length")
        fresh = Trajectory(state["every_n"], state["at_times"])
        self.every_n, self.at_times = fresh.every_n, fresh.at_times
        self._pending = sorted(float(t) for t in state["pending_times"])
        self._columns = {name: list(columns[name]) for name in _COLUMNS}
        self._params = [p.clone() for p in state["params"]]
        self._param_t = [float(t) for t in state["param_t"]]
        self._param_step = [int(s) for s in state["param_step"]]
        self._previous = self._previous_steps = None

    def save(self, path: PathLike) -> None:
        """Write :meth:`to_dict` to ``path`` with :func:`torch.save`, atomically (see :func:`save_checkpoint`)."""
        _torch_save(self._state(copy=False), path)

    @classmethod
    def load(cls, path: PathLike) -> "Trajectory":
        """Read a trajectory written by :meth:`save` (tensors are loaded onto the CPU).

        Raises:
            CheckpointError: the file is missing, damaged or not a trajectory of this library.
        """
        state = _torch_load(path, TRAJECTORY_FORMAT, "trajectory file")
        try:
            return cls.from_dict(state)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"trajectory file {os.fspath(path)!r} is malformed: {exc}") from exc

    def __eq__(self, other) -> bool:
        if not isinstance(other, Trajectory):
            return NotImplemented
        return _equal(self._state(copy=False), other._state(copy=False))

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        end = f", t={self._columns['t'][-1]:.6g}, loss={self._columns['new_loss'][-1]:.6g}" if len(self) else ""
        return f"Trajectory({len(self)} steps{end}, {len(self._params)} parameter vectors)"


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
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
        "format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
        "solver": solver.state_dict(),
        "trajectory": None if trajectory is None else trajectory._state(copy=False),
        "extra": extra,
    }
    _check_plain(payload, "checkpoint")
    _torch_save(payload, path)


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
    state = _torch_load(path, CHECKPOINT_FORMAT, "checkpoint")
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
        for report in trajectory.run(solver, max_steps=10_000, checkpointer=checkpointer):
            ...
        checkpointer.save(solver, trajectory)  # the final state

    Args:
        path: the checkpoint file (overwritten atomically by each save).
        every_seconds: the least wall-clock time between two saves (:func:`time.monotonic`), counted from the
            construction for the first; 0 saves at every call.
        extra: passed to :func:`save_checkpoint` with each save.

    Raises:
        ValueError: ``every_seconds`` is negative or not a finite number.
    """

    def __init__(self, path: PathLike, every_seconds: float, extra: Optional[dict] = None):
        if isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float)) or not (
                math.isfinite(every_seconds) and every_seconds >= 0):
            raise ValueError(f"every_seconds must be a finite number >= 0; got {every_seconds!r}")
        self.path = os.fspath(path)
        self.every_seconds = float(every_seconds)
        self.extra = extra
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
