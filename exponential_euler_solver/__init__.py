"""Train a network along the gradient flow of its training loss, d theta/dt = -grad L(theta)."""

from .curvature import (DenseOperator, GaussNewtonOperator, HessianOperator, LinearOperator,
                        ResidualOperator)
from .eigen import EigenResult, g_eigenvector, h_eigenvector, loss_hessian_eigenvector, top_eigenpairs
from .errors import (CheckpointError, NonFiniteError, RankDivergenceError, SolverError, StepRejectedError,
                     UnstableStepError)
from .loss import LossFunction
from .solvers import (AdaptiveGradientDescent, ExponentialEulerSolver, GradientDescent, RungeKutta4Solver,
                      Solver, StepReport)
from .trajectory import Checkpointer, Trajectory, load_checkpoint, resume, save_checkpoint
from .analysis import make_layerwise_jacobian_function, plot_eigenvalues, plot_loss, top_eigenvalues_along

__version__ = "0.1.0"

__all__ = [
    "LossFunction",
    "LinearOperator", "DenseOperator", "HessianOperator", "GaussNewtonOperator", "ResidualOperator",
    "EigenResult", "top_eigenpairs", "loss_hessian_eigenvector", "g_eigenvector", "h_eigenvector",
    "Solver", "StepReport", "GradientDescent", "AdaptiveGradientDescent", "ExponentialEulerSolver",
    "RungeKutta4Solver",
    "SolverError", "NonFiniteError", "StepRejectedError", "UnstableStepError", "CheckpointError",
    "RankDivergenceError",
    "Trajectory", "Checkpointer", "save_checkpoint", "load_checkpoint", "resume",
    "make_layerwise_jacobian_function", "top_eigenvalues_along", "plot_loss", "plot_eigenvalues",
]
