"""How faithfully a solver follows the gradient flow: crossing times and distances to a converged reference.

The reference is :class:`~exponential_euler_solver.RungeKutta4Solver` with ``alpha`` halved until the flow time
at which the loss crosses the target stops moving (relative change below ``reference_rtol``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .solvers import RungeKutta4Solver

__all__ = ["RunRecord", "FidelityReport", "crossing_time", "integrate", "reference_run", "fidelity"]


@dataclass
class RunRecord:
    """A run to a target loss.

    Attributes:
        crossing_time: flow time at which the loss first fell below the target, interpolated linearly in
            log(loss) between the start and end of the step that crossed it (None if it never did).
        steps, n_grad, n_hvp, n_rejected: the solver's counts at the end of the run.
        losses: ``(t_start, t_end, loss_start, loss_end)`` per step.
        params_at: parameters at the requested flow times (linear interpolation between the ends of the step
            containing each time), in the order of ``times``; a time past the end of the run is omitted.
        monotone: whether every step lowered the loss.
    """

    crossing_time: Optional[float]
    steps: int
    n_grad: int
    n_hvp: int
    n_rejected: int
    losses: list = field(default_factory=list)
    params_at: list = field(default_factory=list)
    monotone: bool = True


def crossing_time(losses: Sequence[tuple], target: float) -> Optional[float]:
    """First flow time at which the loss falls below ``target``, interpolating log(loss) linearly within the
    step; ``losses`` holds ``(t_start, t_end, loss_start, loss_end)`` per step."""
    for t0, t1, l0, l1 in losses:
        if l0 <= target:
            return t0
        if l1 <= target:
            if not (l0 > 0 and l1 > 0):
                return t1
            frac = (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(l1))
            return t0 + frac * (t1 - t0)
    return None


def integrate(solver, target: float, times: Sequence[float] = (), max_steps: int = 100_000,
              t_max: Optional[float] = None) -> RunRecord:
    """Step ``solver`` until the loss at the start of a step is at most ``target`` (the seed's loop) and, when
    ``times`` are given, until the last of them has passed; record losses and parameters at ``times``."""
    times = sorted(float(t) for t in times)
    pending = list(times)
    params_at = []
    losses = []
    monotone = True
    steps = 0
    while steps < max_steps:
        before = solver.params.detach().clone() if pending else None
        report = solver.step()
        steps += 1
        t0, t1 = report.t - report.dt, report.t
        losses.append((t0, t1, report.loss, report.new_loss))
        monotone &= report.new_loss < report.loss
        while pending and pending[0] <= t1:
            w = (pending.pop(0) - t0) / (t1 - t0) if t1 > t0 else 1.0
            params_at.append(torch.lerp(before, solver.params.detach(), w))
        done_loss = min(report.loss, report.new_loss) <= target
        if done_loss and not pending:
            break
        if t_max is not None and t1 >= t_max:
            break
    return RunRecord(crossing_time=crossing_time(losses, target), steps=solver.n_steps, n_grad=solver.n_grad,
                     n_hvp=solver.n_hvp, n_rejected=solver.n_rejected, losses=losses, params_at=params_at,
                     monotone=monotone)


def reference_run(loss, params0: Tensor, target: float, max_step_size: float, *, alpha: float = 1.0,
                  reference_rtol: float = 1e-3, max_halvings: int = 5, time_fractions=(0.25, 0.5, 1.0),
                  progress: Optional[Callable[[str], None]] = None) -> tuple[RunRecord, float, list]:
    """Integrate the flow with RK4, halving ``alpha`` until the crossing time changes by less than
    ``reference_rtol`` relative. Parameters are recorded at ``time_fractions`` of the first run's crossing time.

    Returns:
        ``(record, alpha, times)``: the finest run, its alpha, and the flow times its ``params_at`` refer to.

    Raises:
        RuntimeError: the crossing time did not settle within ``max_halvings`` halvings.
    """
    first = integrate(RungeKutta4Solver(params0.clone(), loss, max_step_size, alpha=alpha), target)
    if first.crossing_time is None:
        raise RuntimeError("the reference never reached the target loss")
    times = [f * first.crossing_time for f in time_fractions]
    previous = first.crossing_time
    for _ in range(max_halvings):
        alpha /= 2
        record = integrate(RungeKutta4Solver(params0.clone(), loss, max_step_size, alpha=alpha), target, times)
        if record.crossing_time is None:
            raise RuntimeError(f"the RK4 reference with alpha={alpha:g} never reached the target loss")
        change = abs(record.crossing_time - previous) / record.crossing_time
        if progress is not None:
            progress(f"RK4 alpha={alpha:g}: crossing {record.crossing_time:.6g} (change {change:.2e})")
        if change < reference_rtol:
            return record, alpha, times
        previous = record.crossing_time
    raise RuntimeError(f"the RK4 reference did not converge to {reference_rtol} in {max_halvings} halvings "
                       f"(last crossing times {previous:.6g})")


@dataclass
class FidelityReport:
    """A solver's run against the converged reference.

    Attributes:
        crossing_time, reference_crossing_time: flow times at which the loss crossed the target.
        relative_error: ``(crossing_time - reference_crossing_time) / reference_crossing_time``.
        times: flow times of the parameter comparisons.
        deviations: ``||theta(t) - theta_ref(t)|| / ||theta_ref(t) - theta_0||`` at ``times``.
        run: the solver's :class:`RunRecord`.
        reference_alpha: the RK4 alpha of the reference.
    """

    crossing_time: Optional[float]
    reference_crossing_time: float
    relative_error: Optional[float]
    times: list
    deviations: list
    run: RunRecord
    reference_alpha: float


def fidelity(loss, params0: Tensor, make_solver: Callable[[Tensor], object], target: float = 0.01, *,
             reference: Optional[tuple] = None, max_step_size: float = 0.01, **reference_kwargs) -> FidelityReport:
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
    ref, alpha, times = reference
    run = integrate(make_solver(params0.clone()), target, times)
    deviations = []
    for p, p_ref in zip(run.params_at, ref.params_at):
        scale = torch.linalg.vector_norm((p_ref - params0).double())
        deviations.append(float(torch.linalg.vector_norm((p - p_ref).double()) / scale))
    err = None
    if run.crossing_time is not None:
        err = (run.crossing_time - ref.crossing_time) / ref.crossing_time
    return FidelityReport(crossing_time=run.crossing_time, reference_crossing_time=ref.crossing_time,
                          relative_error=err, times=list(times[:len(deviations)]), deviations=deviations, run=run,
                          reference_alpha=alpha)
