"""Matrix-free curvature operators of the loss behind one block linear-operator protocol.

Each operator owns its per-batch product over the data loop of :class:`~exponential_euler_solver.LossFunction`
(:class:`~.base.LossOperator`). :data:`OPERATORS` names them for the solvers' ``curvature=`` option, the
eigen-tracker and the analysis; a new operator is one module with a ``LossOperator`` subclass and one line here.
"""

from .base import DenseOperator, LinearOperator, LossOperator, default_chunk_size
from .gauss_newton import GaussNewtonOperator, ResidualOperator
from .hessian import HessianOperator

__all__ = ["LinearOperator", "DenseOperator", "LossOperator", "HessianOperator", "GaussNewtonOperator",
           "ResidualOperator", "OPERATORS", "operator_class", "default_chunk_size"]

#: Curvature name -> operator class ``cls(loss, params)``.
OPERATORS = {"hessian": HessianOperator, "gn": GaussNewtonOperator, "residual": ResidualOperator}


def operator_class(curvature):
    """The operator class for ``curvature``: a name in :data:`OPERATORS` or a callable ``(loss, params) ->
    LinearOperator`` returned as it is.

    Raises:
        ValueError: an unknown name, or something that is neither a name nor callable.
    """
    if isinstance(curvature, str):
        if curvature not in OPERATORS:
            raise ValueError(f"curvature must be one of {sorted(OPERATORS)} or an operator class; got {curvature!r}")
        return OPERATORS[curvature]
    if not callable(curvature):
        raise ValueError(f"curvature must be one of {sorted(OPERATORS)} or an operator class; got {curvature!r}")
    return curvature
