"""Eigen-tracking along a trajectory: warm-started extreme eigenpairs of a curvature operator."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .._timing import clock
from ..curvature import HessianOperator, operator_class
from ..linalg import top_eigenpairs
from ..linalg.blocks import Workspace

__all__ = ["EigenTracker", "DEFAULT_EIG_TOL", "DEFAULT_EIG_MAX_ITERS", "COLD_MAX_ITERS", "LOOSE_TOL",
           "split_step_tolerances"]

DEFAULT_EIG_TOL = 1e-2   # relative residual ||Hv - lambda v|| / |lambda| that a step needs (see README)
DEFAULT_EIG_MAX_ITERS = 20
COLD_MAX_ITERS = 200
#: Relative residual that a cold start asks of the pairs a split step needs only roughly (see
#: :func:`split_step_tolerances`). It puts an eigenvalue within 10% of the Ritz value.
LOOSE_TOL = 0.1


def split_step_tolerances(tol: float, fraction: float, loose: float = LOOSE_TOL) -> Callable[[Tensor], Tensor]:
    """Cold-start tolerances for the ``k + 1`` pairs of a split step (``k`` integrated exponentially, the last
    setting the explicit part's cap ``dt <= fraction / |lambda_{k+1}|``): ``tol`` for the pairs with
    ``|lambda_i| > |lambda_{k+1}| / fraction``, ``max(tol, loose)`` for the others.

    The last pair's vector is not used, only its value; and a tracked direction with ``|lambda_i| dt <= 1`` at the
    capped step is one the explicit part integrates stably too, so an error in its vector only moves part of it
    from the exponential to the explicit part, where the error estimate sees it. What those pairs must get right
    is their magnitude, for the cap, and a residual of ``loose`` bounds that (with the margin of ``fraction``).
    Measured on the benchmark's digits (n_train 64, exponential Euler, multistep scheme): the cold start took
    15 instead of 28 products at 4 classes (the 4th pair, 396.1, next to 376) and 24 instead of 41 at 10 (pairs 6
    to 10, 263 down to 237, all within 1/0.8 of the 10th), same steps and crossing times to 0.005%.
    """
    def tolerances(theta: Tensor) -> Tensor:
        rel = torch.full_like(theta, tol)
        rel[theta.abs() <= theta[-1].abs() / fraction] = max(tol, loose)
        return rel
    return tolerances


class EigenTracker:
    """Keeps the ``n_pairs`` eigenpairs of largest magnitude of a curvature operator, warm-started from the
    previous point.

    Args:
        n_pairs: number of eigenpairs.
        tol: relative residual tolerance of each refresh.
        max_iters: LOBPCG iterations per warm refresh. A cold start (block Lanczos, see
            :func:`~exponential_euler_solver.linalg.top_eigenpairs`) gets ``COLD_MAX_ITERS``.
        seed: seed of the tracker's own RNG for the cold start (torch's global RNG is never touched).
        curvature: the operator: a name in :data:`~exponential_euler_solver.curvature.OPERATORS` (``"hessian"``,
            ``"gn"``, ``"residual"``) or a callable ``(loss, params) -> LinearOperator`` (default the Hessian).
        reuse_vectors: write each refresh's vectors over the previous ones (no new memory); False gives every
            refresh's vectors their own tensor (for reports that hand them out and must not change later).

    Attributes:
        workspace: the eigensolver's scratch blocks (:class:`~exponential_euler_solver.linalg.blocks.Workspace`),
            kept from one refresh to the next.
        cold_tol: per-pair tolerances of the cold start (see
            :func:`~exponential_euler_solver.linalg.top_eigenpairs`), set by a solver that needs some pairs only
            roughly; None: ``tol`` for each.
        values: ``(n_pairs,)`` float64 eigenvalues by decreasing magnitude (None before the first refresh).
        vectors: ``(P, n_pairs)`` eigenvectors in the parameters' dtype.
        age: accepted steps since the last refresh (the solver advances it).
        n_refreshes: refreshes so far (identifies the current basis).
        product_seconds, seconds: wall-clock seconds of the refreshes' operator products, and of the refreshes in
            all (the difference is the eigensolver's own block work).
    """

    def __init__(self, n_pairs: int, tol: float = DEFAULT_EIG_TOL, max_iters: int = DEFAULT_EIG_MAX_ITERS,
                 seed: int = 0, curvature=HessianOperator, reuse_vectors: bool = True):
        self.n_pairs = n_pairs
        self.tol = tol
        self.max_iters = max_iters
        self.operator = operator_class(curvature)
        self.generator = torch.Generator().manual_seed(seed)
        self.cold_tol: Optional[Callable[[Tensor], Tensor]] = None
        self.values: Optional[Tensor] = None
        self.vectors: Optional[Tensor] = None
        self.age = 0
        self.n_refreshes = 0
        self.product_seconds = 0.0
        self.seconds = 0.0
        self.workspace = Workspace()  # the eigensolver's blocks, kept from one refresh to the next
        self.reuse_vectors = bool(reuse_vectors)

    def refresh(self, loss, params: Tensor) -> int:
        """Recompute the eigenpairs at ``params``; returns the number of operator-vector products used."""
        cold = self.vectors is None
        start = clock(params.device)
        operator = self.operator(loss, params)
        out = None
        if self.reuse_vectors and not cold and self.vectors.T.is_contiguous():
            out = self.vectors.T  # overwritten in place: the new vectors, after the solve has read the old ones
        result = top_eigenpairs(operator, self.n_pairs, which="LM", init=self.vectors,
                                tol=self.tol, max_iters=COLD_MAX_ITERS if cold else self.max_iters,
                                generator=self.generator, cold_tol=self.cold_tol, workspace=self.workspace, out=out)
        self.seconds += clock(params.device) - start
        self.product_seconds += getattr(operator, "seconds", 0.0)
        self.values, self.vectors = result.eigenvalues, result.eigenvectors
        self.age = 0
        self.n_refreshes += 1
        return result.n_products

    def state_dict(self) -> dict:
        vectors = None if self.vectors is None else self.vectors.clone()  # the next refresh may overwrite them
        return {"values": self.values, "vectors": vectors, "age": self.age, "n_refreshes": self.n_refreshes,
                "product_seconds": self.product_seconds, "seconds": self.seconds,
                "generator": self.generator.get_state(), "tol": self.tol, "max_iters": self.max_iters}

    def load_state_dict(self, state: dict, like: Tensor) -> None:
        # On the parameters' device (a checkpoint is loaded onto the CPU); eigenvalues stay float64.
        self.values = None if state["values"] is None else state["values"].to(like.device)
        v = state["vectors"]
        self.vectors = None if v is None else v.to(device=like.device, dtype=like.dtype)
        self.age = state["age"]
        self.n_refreshes = state.get("n_refreshes", 0)
        self.product_seconds, self.seconds = state.get("product_seconds", 0.0), state.get("seconds", 0.0)
        self.generator.set_state(state["generator"])
        self.tol, self.max_iters = state["tol"], state["max_iters"]
