"""The solvers by name, with the seed benchmark's arguments: the one list the benchmark command, its comparison
with stable-solvers and its fidelity harness read. Adding a solver is one module and one line here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

from .exponential_euler import ExponentialEulerSolver
from .gradient_descent import AdaptiveGradientDescent

__all__ = ["SolverEntry", "SOLVERS"]


@dataclass(frozen=True)
class SolverEntry:
    """How the benchmark builds one solver.

    Attributes:
        label: the name used in tables and plots (``"Exponential Euler"``).
        cls: the solver class, called as ``cls(params, loss_func, **arguments(n_classes))``.
        arguments: the keyword arguments of the seed benchmark for a problem with ``n_classes`` classes.
        in_default_grid: whether the benchmark runs it when no ``--solvers`` are given.
    """

    label: str
    cls: type
    arguments: Callable[[int], Dict[str, object]]
    in_default_grid: bool = True

    def build(self, params, loss_func, n_classes: int):
        """The solver on ``params`` (updated in place) with the seed's arguments."""
        return self.cls(params, loss_func, **self.arguments(n_classes))


#: Solver name -> how to build it, with the seed benchmark's arguments.
SOLVERS: Dict[str, SolverEntry] = {
    "exponential-euler": SolverEntry(
        "Exponential Euler", ExponentialEulerSolver,
        lambda n_classes: {"max_step_size": 0.01, "stiff_dim": n_classes - 1}),
    "adaptive": SolverEntry(
        "Adaptive Gradient", AdaptiveGradientDescent,
        lambda n_classes: {"lr": 0.01, "warmup_iters": 10, "warmup_factor": 0.01}),
}
