"""Gradient-flow solvers: a step proposes, the controller decides."""

from .base import Solver, StepReport
from .exponential_euler import ExponentialEulerSolver
from .gradient_descent import AdaptiveGradientDescent, GradientDescent
from .runge_kutta import RungeKutta4Solver

__all__ = ["Solver", "StepReport", "GradientDescent", "AdaptiveGradientDescent", "ExponentialEulerSolver",
           "RungeKutta4Solver"]
