"""The grid with its optional measurements: the peer's runs, a gradient-cost floor, and a reference trajectory.

For every grid point (:class:`PointResult`), in this order and in one process:

1. with ``compare``: the median time of one full-batch gradient of the benchmark's :class:`LossFunction`
   (:func:`gradient_seconds`); the *floor* of a run is its accepted steps times that time, the cost of a method
   that needed only one gradient per step and nothing else;
2. with ``fidelity``: a converged RK4 integration of the flow to the target (:func:`compute_reference`, through
   :func:`~exponential_euler_solver.fidelity.reference_run` with ``max_step_size`` :data:`REFERENCE_MAX_STEP`);
3. for each solver: this library's run (:func:`~.runner.run_solver`), then, with ``compare``, the peer's
   (:func:`~.peer.run_peer`), both from the same initial parameters. With ``fidelity`` both record their
   parameters at the reference's times, and :func:`measure_fidelity` compares crossing times and parameters.

The crossing time of a run is the one its history already holds (``RunResult.t_target``, interpolated in
``log L`` within the crossing step exactly as :func:`~exponential_euler_solver.fidelity.crossing_time` does), so
no solver runs twice.

With a :class:`~.runner.GridCheckpoint` (this library's runs only, without ``compare`` and ``fidelity``), runs
the checkpoint lists as finished are taken from it, and a grid point whose runs have all finished is not even
built.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ..fidelity import reference_run
from .peer import DEFAULT_MAX_SECONDS, import_peer, run_peer
from .runner import (DEFAULT_MAX_STEPS, Fidelity, GridCheckpoint, ParamSampler, Problem, RunResult, build_problem,
                     check_grid, check_run_args, run_solver)

__all__ = ["REFERENCE_MAX_STEP", "GRADIENT_REPEATS", "Reference", "PointResult", "gradient_seconds",
           "compute_reference", "measure_fidelity", "run_points"]

REFERENCE_MAX_STEP = 0.01  # the RK4 reference's largest step (the seed's max_step_size)
GRADIENT_REPEATS = 5       # timed gradients (after one warm-up) whose median defines the floor


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gradient_seconds(loss_func, params: Tensor, repeats: int = GRADIENT_REPEATS) -> float:
    """Median wall time of ``loss_func.gradient(params)`` over ``repeats`` calls after one warm-up call.

    Raises:
        ValueError: ``repeats`` is not a positive int.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int; got {repeats!r}")
    loss_func.gradient(params)
    _synchronize(params.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss_func.gradient(params)
        _synchronize(params.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Reference:
    """The converged RK4 reference of one grid point.

    Attributes:
        crossing_time: flow time at which its loss crossed the target; None when it failed (see ``error``).
        alpha: the RK4 ``alpha`` (step in units of ``1/|lambda_1|``) at which the crossing time settled.
        times: the flow times at which its parameters were recorded (fractions of the first, coarsest run's
            crossing time).
        steps, n_grad, n_hvp: counts of the finest run alone.
        wall_time: seconds for the whole halving sequence.
        error: why no reference could be computed, else None.
        params_at: its parameters at ``times`` (not written to JSON).
    """

    crossing_time: Optional[float]
    alpha: Optional[float]
    times: List[float]
    steps: int
    n_grad: int
    n_hvp: int
    wall_time: float
    error: Optional[str] = None
    params_at: List[Tensor] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"crossing_time": self.crossing_time, "alpha": self.alpha, "times": list(self.times),
                "steps": self.steps, "n_grad": self.n_grad, "n_hvp": self.n_hvp, "wall_time": self.wall_time,
                "error": self.error, "max_step_size": REFERENCE_MAX_STEP}


def compute_reference(problem: Problem, target: float, *,
                      progress: Optional[Callable[[str], None]] = None) -> Reference:
    """:func:`~exponential_euler_solver.fidelity.reference_run` from ``problem.init_params`` to ``target`` with
    ``max_step_size`` :data:`REFERENCE_MAX_STEP` and its other defaults; a failure (the crossing time did not
    settle, or the target was never reached) is kept in ``error`` instead of raised."""
    start = time.perf_counter()
    try:
        record, alpha, times = reference_run(problem.loss_func, problem.init_params, target, REFERENCE_MAX_STEP,
                                             progress=progress)
    except RuntimeError as exc:
        return Reference(None, None, [], 0, 0, 0, time.perf_counter() - start, error=str(exc))
    return Reference(crossing_time=record.crossing_time, alpha=alpha, times=list(times), steps=record.steps,
                     n_grad=record.n_grad, n_hvp=record.n_hvp, wall_time=time.perf_counter() - start,
                     params_at=list(record.params_at))


def measure_fidelity(run: RunResult, sampler: ParamSampler, reference: Reference, init_params: Tensor) -> Fidelity:
    """The run's crossing-time error and parameter deviations against ``reference``.

    ``relative_error = (run.t_target - T_ref) / T_ref``; the deviation at each reference time the run reached is
    ``||theta(t) - theta_ref(t)|| / ||theta_ref(t) - theta_0||`` in float64, as
    :func:`~exponential_euler_solver.fidelity.fidelity` defines it.
    """
    t_ref = reference.crossing_time
    err = None if run.t_target is None else (run.t_target - t_ref) / t_ref
    deviations = []
    for p, p_ref in zip(sampler.params, reference.params_at):
        scale = torch.linalg.vector_norm((p_ref - init_params).double())
        deviations.append(float(torch.linalg.vector_norm((p - p_ref).double()) / scale))
    return Fidelity(reference_crossing_time=t_ref, relative_error=err, times=sampler.recorded_times,
                    deviations=deviations, extra_steps=sampler.extra_steps)


@dataclass
class PointResult:
    """Everything measured on one grid point.

    Attributes:
        n_train, n_classes, seed: the grid point.
        runs: this library's runs, in solver order.
        peer_runs: the peer's runs of the same solvers (``compare``), else empty.
        gradient_time: median seconds of one full-batch gradient (``compare``), else None.
        reference: the RK4 reference (``fidelity``), else None.
    """

    n_train: int
    n_classes: int
    seed: int
    runs: List[RunResult] = field(default_factory=list)
    peer_runs: List[RunResult] = field(default_factory=list)
    gradient_time: Optional[float] = None
    reference: Optional[Reference] = None

    def peer_of(self, run: RunResult) -> Optional[RunResult]:
        """The peer's run of ``run``'s solver, or None."""
        return next((p for p in self.peer_runs if p.solver == run.solver), None)

    def floor(self, run: RunResult) -> Optional[float]:
        """``run.steps * gradient_time`` (seconds), or None without a gradient time."""
        return None if self.gradient_time is None else run.steps * self.gradient_time


def run_points(X: Tensor, y: Tensor, *, n_train: Sequence[int], n_classes: Sequence[int], seeds: Sequence[int],
               solvers: Sequence[str], target: float, device="cpu", dtype: torch.dtype = torch.float32,
               max_steps: int = DEFAULT_MAX_STEPS, quiet: bool = False, compare: bool = False,
               compare_max_seconds: float = DEFAULT_MAX_SECONDS, fidelity: bool = False,
               progress: Optional[Callable[[str], None]] = None,
               checkpoint: Optional[GridCheckpoint] = None) -> List[PointResult]:
    """Every solver on every grid point (see the module docstring), in the order of
    :func:`~.runner.run_grid`.

    Args:
        compare: also run the peer (``stable-solvers``) and time one gradient per point.
        compare_max_seconds: the peer's time cap per run (seconds of stepping).
        fidelity: compute an RK4 reference per point and compare every run with it.
        progress: receives one line per reference refinement (None: silent).
        checkpoint: keep the grid's checkpoint there, and take the runs it lists as finished from it (see
            :class:`~.runner.GridCheckpoint`); None: no checkpoint.
        Others: as :func:`~.runner.run_grid`.

    Raises:
        PeerMissingError: ``compare`` without ``stable-solvers`` installed (before anything runs).
        DataError, ValueError, KeyError: as :func:`~.runner.run_grid`; ValueError also for a
            ``compare_max_seconds`` that is not a positive number, or a ``checkpoint`` with ``compare`` or
            ``fidelity``.
        CheckpointError: the checkpoint's interrupted run does not fit its solver.
    """
    check_run_args(target, max_steps)
    if checkpoint is not None and (compare or fidelity):
        raise ValueError("checkpoint cannot be combined with compare or fidelity: the peer's runs and the RK4 "
                         "references cannot be resumed; got "
                         + " and ".join(name for name, on in (("compare", compare), ("fidelity", fidelity)) if on))
    if compare:
        import_peer()
        if isinstance(compare_max_seconds, bool) or not isinstance(compare_max_seconds, (int, float)) \
                or not 0 < compare_max_seconds < math.inf:
            raise ValueError(f"compare_max_seconds must be a positive finite number; got {compare_max_seconds!r}")
    solvers, points = check_grid(X, y, n_train=n_train, n_classes=n_classes, seeds=seeds, solvers=solvers)
    results: List[PointResult] = []
    for n, c, s in points:
        saved = {} if checkpoint is None else {name: checkpoint.result(n, c, s, name) for name in solvers}
        if saved and all(run is not None for run in saved.values()):
            results.append(PointResult(n, c, s, runs=[saved[name] for name in solvers]))
            continue
        problem = build_problem(X, y, n, c, s, device=device, dtype=dtype)
        point = PointResult(n, c, s)
        if compare:
            point.gradient_time = gradient_seconds(problem.loss_func, problem.init_params)
        if fidelity:
            tell = None if progress is None else (
                lambda line, where=f"RK4 reference n={n} C={c} seed={s}": progress(f"{where}: {line}"))
            point.reference = compute_reference(problem, target, progress=tell)
        reference = point.reference if point.reference is not None and point.reference.error is None else None
        for name in solvers:
            if saved.get(name) is not None:
                point.runs.append(saved[name])
                continue
            sampler = None if reference is None else ParamSampler(reference.times)
            run = run_solver(problem, name, target, max_steps=max_steps, quiet=quiet, sampler=sampler,
                             checkpoint=checkpoint)
            if reference is not None:
                run.fidelity = measure_fidelity(run, sampler, reference, problem.init_params)
            point.runs.append(run)
            if compare:
                sampler = None if reference is None else ParamSampler(reference.times)
                peer = run_peer(problem, name, target, max_steps=max_steps, max_seconds=compare_max_seconds,
                                quiet=quiet, sampler=sampler)
                if reference is not None:
                    peer.fidelity = measure_fidelity(peer, sampler, reference, problem.init_params)
                point.peer_runs.append(peer)
        results.append(point)
    return results
