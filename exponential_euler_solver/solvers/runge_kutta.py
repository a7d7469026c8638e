"""Classical fourth-order Runge-Kutta on the gradient flow: the reference integrator."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from .._validate import positive_float
from .base import Proposal
from .eigen_based import EigenSolverBase

__all__ = ["RungeKutta4Solver"]


class RungeKutta4Solver(EigenSolverBase):
    """Classical RK4 on ``d theta/dt = -grad L`` with ``dt = min(max_step_size, alpha / |lambda_1|)``.

    ``lambda_1`` (largest magnitude) is tracked with the warm-started eigensolver, refreshed every step. Each
    step costs four gradient evaluations: the stages ``k2``, ``k3``, ``k4`` and the gradient at the candidate,
    which is the next step's ``k1``. The integrator the edge-of-stability literature uses to approximate gradient
    flow; halve ``alpha`` until the answer stops moving. It has no error estimate: the step size is set by
    ``alpha`` alone (``rtol`` is refused). ``params`` is updated in place.

    Args:
        params: flat parameters (updated in place).
        loss: the :class:`~exponential_euler_solver.LossFunction`.
        max_step_size: the largest step, > 0.
        alpha: the step in units of ``1/|lambda_1|``, > 0 (RK4's stability interval on the real axis is
            about 2.79).
        **kwargs: see :class:`~exponential_euler_solver.solvers.eigen_based.EigenSolverBase` (not ``rtol``).

    Raises:
        ValueError: a non-positive ``max_step_size`` or ``alpha``, or an ``rtol`` other than None.
    """

    order = 4

    def __init__(self, params: Tensor, loss, max_step_size: float, alpha: float = 1.0, **kwargs):
        rtol = kwargs.pop("rtol", None)
        if rtol is not None:
            raise ValueError(f"rtol must be None for RungeKutta4Solver: it has no error estimate, its step is "
                             f"min(max_step_size, alpha / |lambda_1|) (make alpha smaller instead); got {rtol!r}")
        super().__init__(params, loss, 1, rtol=None, **kwargs)
        self.max_step_size = positive_float("max_step_size", max_step_size)
        self.alpha = positive_float("alpha", alpha)

    @property
    def sharpness(self) -> Optional[float]:
        return None if self.tracker.values is None else abs(float(self.tracker.values[0]))

    def _max_dt(self) -> float:
        cap = math.inf if self.sharpness == 0 else self.alpha / self.sharpness
        return min(self._scale() * self.max_step_size, cap)

    def _propose(self, dt: float) -> Proposal:
        theta, k1 = self.params, self._grad
        k2 = self._evaluate(theta - (dt / 2) * k1)[1]
        k3 = self._evaluate(theta - (dt / 2) * k2)[1]
        k4 = self._evaluate(theta - dt * k3)[1]
        return Proposal(delta=-(dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4))

    def _report_extras(self) -> dict:
        return {"sharpness": self.sharpness}
