"""The record of a run: what each accepted step did, the parameters kept along the way, and what follows from them.

A :class:`Trajectory` is what :func:`~exponential_euler_solver.integrate` returns. Its columns are the scalar
fields of each :class:`~exponential_euler_solver.StepReport`; it also keeps parameter vectors at requested flow
times and every few steps. Crossing times, parameters inside a step and distances to a reference are computed
here, once, from the record:

* the loss between two step ends is the cubic Hermite interpolant of ``L`` with ``dL/dt = -||grad L||^2`` at both
  ends (:func:`hermite_crossing`); it needs no extra evaluation, since every step reports both slopes;
* the parameters inside a step are the cubic Hermite interpolant of theta with ``dtheta/dt = -grad L`` at both
  ends (:func:`hermite_point`, fourth-order accurate locally, third order over a run).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import CheckpointError
from .files import FORMAT_VERSION, PathLike, deep_equal, format_problem, torch_load, torch_save

__all__ = ["Trajectory", "TRAJECTORY_FORMAT", "COLUMNS", "TIMING_COLUMNS", "hermite_point", "hermite_crossing",
           "hermite_loss", "relative_deviation"]

TRAJECTORY_FORMAT = "exponential_euler_solver/trajectory"

#: Per-step columns, in the order of :meth:`Trajectory.rows`; each is the StepReport field of the same name
#: (``eigenvalues`` is its ``eigvals``, as a list).
COLUMNS = ("step", "t_start", "t", "dt", "loss", "new_loss", "slope", "new_slope", "rejections", "n_grad",
           "n_hvp", "n_rejected", "error_ratio", "sharpness", "eigenvalues", "eig_age", "seconds", "time_grad",
           "time_hvp", "time_eig")
_INT_COLUMNS = ("step", "rejections", "n_grad", "n_hvp", "n_rejected")
#: The columns that are wall-clock readings (two runs of the same steps differ in them).
TIMING_COLUMNS = ("seconds", "time_grad", "time_hvp", "time_eig")


# ----------------------------------------------------------------------------------------------------------------
# interpolation within a step
def _hermite_basis(s: float) -> tuple[float, float, float, float]:
    s2, s3 = s * s, s * s * s
    return 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s, -2 * s3 + 3 * s2, s3 - s2


def hermite_point(theta0: Tensor, grad0: Tensor, theta1: Tensor, grad1: Tensor, t0: float, t1: float,
                  tau: float) -> Tensor:
    """The parameters at flow time ``tau`` in ``[t0, t1]`` from the cubic Hermite interpolant with values
    ``theta0``, ``theta1`` and derivatives ``-grad0``, ``-grad1`` (the flow's) at the ends::

        theta(t0 + s h) = h00(s) theta0 + h01(s) theta1 - h (h10(s) grad0 + h11(s) grad1),   h = t1 - t0

    with the cubic Hermite basis ``h00 = 2s^3 - 3s^2 + 1``, ``h10 = s^3 - 2s^2 + s``, ``h01 = -2s^3 + 3s^2``,
    ``h11 = s^3 - s^2``. ``s`` is clipped to ``[0, 1]``; ``s = 1`` gives ``theta1`` exactly.
    """
    h = t1 - t0
    s = 1.0 if h <= 0 else min(1.0, max(0.0, (tau - t0) / h))
    if s == 1.0:
        return theta1.detach().clone()
    if s == 0.0:
        return theta0.detach().clone().to(theta1.dtype)
    b00, b10, b01, b11 = _hermite_basis(s)
    out = theta1.detach() * b01
    out.add_(theta0.detach().to(theta1.dtype), alpha=b00)
    out.add_(grad0.to(theta1.dtype), alpha=-h * b10)
    out.add_(grad1.to(theta1.dtype), alpha=-h * b11)
    return out


def hermite_loss(t0: float, t1: float, loss0: float, loss1: float, slope0: float, slope1: float, tau: float) -> float:
    """The cubic Hermite interpolant of the loss at ``tau``, with values ``loss0``, ``loss1`` and slopes
    ``slope0``, ``slope1`` (``dL/dt``) at ``t0``, ``t1``."""
    h = t1 - t0
    s = (tau - t0) / h
    b00, b10, b01, b11 = _hermite_basis(s)
    return b00 * loss0 + b10 * h * slope0 + b01 * loss1 + b11 * h * slope1


def hermite_crossing(t0: float, t1: float, loss0: float, loss1: float, slope0: Optional[float],
                     slope1: Optional[float], target: float) -> float:
    """The first time in ``[t0, t1]`` at which the cubic Hermite interpolant of the loss (see
    :func:`hermite_loss`) falls to ``target``, for ``loss0 > target >= loss1``.

    The cubic is sampled on 64 sub-intervals to bracket its first crossing, which is then refined by bisection to
    double precision. Without slopes (None: records written before they were kept), ``log L`` is interpolated
    linearly instead.
    """
    if t1 <= t0:
        return t1
    if slope0 is None or slope1 is None or not (math.isfinite(slope0) and math.isfinite(slope1)):
        if not (loss0 > 0 and loss1 > 0):
            return t1
        frac = (math.log(loss0) - math.log(target)) / (math.log(loss0) - math.log(loss1))
        return t0 + frac * (t1 - t0)

    def f(tau: float) -> float:
        return hermite_loss(t0, t1, loss0, loss1, slope0, slope1, tau) - target

    grid = 64
    lo = t0
    for i in range(1, grid + 1):
        hi = t1 if i == grid else t0 + (t1 - t0) * i / grid
        if f(hi) <= 0:
            break
        lo = hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if f(mid) <= 0:
            hi = mid
        else:
            lo = mid
    return hi


def relative_deviation(params: Tensor, reference: Tensor, origin: Tensor) -> float:
    """``||params - reference|| / ||reference - origin||`` (float64 norms): how far a trajectory is from the
    reference at one time, relative to how far the reference has moved from where both started."""
    scale = torch.linalg.vector_norm((reference - origin).double())
    return float(torch.linalg.vector_norm((params - reference).double()) / scale)


# ----------------------------------------------------------------------------------------------------------------
# the record
class Trajectory:
    """What each accepted step of a run did, and the parameters kept along the way.

    Per step (one row per :class:`~exponential_euler_solver.StepReport`), the columns :data:`COLUMNS`, returned
    as tensors by the properties of the same names (int64 or float64, NaN where a step reported None). Parameters
    are kept (as copies, on their device) where the save specification of
    :func:`~exponential_euler_solver.integrate` asks: at requested flow times ``at_times`` (interpolated, see
    the module docstring) and every ``every_n`` accepted steps (at the run's start too). The kept vectors are
    :attr:`params`, with their flow times :attr:`param_t` and the number of steps completed at each
    :attr:`param_step` (an interpolated point inside step ``s`` counts ``s``).

    ``stop_reason`` and ``error`` say why the last :func:`~exponential_euler_solver.integrate` call on it ended.

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
        self.pending_times = list(self.at_times)  # requested times not reached yet
        self.stop_reason: Optional[str] = None
        self.error: Optional[str] = None
        self._columns: dict[str, list] = {name: [] for name in COLUMNS}
        self._params: list[Tensor] = []
        self._param_t: list[float] = []
        self._param_step: list[int] = []

    @property
    def stores_params(self) -> bool:
        """Whether this trajectory keeps parameters (``every_n`` or ``at_times`` given)."""
        return self.every_n is not None or bool(self.at_times)

    # -- recording (the driver's) ------------------------------------------------------------------------------
    def append(self, report) -> None:
        """Append the row of one accepted step (a :class:`~exponential_euler_solver.StepReport`, or any object
        with its fields; missing optional fields are None)."""
        c = self._columns
        t, dt = float(report.t), float(report.dt)
        t_start = getattr(report, "t_start", None)
        if t_start is None:
            t_start = c["t"][-1] if c["t"] else t - dt
        c["step"].append(int(report.step))
        c["t_start"].append(float(t_start))
        c["t"].append(t)
        c["dt"].append(dt)
        c["loss"].append(float(report.loss))
        c["new_loss"].append(float(report.new_loss))
        for name in ("slope", "new_slope", "error_ratio", "sharpness", "seconds", "time_grad", "time_hvp", "time_eig"):
            value = getattr(report, name, None)
            c[name].append(None if value is None else float(value))
        for name in ("rejections", "n_grad", "n_hvp", "n_rejected"):
            c[name].append(int(getattr(report, name, 0) or 0))
        eig_age = getattr(report, "eig_age", None)
        c["eig_age"].append(None if eig_age is None else int(eig_age))
        eigvals = getattr(report, "eigvals", None)
        c["eigenvalues"].append(None if eigvals is None
                                else [float(v) for v in torch.as_tensor(eigvals).reshape(-1)])

    def keep(self, params: Tensor, t: float, steps: int) -> None:
        """Keep a copy of ``params`` at flow time ``t`` after ``steps`` accepted steps (not twice for one time)."""
        if self._param_t and self._param_t[-1] == t:
            return
        self._params.append(params.detach().clone())
        self._param_t.append(float(t))
        self._param_step.append(int(steps))

    # -- what follows from the record --------------------------------------------------------------------------
    def crossing_time(self, target: float) -> Optional[float]:
        """The first flow time at which the loss falls to ``target``: inside the first step whose end loss is
        at most ``target``, the crossing of the loss's cubic Hermite interpolant (:func:`hermite_crossing`);
        the start of the first step when it already starts at or below ``target``; None when no step reaches it.
        """
        c = self._columns
        for i in range(len(self)):
            if c["loss"][i] <= target:
                return c["t_start"][i]
            if c["new_loss"][i] <= target:
                return hermite_crossing(c["t_start"][i], c["t"][i], c["loss"][i], c["new_loss"][i], c["slope"][i],
                                        c["new_slope"][i], target)
        return None

    def params_at(self, t: float) -> Optional[Tensor]:
        """The kept parameter vector at flow time ``t`` (exactly one of :attr:`param_t`), else None."""
        for tau, p in zip(self._param_t, self._params):
            if tau == t:
                return p
        return None

    def deviations(self, reference: "Trajectory", origin: Tensor) -> tuple[list[float], list[float]]:
        """``||theta(t) - theta_ref(t)|| / ||theta_ref(t) - theta_0||`` (float64 norms) at each requested time
        both trajectories kept, in time order; returns ``(times, deviations)``."""
        times, out = [], []
        for tau in self.at_times:
            p, p_ref = self.params_at(tau), reference.params_at(tau)
            if p is None or p_ref is None:
                continue
            times.append(tau)
            out.append(relative_deviation(p, p_ref, origin))
        return times, out

    @property
    def wall_time(self) -> float:
        """Seconds the recorded steps took, as each step measured itself (0 for steps that did not say)."""
        return float(sum(s for s in self._columns["seconds"] if s is not None))

    @property
    def strictly_decreasing(self) -> bool:
        """Every recorded step lowered the loss."""
        c = self._columns
        return all(b < a for a, b in zip(c["loss"], c["new_loss"]))

    def rows(self, n: Optional[int] = None) -> list[dict]:
        """The first ``n`` steps (all by default) as one dict per step, keyed by :data:`COLUMNS`."""
        n = len(self) if n is None else min(n, len(self))
        return [{name: self._columns[name][i] for name in COLUMNS} for i in range(n)]

    def head(self, n: int) -> "Trajectory":
        """A trajectory of the first ``n`` steps and the parameters kept up to them (the same tensors)."""
        out = Trajectory(self.every_n, self.at_times)
        out._columns = {name: list(values[:n]) for name, values in self._columns.items()}
        kept = [i for i, s in enumerate(self._param_step) if s <= n]
        out._params = [self._params[i] for i in kept]
        out._param_t = [self._param_t[i] for i in kept]
        out._param_step = [self._param_step[i] for i in kept]
        out.pending_times = [tau for tau in self.at_times if tau not in out._param_t]
        out.stop_reason, out.error = self.stop_reason, self.error
        return out

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> "Trajectory":
        """A trajectory (without parameters) from :meth:`rows`."""
        out = cls()
        for name in COLUMNS:
            out._columns[name] = [row.get(name) for row in rows]
        return out

    # -- columns -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._columns["step"])

    def _ints(self, name: str) -> Tensor:
        return torch.tensor(self._columns[name], dtype=torch.int64)

    def _floats(self, name: str) -> Tensor:
        return torch.tensor([math.nan if v is None else v for v in self._columns[name]], dtype=torch.float64)

    def column(self, name: str) -> Tensor:
        """The column ``name`` of :data:`COLUMNS` as a tensor (``eigenvalues`` as ``(len, k)``, NaN-padded)."""
        if name == "eigenvalues":
            return self.eigenvalues
        if name not in COLUMNS:
            raise KeyError(f"name must be one of {COLUMNS}; got {name!r}")
        return self._ints(name) if name in _INT_COLUMNS else self._floats(name)

    step = property(lambda self: self._ints("step"), doc="Step indices, int64.")
    t_start = property(lambda self: self._floats("t_start"), doc="Flow time at the start of each step, float64.")
    t = property(lambda self: self._floats("t"), doc="Flow time at the end of each step, float64.")
    dt = property(lambda self: self._floats("dt"), doc="Step sizes, float64.")
    loss = property(lambda self: self._floats("loss"), doc="Loss at the start of each step, float64.")
    new_loss = property(lambda self: self._floats("new_loss"), doc="Loss at the end of each step, float64.")
    slope = property(lambda self: self._floats("slope"), doc="dL/dt at the start of each step, float64.")
    new_slope = property(lambda self: self._floats("new_slope"), doc="dL/dt at the end of each step, float64.")
    rejections = property(lambda self: self._ints("rejections"), doc="Rejected proposals within each step.")
    n_grad = property(lambda self: self._ints("n_grad"), doc="Cumulative gradient evaluations after each step.")
    n_hvp = property(lambda self: self._ints("n_hvp"), doc="Cumulative Hessian-vector products after each step.")
    n_rejected = property(lambda self: self._ints("n_rejected"), doc="Cumulative rejected proposals.")
    error_ratio = property(lambda self: self._floats("error_ratio"),
                           doc="Each accepted step's error ratio, float64 (NaN without error control).")
    eig_age = property(lambda self: self._floats("eig_age"),
                       doc="Age in steps of the eigenpairs each step used, float64 (NaN when none).")
    seconds = property(lambda self: self._floats("seconds"), doc="Wall-clock seconds of each step, float64.")

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
        parameter vectors are copies."""
        return self._state(copy=True)

    def _state(self, copy: bool) -> dict:
        return {
            "format": TRAJECTORY_FORMAT, "format_version": FORMAT_VERSION,
            "every_n": self.every_n, "at_times": list(self.at_times), "pending_times": list(self.pending_times),
            "stop_reason": self.stop_reason, "error": self.error,
            "columns": {name: list(values) for name, values in self._columns.items()},
            "params": [p.detach().clone() if copy else p for p in self._params],
            "param_t": list(self._param_t), "param_step": list(self._param_step),
        }

    @classmethod
    def from_dict(cls, state: dict) -> "Trajectory":
        """Rebuild a trajectory from :meth:`to_dict` (also of format version 1: the columns it lacks, the
        slopes, ``eig_age`` and ``seconds``, are None, and ``t_start`` is the previous step's ``t``).

        Raises:
            ValueError: ``state`` is not a trajectory dict of a supported format version.
        """
        traj = cls()
        traj._restore(state)
        return traj

    def _restore(self, state: dict) -> None:
        problem = format_problem(state, TRAJECTORY_FORMAT)
        if problem is not None:
            raise ValueError(f"state must be a dict from Trajectory.to_dict(): {problem}")
        columns = dict(state.get("columns", {}))
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            sizes = {k: len(v) for k, v in columns.items()}
            raise ValueError(f"trajectory columns must have one length; got {sizes}")
        n = lengths.pop() if lengths else 0
        if state["format_version"] < 2:
            t, dt = columns.get("t", []), columns.get("dt", [])
            columns.setdefault("t_start", ([t[0] - dt[0]] if t else []) + list(t[:-1]))
            for name in ("slope", "new_slope", "eig_age", "seconds"):
                columns.setdefault(name, [None] * n)
        for name in ("time_grad", "time_hvp", "time_eig"):  # not in files written before they were timed
            columns.setdefault(name, [None] * n)
        if set(columns) != set(COLUMNS):
            raise ValueError(f"trajectory columns must be {list(COLUMNS)}; got {sorted(columns)}")
        if not len(state["params"]) == len(state["param_t"]) == len(state["param_step"]):
            raise ValueError("trajectory params, param_t and param_step must have one length")
        fresh = Trajectory(state["every_n"], state["at_times"])
        self.every_n, self.at_times = fresh.every_n, fresh.at_times
        self.pending_times = sorted(float(t) for t in state["pending_times"])
        self.stop_reason, self.error = state.get("stop_reason"), state.get("error")
        self._columns = {name: list(columns[name]) for name in COLUMNS}
        self._params = [p.clone() for p in state["params"]]
        self._param_t = [float(t) for t in state["param_t"]]
        self._param_step = [int(s) for s in state["param_step"]]

    def save(self, path: PathLike) -> None:
        """Write :meth:`to_dict` to ``path`` with :func:`torch.save`, atomically (see
        :func:`~exponential_euler_solver.save_checkpoint`)."""
        torch_save(self._state(copy=False), path)

    @classmethod
    def load(cls, path: PathLike) -> "Trajectory":
        """Read a trajectory written by :meth:`save` (tensors are loaded onto the CPU).

        Raises:
            CheckpointError: the file is missing, damaged, not a trajectory of this library, or of a newer
                format version.
        """
        state = torch_load(path, TRAJECTORY_FORMAT, "trajectory file")
        try:
            return cls.from_dict(state)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"trajectory file {os.fspath(path)!r} is malformed: {exc}") from exc

    def __eq__(self, other) -> bool:
        if not isinstance(other, Trajectory):
            return NotImplemented
        return deep_equal(self._state(copy=False), other._state(copy=False))

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        end = f", t={self._columns['t'][-1]:.6g}, loss={self._columns['new_loss'][-1]:.6g}" if len(self) else ""
        return f"Trajectory({len(self)} steps{end}, {len(self._params)} parameter vectors)"
