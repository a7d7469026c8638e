"""Thick-restarted block Lanczos: the cold start of the eigensolver (no previous vectors to start from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .blocks import Workspace, gram, orthonormalize, random_columns, row_norms, scratch_rows, whitener
from .select import select, thresholds

__all__ = ["KRYLOV_WIDTH", "KrylovResult", "block_krylov"]

# Vectors added to a cold start's Krylov basis per step. One vector (plain Lanczos with full reorthogonalisation)
# reaches twice the Krylov degree of a block of two for the same products: measured on the benchmark's Hessians at
# initialisation (digits, tol 1e-2, same eigenvalues found), 6 / 23 / 38 / 35 products at 64x2 / 64x4 / 64x10 /
# 256x10 against 16 / 34 / 50 / 56 with two (which beat 3, 4 and 6). A single vector finds only one copy of an
# exactly repeated eigenvalue; the top of a network Hessian at a random point has none, and pairs of nearly equal
# magnitude and opposite sign (-414.6 and 413.9 at 64x4) are found.
KRYLOV_WIDTH = 1
# After its three-term part is removed, a new block is orthogonalised against the whole basis once, and a second
# time only when that pass removed most of a vector: its norm fell below this fraction of what it was (the
# criterion of Daniel, Gragg, Kaufman and Stewart 1976, with Kahan's 1/sqrt(2)).
REORTHOGONALIZE_BELOW = 2 ** -0.5


@dataclass
class KrylovResult:
    """What :func:`block_krylov` found.

    Attributes:
        theta: ``(b,)`` float64 Ritz values, selected and ordered by ``which``.
        X: ``(min(b, basis size), n)`` Ritz vectors, one per row.
        rnorm: ``(b,)`` float64 residual norms.
        products: operator-vector products made.
        restarts: thick restarts.
        converged: whether the ``k`` wanted pairs met the tolerance.
    """

    theta: Tensor
    X: Tensor
    rnorm: Tensor
    products: int
    restarts: int
    converged: bool


def block_krylov(operator, k: int, b: int, which: str, tol: Union[float, Callable[[Tensor], Tensor]], dim: int,
                 budget: int,
                 generator: Optional[torch.Generator], start: Optional[Tensor] = None,
                 workspace: Optional[Workspace] = None) -> KrylovResult:
    """Thick-restarted block Lanczos (Wu & Simon 2000) from ``KRYLOV_WIDTH`` random vectors (or ``start``, an
    ``(n, w)`` block): Rayleigh-Ritz on a
    Krylov basis of at most ``dim`` vectors, grown until its ``k`` wanted Ritz pairs meet ``tol`` (with at least
    ``b`` vectors in the basis) or ``budget`` products are spent. A full basis restarts from its ``b`` best Ritz
    vectors. ``tol`` is a relative residual tolerance, or a callable giving one per pair from the ``k`` wanted
    Ritz values (float64, ordered by ``which``).

    Each new block is orthogonalised against the blocks it couples to, then against the whole basis (classical
    Gram-Schmidt, float64 coefficients; a second full pass only when needed, see :data:`REORTHOGONALIZE_BELOW`),
    so ``A V^T = V^T T + W^T E`` holds with ``T = V A V^T`` (float64, filled as the blocks come) and ``W`` the
    orthogonalised image of the last block ``E``. The Ritz vectors' residuals follow from it without further
    products: ``A x - theta x = W^T z_E``, so ``||A x - theta x||^2 = z_E^T (W W^T) z_E``.
    It also holds after a restart, with ``T = [[diag(theta), s^T], [s, ...]]``. When ``W`` loses a direction
    (dependent on the basis) the relation would not survive the next block, so the search stops there:
    ``converged`` says whether the pairs are good, and the caller goes on with LOBPCG otherwise. The basis is
    kept in ``workspace`` when one is given."""
    n, dtype, device = operator.shape[0], operator.dtype, operator.device
    rand = random_columns(n, KRYLOV_WIDTH, generator, dtype, device) if start is None else start.to(dtype)
    Q = orthonormalize(rand)
    # The basis and, after it, the rows of the next block's image (written in place: no new memory per block).
    rows = scratch_rows(workspace, dim + Q.shape[1], Q[:, 0])
    V, image = rows[:dim], rows[dim:]
    T = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    lo, hi = 0, Q.shape[1]
    V[:hi] = Q.T
    del rand, Q
    products = restarts = 0
    near = 0  # first row of the blocks the new one couples to in exact arithmetic (the last two; after a restart,
    #           the Ritz block too)
    while True:
        W = image[:hi - lo]
        operator.matmat(V[lo:hi].T, out=W.T)
        products += hi - lo
        # The three-term part first, on the few rows the image really lies along, then one pass over the whole
        # basis for what rounding spread elsewhere, and a second only when that pass removed most of a vector.
        C = torch.zeros(hi, W.shape[0], dtype=torch.float64, device=device)
        C[near:hi] = gram(V[near:hi].T, W.T)
        W.addmm_(C[near:hi].T.to(dtype), V[near:hi], alpha=-1)
        before = row_norms(W)
        for _ in range(2):
            C_pass = gram(V[:hi].T, W.T)
            W.addmm_(C_pass.T.to(dtype), V[:hi], alpha=-1)
            C += C_pass
            G = gram(W.T, W.T)
            if not bool((G.diagonal().clamp_min(0).sqrt() < REORTHOGONALIZE_BELOW * before).any()):
                break
            before = G.diagonal().clamp_min(0).sqrt()
        T[:hi, lo:hi] = C
        T[lo:hi, :hi] = C.T
        values, Z = torch.linalg.eigh((T[:hi, :hi] + T[:hi, :hi].T) / 2)
        idx = select(values, b, which)
        theta, Z = values[idx], Z[:, idx]
        ZE = Z[lo:hi]
        rnorm = (ZE * (G @ ZE)).sum(0).clamp_min(0).sqrt()
        converged = idx.numel() >= b and not bool((rnorm[:k] > thresholds(theta, k, tol)).any())
        whiten = whitener(G, dtype)
        grow = whiten.shape[1]
        if converged or grow < W.shape[0] or products + grow > budget:
            break
        if hi + grow > dim:  # thick restart: keep the Ritz vectors, couple them to the next block
            V[:b] = Z.T.to(dtype) @ V[:hi]
            T.zero_()
            T[:b, :b] = torch.diag(theta)
            coupling = whiten.T @ G @ ZE
            T[b:b + grow, :b] = coupling
            T[:b, b:b + grow] = coupling.T
            hi = b
            restarts += 1
            lo = 0
        torch.mm(whiten.T.to(dtype), W, out=V[hi:hi + grow])
        near, lo, hi = lo, hi, hi + grow
    return KrylovResult(theta=theta, X=Z.T.to(dtype) @ V[:hi], rnorm=rnorm, products=products, restarts=restarts,
                        converged=converged)
