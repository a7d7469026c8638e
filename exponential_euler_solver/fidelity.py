"""How faithfully a solver follows the gradient flow: crossing times and distances to a converged reference.

The reference is :class:`~exponential_euler_solver.RungeKutta4Solver` with ``alpha`` halved until the flow time
at which the loss crosses the target stops moving (relative change below ``reference_rtol``). Every run goes
through :func:`~exponential_euler_solver.integrate`; crossing times and deviations come from the
:class:`~exponential_euler_solver.Trajectory` it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import Tensor

from .integrate import SaveAt, Stop, integrate
from .solvers import RungeKutta4Solver
from .trajectory import Trajectory

__all__ = ["Reference", "FidelityReport", "run_with_times", "reference_run", "fidelity"]


def run_with_times(solver, stop: Stop, times: Sequence[float] = (), *, max_steps: Optional[int] = None,
                   progress=False) -> tuple[Trajectory, int]:
    """:func:`~exponential_euler_solver.integrate` ``solver`` until ``stop`` keeping the parameters at ``times``;
    when it stopped at its target with times still ahead, go on until the last of them has passed.

    Returns:
        ``(trajectory, n)``: the whole record and the number of its steps taken before ``stop`` held (the steps
        after them were taken only to reach the times).
    """
    trajectory = integrate(solver, stop, SaveAt(ts=times), progress=progress)
    n = len(trajectory)
    if trajectory.pending_times and trajectory.stop_reason == "target":
        reason = trajectory.stop_reason
        limit = None if max_steps is None else solver.n_steps + max_steps
        integrate(solver, Stop(time=max(trajectory.pending_times), steps=limit, errors="record"),
                  trajectory=trajectory)
        trajectory.stop_reason = reason
    return trajectory, n


@dataclass
class Reference:
    """A converged RK4 integration of the flow (:func:`reference_run`).

    Attributes:
        trajectory: the finest run, with the parameters at ``times``.
        alpha: its RK4 ``alpha`` (step in units of ``1/|lambda_1|``).
        times: the flow times of the parameter comparisons (fractions of the coarsest run's crossing time).
        target: the loss whose crossing time converged.
        steps: the finest run's steps until the target (further steps only reached the last time).
    """

    trajectory: Trajectory
    alpha: float
    times: list
    target: float
    steps: int

    @property
    def crossing_time(self) -> float:
        return self.trajectory.crossing_time(self.target)


def reference_run(loss, params0: Tensor, target: float, max_step_size: float, *, alpha: float = 1.0,
                  reference_rtol: float = 1e-3, max_halvings: int = 5, time_fractions=(0.25, 0.5, 1.0),
                  progress: Optional[Callable[[str], None]] = None) -> Reference:
    """Integrate the flow with RK4 from ``params0`` (not modified), halving ``alpha`` until the crossing time
    changes by less than ``reference_rtol`` relative. Parameters are kept at ``time_fractions`` of the first run's
    crossing time.

    Returns:
        A :class:`Reference`.

    Raises:
        RuntimeError: the target was never reached, or the crossing time did not settle within ``max_halvings``
            halvings.
    """
    first = integrate(RungeKutta4Solver(params0.clone(), loss, max_step_size, alpha=alpha), Stop(loss=target))
    previous = first.crossing_time(target)
    if previous is None:
        raise RuntimeError("the reference never reached the target loss")
    times = [f * previous for f in time_fractions]
    for _ in range(max_halvings):
        alpha /= 2
        solver = RungeKutta4Solver(params0.clone(), loss, max_step_size, alpha=alpha)
        trajectory, steps = run_with_times(solver, Stop(loss=target), times)
        crossing = trajectory.crossing_time(target)
        if crossing is None:
            raise RuntimeError(f"the RK4 reference with alpha={alpha:g} never reached the target loss")
        change = abs(crossing - previous) / crossing
        if progress is not None:
            progress(f"RK4 alpha={alpha:g}: crossing {crossing:.6g} (change {change:.2e})")
        if change < reference_rtol:
            return Reference(trajectory=trajectory, alpha=alpha, times=times, target=target, steps=steps)
        previous = crossing
    raise RuntimeError(f"the RK4 reference did not converge to {reference_rtol} in {max_halvings} halvings "
                       f"(last crossing times {previous:.6g})")


@dataclass
class FidelityReport:
    """A solver's run against the converged reference.

    Attributes:
        crossing_time, reference_crossing_time: flow times at which the loss crossed the target.
        relative_error: ``(crossing_time - reference_crossing_time) / reference_crossing_time``.
        times: flow times of the parameter comparisons the run reached.
        deviations: ``||theta(t) - theta_ref(t)|| / ||theta_ref(t) - theta_0||`` at ``times``.
        trajectory: the solver's run (with the steps taken after the target to reach the last time).
        steps: the run's steps until the target.
        reference_alpha: the RK4 alpha of the reference.
    """

    crossing_time: Optional[float]
    reference_crossing_time: float
    relative_error: Optional[float]
    times: list
    deviations: list
    trajectory: Trajectory
    steps: int
    reference_alpha: float


def fidelity(loss, params0: Tensor, make_solver: Callable[[Tensor], object], target: float = 0.01, *,
             reference: Optional[Reference] = None, max_step_size: float = 0.01,
             **reference_kwargs) -> FidelityReport:
    """Run ``make_solver(params0.clone())`` to ``target`` and compare it with a converged RK4 reference.

    Args:
        loss: the :class:`~exponential_euler_solver.LossFunction`.
        params0: initial parameters (not modified).
        make_solver: builds the solver under test from a copy of ``params0``.
        target: the loss whose crossing time is compared.
        reference: a precomputed :func:`reference_run` result, to compare several solvers against one reference.
        max_step_size: the reference's largest step.
        **reference_kwargs: passed to :func:`reference_run`.

    Returns:
        A :class:`FidelityReport`.
    """
    if reference is None:
        reference = reference_run(loss, params0, target, max_step_size, **reference_kwargs)
    trajectory, steps = run_with_times(make_solver(params0.clone()), Stop(loss=target), reference.times)
    times, deviations = trajectory.deviations(reference.trajectory, params0)
    crossing, ref = trajectory.crossing_time(target), reference.crossing_time
    err = None if crossing is None else (crossing - ref) / ref
    return FidelityReport(crossing_time=crossing, reference_crossing_time=ref, relative_error=err, times=times,
                          deviations=deviations, trajectory=trajectory, steps=steps, reference_alpha=reference.alpha)
