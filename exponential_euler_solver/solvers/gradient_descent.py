"""Gradient descent and adaptive gradient descent."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._validate import positive_float
from .base import Solver
from .exponential_euler import MULTISTEP_MOMENTUM, SplitSteps, StiffSplitSolver
from .tracking import EigenTracker

__all__ = ["GradientDescent", "AdaptiveGradientDescent"]


class GradientDescent(SplitSteps, Solver):
    """Gradient descent at a fixed step: ``theta <- theta - lr * grad L(theta)``; ``t`` advances by ``lr``.

    Plain gradient descent by default (``rtol=None, monotone=False``), e.g. to study the edge of stability.
    With ``rtol`` the step is Heun's (``corrector``, see
    :class:`~exponential_euler_solver.solvers.exponential_euler.SplitSteps`) and dt is error-controlled, never
    above ``lr``. ``params`` is updated in place by ``step()``.

    Args:
        params: flat parameters (updated in place).
        loss: the :class:`~exponential_euler_solver.LossFunction`.
        lr: the step size, > 0.
        rtol: with a value, dt is error-controlled (never above ``lr``).
        monotone: reject steps that raise the loss.
        corrector: Heun's step; default: on when ``rtol`` is given.
        error_if_unstable: compute |lambda_1| at each step and raise when ``lr * |lambda_1| > 2``.
        **kwargs: see :class:`~exponential_euler_solver.solvers.base.Solver`.
    """

    def __init__(self, params: Tensor, loss, lr: float, *, rtol: Optional[float] = None, monotone: bool = False,
                 corrector: Optional[bool] = None, **kwargs):
        super().__init__(params, loss, rtol=rtol, monotone=monotone, **kwargs)
        self.lr = positive_float("lr", lr)
        self.corrector = (self.rtol is not None) if corrector is None else bool(corrector)
        self._tracker = EigenTracker(1) if self.error_if_unstable else None

    def _prepare(self) -> None:
        if self._tracker is not None:
            self.n_hvp += self._tracker.refresh(self.loss, self.params)

    def _stability_curvature(self) -> Optional[float]:
        return None if self._tracker is None else abs(float(self._tracker.values[0]))

    def _curvature_seconds(self) -> tuple[float, float]:
        if self._tracker is None:
            return 0.0, 0.0
        return self._tracker.product_seconds, self._tracker.seconds - self._tracker.product_seconds

    def _max_dt(self) -> float:
        return self.lr

    def _method_state(self) -> dict:
        return {} if self._tracker is None else {"tracker": self._tracker.state_dict()}

    def _load_method_state(self, state: dict) -> None:
        if self._tracker is not None and "tracker" in state:
            self._tracker.load_state_dict(state["tracker"], self.params)


class AdaptiveGradientDescent(StiffSplitSolver):
    """Gradient descent with ``dt = min(s * lr, 1 / |lambda_1|)``.

    ``lambda_1`` is the Hessian eigenvalue of largest magnitude at the current point, ``s = warmup_factor``
    during the first ``warmup_iters`` steps and 1 after: the ``k = 0`` case of
    :class:`~exponential_euler_solver.solvers.exponential_euler.StiffSplitSolver`. With error control (``rtol``,
    default ``"auto"``) dt may be smaller still. Under the default multistep scheme the step is the second-order
    two-step one with ``momentum``
    (:data:`~exponential_euler_solver.solvers.exponential_euler.MULTISTEP_MOMENTUM`, 0.25; see
    :class:`~exponential_euler_solver.solvers.exponential_euler.StiffSplitSolver`), one gradient per step and
    stable for ``dt |lambda_1| < 1.25``, so its cap is the rule's ``1 / |lambda_1|`` itself
    (``stability_fraction`` 1). With ``scheme="heun"`` the step is Heun's, ``theta - (dt/2) (g + g*)`` with
    ``g*`` the gradient at the plain step's point, and the correction's norm ``(dt/2) ||g* - g||`` is kept below
    ``rtol * ||theta_new - theta||``. ``rtol=None`` gives the plain rule. ``params`` is updated in place.

    Args:
        params: flat parameters (updated in place).
        loss: the :class:`~exponential_euler_solver.LossFunction`.
        lr: the largest step size, > 0.
        warmup_iters: number of initial steps with the reduced cap ``warmup_factor * lr``.
        warmup_factor: the factor ``s`` during warmup, > 0.
        rtol: relative local error per step, or None.
        **kwargs: see :class:`~exponential_euler_solver.solvers.exponential_euler.StiffSplitSolver`.

    The report's ``sharpness`` is ``|lambda_1|``.
    """

    default_momentum = MULTISTEP_MOMENTUM

    def __init__(self, params: Tensor, loss, lr: float, warmup_iters: int = 0, warmup_factor: float = 1.0, *,
                 rtol="auto", **kwargs):
        super().__init__(params, loss, 0, warmup_iters=warmup_iters, warmup_factor=warmup_factor, rtol=rtol,
                         **kwargs)
        self.lr = positive_float("lr", lr)

    @property
    def sharpness(self) -> Optional[float]:
        return None if self.tracker.values is None else abs(float(self.tracker.values[0]))

    def _step_limit(self) -> float:
        return self.lr

    def _report_extras(self) -> dict:
        extras = {"sharpness": self.sharpness}
        if self.report_eigvecs:
            extras["eigvecs"] = self.tracker.vectors
        return extras
