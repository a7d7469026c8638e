"""The front end of the eigensolver: a few extreme eigenpairs of a symmetric block operator.

A warm start (previous vectors given) runs LOBPCG (:mod:`.lobpcg`); a cold start runs thick-restarted block
Lanczos (:mod:`.lanczos`), whose residuals follow from the Krylov relation. Both see only the operator protocol of
:mod:`exponential_euler_solver.curvature` (``matmat``, ``shape``, ``dtype``, ``device``). The projected matrices are
summed in float64 over chunks whatever the operator's dtype (:mod:`.blocks`). Eigenvalues are Ritz values, so
their signs are true signs, also when eigenvalues of opposite sign have nearly equal magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .blocks import Workspace, gram, orthonormalize, random_columns, row_norms
from .lanczos import KRYLOV_WIDTH, block_krylov
from .lobpcg import LOBPCG
from .select import WHICH, scaled, select, thresholds

__all__ = ["EigenResult", "top_eigenpairs", "default_tol"]

# Starting vectors whose Gram matrix is this close to the identity are used as they are.
WARM_ORTHO_TOL = 1e-5


@dataclass
class EigenResult:
    """Result of :func:`top_eigenpairs`.

    Attributes:
        eigenvalues: ``(k,)`` float64 Ritz values, ordered as ``which`` asks (decreasing magnitude for ``'LM'``,
            decreasing for ``'LA'``, increasing for ``'SA'``).
        eigenvectors: ``(n, k)`` orthonormal Ritz vectors in the operator's dtype.
        residual_norms: ``(k,)`` float64 ``||A v_i - lambda_i v_i||`` (unit ``v_i``). After a cold start they come
            from the Krylov relation, so below what a vector of the operator's dtype can represent (about
            ``eps * |lambda_i| * sqrt(n)``) they understate the residual of the vectors as stored.
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


def _check_int(name: str, value, low: int, rule: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be {rule}; got {value!r}")
    return value


def top_eigenpairs(operator, k: int, *, which: str = "LM", init: Optional[Tensor] = None,
                   tol: Optional[float] = None, max_iters: int = 100,
                   generator: Optional[torch.Generator] = None, block_size: Optional[int] = None,
                   krylov_dim: Optional[int] = None,
                   cold_tol: Optional[Callable[[Tensor], Tensor]] = None,
                   workspace: Optional[Workspace] = None, out: Optional[Tensor] = None) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator: warm-started LOBPCG, or block Lanczos from cold.

    Stops when every residual satisfies ``||A v_i - lambda_i v_i|| <= tol * max(|lambda_i|, ZERO_FLOOR *
    max_j |lambda_j|)`` or after ``max_iters`` iterations. The first Rayleigh-Ritz on ``init`` already gives true
    eigenpairs of the subspace; along a trajectory, passing the previous answer as ``init`` usually leaves one or
    two iterations to do.

    A cold start (no ``init``) is thick-restarted Lanczos instead: a Krylov basis grown ``KRYLOV_WIDTH`` random
    vector(s) at a time, up to ``krylov_dim`` vectors, restarted from its best ``block_size`` Ritz vectors when full.
    A Krylov basis keeps every direction it has seen, where LOBPCG keeps three blocks: on the benchmark's Hessians
    at initialisation (digits, tol 1e-2) it needs 6, 23 and 38 products at 2, 4 and 10 classes (n_train 64) where
    LOBPCG needed 28, 75 and 148. Should the Krylov space turn out invariant before the pairs converge, LOBPCG goes
    on from the Ritz vectors.

    For ``k = n`` (the whole spectrum) the operator is materialised with ``n`` products and decomposed densely.

    Args:
        operator: an object with ``shape``, ``dtype``, ``device`` and ``matmat(X)`` for ``X`` of shape (n, m).
        k: number of eigenpairs, ``1 <= k <= n``.
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
        cold_tol: the cold start's relative tolerance per pair, from the ``k`` wanted Ritz values (float64, ordered
            by ``which``) to a ``(k,)`` tensor, when some pairs need less than ``tol`` (e.g. a pair of which only
            the eigenvalue is used); default ``tol`` for each. ``converged`` is then judged by it.
        krylov_dim: largest Krylov basis of a cold start, in vectors; ``0`` starts LOBPCG from random vectors.
            Default ``6 * block_size``: the memory of LOBPCG's own blocks (``S`` and ``AS``, ``3 * block_size``
            rows each).
        workspace: a :class:`~.blocks.Workspace` for the Krylov basis and LOBPCG's blocks, kept by a caller that
            solves again and again (an eigen-tracker); default: new blocks. The returned vectors never live in it.
        out: a contiguous ``(k, n)`` tensor to write the eigenvectors into (the result's ``eigenvectors`` is then
            ``out.T``); it may be ``init``'s memory, which is read before ``out`` is written. Default: a new one.

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: ``k``, ``which``, ``tol``, ``max_iters``, ``block_size``, ``krylov_dim`` or ``init`` out of
            range.
    """
    n = operator.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= {n} (the operator's size); got {k!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}; got {which!r}")
    if tol is None:
        tol = default_tol(operator.dtype)
    if not tol > 0:
        raise ValueError(f"tol must be positive; got {tol!r}")
    _check_int("max_iters", max_iters, 0, "a non-negative int")
    dtype, device = operator.dtype, operator.device
    if init is not None:
        init = init.unsqueeze(1) if init.ndim == 1 else init
        if init.ndim != 2 or init.shape[0] != n:
            raise ValueError(f"init must have shape ({n},) or ({n}, j); got {tuple(init.shape)}")
    if block_size is None:
        warm = init is not None and init.shape[1] >= k
        block_size = init.shape[1] if warm else k + max(2, k // 2)
    _check_int("block_size", block_size, k, f"an int >= k = {k}")
    if krylov_dim is None:
        krylov_dim = 6 * block_size
    _check_int("krylov_dim", krylov_dim, 0, "a non-negative int")
    if k == n:
        return _dense(operator, k, which, tol)
    block_size = min(block_size, n - 1)
    krylov_dim = min(krylov_dim, n)
    start_products = operator.n_products if hasattr(operator, "n_products") else None
    products = 0

    if init is None and krylov_dim >= block_size + KRYLOV_WIDTH:
        budget = (max_iters + 1) * block_size
        start_tol = tol if cold_tol is None else cold_tol
        start = block_krylov(operator, k, block_size, which, start_tol, krylov_dim, budget, generator,
                             workspace=workspace)
        products += start.products
        if start.converged or products + block_size > budget:
            return _result(operator, start_products, products, start.theta[:k], start.X[:k], start.rnorm[:k],
                           start.restarts, start_tol, out)
        # A block turned out dependent first (the Krylov space is invariant in some direction): LOBPCG goes on
        # from the Ritz vectors, within what is left of the budget.
        init = start.X.T
        max_iters = (budget - products) // block_size - 1
        del start

    X = _starting_block(init, n, block_size, generator, dtype, device)
    if X.shape[1] < k:
        raise ValueError(f"init must have {k} linearly independent columns; got rank {X.shape[1]}")
    solve = LOBPCG(operator, X, k, which, tol, workspace=workspace)
    del X
    solve.run(max_iters)
    products += solve.products
    return _result(operator, start_products, products, solve.theta[:k], solve.vectors[:k], solve.rnorm[:k],
                   solve.iterations, tol, out)


def _starting_block(init: Optional[Tensor], n: int, block_size: int, generator, dtype, device) -> Tensor:
    """``init`` (when given) filled up to ``block_size`` columns with random ones, orthonormalised."""
    columns = []
    if init is not None:
        columns.append(init.detach().to(dtype=dtype, device=device))
    n_init = columns[0].shape[1] if columns else 0
    if n_init < block_size:
        columns.append(random_columns(n, block_size - n_init, generator, dtype, device))
    if len(columns) == 1 and n_init >= block_size:
        # A warm start from a previous answer is orthonormal already: one Gram pass checks it, where
        # orthonormalising would take four.
        X = columns[0]
        if float((gram(X, X) - torch.eye(n_init, dtype=torch.float64, device=X.device)).abs().max()) <= WARM_ORTHO_TOL:
            return X
    X = torch.cat(columns, dim=1) if len(columns) > 1 else columns[0].clone()
    return orthonormalize(X[:, :max(block_size, n_init)])


def _dense(operator, k: int, which: str, tol: float) -> EigenResult:
    """The whole spectrum from the materialised operator (``n`` products)."""
    n = operator.shape[0]
    A = operator.matmat(torch.eye(n, dtype=operator.dtype, device=operator.device)).double()
    values, vectors = torch.linalg.eigh((A + A.T) / 2)
    idx = select(values, k, which)
    theta, X = values[idx], vectors[:, idx]
    rnorm = torch.linalg.vector_norm(A @ X - X * theta, dim=0)
    return EigenResult(eigenvalues=theta, eigenvectors=X.to(operator.dtype).contiguous(), residual_norms=rnorm,
                       n_products=n, n_iterations=0, converged=bool((rnorm <= tol * scaled(theta)).all()))


def _result(operator, start_products: Optional[int], products: int, theta: Tensor, X: Tensor, rnorm: Tensor,
            iters: int, tol: Union[float, Callable[[Tensor], Tensor]], out: Optional[Tensor] = None) -> EigenResult:
    """The wanted pairs from rows ``X`` (orthonormal up to rounding in the operator's dtype), renormalised (into
    ``out`` when given)."""
    norms = row_norms(X)
    X = torch.div(X, norms.to(X.dtype)[:, None], out=out).T  # (n, k), each vector contiguous (a view of the rows)
    rnorm = rnorm / norms
    if start_products is not None:
        products = operator.n_products - start_products
    return EigenResult(eigenvalues=theta, eigenvectors=X, residual_norms=rnorm, n_products=products,
                       n_iterations=iters, converged=bool((rnorm <= thresholds(theta, len(theta), tol)).all()))
