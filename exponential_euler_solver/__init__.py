"""Train a network along the gradient flow of its training loss, d theta/dt = -grad L(theta).

The flow of data is the layout of the package: :mod:`.loss` (data, parameter layout, value and gradient) ->
:mod:`.curvature` (operators that own their products) -> :mod:`.linalg` (the eigensolver) -> :mod:`.solvers` (a
step proposes, the controller decides) -> :mod:`.integrate` (the one driver) -> :mod:`.trajectory` and
:mod:`.checkpoint` (the record, files) -> :mod:`.fidelity`, :mod:`.analysis` and the benchmark command.
"""

from .analysis import (
                        g_eigenvector,
                        h_eigenvector,
                        loss_hessian_eigenvector,
                        make_layerwise_jacobian_function,
                        plot_eigenvalues,
                        plot_loss,
                        top_eigenvalues_along,
)
from .checkpoint import Checkpointer, load_checkpoint, resume, save_checkpoint
from .curvature import OPERATORS, DenseOperator, GaussNewtonOperator, HessianOperator, LinearOperator, ResidualOperator
from .errors import (
                        CheckpointError,
                        NonFiniteError,
                        RankDivergenceError,
                        SolverError,
                        StepRejectedError,
                        UnstableStepError,
)
from .integrate import SaveAt, Stop, integrate
from .linalg import EigenResult, top_eigenpairs
from .loss import LossFunction
from .solvers import (
                        SOLVERS,
                        AdaptiveGradientDescent,
                        ExponentialEulerSolver,
                        GradientDescent,
                        RungeKutta4Solver,
                        Solver,
                        StepReport,
)
from .trajectory import Trajectory

__version__ = "0.2.0"

__all__ = [
    "LossFunction",
    "LinearOperator", "DenseOperator", "HessianOperator", "GaussNewtonOperator", "ResidualOperator", "OPERATORS",
    "EigenResult", "top_eigenpairs", "loss_hessian_eigenvector", "g_eigenvector", "h_eigenvector",
    "Solver", "StepReport", "GradientDescent", "AdaptiveGradientDescent", "ExponentialEulerSolver",
    "RungeKutta4Solver", "SOLVERS",
    "integrate", "Stop", "SaveAt", "Trajectory",
    "SolverError", "NonFiniteError", "StepRejectedError", "UnstableStepError", "CheckpointError",
    "RankDivergenceError",
    "Checkpointer", "save_checkpoint", "load_checkpoint", "resume",
    "make_layerwise_jacobian_function", "top_eigenvalues_along", "plot_loss", "plot_eigenvalues",
]
