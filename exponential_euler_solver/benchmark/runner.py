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
with a reference trajectory, :mod:`.compare`). A :class:`GridCheckpoint` passed to it keeps one checkpoint file
for a whole grid, from which an interrupted grid continues to the same numbers.
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

from ..errors import CheckpointError, SolverError
from ..loss import LossFunction
from ..solvers import AdaptiveGradientDescent, ExponentialEulerSolver, Solver, StepReport
from ..trajectory import Checkpointer, Trajectory, load_checkpoint, save_checkpoint
from .datasets import N_FEATURES, select_subset

__all__ = [
    "HIDDEN_WIDTH", "N_HIDDEN_BLOCKS", "DEFAULT_MAX_STEPS", "DataError", "SolverSpec", "SOLVERS", "Problem",
    "StepRecord", "Fidelity", "RunResult", "ParamSampler", "build_network", "build_problem", "run_solver",
    "run_grid", "check_grid", "check_run_args", "crossing_time", "IMPLEMENTATION", "GridCheckpoint",
    "CheckpointMismatchError", "DEFAULT_CHECKPOINT_SECONDS", "GRID_CHECKPOINT_KIND",
]

HIDDEN_WIDTH = 512
N_HIDDEN_BLOCKS = 4          # Linear(512, 512) + ELU blocks between the input and output layers
DEFAULT_MAX_STEPS = 100_000  # hard cap on accepted steps per run; a run that hits it is not converged
IMPLEMENTATION = "ours"      # RunResult.implementation of this library's runs (the peer's: see .peer)
DEFAULT_CHECKPOINT_SECONDS = 60.0  # least wall-clock time between two checkpoints within a run
GRID_CHECKPOINT_KIND = "exponential_euler_solver.benchmark/grid"  # marks the ``extra`` of a grid checkpoint
GRID_CHECKPOINT_VERSION = 1


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

    @classmethod
    def from_dict(cls, data: dict) -> "Fidelity":
        """The inverse of :func:`dataclasses.asdict`."""
        return cls(**data)


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

    @property
    def first_step_hvp(self) -> Optional[int]:
        """Hessian-vector products made by the first accepted step (the cold start of the eigen-solve, with any
        retries of that step); None without steps."""
        return self.history[0].n_hvp if self.history else None

    def to_dict(self) -> dict:
        """Plain JSON-ready data: every field, ``hvp_per_step``, ``first_step_hvp`` and the history as a list of
        dicts."""
        out = asdict(self)
        out["hvp_per_step"] = self.hvp_per_step
        out["first_step_hvp"] = self.first_step_hvp
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunResult":
        """The run of :meth:`to_dict` (``hvp_per_step`` and ``first_step_hvp`` are recomputed, not read).

        Raises:
            KeyError, TypeError: ``data`` is not shaped like :meth:`to_dict`'s output.
        """
        data = {k: v for k, v in data.items() if k not in ("hvp_per_step", "first_step_hvp")}
        data["history"] = [StepRecord(**h) for h in data.get("history", [])]
        if data.get("fidelity") is not None:
            data["fidelity"] = Fidelity.from_dict(data["fidelity"])
        return cls(**data)


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
# checkpoints
RunKey = Tuple[int, int, int, str]  # (n_train, n_classes, seed, solver)


class CheckpointMismatchError(CheckpointError):
    """A grid checkpoint was written for another grid or configuration than the one asked to resume."""


def _history_from_trajectory(state: dict) -> List[StepRecord]:
    """The :class:`StepRecord` s of a trajectory's plain state (:meth:`~exponential_euler_solver.Trajectory.to_dict`
    of a trajectory that recorded every step of a run from its start): ``t_start`` is the previous step's ``t``
    (0.0 for the first), ``eig_refreshed`` whether ``n_hvp`` grew. Equal to what :meth:`StepRecord.from_report`
    made of the same reports."""
    c = state["columns"]
    history: List[StepRecord] = []
    t_prev, hvp_prev = 0.0, 0
    for i in range(len(c["step"])):
        eig = c["eigenvalues"][i]
        history.append(StepRecord(
            step=c["step"][i], t_start=t_prev, t=c["t"][i], dt=c["dt"][i], loss=c["loss"][i],
            new_loss=c["new_loss"][i], eigvals=None if eig is None else list(eig), sharpness=c["sharpness"][i],
            n_grad=c["n_grad"][i], n_hvp=c["n_hvp"][i], rejections=c["rejections"][i],
            eig_refreshed=c["n_hvp"][i] > hvp_prev))
        t_prev, hvp_prev = c["t"][i], c["n_hvp"][i]
    return history


def _run_key(data: dict) -> RunKey:
    return int(data["n_train"]), int(data["n_classes"]), int(data["seed"]), str(data["solver"])


class GridCheckpoint:
    """One checkpoint file for a whole benchmark grid, from which an interrupted grid continues.

    The file is a :func:`~exponential_euler_solver.save_checkpoint` file (written atomically, by rank 0 only).
    Its solver state and trajectory are those of the run in progress, or of the last run that ended; its
    ``extra`` holds, as plain containers::

        {"kind": GRID_CHECKPOINT_KIND, "version": 1,
         "config": the grid's configuration (compared on resume, see check_config),
         "finished": [RunResult.to_dict() of every run that ended, in grid order],
         "current": {"n_train", "n_classes", "seed", "solver", "wall_time", "done"}}

    ``current`` names the run that the solver state belongs to: ``wall_time`` is the seconds its stepping loop
    had run at the save (the time spent saving left out), ``done`` whether the run has ended (it is then in
    ``finished`` too). :func:`run_solver` saves when the first run of a fresh grid starts (so the file exists
    from then on), after each accepted step through a :class:`~exponential_euler_solver.Checkpointer` (at most
    every ``every_seconds``), and when each run ends.

    Resuming (:meth:`load`): finished runs are taken from the file instead of being run again (:meth:`result`);
    the interrupted run is rebuilt from its grid point and solver, its solver state is loaded
    (``load_state_dict``) and its steps so far are taken from the stored trajectory, so it continues from its
    last saved step to the numbers of an uninterrupted run (steps taken after that save are taken again). Its
    wall time is the saved one plus the time after the resume.

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
        """Read a grid checkpoint written by :func:`run_solver` to continue its grid.

        Raises:
            CheckpointError: the file is missing, damaged, not a checkpoint of this library, or not a benchmark
                grid checkpoint (see :func:`~exponential_euler_solver.load_checkpoint`).
        """
        state = load_checkpoint(path)
        extra = state.get("extra")
        if not isinstance(extra, dict) or extra.get("kind") != GRID_CHECKPOINT_KIND:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a benchmark grid checkpoint (written by "
                                  "euler-benchmark --checkpoint): its extra has no 'kind': "
                                  f"{GRID_CHECKPOINT_KIND!r}")
        if not isinstance(extra.get("version"), int) or extra["version"] > GRID_CHECKPOINT_VERSION:
            raise CheckpointError(f"benchmark grid checkpoint {str(path)!r} has version {extra.get('version')!r}; "
                                  f"this library reads versions up to {GRID_CHECKPOINT_VERSION}")
        ckpt = cls(path, extra.get("config"), every_seconds)
        try:
            finished = [RunResult.from_dict(d) for d in extra["finished"]]
            current = extra["current"]
            done = current is None or bool(current["done"])
            if not done:
                _run_key(current)
                float(current["wall_time"])
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
    def finished(self) -> List[RunResult]:
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

    # -- used by run_solver -------------------------------------------------------------------------------------
    def _save(self, solver: Solver, trajectory: Trajectory) -> None:
        save_checkpoint(self.path, solver, trajectory, self.extra)
        self._written = True

    def start(self, key: RunKey, solver: Solver, trajectory: Trajectory, wall_time: float) -> Checkpointer:
        """Mark ``key`` as the run in progress (saving now when the file has not been written yet) and return
        the checkpointer that its steps are offered to."""
        n, c, s, name = key
        self.extra["current"] = {"n_train": n, "n_classes": c, "seed": s, "solver": name,
                                 "wall_time": float(wall_time), "done": False}
        if not self._written:
            self._save(solver, trajectory)
        return Checkpointer(self.path, self.every_seconds, extra=self.extra)

    def offer(self, checkpointer: Checkpointer, solver: Solver, trajectory: Trajectory, wall_time: float) -> float:
        """After an accepted step: save if ``every_seconds`` have passed; returns the seconds spent here."""
        start = time.perf_counter()
        self.extra["current"]["wall_time"] = float(wall_time)
        if checkpointer.maybe_save(solver, trajectory):
            self._written = True
        return time.perf_counter() - start

    def finish(self, result: RunResult, solver: Solver, trajectory: Trajectory) -> None:
        """Record ``result`` as ended and save."""
        self.extra["current"].update(wall_time=float(result.wall_time), done=True)
        self.extra["finished"].append(result.to_dict())
        self._finished[(result.n_train, result.n_classes, result.seed, result.solver)] = result
        if self._interrupted is not None and _run_key(self._interrupted["extra"]["current"]) == _run_key(
                self.extra["current"]):
            self._interrupted = None
        self._save(solver, trajectory)


# ------------------------------------------------------------------------------------------------------------
# running
def run_solver(problem: Problem, solver: str, target: float, *, max_steps: int = DEFAULT_MAX_STEPS,
               quiet: bool = False, sampler: Optional[ParamSampler] = None,
               checkpoint: Optional[GridCheckpoint] = None) -> RunResult:
    """Run one solver from a clone of ``problem.init_params`` until the reported loss is ``<= target``.

    Stops early, not converged, after ``max_steps`` accepted steps or when a step raises a
    :class:`~exponential_euler_solver.SolverError` (its message is kept in ``error``). Shows a tqdm bar with
    the step, loss, flow time and dt unless ``quiet``.

    With a ``sampler``, the parameters are recorded at its times. A converged run whose last step ended before
    the last time then takes further steps (at most ``max_steps``) until it has passed it; those steps are
    outside the run's wall time, history and counts. The sampler's own time is taken off ``wall_time``.

    With a ``checkpoint``, the run is saved to it after its steps and when it ends (see :class:`GridCheckpoint`;
    the time spent saving is taken off ``wall_time``). When the checkpoint was loaded holding this run
    unfinished, the run continues from the saved solver state and steps instead of starting afresh, and its
    ``wall_time`` adds the saved seconds. (Only a run that the checkpoint does not list as finished should be
    passed to it.)

    Raises:
        KeyError: ``solver`` is not a key of :data:`SOLVERS`.
        ValueError: ``target`` is not a positive number or ``max_steps`` not a positive int; or both a
            ``sampler`` and a ``checkpoint`` are given (a sampler's records are not checkpointed).
        CheckpointError: the checkpoint's solver state does not fit the solver built for this run.
    """
    check_run_args(target, max_steps)
    if sampler is not None and checkpoint is not None:
        raise ValueError("a run takes a sampler or a checkpoint, not both: a sampler's records are not saved in "
                         "checkpoints")
    spec = SOLVERS[solver]
    args = spec.arguments(problem.n_classes)
    params = problem.init_params.clone()
    instance = spec.build(params, problem.loss_func, problem.n_classes)
    history: List[StepRecord] = []
    error: Optional[str] = None
    key = (problem.n_train, problem.n_classes, problem.seed, solver)
    desc = f"{spec.label} n={problem.n_train} C={problem.n_classes} seed={problem.seed}"
    loss, t_prev, wall_before = math.inf, 0.0, 0.0
    trajectory = checkpointer = None
    if checkpoint is not None:
        saved = checkpoint.interrupted(*key)
        trajectory = Trajectory()
        if saved is not None:
            try:
                instance.load_state_dict(saved["solver"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"checkpoint {str(checkpoint.path)!r} does not fit the {spec.label} solver "
                                      f"of n={problem.n_train} C={problem.n_classes} seed={problem.seed}: "
                                      f"{exc}") from exc
            trajectory = Trajectory.from_dict(saved["trajectory"])
            history = _history_from_trajectory(saved["trajectory"])
            wall_before = float(saved["extra"]["current"]["wall_time"])
            if history:
                loss, t_prev = history[-1].loss, history[-1].t
            desc += f" (resumed at step {len(history)})"
        checkpointer = checkpoint.start(key, instance, trajectory, wall_before)
    saving = 0.0  # seconds spent saving checkpoints inside the timed loop
    with tqdm(desc=desc, unit="step", initial=len(history), disable=quiet, dynamic_ncols=True) as bar:
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
            if checkpointer is not None:
                trajectory.record(report)
                saving += checkpoint.offer(checkpointer, instance, trajectory,
                                           wall_before + time.perf_counter() - start - saving)
            bar.set_postfix({"step": report.step, "loss": f"{report.new_loss:.4g}", "t": f"{report.t:.4g}",
                             "dt": f"{report.dt:.3g}"}, refresh=False)
            bar.update(1)
        wall_time = (wall_before + time.perf_counter() - start - saving
                     - (0.0 if sampler is None else sampler.seconds))
    n_grad, n_hvp, n_rejected = instance.n_grad, instance.n_hvp, instance.n_rejected
    if sampler is not None and loss <= target:
        _continue_for_sampler(instance, sampler, t_prev, max_steps)
    last = history[-1] if history else None
    result = RunResult(
        n_train=problem.n_train, n_classes=problem.n_classes, seed=problem.seed, solver=solver, solver_args=args,
        target=target, converged=loss <= target, error=error, wall_time=wall_time, steps=len(history),
        n_grad=n_grad, n_hvp=n_hvp, n_rejected=n_rejected,
        t_target=crossing_time(history, target), final_loss=None if last is None else last.new_loss,
        strictly_decreasing=all(rec.new_loss < rec.loss for rec in history), history=history,
        stop_reason="target" if loss <= target else "error" if error is not None else "max_steps")
    if checkpoint is not None:
        checkpoint.finish(result, instance, trajectory)
    return result


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
