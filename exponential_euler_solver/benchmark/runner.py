"""One benchmark problem, one solver run, and the grid of both.

The problem is the seed benchmark's: a subset of ``n_train`` examples of the first ``n_classes`` classes, the
6-layer ELU MLP below, mean cross-entropy over the full batch, and an initial parameter vector drawn after
``torch.manual_seed(seed)``. Every solver of a grid point starts from a clone of the same vector and runs, as
the seed's loop did, until the loss that ``step()`` reports at the start of a step is at most the target::

    loss = inf
    while loss > target:
        loss = solver.step().loss

Solvers are built from :data:`SOLVERS` (name -> :class:`SolverSpec`); add an entry there to benchmark another.
A :class:`ParamSampler` passed to :func:`run_solver` records the parameters at given flow times (for comparisons
with a reference trajectory, :mod:`.compare`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from ..errors import SolverError
from ..loss import LossFunction
from ..solvers import AdaptiveGradientDescent, ExponentialEulerSolver, Solver, StepReport
from .datasets import N_FEATURES, select_subset

__all__ = [
    "HIDDEN_WIDTH", "N_HIDDEN_BLOCKS", "DEFAULT_MAX_STEPS", "DataError", "SolverSpec", "SOLVERS", "Problem",
    "StepRecord", "Fidelity", "RunResult", "ParamSampler", "build_network", "build_problem", "run_solver",
    "run_grid", "check_grid", "check_run_args", "crossing_time", "IMPLEMENTATION",
]

HIDDEN_WIDTH = 512
N_HIDDEN_BLOCKS = 4          # Linear(512, 512) + ELU blocks between the input and output layers
DEFAULT_MAX_STEPS = 100_000  # hard cap on accepted steps per run; a run that hits it is not converged
IMPLEMENTATION = "ours"      # RunResult.implementation of this library's runs (the peer's: see .peer)


class DataError(ValueError):
    """The dataset cannot be loaded, or it does not hold a grid point (too few examples or classes)."""


# ------------------------------------------------------------------------------------------------------------
# solvers
@dataclass(frozen=True)
class SolverSpec:
    """How the benchmark builds one solver.

    Attributes:
        label: the name used in tables and plots (``"Exponential Euler"``).
        cls: the solver class, called as ``cls(params, loss_func, **arguments(n_classes))``.
        arguments: the keyword arguments for a problem with ``n_classes`` classes (recorded with each run).
    """

    label: str
    cls: type
    arguments: Callable[[int], Dict[str, object]]

    def build(self, params: Tensor, loss_func: LossFunction, n_classes: int) -> Solver:
        return self.cls(params, loss_func, **self.arguments(n_classes))


#: Solver name -> how to build it, with the seed benchmark's arguments.
SOLVERS: Dict[str, SolverSpec] = {
    "exponential-euler": SolverSpec(
        "Exponential Euler", ExponentialEulerSolver,
        lambda n_classes: {"max_step_size": 0.01, "stiff_dim": n_classes - 1}),
    "adaptive": SolverSpec(
        "Adaptive Gradient", AdaptiveGradientDescent,
        lambda n_classes: {"lr": 0.01, "warmup_iters": 10, "warmup_factor": 0.01}),
}


# ------------------------------------------------------------------------------------------------------------
# the problem
def build_network(n_classes: int) -> nn.Sequential:
    """The seed's network: Linear(3072, 512), ELU, 4 x [Linear(512, 512), ELU], Linear(512, n_classes)."""
    layers: List[nn.Module] = [nn.Linear(N_FEATURES, HIDDEN_WIDTH), nn.ELU()]
    for _ in range(N_HIDDEN_BLOCKS):
        layers += [nn.Linear(HIDDEN_WIDTH, HIDDEN_WIDTH), nn.ELU()]
    layers.append(nn.Linear(HIDDEN_WIDTH, n_classes))
    return nn.Sequential(*layers)


@dataclass
class Problem:
    """One grid point: the loss and the initial parameters every solver starts from (never modified)."""

    n_train: int
    n_classes: int
    seed: int
    loss_func: LossFunction
    init_params: Tensor


def build_problem(X: Tensor, y: Tensor, n_train: int, n_classes: int, seed: int, *, device="cpu",
                  dtype: torch.dtype = torch.float32) -> Problem:
    """Build the loss of one grid point and its initial parameters.

    The subset is :func:`~.datasets.select_subset` with ``seed``; the data and the network are put on
    ``device`` in ``dtype`` (the network is built here, so moving it changes nothing of the caller's). The
    initial vector is ``loss_func.initialize_parameters(device=device, dtype=dtype)`` right after
    ``torch.manual_seed(seed)``.

    Raises:
        ValueError: ``n_train`` or ``n_classes`` do not fit the data (see :func:`~.datasets.select_subset`).
    """
    X_sub, y_sub = select_subset(X, y, n_train, n_classes, seed)
    data = TensorDataset(X_sub.to(device=device, dtype=dtype), y_sub.to(device=device))
    net = build_network(n_classes).to(device=device, dtype=dtype)
    loss_func = LossFunction(data, nn.CrossEntropyLoss(), net)
    torch.manual_seed(seed)
    init_params = loss_func.initialize_parameters(device=device, dtype=dtype)
    return Problem(n_train, n_classes, seed, loss_func, init_params)


# ------------------------------------------------------------------------------------------------------------
# results
@dataclass
class StepRecord:
    """One accepted step (see :class:`~exponential_euler_solver.StepReport`).

    ``t_start`` is the flow time at the start of the step (the previous step's ``t``, i.e. ``t - dt`` without
    rounding). ``eigvals`` are the eigenvalues the step used (exponential Euler), ``sharpness`` the tracked
    ``|lambda_1|`` (adaptive gradient descent); the other is None. Solvers may reuse eigenpairs for several
    steps; ``eig_refreshed`` says whether this step computed them anew (it made Hessian-vector products), so
    they belong to its starting point. ``n_grad`` and ``n_hvp`` are cumulative, ``rejections`` counts this
    step's rejected proposals.
    """

    step: int
    t_start: float
    t: float
    dt: float
    loss: float
    new_loss: float
    eigvals: Optional[List[float]]
    sharpness: Optional[float]
    n_grad: int
    n_hvp: int
    rejections: int
    eig_refreshed: bool

    @classmethod
    def from_report(cls, report: StepReport, t_start: float, n_hvp_before: int) -> "StepRecord":
        """The record of ``report``, for a step that started at flow time ``t_start`` with ``n_hvp_before``
        Hessian-vector products made so far."""
        return cls(step=report.step, t_start=t_start, t=report.t, dt=report.dt, loss=report.loss,
                   new_loss=report.new_loss,
                   eigvals=None if report.eigvals is None else [float(v) for v in report.eigvals.tolist()],
                   sharpness=None if report.sharpness is None else float(report.sharpness),
                   n_grad=report.n_grad, n_hvp=report.n_hvp, rejections=report.rejections,
                   eig_refreshed=report.n_hvp > n_hvp_before)

    @property
    def top_curvature(self) -> Optional[float]:
        """``|lambda_1|`` as the step saw it: ``|eigvals[0]|`` or ``sharpness``; None when neither is known."""
        if self.eigvals:
            return abs(self.eigvals[0])
        return self.sharpness


@dataclass
class Fidelity:
    """A run measured against a converged reference trajectory of the same flow (see :mod:`.compare`).

    Attributes:
        reference_crossing_time: the reference's flow time at which the loss crossed the target.
        relative_error: ``(t_target - reference_crossing_time) / reference_crossing_time`` with the run's
            ``t_target``; None when the run never reached the target.
        times: the flow times of the parameter comparisons that the run reached.
        deviations: ``||theta(t) - theta_ref(t)|| / ||theta_ref(t) - theta_0||`` at ``times`` (float64 norms,
            as :class:`~exponential_euler_solver.fidelity.FidelityReport`).
        extra_steps: steps taken after the run ended, outside its timing and counts, to reach the last time.
    """

    reference_crossing_time: float
    relative_error: Optional[float]
    times: List[float]
    deviations: List[float]
    extra_steps: int = 0


@dataclass
class RunResult:
    """One solver run on one problem.

    Attributes:
        n_train, n_classes, seed: the grid point.
        solver: the solver's name in :data:`SOLVERS`; ``solver_args``: the arguments it was built with.
        target: the loss target.
        converged: the loop ended because the loss reported by ``step()`` was ``<= target``.
        error: the message of a :class:`~exponential_euler_solver.SolverError` that ended the run, else None.
        wall_time: seconds of ``time.perf_counter()`` around the stepping loop.
        steps: accepted steps (``len(history)``).
        n_grad, n_hvp, n_rejected: gradient evaluations, Hessian-vector products and rejected proposals.
        t_target: flow time at which the loss first fell to the target, log-linearly interpolated within the
            step that crossed it (0.0 if the initial loss was already there); None if it never did.
        final_loss: the loss at the final parameters (the last step's ``new_loss``); None without steps.
        strictly_decreasing: every step's ``new_loss < loss``.
        history: one :class:`StepRecord` per accepted step.
        implementation: :data:`IMPLEMENTATION` for this library's solvers; the peer's runs name the peer.
        stop_reason: why the loop ended: ``"target"``, ``"max_steps"``, ``"max_seconds"`` or ``"error"``.
        fidelity: the run against the reference trajectory (``--fidelity``), else None.
    """

    n_train: int
    n_classes: int
    seed: int
    solver: str
    solver_args: Dict[str, object]
    target: float
    converged: bool
    error: Optional[str]
    wall_time: float
    steps: int
    n_grad: int
    n_hvp: int
    n_rejected: int
    t_target: Optional[float]
    final_loss: Optional[float]
    strictly_decreasing: bool
    history: List[StepRecord] = field(default_factory=list)
    implementation: str = IMPLEMENTATION
    stop_reason: str = "target"
    fidelity: Optional[Fidelity] = None

    @property
    def label(self) -> str:
        return SOLVERS[self.solver].label if self.solver in SOLVERS else self.solver

    @property
    def hvp_per_step(self) -> Optional[float]:
        return self.n_hvp / self.steps if self.steps else None

    def to_dict(self) -> dict:
        """Plain JSON-ready data: every field, ``hvp_per_step``, and the history as a list of dicts."""
        out = asdict(self)
        out["hvp_per_step"] = self.hvp_per_step
        return out


class ParamSampler:
    """Records the parameters of a run at given flow times.

    A time inside a step is served by linear interpolation between the parameters at the two ends of that step,
    as :func:`~exponential_euler_solver.fidelity.integrate` does. Call :meth:`before_step` before each step
    (it copies the parameters while times are pending) and :meth:`after_step` after it. ``seconds`` accumulates
    the time spent here, which :func:`run_solver` takes off a run's wall time; ``extra_steps`` counts the steps
    a run took after it ended only to reach the last time.

    Args:
        times: flow times (any order; kept sorted).
    """

    def __init__(self, times: Sequence[float]):
        self.times: List[float] = sorted(float(t) for t in times)
        self.params: List[Tensor] = []
        self.seconds = 0.0
        self.extra_steps = 0
        self._pending = list(self.times)
        self._before: Optional[Tensor] = None

    @property
    def done(self) -> bool:
        """Every time has been recorded."""
        return not self._pending

    @property
    def recorded_times(self) -> List[float]:
        """The times recorded so far (the first ``len(params)`` of ``times``)."""
        return self.times[:len(self.params)]

    def before_step(self, params: Tensor) -> None:
        """Keep a copy of ``params``, the start of the coming step (only while times are pending)."""
        if not self._pending:
            return
        start = time.perf_counter()
        if self._before is None:
            self._before = params.detach().clone()
        else:
            self._before.copy_(params.detach())
        self.seconds += time.perf_counter() - start

    def after_step(self, t_start: float, t_end: float, params: Tensor) -> None:
        """Record every pending time in ``[t_start, t_end]`` of the step that just ended at ``params``."""
        if not self._pending or self._pending[0] > t_end:
            return
        start = time.perf_counter()
        while self._pending and self._pending[0] <= t_end:
            w = (self._pending.pop(0) - t_start) / (t_end - t_start) if t_end > t_start else 1.0
            self.params.append(torch.lerp(self._before, params.detach(), min(max(w, 0.0), 1.0)))
        self.seconds += time.perf_counter() - start


def crossing_time(history: Sequence[StepRecord], target: float) -> Optional[float]:
    """Flow time at which the loss first fell to ``target``.

    Within the first step with ``new_loss <= target`` (and ``loss > target``), ``log L`` is taken as linear in
    ``t`` between ``(t_start, log loss)`` and ``(t, log new_loss)``::

        t_target = t_start + dt * (log loss - log target) / (log loss - log new_loss)

    Returns 0.0 when the first step already starts at or below the target, None when no step reaches it.
    """
    for rec in history:
        if rec.loss <= target:
            return rec.t_start
        if rec.new_loss <= target:
            if rec.new_loss <= 0.0:
                return rec.t
            frac = (math.log(rec.loss) - math.log(target)) / (math.log(rec.loss) - math.log(rec.new_loss))
            return rec.t_start + (rec.t - rec.t_start) * frac
    return None


# ------------------------------------------------------------------------------------------------------------
# running
def run_solver(problem: Problem, solver: str, target: float, *, max_steps: int = DEFAULT_MAX_STEPS,
               quiet: bool = False, sampler: Optional[ParamSampler] = None) -> RunResult:
    """Run one solver from a clone of ``problem.init_params`` until the reported loss is ``<= target``.

    Stops early, not converged, after ``max_steps`` accepted steps or when a step raises a
    :class:`~exponential_euler_solver.SolverError` (its message is kept in ``error``). Shows a tqdm bar with
    the step, loss, flow time and dt unless ``quiet``.

    With a ``sampler``, the parameters are recorded at its times. A converged run whose last step ended before
    the last time then takes further steps (at most ``max_steps``) until it has passed it; those steps are
    outside the run's wall time, history and counts. The sampler's own time is taken off ``wall_time``.

    Raises:
        KeyError: ``solver`` is not a key of :data:`SOLVERS`.
        ValueError: ``target`` is not a positive number or ``max_steps`` not a positive int.
    """
    check_run_args(target, max_steps)
    spec = SOLVERS[solver]
    args = spec.arguments(problem.n_classes)
    params = problem.init_params.clone()
    instance = spec.build(params, problem.loss_func, problem.n_classes)
    history: List[StepRecord] = []
    error: Optional[str] = None
    desc = f"{spec.label} n={problem.n_train} C={problem.n_classes} seed={problem.seed}"
    loss = math.inf
    with tqdm(desc=desc, unit="step", disable=quiet, dynamic_ncols=True) as bar:
        t_prev = 0.0
        start = time.perf_counter()
        while loss > target and len(history) < max_steps:
            if sampler is not None:
                sampler.before_step(params)
            try:
                report = instance.step()
            except SolverError as exc:
                error = f"{type(exc).__name__}: {exc}"
                break
            if sampler is not None:
                sampler.after_step(t_prev, report.t, params)
            history.append(StepRecord.from_report(report, t_prev, history[-1].n_hvp if history else 0))
            t_prev = report.t
            loss = report.loss
            bar.set_postfix({"step": report.step, "loss": f"{report.new_loss:.4g}", "t": f"{report.t:.4g}",
                             "dt": f"{report.dt:.3g}"}, refresh=False)
            bar.update(1)
        wall_time = time.perf_counter() - start - (0.0 if sampler is None else sampler.seconds)
    n_grad, n_hvp, n_rejected = instance.n_grad, instance.n_hvp, instance.n_rejected
    if sampler is not None and loss <= target:
        _continue_for_sampler(instance, sampler, t_prev, max_steps)
    last = history[-1] if history else None
    return RunResult(
        n_train=problem.n_train, n_classes=problem.n_classes, seed=problem.seed, solver=solver, solver_args=args,
        target=target, converged=loss <= target, error=error, wall_time=wall_time, steps=len(history),
        n_grad=n_grad, n_hvp=n_hvp, n_rejected=n_rejected,
        t_target=crossing_time(history, target), final_loss=None if last is None else last.new_loss,
        strictly_decreasing=all(rec.new_loss < rec.loss for rec in history), history=history,
        stop_reason="target" if loss <= target else "error" if error is not None else "max_steps")


def _continue_for_sampler(instance: Solver, sampler: ParamSampler, t: float, max_steps: int) -> None:
    """Step ``instance`` on, untimed, until ``sampler`` is done (at most ``max_steps`` steps or the first
    :class:`~exponential_euler_solver.SolverError`); the number of steps goes to ``sampler.extra_steps``."""
    steps = 0
    while not sampler.done and steps < max_steps:
        sampler.before_step(instance.params)
        try:
            report = instance.step()
        except SolverError:
            break
        sampler.after_step(t, report.t, instance.params)
        t = report.t
        steps += 1
    sampler.extra_steps = steps


def check_run_args(target: float, max_steps: int) -> None:
    """Raise ValueError unless ``target`` is a positive finite number and ``max_steps`` a positive int."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < math.inf:
        raise ValueError(f"target must be a positive finite number; got {target!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int; got {max_steps!r}")


def check_grid(X: Tensor, y: Tensor, *, n_train: Sequence[int], n_classes: Sequence[int], seeds: Sequence[int],
               solvers: Sequence[str]) -> Tuple[List[str], List[Tuple[int, int, int]]]:
    """The grid's distinct solvers and points ``(n_train, n_classes, seed)``, in grid order, after checking that
    every solver is known and every point fits the data (its subset is drawn).

    Raises:
        DataError: a grid point does not fit the data (see :func:`~.datasets.select_subset`).
        KeyError: an unknown solver name.
    """
    solvers = list(dict.fromkeys(solvers))
    unknown = [name for name in solvers if name not in SOLVERS]
    if unknown:
        raise KeyError(f"solvers must be among {sorted(SOLVERS)}; got {unknown}")
    points = list(dict.fromkeys((n, c, s) for n in n_train for c in n_classes for s in seeds))
    for n, c, s in points:
        try:
            select_subset(X, y, n, c, s)
        except ValueError as exc:
            raise DataError(str(exc)) from exc
    return solvers, points


def run_grid(X: Tensor, y: Tensor, *, n_train: Sequence[int], n_classes: Sequence[int], seeds: Sequence[int],
             solvers: Sequence[str], target: float, device="cpu", dtype: torch.dtype = torch.float32,
             max_steps: int = DEFAULT_MAX_STEPS, quiet: bool = False) -> List[RunResult]:
    """Every solver on every grid point, in the order n_train, n_classes, seed, solver (repeats run once).

    All subsets are drawn first, so a grid value that does not fit the data fails before any run starts.

    Raises:
        DataError: a grid point does not fit the data (see :func:`~.datasets.select_subset`).
        ValueError: a bad ``target`` or ``max_steps``.
        KeyError: an unknown solver name.
    """
    check_run_args(target, max_steps)
    solvers, points = check_grid(X, y, n_train=n_train, n_classes=n_classes, seeds=seeds, solvers=solvers)
    results: List[RunResult] = []
    for n, c, s in points:
        problem = build_problem(X, y, n, c, s, device=device, dtype=dtype)
        for name in solvers:
            results.append(run_solver(problem, name, target, max_steps=max_steps, quiet=quiet))
    return results
