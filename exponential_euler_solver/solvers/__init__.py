"""Gradient-flow solvers: a step proposes, the controller decides (the contract: :mod:`.base`)."""

from .base import Proposal, Solver, StepReport
from .control import StepSizeController
from .exponential_euler import ExponentialEulerSolver, SplitSteps, StiffSplitSolver
from .gradient_descent import AdaptiveGradientDescent, GradientDescent
from .registry import SOLVERS, SolverEntry
from .runge_kutta import RungeKutta4Solver
from .tracking import EigenTracker

__all__ = ["Solver", "StepReport", "Proposal", "StepSizeController", "EigenTracker", "SplitSteps",
           "StiffSplitSolver", "GradientDescent", "AdaptiveGradientDescent", "ExponentialEulerSolver",
           "RungeKutta4Solver", "SOLVERS", "SolverEntry"]
