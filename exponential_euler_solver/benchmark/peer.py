"""The existing implementation, ``stable-solvers`` 0.1 (the "peer"), run on a benchmark problem.

The peer is imported lazily, only when a comparison is asked for (``pip install exponential-euler-solver[compare]``).
Each peer run starts from a clone of the problem's initial parameters, on the peer's own ``LossFunction`` over the
problem's dataset, a copy of its network and a fresh ``CrossEntropyLoss`` (the peer moves the network it is given
to the ``meta`` device and rewrites the criterion's reduction, so it never sees the benchmark's own objects). It
is driven by the seed's loop, ``while loss > target: loss = solver.step().loss``, without asserting that the loss
falls (the peer's loss may rise; its own warning about that is silenced and the rises are visible in the history).

What is counted, from outside the peer's code:

* gradient evaluations: calls of its ``LossFunction.gradient`` (each is one loss-and-gradient pass);
* Hessian-vector products: its power iteration applies a Hessian operator to a block of ``n`` vectors at once
  (``n = 1`` for adaptive gradient descent, ``stiff_dim + 1`` for exponential Euler), and each application makes
  one call of the loss function's ``dataloader()``. Calls of ``dataloader()`` made outside ``gradient()`` and
  ``forward()`` are counted as operator applications, and HVPs = applications x ``n`` (:data:`HVP_COUNTING`).
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from .runner import DEFAULT_MAX_STEPS, ParamSampler, Problem, RunResult, StepRecord, crossing_time

__all__ = ["PEER_PACKAGE", "PEER_MODULE", "PEER_MISSING", "HVP_COUNTING", "DEFAULT_MAX_SECONDS", "PeerMissingError",
           "PeerSpec", "PEER_SOLVERS", "import_peer", "peer_version", "peer_implementation", "run_peer"]

PEER_PACKAGE = "stable-solvers"
PEER_MODULE = "stable_solvers"
PEER_MISSING = "--compare needs stable-solvers: pip install exponential-euler-solver[compare]"
DEFAULT_MAX_SECONDS = 600.0
HVP_COUNTING = ("peer HVPs = applications of its Hessian operator (calls of its LossFunction.dataloader() outside "
                "gradient() and forward()) x the block width of its power iteration (1 for adaptive gradient "
                "descent, stiff_dim + 1 for exponential Euler); peer gradient evals = calls of its "
                "LossFunction.gradient()")
_RISE_WARNING = "Loss has increased"  # the peer's warning when a step's starting loss is above the previous one


class PeerMissingError(ImportError):
    """``stable-solvers`` is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class PeerSpec:
    """How a peer solver is built with the seed's arguments.

    Attributes:
        class_name: the class in ``stable_solvers``.
        arguments: keyword arguments for a problem with ``n_classes`` classes.
        block_width: the number of vectors its power iteration multiplies by the Hessian at once.
    """

    class_name: str
    arguments: Callable[[int], Dict[str, object]]
    block_width: Callable[[int], int]


#: Benchmark solver name -> the peer's solver with the seed benchmark's arguments.
PEER_SOLVERS: Dict[str, PeerSpec] = {
    "exponential-euler": PeerSpec(
        "ExponentialEulerSolver", lambda n_classes: {"max_step_size": 0.01, "stiff_dim": n_classes - 1},
        lambda n_classes: n_classes),
    "adaptive": PeerSpec(
        "AdaptiveGradientDescent", lambda n_classes: {"lr": 0.01, "warmup_iters": 10, "warmup_factor": 0.01},
        lambda n_classes: 1),
}


def import_peer():
    """The ``stable_solvers`` module.

    Raises:
        PeerMissingError: it is not installed (message :data:`PEER_MISSING`).
    """
    try:
        import stable_solvers
    except ImportError as exc:
        raise PeerMissingError(PEER_MISSING) from exc
    return stable_solvers


def peer_version() -> str:
    """The installed ``stable-solvers`` version, or ``"unknown"``."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version(PEER_PACKAGE)
    except (ImportError, PackageNotFoundError):
        return str(getattr(import_peer(), "__version__", "unknown"))


def peer_implementation() -> str:
    """The ``implementation`` name of peer runs, e.g. ``"stable-solvers 0.1"``."""
    return f"{PEER_PACKAGE} {peer_version()}"


@functools.lru_cache(maxsize=None)
def _counting_loss_class(module):
    """A subclass of the peer's ``LossFunction`` that counts gradient calls and Hessian-operator passes."""

    class CountingLossFunction(module.LossFunction):
        """The peer's ``LossFunction`` with counters ``n_gradient``, ``n_value`` and ``n_operator_passes``."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.n_gradient = 0
            self.n_value = 0
            self.n_operator_passes = 0
            self._own_passes = 0  # > 0 while gradient() or forward() iterates over the data

        def gradient(self, params):
            self.n_gradient += 1
            self._own_passes += 1
            try:
                return super().gradient(params)
            finally:
                self._own_passes -= 1

        def forward(self, params):
            self.n_value += 1
            self._own_passes += 1
            try:
                return super().forward(params)
            finally:
                self._own_passes -= 1

        def dataloader(self, device):
            if not self._own_passes:
                self.n_operator_passes += 1
            return super().dataloader(device)

    return CountingLossFunction


def _make_peer_loss(module, problem: Problem):
    data = problem.loss_func.dataset
    return _counting_loss_class(module)(data, nn.CrossEntropyLoss(), copy.deepcopy(problem.loss_func.net),
                                        batch_size=len(data))


def run_peer(problem: Problem, solver: str, target: float, *, max_steps: int = DEFAULT_MAX_STEPS,
             max_seconds: float = DEFAULT_MAX_SECONDS, quiet: bool = False,
             sampler: Optional[ParamSampler] = None) -> RunResult:
    """Run the peer's counterpart of ``solver`` from a clone of ``problem.init_params`` with the seed's loop.

    ``torch.manual_seed(problem.seed)`` is called first (the peer's power iteration starts from ``torch.randn``).
    The run stops, converged, at the first step whose reported loss (the loss at its start) is ``<= target``;
    not converged after ``max_steps`` steps, once ``max_seconds`` of stepping have passed (checked between
    steps), when the reported loss is not finite, or when the peer raises (its power iteration gives up after
    1000 iterations). Its flow time is the sum of the reported ``dt``. The history's ``new_loss`` of a step is the
    next step's reported loss; for the last step it is evaluated afterwards with the benchmark's own loss
    function (outside the timing and the counts). ``sharpness`` (adaptive) is stored as ``|sharpness|``, what the
    peer's step uses; ``eigvals`` (exponential Euler) as the peer reports them. Counts: see the module docstring.
    With a ``sampler``, parameters are recorded as in :func:`~.runner.run_solver` (a converged run continues,
    untimed, until the sampler's last time, within ``max_steps`` further steps and ``max_seconds``).

    Returns:
        A :class:`~.runner.RunResult` with ``implementation`` :func:`peer_implementation` and ``n_rejected`` 0
        (the peer accepts every step).

    Raises:
        PeerMissingError: ``stable-solvers`` is not installed.
        KeyError: ``solver`` is not a key of :data:`PEER_SOLVERS`.
    """
    module = import_peer()
    spec = PEER_SOLVERS[solver]
    args = spec.arguments(problem.n_classes)
    width = spec.block_width(problem.n_classes)
    loss_func = _make_peer_loss(module, problem)
    params = problem.init_params.clone()
    torch.manual_seed(problem.seed)
    instance = getattr(module, spec.class_name)(params, loss_func, **args)
    history: List[StepRecord] = []
    error: Optional[str] = None
    stop = "target"
    desc = f"{PEER_PACKAGE} {spec.class_name} n={problem.n_train} C={problem.n_classes} seed={problem.seed}"
    loss, t = math.inf, 0.0
    sampled = 0.0 if sampler is None else sampler.seconds

    def elapsed() -> float:
        return time.perf_counter() - start - ((sampler.seconds - sampled) if sampler is not None else 0.0)

    with warnings.catch_warnings(), tqdm(desc=desc, unit="step", disable=quiet, dynamic_ncols=True) as bar:
        warnings.filterwarnings("ignore", message=_RISE_WARNING)
        start = time.perf_counter()
        while not loss <= target:
            if not math.isfinite(loss) and history:
                error, stop = f"the peer's loss is not finite ({loss}) at step {len(history) - 1}", "error"
                break
            if len(history) >= max_steps:
                stop = "max_steps"
                break
            if elapsed() >= max_seconds:
                stop = "max_seconds"
                break
            if sampler is not None:
                sampler.before_step(params)
            try:
                report = instance.step()
            except RuntimeError as exc:
                error, stop = f"{type(exc).__name__}: {exc}", "error"
                break
            t_end = t + float(report.dt)
            if sampler is not None:
                sampler.after_step(t, t_end, params)
            loss = float(report.loss)
            if history:
                history[-1].new_loss = loss
            eigvals = getattr(report, "eigvals", None)
            sharpness = getattr(report, "sharpness", None)
            history.append(StepRecord(
                step=len(history), t_start=t, t=t_end, dt=float(report.dt), loss=loss, new_loss=math.nan,
                eigvals=None if eigvals is None else [float(v) for v in eigvals.tolist()],
                sharpness=None if sharpness is None else abs(float(sharpness)),
                n_grad=loss_func.n_gradient, n_hvp=loss_func.n_operator_passes * width, rejections=0,
                eig_refreshed=True))
            t = t_end
            bar.set_postfix({"step": len(history) - 1, "loss": f"{loss:.4g}", "t": f"{t:.4g}",
                             "dt": f"{float(report.dt):.3g}"}, refresh=False)
            bar.update(1)
        wall_time = elapsed()
        n_grad, n_hvp = loss_func.n_gradient, loss_func.n_operator_passes * width
        if history:
            history[-1].new_loss = float(problem.loss_func(params))
        if sampler is not None and stop == "target":
            budget = max_seconds - wall_time
            begun = time.perf_counter()
            for _ in range(max_steps):
                if sampler.done or time.perf_counter() - begun >= budget:
                    break
                sampler.before_step(params)
                try:
                    report = instance.step()
                except RuntimeError:
                    break
                sampler.after_step(t, t + float(report.dt), params)
                t += float(report.dt)
                sampler.extra_steps += 1
    converged = stop == "target"
    return RunResult(
        n_train=problem.n_train, n_classes=problem.n_classes, seed=problem.seed, solver=solver, solver_args=args,
        target=target, converged=converged, error=error, wall_time=wall_time, steps=len(history), n_grad=n_grad,
        n_hvp=n_hvp, n_rejected=0, t_target=crossing_time(history, target),
        final_loss=history[-1].new_loss if history else None,
        strictly_decreasing=all(rec.new_loss < rec.loss for rec in history), history=history,
        implementation=peer_implementation(), stop_reason=stop)
