"""Shared machinery of the solvers that use top Hessian eigenpairs."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._validate import non_negative_int, positive_float, positive_int
from .base import Solver
from .tracking import DEFAULT_EIG_MAX_ITERS, DEFAULT_EIG_TOL, EigenTracker

__all__ = ["EigenSolverBase"]

# With error control the eigenpairs are refreshed every `default_max_eig_age` steps (a class attribute), and at
# once after a rejection (the error estimate sees stale curvature: a stiff direction that moved or a sharpness
# that grew). Measured on the benchmark (n_train 64, 2 classes, first-order steps): every step 225 HVPs, every
# 10 steps 71, same trajectory error. Without error control (rtol=None, the plain rule) they are refreshed at
# every step.
DEFAULT_MAX_EIG_AGE = 10


class EigenSolverBase(Solver):
    """A solver whose step needs the ``n_pairs`` Hessian eigenpairs of largest magnitude.

    The eigenpairs are computed at the first step (block Lanczos, see
    :func:`~exponential_euler_solver.eigen.top_eigenpairs`) and refreshed (warm-started LOBPCG to relative
    residual ``eig_tol``) at the start of a step when they are ``max_eig_age`` accepted steps old (default: 1
    without error control, else the class's ``default_max_eig_age``), and after a rejected proposal that used
    older ones; a rejection with fresh eigenpairs retries with the same ones (no new products).
    """

    default_max_eig_age = DEFAULT_MAX_EIG_AGE

    def __init__(self, params: Tensor, loss, n_pairs: int, *, warmup_iters: int = 0, warmup_factor: float = 1.0,
                 eig_tol: float = DEFAULT_EIG_TOL, eig_max_iters: int = DEFAULT_EIG_MAX_ITERS,
                 max_eig_age: Optional[int] = None, seed: int = 0, **kwargs):
        super().__init__(params, loss, **kwargs)
        self.warmup_iters = non_negative_int("warmup_iters", warmup_iters)
        self.warmup_factor = positive_float("warmup_factor", warmup_factor)
        if max_eig_age is None:
            max_eig_age = 1 if self.rtol is None else self.default_max_eig_age
        self.max_eig_age = positive_int("max_eig_age", max_eig_age)
        self.tracker = EigenTracker(n_pairs, tol=positive_float("eig_tol", eig_tol),
                                    max_iters=non_negative_int("eig_max_iters", eig_max_iters), seed=seed)

    @property
    def eigvals(self) -> Optional[Tensor]:
        """The current eigenvalue estimates (float64), ordered by decreasing magnitude."""
        return self.tracker.values

    def _refresh(self) -> None:
        self.n_hvp += self.tracker.refresh(self.loss, self.params)

    def _prepare(self) -> None:
        if self.tracker.vectors is None or self.tracker.age >= self.max_eig_age:
            self._refresh()

    def _on_reject(self) -> None:
        if self.tracker.age > 0:
            self._refresh()

    def step(self):
        report = super().step()
        report.eig_age = self.tracker.age
        self.tracker.age += 1
        return report

    def _scale(self) -> float:
        return self._warmup_scale(self.warmup_iters, self.warmup_factor)

    def _method_state(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def _load_method_state(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"], self.params)
