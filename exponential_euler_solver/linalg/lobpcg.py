"""LOBPCG without preconditioner (Knyazev 2001) on row blocks: the warm-started eigensolver.

Rayleigh-Ritz on the span of the current vectors ``X``, their residuals ``R = AX - X Theta`` and the previous
search directions ``P``. The basis lives in two row blocks, one vector per row (contiguous): ``S = [X; P; R]`` and
``AS = A S``, at most ``3b`` rows each (in a caller's :class:`~.blocks.Workspace` when one is given); the residuals
are formed in their rows of ``S``. Ritz vectors and search directions are formed in place, column chunk by column
chunk; of the ``(m, m)`` projections ``S S^T`` and ``S AS^T`` (float64) only the rows of ``P`` and ``R`` are
multiplied out, since the Ritz block is ``I`` and ``diag(theta)`` by construction. Residual norms come from the
residual vectors themselves, not from projected matrices (which cancel).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .blocks import Workspace, gram, row_norms, scratch_rows, whitener
from .select import scaled, select

__all__ = ["LOBPCG", "project", "rotate", "rayleigh_ritz", "ROTATE_CHUNK"]

#: Columns per chunk of the in-place rotation: its products are short (``m`` terms), so the chunk sets only the
#: temporary's size (``b`` rows) and the number of Python-level products (10 at 2.6M entries).
ROTATE_CHUNK = 1 << 18


def project(S: Tensor, AS: Tensor, m: int, ritz: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(S S^T, S AS^T)`` in float64 over the first ``m`` rows of the row blocks ``S``, ``AS`` (one vector per
    row), chunked as :func:`~.blocks.gram`.

    With ``ritz`` (``b`` values), rows ``[:b]`` are the Ritz vectors of the previous Rayleigh-Ritz: their blocks
    are ``I`` and ``diag(ritz)`` by construction (up to the rounding of the rotation that formed them), so only
    rows ``[b:m]`` are multiplied and the rest follows by symmetry."""
    b = 0 if ritz is None else ritz.shape[0]
    M = torch.zeros(m, m, dtype=torch.float64, device=S.device)
    K = torch.zeros(m, m, dtype=torch.float64, device=S.device)
    M[b:] = gram(S[b:m].T, S[:m].T)
    K[b:] = gram(S[b:m].T, AS[:m].T)
    if b:
        M[:b, :b] = torch.eye(b, dtype=torch.float64, device=S.device)
        K[:b, :b] = torch.diag(ritz)
        M[:b, b:] = M[b:, :b].T
        K[:b, b:] = K[b:, :b].T
    return M, K


def rotate(S: Tensor, AS: Tensor, m: int, Y: Tensor, Yp: Optional[Tensor] = None) -> None:
    """In place, column chunk by column chunk (no second tall block): the Ritz vectors ``X = Y^T S[:m]`` into rows
    ``[:b]`` and the search directions ``P = Yp^T S[:m]`` into rows ``[b:b + p]`` of ``S``, the same for ``AS``.
    ``Y`` is ``(m, b)``, ``Yp`` ``(m, p)`` float64 with zero rows ``[:b]`` (directions outside the old ``X``)."""
    b = Y.shape[1]
    Yt = Y.T.to(S.dtype)
    Pt = None if Yp is None else Yp[b:].T.to(S.dtype)
    for start in range(0, S.shape[1], ROTATE_CHUNK):
        cols = slice(start, start + ROTATE_CHUNK)
        for A in (S, AS):
            x = Yt @ A[:m, cols]
            if Pt is not None:
                A[b:b + Pt.shape[0], cols] = Pt @ A[b:m, cols]
            A[:b, cols] = x


def rayleigh_ritz(M: Tensor, K: Tensor, b: int, which: str, dtype: torch.dtype):
    """Ritz pairs of the pencil ``(K, M) = (S^T A S, S^T S)`` (float64), whitening ``M`` by its eigendecomposition
    so a nearly dependent basis is handled; returns the ``b`` selected values and coefficient matrix."""
    T = whitener(M, dtype)
    C = T.T @ ((K + K.T) / 2) @ T
    values, Z = torch.linalg.eigh((C + C.T) / 2)
    idx = select(values, b, which)
    return values[idx], T @ Z[:, idx]


class LOBPCG:
    """One LOBPCG solve: :meth:`update` (Rayleigh-Ritz, new Ritz vectors and search directions, residuals),
    :meth:`done`, :meth:`expand` (the residual directions and their images).

    Args:
        operator: the block operator (``matmat``, ``dtype``).
        X: ``(n, b)`` orthonormal starting block.
        k: wanted pairs (the first ``k`` of the ``b`` Ritz pairs must converge).
        which: see :func:`~exponential_euler_solver.linalg.top_eigenpairs`.
        tol: relative residual tolerance.
        workspace: where the blocks live (kept from one solve to the next); default: new blocks.

    Attributes:
        theta, rnorm: the current Ritz values and residual norms (after :meth:`update`).
        products: operator-vector products made, iterations: expansions made.
    """

    def __init__(self, operator, X: Tensor, k: int, which: str, tol: float, workspace: Optional[Workspace] = None):
        self.operator, self.k, self.which, self.tol = operator, k, which, tol
        self.dtype = operator.dtype
        b = X.shape[1]
        self.b = b
        blocks = scratch_rows(workspace, 6 * b, X)
        self.S, self.AS = blocks[:3 * b], blocks[3 * b:]
        self.S[:b] = X.T
        operator.matmat(self.S[:b].T, out=self.AS[:b].T)
        self.products = b
        self.iterations = 0
        self.theta: Optional[Tensor] = None
        self.rnorm: Optional[Tensor] = None
        self._n_dirs, self._m = 0, b
        self._R: Optional[Tensor] = None
        self._active: Optional[Tensor] = None

    def update(self) -> None:
        """Rayleigh-Ritz on the basis; Ritz vectors into rows ``[:b]``, search directions after them; residuals."""
        b, S, AS, dtype = self.b, self.S, self.AS, self.dtype
        M, K = project(S, AS, self._m, self.theta)
        self.theta, Y = rayleigh_ritz(M, K, b, self.which, dtype)
        Yp = None
        if self.iterations > 0:
            # LOBPCG's search directions: the part of the new Ritz vectors outside the old ones, whitened.
            Yp = Y.clone()
            Yp[:b] = 0
            Yp = Yp @ whitener(Yp.T @ M @ Yp, dtype)
            self._n_dirs = Yp.shape[1]
        rotate(S, AS, self._m, Y, Yp)
        # The residuals go where expand() will want them, the rows after the search directions.
        lo = b + self._n_dirs
        self._R = torch.addcmul(AS[:b], S[:b], -self.theta.to(dtype)[:, None], out=S[lo:lo + b])
        self.rnorm = row_norms(self._R)
        self._active = self.rnorm > self.tol * scaled(self.theta)

    def done(self) -> bool:
        """Every one of the ``k`` wanted residuals meets the tolerance."""
        return not bool(self._active[:self.k].any())

    def expand(self) -> None:
        """Append the normalised residuals of the unconverged pairs and their images to the basis."""
        self.iterations += 1
        # Residuals are orthogonal to the Ritz vectors; normalised, they need no further orthogonalisation:
        # the Rayleigh-Ritz whitens the whole basis with its float64 Gram matrix.
        idx = self._active.nonzero()[:, 0]
        lo = self.b + self._n_dirs
        self._m = lo + idx.numel()
        for row, active in enumerate(idx.tolist()):  # the active residuals moved up in place (rows lo: hold them)
            if active != row:
                self._R[row].copy_(self._R[active])
        self.S[lo:self._m].div_(self.rnorm[idx].to(self.dtype)[:, None])
        self._R = None
        self.operator.matmat(self.S[lo:self._m].T, out=self.AS[lo:self._m].T)
        self.products += self._m - lo

    def run(self, max_iters: int) -> "LOBPCG":
        """Iterate until :meth:`done` or ``max_iters`` expansions; returns itself."""
        while True:
            self.update()
            if self.done() or self.iterations >= max_iters:
                return self
            self.expand()

    @property
    def vectors(self) -> Tensor:
        """The Ritz vectors, one per row (``(b, n)`` view)."""
        return self.S[:self.b]
