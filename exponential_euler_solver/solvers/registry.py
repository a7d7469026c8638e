"""The solvers by name, with the seed benchmark's arguments: the one list the benchmark command, its comparison
with stable-solvers and its fidelity harness read. Adding a solver is one module and one line here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

from .exponential_euler import ExponentialEulerSolver
from .gradient_descent import AdaptiveGradientDescent

__all__ = ["LOSS_KINDS", "SolverEntry", "SOLVERS", "stiff_dim"]

#: The benchmark's loss kinds: mean cross-entropy (``"ce"``) and mean squared error against one-hot targets
#: (``"mse"``).
LOSS_KINDS = ("ce", "mse")


def stiff_dim(n_classes: int, loss: str = "ce") -> int:
    """The number of sharp Hessian directions of a ``n_classes``-output classifier trained with ``loss``:
    ``n_classes - 1`` for cross-entropy (the softmax is invariant to a shift of all logits, so the loss's Hessian
    in the outputs has rank C - 1) and ``n_classes`` for squared error (its Hessian in the outputs is the
    identity: one sharp direction per output).

    Raises:
        ValueError: ``loss`` is not one of :data:`LOSS_KINDS`.
    """
    if loss == "ce":
        return n_classes - 1
    if loss == "mse":
        return n_classes
    raise ValueError(f"loss must be one of {LOSS_KINDS}; got {loss!r}")


@dataclass(frozen=True)
class SolverEntry:
    """How the benchmark builds one solver.

    Attributes:
        label: the name used in tables and plots (``"Exponential Euler"``).
        cls: the solver class, called as ``cls(params, loss_func, **arguments(n_classes, loss))``.
        arguments: the keyword arguments of the seed benchmark for a problem with ``n_classes`` classes and the
            loss kind ``loss`` (one of :data:`LOSS_KINDS`): ``arguments(n_classes, loss)``.
        in_default_grid: whether the benchmark runs it when no ``--solvers`` are given.
    """

    label: str
    cls: type
    arguments: Callable[..., Dict[str, object]]
    in_default_grid: bool = True

    def arguments_for(self, n_classes: int, loss: str = "ce") -> Dict[str, object]:
        """``arguments(n_classes, loss)``.

        Raises:
            ValueError: ``loss`` is not one of :data:`LOSS_KINDS`.
        """
        if loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}; got {loss!r}")
        return self.arguments(n_classes, loss)

    def build(self, params, loss_func, n_classes: int, loss: str = "ce"):
        """The solver on ``params`` (updated in place) with the seed's arguments for ``n_classes`` and ``loss``
        (:meth:`arguments_for`)."""
        return self.cls(params, loss_func, **self.arguments_for(n_classes, loss))


def _exponential_euler_arguments(n_classes: int, loss: str = "ce") -> Dict[str, object]:
    return {"max_step_size": 0.01, "stiff_dim": stiff_dim(n_classes, loss)}


def _adaptive_arguments(n_classes: int, loss: str = "ce") -> Dict[str, object]:
    stiff_dim(n_classes, loss)  # checks the loss kind; the arguments do not depend on it
    return {"lr": 0.01, "warmup_iters": 10, "warmup_factor": 0.01}


def _heun(arguments: Callable[..., Dict[str, object]]) -> Callable[..., Dict[str, object]]:
    return lambda n_classes, loss="ce": {**arguments(n_classes, loss), "scheme": "heun"}


#: Solver name -> how to build it, with the seed benchmark's arguments. The ``-heun`` entries are the same solvers
#: with the exponential-Heun scheme they used before the multistep scheme (``--solvers ... exponential-euler-heun
#: adaptive-heun`` compares the two in one run).
SOLVERS: Dict[str, SolverEntry] = {
    "exponential-euler": SolverEntry("Exponential Euler", ExponentialEulerSolver, _exponential_euler_arguments),
    "adaptive": SolverEntry("Adaptive Gradient", AdaptiveGradientDescent, _adaptive_arguments),
    "exponential-euler-heun": SolverEntry("Exponential Euler (heun)", ExponentialEulerSolver,
                                          _heun(_exponential_euler_arguments), in_default_grid=False),
    "adaptive-heun": SolverEntry("Adaptive Gradient (heun)", AdaptiveGradientDescent, _heun(_adaptive_arguments),
                                 in_default_grid=False),
}
