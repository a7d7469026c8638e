"""Shared machinery of the solvers that use extreme eigenpairs of the curvature: tracking and warmup."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._validate import non_negative_int, positive_float, positive_int
from ..curvature import HessianOperator
from .base import Solver
from .tracking import DEFAULT_EIG_MAX_ITERS, DEFAULT_EIG_TOL, EigenTracker

__all__ = ["EigenSolverBase", "DEFAULT_MAX_EIG_AGE"]

# With error control the eigenpairs are refreshed every `default_max_eig_age` steps (a class attribute), and at
# once after a rejection (the error estimate sees stale curvature: a stiff direction that moved or a sharpness
# that grew). Measured on the benchmark (n_train 64, 2 classes, first-order steps): every step 225 HVPs, every
# 10 steps 71, same trajectory error. Without error control (rtol=None, the plain rule) they are refreshed at
# every step.
DEFAULT_MAX_EIG_AGE = 10


class EigenSolverBase(Solver):
    """A solver whose step needs the ``n_pairs`` eigenpairs of largest magnitude of the curvature.

    The eigenpairs are computed at the first step (block Lanczos, see
    :func:`~exponential_euler_solver.linalg.top_eigenpairs`) and refreshed (warm-started LOBPCG to relative
    residual ``eig_tol``) at the start of a step when they are ``max_eig_age`` accepted steps old (default: 1
    without error control, else the class's ``default_max_eig_age``), and after a rejected proposal that used
    older ones; a rejection with fresh eigenpairs retries with the same ones (no new products).

    Args:
        params, loss: as :class:`~exponential_euler_solver.solvers.base.Solver`.
        n_pairs: eigenpairs tracked.
        warmup_iters: steps during which the method's step limit is scaled by ``warmup_factor``.
        warmup_factor: that scale, > 0.
        eig_tol: relative residual tolerance of each refresh.
        eig_max_iters: LOBPCG iterations per warm refresh.
        max_eig_age: accepted steps between refreshes (see above).
        seed: seed of the eigen-tracker's own RNG (cold start).
        curvature: the operator whose eigenpairs are tracked: ``"hessian"`` (default), ``"gn"`` (Gauss-Newton),
            ``"residual"`` or a callable ``(loss, params) -> LinearOperator``
            (see :mod:`exponential_euler_solver.curvature`).
        **kwargs: :class:`~exponential_euler_solver.solvers.base.Solver` options.
    """

    default_max_eig_age = DEFAULT_MAX_EIG_AGE

    def __init__(self, params: Tensor, loss, n_pairs: int, *, warmup_iters: int = 0, warmup_factor: float = 1.0,
                 eig_tol: float = DEFAULT_EIG_TOL, eig_max_iters: int = DEFAULT_EIG_MAX_ITERS,
                 max_eig_age: Optional[int] = None, seed: int = 0, curvature=HessianOperator, **kwargs):
        super().__init__(params, loss, **kwargs)
        self.warmup_iters = non_negative_int("warmup_iters", warmup_iters)
        self.warmup_factor = positive_float("warmup_factor", warmup_factor)
        if max_eig_age is None:
            max_eig_age = 1 if self.rtol is None else self._default_max_eig_age()
        self.max_eig_age = positive_int("max_eig_age", max_eig_age)
        self.tracker = EigenTracker(n_pairs, tol=positive_float("eig_tol", eig_tol),
                                    max_iters=non_negative_int("eig_max_iters", eig_max_iters), seed=seed,
                                    curvature=curvature, reuse_vectors=not self.report_eigvecs)

    @property
    def eigvals(self) -> Optional[Tensor]:
        """The current eigenvalue estimates (float64), ordered by decreasing magnitude."""
        return self.tracker.values

    def _curvature_seconds(self) -> tuple[float, float]:
        return self.tracker.product_seconds, self.tracker.seconds - self.tracker.product_seconds

    def _scale(self) -> float:
        """The warmup factor of the current step: ``warmup_factor`` during the first ``warmup_iters`` steps."""
        return self.warmup_factor if self.n_steps < self.warmup_iters else 1.0

    def _default_max_eig_age(self) -> int:
        return self.default_max_eig_age

    def _refresh(self) -> None:
        self.n_hvp += self.tracker.refresh(self.loss, self.params)

    def _refresh_due(self) -> bool:
        """Whether the eigenpairs are to be refreshed before this step: none yet, or ``max_eig_age`` steps old."""
        return self.tracker.vectors is None or self.tracker.age >= self.max_eig_age

    def _prepare(self) -> None:
        if self._refresh_due():
            self._refresh()

    def _on_reject(self, finite: bool, decreased: bool, ratio: Optional[float]) -> None:
        if self.tracker.age > 0:
            self._refresh()

    def step(self):
        report = super().step()
        report.eig_age = self.tracker.age
        self.tracker.age += 1
        return report

    def _method_state(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def _load_method_state(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"], self.params)
