"""The existing implementation, ``stable-solvers`` 0.1 (the "peer"), wrapped in this library's step protocol.

The peer is imported lazily, only when a comparison is asked for (``pip install exponential-euler-solver[compare]``).
:class:`PeerSolver` runs the peer's solver from a clone of the problem's initial parameters, on the peer's own
``LossFunction`` over the problem's dataset, a copy of its network and a fresh ``CrossEntropyLoss`` (the peer moves
the network it is given to the ``meta`` device and rewrites the criterion's reduction, so it never sees the
benchmark's own objects). It has ``step()``, ``params``, ``t``, ``n_steps``, ``loss_value`` and
``current_gradient()``, so :func:`~exponential_euler_solver.integrate` drives it like any solver of ours, with the
seed's loop (``Stop(step_loss=target)``) and without asserting that the loss falls (the peer's loss may rise; its
own warning about that is silenced and the rises are visible in the record).

What is counted, from outside the peer's code:

* gradient evaluations: calls of its ``LossFunction.gradient`` (each is one loss-and-gradient pass);
* Hessian-vector products: its power iteration applies a Hessian operator to a block of ``n`` vectors at once
  (``n = 1`` for adaptive gradient descent, ``stiff_dim + 1`` for exponential Euler), and each application makes
  one call of the loss function's ``dataloader()``. Calls of ``dataloader()`` made outside ``gradient()`` and
  ``forward()`` are counted as operator applications, and HVPs = applications x ``n`` (:data:`HVP_COUNTING`).

The peer does not report the loss and gradient at the end of a step (it computes them at the start of the next).
The adapter evaluates them after each step with the benchmark's own loss function, outside the step's timing and
the counts: they give the record its ``new_loss`` and slopes and the driver its interpolation.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError, SolverError
from ..solvers import SOLVERS, StepReport
from .problem import Problem

__all__ = ["PEER_PACKAGE", "PEER_MODULE", "PEER_MISSING", "HVP_COUNTING", "DEFAULT_MAX_SECONDS", "PeerMissingError",
           "PeerSpec", "PEER_SOLVERS", "PeerSolver", "import_peer", "peer_version", "peer_implementation"]

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
    """The peer's counterpart of one of our solvers, built with the same (the seed's) arguments.

    Attributes:
        class_name: the class in ``stable_solvers``.
        block_width: the number of vectors its power iteration multiplies by the Hessian at once, for a problem
            with ``n_classes`` classes.
    """

    class_name: str
    block_width: Callable[[int], int]


#: Our solver name (a key of SOLVERS) -> the peer's counterpart; solvers without one are not compared.
PEER_SOLVERS: Dict[str, PeerSpec] = {
    "exponential-euler": PeerSpec("ExponentialEulerSolver", lambda n_classes: n_classes),
    "adaptive": PeerSpec("AdaptiveGradientDescent", lambda n_classes: 1),
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

        def _counted(self, method, counter: str, params):
            setattr(self, counter, getattr(self, counter) + 1)
            self._own_passes += 1
            try:
                return method(params)
            finally:
                self._own_passes -= 1

        def gradient(self, params):
            return self._counted(super().gradient, "n_gradient", params)

        def forward(self, params):
            return self._counted(super().forward, "n_value", params)

        def dataloader(self, device):
            if not self._own_passes:
                self.n_operator_passes += 1
            return super().dataloader(device)

    return CountingLossFunction


class PeerSolver:
    """The peer's counterpart of our solver ``solver`` on ``problem``, in this library's step protocol.

    ``torch.manual_seed(problem.seed)`` is called before the peer's solver is built (its power iteration starts
    from ``torch.randn``). A step's report carries the peer's own loss at the start of the step (what the seed's
    loop reads), its ``dt``, ``sharpness`` (as ``|sharpness|``, what its step uses) or ``eigvals`` (as it reports
    them), the counts (see the module docstring) and the seconds of the peer's ``step()`` call alone.

    Args:
        problem: the benchmark problem.
        solver: a key of :data:`PEER_SOLVERS`.

    Raises:
        PeerMissingError: ``stable-solvers`` is not installed.
        KeyError: ``solver`` has no peer counterpart.
        ValueError: the problem's loss is not cross-entropy (``problem.loss != "ce"``).
    """

    def __init__(self, problem: Problem, solver: str):
        if getattr(problem, "loss", "ce") != "ce":
            raise ValueError(f"the peer is built with CrossEntropyLoss only; got a problem with loss {problem.loss!r}")
        module = import_peer()
        spec = PEER_SOLVERS[solver]
        self.name = solver
        self.arguments = SOLVERS[solver].arguments_for(problem.n_classes, problem.loss)
        self.label = SOLVERS[solver].label
        self._width = spec.block_width(problem.n_classes)
        data = problem.loss_func.dataset
        self._peer_loss = _counting_loss_class(module)(data, nn.CrossEntropyLoss(),
                                                       copy.deepcopy(problem.loss_func.net), batch_size=len(data))
        self._loss = problem.loss_func
        self.params = problem.init_params.clone()
        torch.manual_seed(problem.seed)
        self._peer = getattr(module, spec.class_name)(self.params, self._peer_loss, **self.arguments)
        self.t = 0.0
        self.n_steps = 0
        self.n_rejected = 0
        self._loss_value: Optional[float] = None
        self._grad: Optional[Tensor] = None

    @property
    def n_grad(self) -> int:
        return self._peer_loss.n_gradient

    @property
    def n_hvp(self) -> int:
        return self._peer_loss.n_operator_passes * self._width

    @property
    def loss_value(self) -> Optional[float]:
        return self._loss_value

    def current_gradient(self) -> Tensor:
        """The gradient at the current parameters by the benchmark's loss function (not counted)."""
        if self._grad is None:
            loss, self._grad = self._loss.gradient(self.params)
            self._loss_value = float(loss)
        return self._grad

    def step(self) -> StepReport:
        """One step of the peer; raises :class:`~exponential_euler_solver.SolverError` when the peer raises (its
        power iteration gives up after 1000 iterations) or reports a loss that is not finite."""
        slope = -float(torch.linalg.vector_norm(self.current_gradient().double())) ** 2
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_RISE_WARNING)
            try:
                report = self._peer.step()
            except RuntimeError as exc:
                raise SolverError(f"the peer raised {type(exc).__name__}: {exc}", step=self.n_steps,
                                  t=self.t) from exc
        seconds = time.perf_counter() - start
        loss = float(report.loss)
        if not math.isfinite(loss):
            raise NonFiniteError(f"the peer's loss is not finite ({loss})", step=self.n_steps, t=self.t)
        dt = float(report.dt)
        t_start, self.t = self.t, self.t + dt
        self._grad = None
        new_grad = self.current_gradient()
        eigvals = getattr(report, "eigvals", None)
        sharpness = getattr(report, "sharpness", None)
        out = StepReport(step=self.n_steps, loss=loss, new_loss=self._loss_value, dt=dt, t=self.t, t_start=t_start,
                         slope=slope, new_slope=-float(torch.linalg.vector_norm(new_grad.double())) ** 2,
                         n_grad=self.n_grad, n_hvp=self.n_hvp, n_rejected=0,
                         eigvals=None if eigvals is None else torch.as_tensor(eigvals).detach().double().cpu(),
                         sharpness=None if sharpness is None else abs(float(sharpness)), seconds=seconds)
        self.n_steps += 1
        return out
