"""The one integration driver: step a solver until a stop condition, keep what the save specification asks for.

::

    trajectory = integrate(solver, Stop(step_loss=0.01), SaveAt(ts=[0.1, 0.2], checkpoint=Checkpointer("run.pt", 60)))
    trajectory.crossing_time(0.01), trajectory.params, trajectory.wall_time

Every caller (the benchmark, the fidelity harness, the comparison with stable-solvers, a user's script) runs its
solver through :func:`integrate` and reads the :class:`~exponential_euler_solver.Trajectory` it returns. Anything
with the step protocol can be integrated: ``step()`` returning a
:class:`~exponential_euler_solver.StepReport`, and ``params``, ``t``, ``n_steps``, ``loss_value`` and
``current_gradient()`` (the gradient at the current point, for interpolation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from torch import Tensor

from .checkpoint import Checkpointer
from .errors import SolverError
from .trajectory import Trajectory, hermite_point

__all__ = ["Stop", "SaveAt", "integrate", "STOP_REASONS"]

#: Why a run ended, as ``Trajectory.stop_reason``.
STOP_REASONS = ("target", "time", "max_steps", "max_seconds", "error", "caller")
# A requested flow time this many ulps of the flow time before a step's start still counts as inside the step.
_TIME_SLACK_ULPS = 8


def _number(name: str, value, *, integer: bool = False) -> None:
    if value is None:
        return
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int or None; got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number or None; got {value!r}")


@dataclass(frozen=True)
class Stop:
    """When :func:`integrate` stops. Each condition is checked between steps; the first that holds ends the run
    (``Trajectory.stop_reason`` names it).

    Attributes:
        loss: stop once the loss at the current point is at most this (``"target"``).
        step_loss: stop after the first step that *started* at a loss at most this (``"target"``): the seed's
            loop ``loss = inf; while loss > target: loss = solver.step().loss``, which takes one step past the
            crossing.
        time: stop once the flow time reaches this (``"time"``; the last step may end past it).
        steps: stop once the solver has completed this many accepted steps in total (``"max_steps"``; a resumed
            solver carries its count over, so the same loop ends at the same step either way).
        seconds: stop once the trajectory's steps took this many seconds (``"max_seconds"``).
        errors: ``"raise"`` (default) lets a :class:`~exponential_euler_solver.SolverError` propagate;
            ``"record"`` ends the run with ``stop_reason == "error"`` and its message in ``Trajectory.error``.

    Raises:
        ValueError: a value of the wrong type, or no condition at all.
    """

    loss: Optional[float] = None
    step_loss: Optional[float] = None
    time: Optional[float] = None
    steps: Optional[int] = None
    seconds: Optional[float] = None
    errors: str = "raise"

    def __post_init__(self):
        for name in ("loss", "step_loss", "time", "seconds"):
            _number(name, getattr(self, name))
        _number("steps", self.steps, integer=True)
        if self.errors not in ("raise", "record"):
            raise ValueError(f"errors must be 'raise' or 'record'; got {self.errors!r}")
        if all(getattr(self, name) is None for name in ("loss", "step_loss", "time", "steps", "seconds")):
            raise ValueError("give at least one of loss, step_loss, time, steps, seconds; got none (the run would "
                             "never stop)")

    def before_step(self, solver, trajectory: Trajectory) -> Optional[str]:
        """The reason to stop before the next step, or None."""
        if self.steps is not None and solver.n_steps >= self.steps:
            return "max_steps"
        if self.time is not None and solver.t >= self.time:
            return "time"
        loss = solver.loss_value
        if self.loss is not None and loss is not None and loss <= self.loss:
            return "target"
        if self.seconds is not None and trajectory.wall_time >= self.seconds:
            return "max_seconds"
        return None

    def after_step(self, report) -> Optional[str]:
        """The reason to stop after a step, or None."""
        if self.step_loss is not None and report.loss <= self.step_loss:
            return "target"
        return None


@dataclass(frozen=True)
class SaveAt:
    """What :func:`integrate` keeps besides the per-step record.

    Attributes:
        ts: flow times at which to keep the parameters, interpolated inside the step that contains each by the
            cubic Hermite interpolant of the flow (:func:`~exponential_euler_solver.trajectory.hermite_point`;
            needs no extra gradient). A time that the run does not reach is not kept.
        every_n: keep the parameters at the start and after every ``every_n``-th accepted step.
        checkpoint: a :class:`~exponential_euler_solver.Checkpointer` offered the solver and trajectory after
            every step (it saves at most every ``every_seconds``) and, unless its ``save_at_end`` is False, made to
            save when the run ends.
    """

    ts: Sequence[float] = field(default_factory=tuple)
    every_n: Optional[int] = None
    checkpoint: Optional[Checkpointer] = None


def _start(solver, trajectory: Trajectory) -> None:
    """Keep the starting point when it is a requested time or a multiple of ``every_n`` steps."""
    t, n = float(solver.t), int(solver.n_steps)
    slack = _TIME_SLACK_ULPS * math.ulp(max(1.0, abs(t)))
    pending = trajectory.pending_times
    if pending and pending[0] < t - slack:
        raise ValueError(f"requested flow times {pending[:3]} lie before the run's start at flow time {t:.6g} and "
                         "were not kept; they cannot be reached")
    if trajectory.every_n is not None and n % trajectory.every_n == 0 and n not in trajectory._param_step:
        trajectory.keep(solver.params, t, n)
    while pending and pending[0] <= t + slack:
        trajectory.keep(solver.params, pending.pop(0), n)


def integrate(solver, stop: Stop, save: Optional[SaveAt] = None, *, trajectory: Optional[Trajectory] = None,
              progress: Union[bool, str] = False, callback: Optional[Callable] = None) -> Trajectory:
    """Step ``solver`` until ``stop``, recording every accepted step and keeping what ``save`` asks for.

    Before each step the stop conditions are checked; after it the step is recorded, the parameters at requested
    times inside it are interpolated, the checkpoint (if any) is offered the new state, ``callback(report,
    solver)`` is called, and ``stop.after_step`` is checked. While requested times are pending, the start point
    and its gradient are copied before each step (two vectors of the parameters' size).

    Args:
        solver: a :class:`~exponential_euler_solver.solvers.base.Solver`, or anything with its step protocol
            (see the module docstring).
        stop: a :class:`Stop`.
        save: a :class:`SaveAt`, or None to keep no parameters.
        trajectory: continue recording into this trajectory (e.g. one restored by
            :func:`~exponential_euler_solver.resume`); its own ``at_times``/``every_n`` are used and ``save`` may
            only add a checkpoint. Default: a fresh one built from ``save``.
        progress: show a tqdm bar (a string is its description).
        callback: called as ``callback(report, solver)`` after each recorded step; returning True stops the run
            (``stop_reason == "caller"``).

    Returns:
        The :class:`~exponential_euler_solver.Trajectory`, with ``stop_reason`` (one of :data:`STOP_REASONS`)
        and ``error``.

    Raises:
        TypeError: ``stop`` is not a Stop or ``solver`` has no ``step()``/``params``.
        ValueError: a requested time lies before the solver's flow time and was never kept; or ``save`` asks for
            times or ``every_n`` when continuing a ``trajectory`` that has other ones.
        SolverError: from a step, unless ``stop.errors == "record"``.
    """
    if not isinstance(stop, Stop):
        raise TypeError(f"stop must be a Stop; got {type(stop).__name__}")
    if not (callable(getattr(solver, "step", None)) and isinstance(getattr(solver, "params", None), Tensor)):
        raise TypeError(f"solver must be a Solver with step() and params; got {type(solver).__name__}")
    save = save or SaveAt()
    if trajectory is None:
        trajectory = Trajectory(save.every_n, save.ts)
    elif (save.every_n is not None or len(save.ts)) and (
            save.every_n != trajectory.every_n or sorted(set(map(float, save.ts))) != trajectory.at_times):
        raise ValueError("save.ts and save.every_n must match the trajectory being continued (or be left empty); "
                         f"got ts={list(save.ts)}, every_n={save.every_n} for a trajectory with "
                         f"at_times={trajectory.at_times}, every_n={trajectory.every_n}")
    if trajectory.stores_params:
        _start(solver, trajectory)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc=progress if isinstance(progress, str) else None, initial=solver.n_steps, unit="step",
                   dynamic_ncols=True)
    trajectory.stop_reason = trajectory.error = None
    try:
        _loop(solver, stop, save, trajectory, bar, callback)
    finally:
        if bar is not None:
            bar.close()
    if save.checkpoint is not None and save.checkpoint.save_at_end:  # not after an interrupt: a step may be half done
        save.checkpoint.save(solver, trajectory)
    return trajectory


def _loop(solver, stop: Stop, save: SaveAt, trajectory: Trajectory, bar, callback) -> None:
    while True:
        reason = stop.before_step(solver, trajectory)
        if reason is not None:
            break
        pending = trajectory.pending_times
        start = None
        try:
            if pending:  # the start of the step, for interpolating inside it
                start = (solver.params.detach().clone(), solver.current_gradient().detach().clone(), float(solver.t))
            report = solver.step()
        except SolverError as exc:
            if stop.errors == "raise":
                raise
            trajectory.error, reason = f"{type(exc).__name__}: {exc}", "error"
            break
        trajectory.append(report)
        end_t, steps = float(report.t), int(solver.n_steps)
        if start is not None and pending[0] <= end_t:
            theta0, grad0, t0 = start
            grad1 = solver.current_gradient()
            while pending and pending[0] <= end_t:
                tau = pending.pop(0)
                trajectory.keep(hermite_point(theta0, grad0, solver.params, grad1, t0, end_t, tau), tau, steps - 1)
        if trajectory.every_n is not None and steps % trajectory.every_n == 0:
            trajectory.keep(solver.params, end_t, steps)
        if save.checkpoint is not None:
            save.checkpoint.maybe_save(solver, trajectory)
        if bar is not None:
            bar.set_postfix(loss=f"{report.new_loss:.4g}", t=f"{report.t:.4g}", dt=f"{report.dt:.3g}", refresh=False)
            bar.update(1)
        if callback is not None and callback(report, solver):
            reason = "caller"
            break
        reason = stop.after_step(report)
        if reason is not None:
            break
    trajectory.stop_reason = reason
