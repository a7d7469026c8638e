"""Running the benchmark: every solver on every grid point, with the optional measurements.

For every grid point (:class:`~.results.PointResult`), in this order and in one process:

1. with ``compare``: the median time of one full-batch gradient of the benchmark's loss
   (:func:`gradient_seconds`); the *floor* of a run is its accepted steps times that time, the cost of a method
   that needed only one gradient per step and nothing else;
2. with ``fidelity``: a converged RK4 integration of the flow to the target (:func:`compute_reference`, through
   :func:`~exponential_euler_solver.fidelity.reference_run` with ``max_step_size`` :data:`REFERENCE_MAX_STEP`);
3. for each solver: this library's run, then, with ``compare``, the peer's (:class:`~.peer.PeerSolver`), both
   from the same initial parameters and both through :func:`run` (one driver,
   :func:`~exponential_euler_solver.integrate`, with the seed's loop). With ``fidelity`` both keep their
   parameters at the reference's times, and crossing times and deviations come from their trajectories.

With a :class:`~.grid_checkpoint.GridCheckpoint` (this library's runs only), runs the checkpoint lists as finished
are taken from it, and a grid point whose runs have all finished is not even built.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..curvature import HessianOperator
from ..errors import CheckpointError
from ..fidelity import reference_run, run_with_times
from ..integrate import SaveAt, Stop, integrate
from ..solvers import SOLVERS
from ..trajectory import Trajectory
from .datasets import select_subset
from .grid_checkpoint import GridCheckpoint
from .peer import DEFAULT_MAX_SECONDS, PEER_SOLVERS, PeerSolver, import_peer, peer_implementation
from .problem import LOSS_KINDS, NETWORKS, DataError, Problem, build_problem
from .results import IMPLEMENTATION, FidelityResult, PointResult, ReferenceResult, RunResult

__all__ = ["REFERENCE_MAX_STEP", "GRADIENT_REPEATS", "DEFAULT_MAX_STEPS", "gradient_seconds", "compute_reference",
           "run", "run_solver", "run_peer", "check_run_args", "check_options", "check_problem_options", "check_grid",
           "run_points"]

REFERENCE_MAX_STEP = 0.01  # the RK4 reference's largest step (the seed's max_step_size)
GRADIENT_REPEATS = 5       # timed gradients (after one warm-up) whose median defines the floor
DEFAULT_MAX_STEPS = 100_000  # hard cap on accepted steps per run; a run that hits it is not converged


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_WARM: set = set()


def warm_up(loss_func, params: Tensor) -> None:
    """One gradient and one Hessian-vector product, untimed, once per process and device: the first call of
    :mod:`torch.func` imports and initialises a good deal (1.4 s of a 64x4 run's 8.6 s was such one-time work,
    charged to its first step)."""
    key = (params.device.type, params.dtype)
    if key in _WARM:
        return
    g = loss_func.gradient(params)[1]
    HessianOperator(loss_func, params) @ g
    _WARM.add(key)


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


def compute_reference(problem: Problem, target: float, *,
                      progress: Optional[Callable[[str], None]] = None) -> ReferenceResult:
    """:func:`~exponential_euler_solver.fidelity.reference_run` from ``problem.init_params`` to ``target`` with
    ``max_step_size`` :data:`REFERENCE_MAX_STEP` and its other defaults; a failure (the crossing time did not
    settle, or the target was never reached) is kept in ``error`` instead of raised."""
    start = time.perf_counter()
    try:
        ref = reference_run(problem.loss_func, problem.init_params, target, REFERENCE_MAX_STEP, progress=progress)
    except RuntimeError as exc:
        return ReferenceResult(None, None, [], 0, 0, 0, time.perf_counter() - start, REFERENCE_MAX_STEP,
                               error=str(exc))
    head = ref.trajectory.head(ref.steps)
    return ReferenceResult(crossing_time=ref.crossing_time, alpha=ref.alpha, times=list(ref.times), steps=ref.steps,
                           n_grad=int(head.n_grad[-1]), n_hvp=int(head.n_hvp[-1]),
                           wall_time=time.perf_counter() - start, max_step_size=REFERENCE_MAX_STEP,
                           trajectory=ref.trajectory)


# ------------------------------------------------------------------------------------------------------------
# one run
def run(problem: Problem, solver, target: float, *, name: str, label: str, arguments: dict,
        implementation: str = IMPLEMENTATION, max_steps: int = DEFAULT_MAX_STEPS,
        max_seconds: Optional[float] = None, quiet: bool = False, reference: Optional[ReferenceResult] = None,
        checkpoint: Optional[GridCheckpoint] = None) -> RunResult:
    """Run ``solver`` (ours or the peer's, already built on a clone of ``problem.init_params``) with the seed's
    loop until the loss it reports is ``<= target`` (:func:`~exponential_euler_solver.integrate` with
    ``Stop(step_loss=target)``).

    Stops early, not converged, after ``max_steps`` accepted steps, after ``max_seconds`` of stepping, or when a
    step raises a :class:`~exponential_euler_solver.SolverError` (its message is kept in ``error``). Shows a
    tqdm bar unless ``quiet``.

    With a ``reference`` the parameters are kept at its times; a converged run whose last step ended before the
    last time then takes further steps (at most ``max_steps``) until it has passed it: those steps are outside
    the run's wall time, history and counts, and the result gets its :class:`~.results.FidelityResult`.

    With a ``checkpoint`` the run is saved to it after its steps and when it ends (see
    :class:`~.grid_checkpoint.GridCheckpoint`). When the checkpoint was loaded holding this run unfinished, the
    run continues from the saved solver state and trajectory.

    Raises:
        CheckpointError: the checkpoint's solver state does not fit the solver built for this run.
    """
    key = (problem.n_train, problem.n_classes, problem.seed, name)
    desc = False if quiet else f"{implementation if implementation != IMPLEMENTATION else ''} {label} " \
                               f"n={problem.n_train} C={problem.n_classes} seed={problem.seed}".strip()
    stop = Stop(step_loss=target, steps=max_steps, seconds=max_seconds, errors="record")
    if reference is not None:
        trajectory, steps = run_with_times(solver, stop, reference.times, max_steps=max_steps, progress=desc)
    else:
        trajectory, save = Trajectory(), SaveAt()
        if checkpoint is not None:
            trajectory = _resumed(checkpoint, key, solver, label, problem) or trajectory
            save = SaveAt(checkpoint=checkpoint.start(key, solver, trajectory))
        trajectory = integrate(solver, stop, save, trajectory=trajectory, progress=desc)
        steps = len(trajectory)
    counts = _counts(solver, trajectory, steps)
    result = RunResult.from_run(key[:3], name, arguments, label, target, trajectory.head(steps), counts,
                                implementation)
    if reference is not None:
        times, deviations = trajectory.deviations(reference.trajectory, problem.init_params)
        t_ref = reference.crossing_time
        err = None if result.t_target is None else (result.t_target - t_ref) / t_ref
        result.fidelity = FidelityResult(reference_crossing_time=t_ref, relative_error=err, times=times,
                                         deviations=deviations, extra_steps=len(trajectory) - steps)
    if checkpoint is not None:
        checkpoint.finish(result, solver, trajectory)
    return result


def _counts(solver, trajectory: Trajectory, steps: int) -> Tuple[int, int, int]:
    """The solver's counts when its run stopped: its own counters, or, when steps were taken after the stop
    (to reach the reference's times), the record's at the last step before it."""
    if steps == len(trajectory):
        return solver.n_grad, solver.n_hvp, solver.n_rejected
    row = trajectory.rows(steps)[-1]
    return row["n_grad"], row["n_hvp"], row["n_rejected"]


def _resumed(checkpoint: GridCheckpoint, key, solver, label: str, problem: Problem) -> Optional[Trajectory]:
    """The trajectory of the run ``key`` restored from the checkpoint, with ``solver`` loaded; None when the
    checkpoint does not hold this run unfinished."""
    saved = checkpoint.interrupted(*key)
    if saved is None:
        return None
    try:
        solver.load_state_dict(saved["solver"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint.path)!r} does not fit the {label} solver of "
                              f"n={problem.n_train} C={problem.n_classes} seed={problem.seed}: {exc}") from exc
    return Trajectory.from_dict(saved["trajectory"])


def run_solver(problem: Problem, solver: str, target: float, **kwargs) -> RunResult:
    """:func:`run` with our solver ``solver`` (a key of :data:`~exponential_euler_solver.SOLVERS`) built with
    the seed's arguments for the problem's classes and loss kind on a clone of the initial parameters.

    Raises:
        KeyError: ``solver`` is not a key of SOLVERS.
    """
    entry = SOLVERS[solver]
    arguments = entry.arguments_for(problem.n_classes, problem.loss)
    instance = entry.build(problem.init_params.clone(), problem.loss_func, problem.n_classes, problem.loss)
    return run(problem, instance, target, name=solver, label=entry.label, arguments=arguments, **kwargs)


def run_peer(problem: Problem, solver: str, target: float, *, max_seconds: float = DEFAULT_MAX_SECONDS,
             **kwargs) -> RunResult:
    """:func:`run` with the peer's counterpart of ``solver`` (:class:`~.peer.PeerSolver`), stopped after
    ``max_seconds`` of stepping (checked between its steps).

    Raises:
        PeerMissingError: ``stable-solvers`` is not installed.
        KeyError: ``solver`` has no peer counterpart (:data:`~.peer.PEER_SOLVERS`).
    """
    peer = PeerSolver(problem, solver)
    return run(problem, peer, target, name=solver, label=peer.label, arguments=peer.arguments,
               implementation=peer_implementation(), max_seconds=max_seconds, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# the grid
def check_run_args(target: float, max_steps: int) -> None:
    """Raise ValueError unless ``target`` is a positive finite number and ``max_steps`` a positive int."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < math.inf:
        raise ValueError(f"target must be a positive finite number; got {target!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int; got {max_steps!r}")


def check_options(*, compare: bool, fidelity: bool, checkpoint, compare_max_seconds: float) -> None:
    """Raise ValueError for options that do not go together: a checkpoint with ``compare`` or ``fidelity`` (the
    peer's runs and the RK4 references cannot be resumed), or a ``compare_max_seconds`` that is not a positive
    number."""
    if checkpoint is not None and (compare or fidelity):
        raise ValueError("checkpoint (--checkpoint) cannot be combined with compare (--compare) or fidelity "
                         "(--fidelity): the peer's runs and the RK4 references cannot be resumed; got "
                         + " and ".join(name for name, on in (("--compare", compare), ("--fidelity", fidelity)) if on))
    if compare and (isinstance(compare_max_seconds, bool) or not isinstance(compare_max_seconds, (int, float))
                    or not 0 < compare_max_seconds < math.inf):
        raise ValueError(f"compare_max_seconds must be a positive finite number; got {compare_max_seconds!r}")


def check_problem_options(*, net: str, loss: str, compare: bool = False) -> None:
    """Raise ValueError for an unknown ``net`` or ``loss``, or for ``compare`` with a loss other than
    cross-entropy (the peer's loss function is built with ``CrossEntropyLoss``, :mod:`.peer`)."""
    if net not in NETWORKS:
        raise ValueError(f"net must be one of {NETWORKS}; got {net!r}")
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}; got {loss!r}")
    if compare and loss != "ce":
        raise ValueError(f"compare (--compare) needs the cross-entropy loss (--loss ce): stable-solvers is run with "
                         f"CrossEntropyLoss; got --loss {loss}")


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


def run_points(X: Tensor, y: Tensor, *, n_train: Sequence[int], n_classes: Sequence[int], seeds: Sequence[int],
               solvers: Sequence[str], target: float, device="cpu", dtype: torch.dtype = torch.float32,
               max_steps: int = DEFAULT_MAX_STEPS, max_seconds: Optional[float] = None, quiet: bool = False,
               compare: bool = False, compare_max_seconds: float = DEFAULT_MAX_SECONDS, fidelity: bool = False,
               progress: Optional[Callable[[str], None]] = None,
               checkpoint: Optional[GridCheckpoint] = None, net: str = "mlp", loss: str = "ce") -> List[PointResult]:
    """Every solver on every grid point (see the module docstring), in the order n_train, n_classes, seed,
    solver (repeats run once). All subsets are drawn first, so a grid value that does not fit the data fails
    before any run starts.

    Args:
        compare: also run the peer (``stable-solvers``) for the solvers it has, and time one gradient per point.
        compare_max_seconds: the peer's time cap per run (seconds of stepping).
        fidelity: compute an RK4 reference per point and compare every run with it.
        progress: receives one line per reference refinement (None: silent).
        checkpoint: keep the grid's checkpoint there, and take the runs it lists as finished from it; None: no
            checkpoint.
        net, loss: the network and the loss kind of every problem (:func:`~.problem.build_problem`); the peer
            (``compare``) is built with cross-entropy only.

    Raises:
        PeerMissingError: ``compare`` without ``stable-solvers`` installed (before anything runs).
        DataError: a grid point does not fit the data.
        ValueError: a bad ``target``, ``max_steps`` or option combination (:func:`check_options`), an unknown
            ``net`` or ``loss``, or ``compare`` with a loss other than ``"ce"``.
        KeyError: an unknown solver name.
        CheckpointError: the checkpoint's interrupted run does not fit its solver.
    """
    check_run_args(target, max_steps)
    check_options(compare=compare, fidelity=fidelity, checkpoint=checkpoint, compare_max_seconds=compare_max_seconds)
    check_problem_options(net=net, loss=loss, compare=compare)
    if compare:
        import_peer()
    solvers, points = check_grid(X, y, n_train=n_train, n_classes=n_classes, seeds=seeds, solvers=solvers)
    results: List[PointResult] = []
    for n, c, s in points:
        saved = {} if checkpoint is None else {name: checkpoint.result(n, c, s, name) for name in solvers}
        if saved and all(r is not None for r in saved.values()):
            results.append(PointResult(n, c, s, runs=[saved[name] for name in solvers]))
            continue
        problem = build_problem(X, y, n, c, s, device=device, dtype=dtype, net=net, loss=loss)
        warm_up(problem.loss_func, problem.init_params)
        point = PointResult(n, c, s, init_params=problem.init_params)
        if compare:
            point.gradient_time = gradient_seconds(problem.loss_func, problem.init_params)
        if fidelity:
            tell = None if progress is None else (
                lambda line, where=f"RK4 reference n={n} C={c} seed={s}": progress(f"{where}: {line}"))
            point.reference = compute_reference(problem, target, progress=tell)
        reference = point.reference if point.reference is not None and point.reference.error is None else None
        common = dict(max_steps=max_steps, quiet=quiet, reference=reference)
        for name in solvers:
            if saved.get(name) is not None:
                point.runs.append(saved[name])
                continue
            point.runs.append(run_solver(problem, name, target, checkpoint=checkpoint, max_seconds=max_seconds,
                                         **common))
            if compare and name in PEER_SOLVERS:
                point.peer_runs.append(run_peer(problem, name, target, max_seconds=compare_max_seconds, **common))
        results.append(point)
    return results
