"""Eigen-tracking along a trajectory: warm-started top eigenpairs of the loss Hessian."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..curvature import HessianOperator
from ..eigen import top_eigenpairs

__all__ = ["EigenTracker"]

DEFAULT_EIG_TOL = 1e-2   # relative residual ||Hv - lambda v|| / |lambda| that a step needs (see README)
DEFAULT_EIG_MAX_ITERS = 20
COLD_MAX_ITERS = 200


class EigenTracker:
    """Keeps the ``n_pairs`` Hessian eigenpairs of largest magnitude, warm-started from the previous point.

    Args:
        n_pairs: number of eigenpairs.
        tol: relative residual tolerance of each refresh.
        max_iters: LOBPCG iterations per warm refresh. A cold start (block Lanczos, see
            :func:`~exponential_euler_solver.eigen.top_eigenpairs`) gets ``COLD_MAX_ITERS``.
        seed: seed of the tracker's own RNG for the cold start (torch's global RNG is never touched).
    """

    def __init__(self, n_pairs: int, tol: float = DEFAULT_EIG_TOL, max_iters: int = DEFAULT_EIG_MAX_ITERS,
                 seed: int = 0):
        self.n_pairs = n_pairs
        self.tol = tol
        self.max_iters = max_iters
        self.generator = torch.Generator().manual_seed(seed)
        self.values: Optional[Tensor] = None
        self.vectors: Optional[Tensor] = None
        self.residuals: Optional[Tensor] = None
        self.age = 0  # accepted steps since the last refresh

    def refresh(self, loss, params: Tensor) -> int:
        """Recompute the eigenpairs at ``params``; returns the number of Hessian-vector products used."""
        op = HessianOperator(loss, params)
        cold = self.vectors is None
        result = top_eigenpairs(op, self.n_pairs, which="LM", init=self.vectors, tol=self.tol,
                                max_iters=COLD_MAX_ITERS if cold else self.max_iters, generator=self.generator)
        self.values, self.vectors, self.residuals = result.eigenvalues, result.eigenvectors, result.residual_norms
        self.age = 0
        return result.n_products

    def state_dict(self) -> dict:
        return {"values": self.values, "vectors": self.vectors, "residuals": self.residuals, "age": self.age,
                "generator": self.generator.get_state(), "tol": self.tol, "max_iters": self.max_iters}

    def load_state_dict(self, state: dict, like: Tensor) -> None:
        # On the parameters' device (a checkpoint is loaded onto the CPU); eigenvalues stay float64.
        self.values = None if state["values"] is None else state["values"].to(like.device)
        v = state["vectors"]
        self.vectors = None if v is None else v.to(device=like.device, dtype=like.dtype)
        self.residuals = None if state["residuals"] is None else state["residuals"].to(like.device)
        self.age = state["age"]
        self.generator.set_state(state["generator"])
        self.tol, self.max_iters = state["tol"], state["max_iters"]
