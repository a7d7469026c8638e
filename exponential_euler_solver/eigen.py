"""Warm-started block eigensolver for a few extreme eigenpairs of a symmetric operator.

A warm start runs LOBPCG without preconditioner (Knyazev 2001): Rayleigh-Ritz on the span of the current vectors
``X``, their residuals ``R = AX - X Theta`` and the previous search directions ``P``. A cold start runs
thick-restarted block Lanczos, whose residuals follow from the Krylov relation. Both see only the operator
protocol of :mod:`.curvature` (``matmat``, ``shape``, ``dtype``, ``device``). The projected matrices
(``S^T A S``, ``S^T S``) are summed in float64 over chunks of 16k entries whatever the operator's dtype: a
float32 reduction over millions of entries loses about three digits. LOBPCG's residual norms are computed from
the residual vectors themselves, not from projected matrices (which cancel). Eigenvalues are Ritz values, so their
signs are true signs, also when eigenvalues of opposite sign have nearly equal magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .curvature import GaussNewtonOperator, HessianOperator, ResidualOperator

__all__ = ["EigenResult", "top_eigenpairs", "loss_hessian_eigenvector", "g_eigenvector", "h_eigenvector",
           "default_tol"]

_WHICH = ("LM", "LA", "SA")
# Long reductions are split into chunks of this many entries: within a chunk the products run in the blocks' own
# dtype (a float32 dot product of 16k terms is good to ~1e-7 relative), across chunks they are summed in float64.
# A float32 reduction over all 2.6M entries at once lost ~1e-3 relative on this project's CPU; float64 products
# cost 2.5-3x the float32 ones there.
_CHUNK = 1 << 14
# Residuals are judged against max(|lambda_i|, ZERO_FLOOR * max_j |lambda_j|), so (near-)zero eigenvalues of a
# singular operator can converge.
ZERO_FLOOR = 1e-3


@dataclass
class EigenResult:
    """Result of :func:`top_eigenpairs`.

    Attributes:
        eigenvalues: ``(k,)`` float64 Ritz values, ordered as ``which`` asks (decreasing magnitude for ``'LM'``,
            decreasing for ``'LA'``, increasing for ``'SA'``).
        eigenvectors: ``(n, k)`` orthonormal Ritz vectors in the operator's dtype.
        residual_norms: ``(k,)`` float64 ``||A v_i - lambda_i v_i||`` (unit ``v_i``).
        n_products: operator-vector products made by this call.
        n_iterations: LOBPCG iterations after the initial Rayleigh-Ritz (of a cold start: Krylov restarts).
        converged: whether every residual met its tolerance (see :func:`top_eigenpairs`).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residual_norms: Tensor
    n_products: int
    n_iterations: int
    converged: bool


def default_tol(dtype: torch.dtype) -> float:
    """Default relative residual tolerance: the square root of the dtype's machine epsilon
    (3.4e-4 in float32, 1.5e-8 in float64), as :func:`torch.lobpcg` uses."""
    return math.sqrt(torch.finfo(dtype).eps)


def _gram(A: Tensor, B: Tensor) -> Tensor:
    """``A^T B`` in float64 for tall ``A``, ``B`` (one vector per column), summed over row chunks."""
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    for start in range(0, A.shape[0], _CHUNK):
        out += (A[start:start + _CHUNK].T @ B[start:start + _CHUNK]).double()
    return out


def _project(S: Tensor, AS: Tensor, m: int, ritz: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(S S^T, S AS^T)`` in float64 over the first ``m`` rows of the row blocks ``S``, ``AS`` (one vector per
    row), in one pass over column chunks.

    With ``ritz`` (``b`` values), rows ``[:b]`` are the Ritz vectors of the previous Rayleigh-Ritz: their blocks
    are ``I`` and ``diag(ritz)`` by construction (up to the rounding of the rotation that formed them), so only
    rows ``[b:m]`` are multiplied and the rest follows by symmetry."""
    b = 0 if ritz is None else ritz.shape[0]
    M = torch.zeros(m, m, dtype=torch.float64, device=S.device)
    K = torch.zeros(m, m, dtype=torch.float64, device=S.device)
    for start in range(0, S.shape[1], _CHUNK):
        s = S[b:m, start:start + _CHUNK]
        M[b:] += (s @ S[:m, start:start + _CHUNK].T).double()
        K[b:] += (s @ AS[:m, start:start + _CHUNK].T).double()
    if b:
        M[:b, :b] = torch.eye(b, dtype=torch.float64, device=S.device)
        K[:b, :b] = torch.diag(ritz)
        M[:b, b:] = M[b:, :b].T
        K[:b, b:] = K[b:, :b].T
    return M, K


def _rotate(S: Tensor, AS: Tensor, m: int, Y: Tensor, Yp: Optional[Tensor] = None) -> None:
    """In place, column chunk by column chunk (no second tall block): the Ritz vectors ``X = Y^T S[:m]`` into rows
    ``[:b]`` and the search directions ``P = Yp^T S[:m]`` into rows ``[b:b + p]`` of ``S``, the same for ``AS``.
    ``Y`` is ``(m, b)``, ``Yp`` ``(m, p)`` float64 with zero rows ``[:b]`` (directions outside the old ``X``)."""
    b = Y.shape[1]
    Yt = Y.T.to(S.dtype)
    Pt = None if Yp is None else Yp[b:].T.to(S.dtype)
    for start in range(0, S.shape[1], _CHUNK):
        cols = slice(start, start + _CHUNK)
        for A in (S, AS):
            x = Yt @ A[:m, cols]
            if Pt is not None:
                A[b:b + Pt.shape[0], cols] = Pt @ A[b:m, cols]
            A[:b, cols] = x


def _row_norms(A: Tensor) -> Tensor:
    """Euclidean norms of the rows of ``A`` in float64, summed over column chunks."""
    sq = torch.zeros(A.shape[0], dtype=torch.float64, device=A.device)
    for start in range(0, A.shape[1], _CHUNK):
        c = A[:, start:start + _CHUNK]
        sq += (c * c).sum(1).double()
    return sq.sqrt()


def _apply(S: Tensor, Y: Tensor) -> Tensor:
    """``S @ Y`` with a float64 coefficient matrix, in S's dtype."""
    return S @ Y.to(S.dtype)


def _drop_tol(dtype: torch.dtype) -> float:
    """Relative Gram eigenvalue below which a direction counts as dependent."""
    return 100 * torch.finfo(dtype).eps


def _whitener(M: Tensor, dtype: torch.dtype) -> Tensor:
    """``T`` with ``T^T M T = I`` on the numerically independent part of a float64 Gram matrix ``M``."""
    M = (M + M.T) / 2
    vals, vecs = torch.linalg.eigh(M)
    keep = vals > _drop_tol(dtype) * vals.max().clamp_min(1e-300)
    return vecs[:, keep] / vals[keep].sqrt()


def _orthonormalize(W: Tensor) -> Tensor:
    """Orthonormalise the columns of ``W``, dropping dependent directions (SVQB, Stathopoulos & Wu 2002);
    two passes for stability."""
    for _ in range(2):
        if W.shape[1] == 0:
            return W
        W = _apply(W, _whitener(_gram(W, W), W.dtype))
    return W


def _scale(theta: Tensor) -> Tensor:
    return torch.maximum(theta.abs(), ZERO_FLOOR * theta.abs().max())


def _select(values: Tensor, k: int, which: str) -> Tensor:
    if which == "LM":
        order = torch.argsort(values.abs(), descending=True, stable=True)
    elif which == "LA":
        order = torch.argsort(values, descending=True, stable=True)
    else:
        order = torch.argsort(values, descending=False, stable=True)
    return order[:k]


def _rayleigh_ritz(M: Tensor, K: Tensor, b: int, which: str, dtype: torch.dtype):
    """Ritz pairs of the pencil ``(K, M) = (S^T A S, S^T S)`` (float64), whitening ``M`` by its eigendecomposition
    so a nearly dependent basis is handled; returns the ``b`` selected values and coefficient matrix."""
    T = _whitener(M, dtype)
    C = T.T @ ((K + K.T) / 2) @ T
    values, Z = torch.linalg.eigh((C + C.T) / 2)
    idx = _select(values, b, which)
    return values[idx], T @ Z[:, idx]


def _random_columns(n: int, m: int, generator: Optional[torch.Generator], dtype: torch.dtype,
                    device: torch.device) -> Tensor:
    """``(n, m)`` standard normal starting vectors, drawn on the generator's device (torch's global RNG when
    ``generator`` is None) and moved to ``device``."""
    return torch.randn(n, m, generator=generator, dtype=dtype,
                       device=generator.device if generator is not None else "cpu").to(device)


# Vectors added to a cold start's Krylov basis per step: a block of two still finds a pair of (nearly) equal
# eigenvalues, which a single vector's Krylov space reaches only through rounding. Measured on the benchmark's
# Hessian at initialisation (n_train 64, 4 classes; Ritz residuals after 32-36 products): 2 vectors at a time
# beat 3, 4 and 6.
KRYLOV_WIDTH = 2


@dataclass
class _KrylovResult:
    theta: Tensor       # (b,) float64 Ritz values, selected and ordered by ``which``
    X: Tensor           # (min(b, basis size), n) Ritz vectors, one per row
    rnorm: Tensor       # (b,) float64 residual norms
    products: int
    restarts: int
    converged: bool


def _block_krylov(operator, k: int, b: int, which: str, tol: float, dim: int, budget: int,
                  generator: Optional[torch.Generator]) -> _KrylovResult:
    """Thick-restarted block Lanczos (Wu & Simon 2000) from ``KRYLOV_WIDTH`` random vectors: Rayleigh-Ritz on a
    Krylov basis of at most ``dim`` vectors, grown until its ``k`` wanted Ritz pairs meet ``tol`` (with at least
    ``b`` vectors in the basis) or ``budget`` products are spent. A full basis restarts from its ``b`` best Ritz
    vectors.

    Each new block is orthogonalised against the whole basis twice (classical Gram-Schmidt, float64
    coefficients), so ``A V^T = V^T T + W^T E`` holds with ``T = V A V^T`` (float64, filled as the blocks come)
    and ``W`` the orthogonalised image of the last block ``E``. The Ritz vectors' residuals follow from it without
    further products: ``A x - theta x = W^T z_E``, so ``||A x - theta x||^2 = z_E^T (W W^T) z_E``.
    It also holds after a restart, with ``T = [[diag(theta), s^T], [s, ...]]``. When ``W`` loses a direction
    (dependent on the basis) the relation would not survive the next block, so the search stops there:
    ``converged`` says whether the pairs are good, and the caller goes on with LOBPCG otherwise."""
    n, dtype, device = operator.shape[0], operator.dtype, operator.device
    rand = _random_columns(n, KRYLOV_WIDTH, generator, dtype, device)
    Q = _orthonormalize(rand)
    V = Q.new_empty(dim, n)
    T = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    lo, hi = 0, Q.shape[1]
    V[:hi] = Q.T
    del rand, Q
    products = restarts = 0
    while True:
        W = operator.matmat(V[lo:hi].T).T.contiguous()
        products += hi - lo
        C = _gram(V[:hi].T, W.T)
        W -= C.T.to(dtype) @ V[:hi]
        C2 = _gram(V[:hi].T, W.T)  # a second pass removes what rounding left of the first
        W -= C2.T.to(dtype) @ V[:hi]
        C += C2
        T[:hi, lo:hi] = C
        T[lo:hi, :hi] = C.T
        G = _gram(W.T, W.T)
        values, Z = torch.linalg.eigh((T[:hi, :hi] + T[:hi, :hi].T) / 2)
        idx = _select(values, b, which)
        theta, Z = values[idx], Z[:, idx]
        ZE = Z[lo:hi]
        rnorm = (ZE * (G @ ZE)).sum(0).clamp_min(0).sqrt()
        converged = idx.numel() >= b and not bool((rnorm[:k] > tol * _scale(theta)[:k]).any())
        whiten = _whitener(G, dtype)
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
        V[hi:hi + grow] = whiten.T.to(dtype) @ W
        lo, hi = hi, hi + grow
    return _KrylovResult(theta=theta, X=Z.T.to(dtype) @ V[:hi], rnorm=rnorm, products=products, restarts=restarts,
                        converged=converged)


def top_eigenpairs(operator, k: int, *, which: str = "LM", init: Optional[Tensor] = None,
                   tol: Optional[float] = None, max_iters: int = 100,
                   generator: Optional[torch.Generator] = None, block_size: Optional[int] = None,
                   krylov_dim: Optional[int] = None) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator: warm-started LOBPCG, or block Lanczos from cold.

    Stops when every residual satisfies ``||A v_i - lambda_i v_i|| <= tol * max(|lambda_i|, ZERO_FLOOR *
    max_j |lambda_j|)`` or after ``max_iters``
    iterations. The first Rayleigh-Ritz on ``init`` already gives true eigenpairs of the subspace; along a
    trajectory, passing the previous answer as ``init`` usually leaves one or two iterations to do.

    A cold start (no ``init``) is thick-restarted block Lanczos instead: a Krylov basis grown ``KRYLOV_WIDTH``
    random vectors at a time, up to ``krylov_dim`` vectors, restarted from its best ``block_size`` Ritz vectors
    when full. A Krylov basis keeps every direction it has seen, where LOBPCG keeps three blocks: on the
    benchmark's Hessians at initialisation (tol 1e-2) it needed 16, 34 and 50 products at 2, 4 and 10 classes
    where LOBPCG needed 28, 75 and 148. Should a block turn out dependent before the pairs converge, LOBPCG goes
    on from the Ritz vectors.

    Args:
        operator: an object with ``shape``, ``dtype``, ``device`` and ``matmat(X)`` for ``X`` of shape (n, m).
        k: number of eigenpairs, ``1 <= k < n``.
        which: ``'LM'`` largest magnitude (default), ``'LA'`` largest algebraic, ``'SA'`` smallest algebraic.
        init: ``(n,)`` or ``(n, j)`` starting vectors. Missing columns (``j < k``) are filled with random ones
            from ``generator``; extra columns are used too (a larger search block).
        tol: relative residual tolerance; default :func:`default_tol` of the operator's dtype.
        max_iters: maximum number of LOBPCG iterations after the initial Rayleigh-Ritz. A cold start makes at
            most ``(max_iters + 1) * block_size`` products, as many as LOBPCG could.
        generator: RNG for random starting columns (default: torch's global RNG).
        block_size: number of vectors iterated, ``>= k``; the ``block_size - k`` extra ("guard") vectors are
            not checked for convergence but keep the method from settling on an eigenpair that is not among
            the ``k`` wanted ones (a residual test alone cannot tell). Default ``k + max(2, k // 2)``, or
            ``j`` when ``init`` has ``j >= k`` columns (a warm start needs no guard to stay put).
        krylov_dim: largest Krylov basis of a cold start, in vectors; ``0`` starts LOBPCG from random vectors.
            Default ``6 * block_size``: the memory of LOBPCG's own blocks (``S`` and ``AS``, ``3 * block_size``
            rows each).

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: ``k``, ``which``, ``tol``, ``max_iters``, ``block_size``, ``krylov_dim`` or ``init`` out of
            range.
    """
    n = operator.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an int with 1 <= k < {n} (the operator's size); got {k!r}")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}; got {which!r}")
    if tol is None:
        tol = default_tol(operator.dtype)
    if not tol > 0:
        raise ValueError(f"tol must be positive; got {tol!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"max_iters must be a non-negative int; got {max_iters!r}")
    dtype, device = operator.dtype, operator.device
    if init is not None:
        init = init.unsqueeze(1) if init.ndim == 1 else init
        if init.ndim != 2 or init.shape[0] != n:
            raise ValueError(f"init must have shape ({n},) or ({n}, j); got {tuple(init.shape)}")
    if block_size is None:
        warm = init is not None and init.shape[1] >= k
        block_size = init.shape[1] if warm else k + max(2, k // 2)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < k:
        raise ValueError(f"block_size must be an int >= k = {k}; got {block_size!r}")
    block_size = min(block_size, n - 1)
    if krylov_dim is None:
        krylov_dim = 6 * block_size
    if isinstance(krylov_dim, bool) or not isinstance(krylov_dim, int) or krylov_dim < 0:
        raise ValueError(f"krylov_dim must be a non-negative int; got {krylov_dim!r}")
    krylov_dim = min(krylov_dim, n)
    start_products = operator.n_products if hasattr(operator, "n_products") else None
    products = 0

    if init is None and krylov_dim >= block_size + KRYLOV_WIDTH:
        budget = (max_iters + 1) * block_size
        start = _block_krylov(operator, k, block_size, which, tol, krylov_dim, budget, generator)
        products += start.products
        if start.converged or products + block_size > budget:
            return _result(operator, start_products, products, start.theta[:k], start.X[:k], start.rnorm[:k],
                           start.restarts, tol)
        # A block turned out dependent first (the Krylov space is invariant in some direction): LOBPCG goes on
        # from the Ritz vectors, within what is left of the budget.
        init = start.X.T
        max_iters = (budget - products) // block_size - 1
        del start

    columns = []
    if init is not None:
        columns.append(init.detach().to(dtype=dtype, device=device))
    n_init = columns[0].shape[1] if columns else 0
    if n_init < block_size:
        columns.append(_random_columns(n, block_size - n_init, generator, dtype, device))
    X = torch.cat(columns, dim=1) if len(columns) > 1 else columns[0].clone()
    X = _orthonormalize(X[:, :max(block_size, n_init)])
    if X.shape[1] < k:
        raise ValueError(f"init must have {k} linearly independent columns; got rank {X.shape[1]}")

    # The basis lives in row blocks, one vector per row (contiguous): S = [X; P; W] and AS = A S, at most 3b
    # rows each. Ritz vectors and search directions are formed in place; of the (m, m) projections S S^T and
    # S AS^T (float64) only the rows of P and W are multiplied out: no tall temporary and no (AS)(AS)^T.
    b = X.shape[1]
    S = X.new_empty(3 * b, n)
    AS = X.new_empty(3 * b, n)
    S[:b] = X.T
    AS[:b] = operator.matmat(X).T
    products += b
    del X
    theta = None
    n_dirs, m, iters = 0, b, 0
    while True:
        M, K = _project(S, AS, m, theta)
        theta, Y = _rayleigh_ritz(M, K, b, which, dtype)
        Yp = None
        if iters > 0:
            # LOBPCG's search directions: the part of the new Ritz vectors outside the old ones, whitened.
            Yp = Y.clone()
            Yp[:b] = 0
            Yp = Yp @ _whitener(Yp.T @ M @ Yp, dtype)
            n_dirs = Yp.shape[1]
        _rotate(S, AS, m, Y, Yp)
        R = torch.addcmul(AS[:b], S[:b], -theta.to(dtype)[:, None])
        rnorm = _row_norms(R)
        active = rnorm > tol * _scale(theta)
        if not bool(active[:k].any()) or iters >= max_iters:
            break
        iters += 1
        # Residuals are orthogonal to the Ritz vectors; normalised, they need no further orthogonalisation:
        # the Rayleigh-Ritz whitens the whole basis with its float64 Gram matrix.
        idx = active.nonzero()[:, 0]
        lo, m = b + n_dirs, b + n_dirs + idx.numel()
        S[lo:m] = R[idx] / rnorm[idx].to(dtype)[:, None]
        del R
        AS[lo:m] = operator.matmat(S[lo:m].T).T
        products += m - lo

    return _result(operator, start_products, products, theta[:k], S[:k], rnorm[:k], iters, tol)


def _result(operator, start_products: Optional[int], products: int, theta: Tensor, X: Tensor, rnorm: Tensor,
            iters: int, tol: float) -> EigenResult:
    """The wanted pairs from rows ``X`` (orthonormal up to rounding in the operator's dtype), renormalised."""
    norms = _row_norms(X)
    X = (X / norms.to(X.dtype)[:, None]).T.contiguous()
    rnorm = rnorm / norms
    if start_products is not None:
        products = operator.n_products - start_products
    return EigenResult(eigenvalues=theta, eigenvectors=X, residual_norms=rnorm, n_products=products,
                       n_iterations=iters, converged=bool((rnorm <= tol * _scale(theta)).all()))


def _seed_helper(operator_cls, loss, params: Tensor, n: int, max_iters: int, tol: Optional[float],
                 init_eigvecs: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    result = top_eigenpairs(operator_cls(loss, params), n, which="LM", init=init_eigvecs, tol=tol,
                            max_iters=max_iters)
    return result.eigenvalues, result.eigenvectors


def loss_hessian_eigenvector(loss, params: Tensor, n: int = 1, max_iters: int = 100, tol: Optional[float] = None,
                             init_eigvecs: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The ``n`` eigenpairs of largest magnitude of the loss Hessian at ``params``.

    Args:
        loss: a :class:`~exponential_euler_solver.LossFunction`.
        params: flat parameters.
        n: number of eigenpairs.
        max_iters: LOBPCG iterations at most.
        tol: relative residual tolerance (default from the dtype, see :func:`default_tol`).
        init_eigvecs: ``(P, j)`` starting vectors, e.g. a previous answer.

    Returns:
        ``(eigvals, eigvecs)``: ``(n,)`` float64 values ordered by decreasing magnitude, ``(P, n)`` vectors.
    """
    return _seed_helper(HessianOperator, loss, params, n, max_iters, tol, init_eigvecs)


def g_eigenvector(loss, params: Tensor, n: int = 1, max_iters: int = 100, tol: Optional[float] = None,
                  init_eigvecs: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """As :func:`loss_hessian_eigenvector`, for the Gauss-Newton matrix G."""
    return _seed_helper(GaussNewtonOperator, loss, params, n, max_iters, tol, init_eigvecs)


def h_eigenvector(loss, params: Tensor, n: int = 1, max_iters: int = 100, tol: Optional[float] = None,
                  init_eigvecs: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """As :func:`loss_hessian_eigenvector`, for the residual H = Hessian - G."""
    return _seed_helper(ResidualOperator, loss, params, n, max_iters, tol, init_eigvecs)
