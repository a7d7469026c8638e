"""Dense work on tall blocks and long vectors, accurate without float64 copies.

Long reductions are split into chunks of :data:`CHUNK` entries: within a chunk the products run in the blocks' own
dtype (a float32 dot product of 16k terms is good to ~1e-7 relative), across chunks they are summed in float64. A
float32 reduction over all 2.6M entries at once lost ~1e-3 relative on this project's CPU; float64 products cost
2.5-3x the float32 ones there, and a float64 copy of a 2.6M-entry vector is a pass over 21 MB.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["CHUNK", "NORM_CHUNK", "LOOP_FROM_COLUMNS", "gram", "dot", "norm", "row_norms", "Workspace",
           "scratch_rows", "apply", "drop_tol", "whitener", "orthonormalize", "random_columns"]

CHUNK = 1 << 14


#: Columns of a row-major ``A`` from which :func:`gram` loops over the chunks instead of batching them.
LOOP_FROM_COLUMNS = 8


def gram(A: Tensor, B: Tensor) -> Tensor:
    """``A^T B`` in float64 for tall ``A`` ``(n, a)``, ``B`` ``(n, b)`` (one vector per column), summed over row
    chunks.

    The chunks' products are one batched product (``torch.bmm`` over ``(n / CHUNK, CHUNK, a)`` views, no copy):
    measured on this project's CPU at n = 2.6M with the basis stored one vector per row (``A`` column-major), 2-6x
    faster than a Python loop over the chunks for a few columns, 10% for 20, same rounding. For a row-major ``A``
    with many columns the loop measured faster and is kept."""
    n, a = A.shape
    if A.stride(0) != 1 and a >= LOOP_FROM_COLUMNS:
        out = torch.zeros(a, B.shape[1], dtype=torch.float64, device=A.device)
        for start in range(0, n, CHUNK):
            out += (A[start:start + CHUNK].T @ B[start:start + CHUNK]).double()
        return out
    rows = n // CHUNK
    body = rows * CHUNK
    out = torch.bmm(A[:body].reshape(rows, CHUNK, a).transpose(1, 2),
                    B[:body].reshape(rows, CHUNK, B.shape[1])).double().sum(0)
    if body < n:
        out += (A[body:].T @ B[body:]).double()
    return out


def dot(a: Tensor, b: Tensor) -> float:
    """``a . b`` of two 1-D tensors as a Python float, without copies (measured on this project's CPU at 2.6M
    float32 entries: 3.5e-7 relative to the float64 value, at the cost of one pass)."""
    return float(torch.dot(a, b))


#: Entries per row of :func:`norm`'s row norms.
NORM_CHUNK = 1 << 12


def norm(a: Tensor) -> float:
    """``||a||`` of a tensor as a Python float, in one pass without copies: the norms of rows of
    :data:`NORM_CHUNK` entries in ``a``'s dtype, their squares summed in float64. Measured on this project's CPU at
    2.6M float32 entries spread over 8 decades: 1e-7 relative to the float64 value, 0.2 ms, where
    ``vector_norm(a, dtype=float64)`` took 2.6 ms and a float32 ``vector_norm`` over all entries lost 7e-5. Any
    non-finite entry makes it non-finite (so does an entry whose square overflows)."""
    flat = a.reshape(-1)
    rows = flat.numel() // NORM_CHUNK
    body = rows * NORM_CHUNK
    sq = torch.linalg.vector_norm(flat[:body].view(rows, NORM_CHUNK), dim=1).double().square().sum()
    if body < flat.numel():  # the ragged tail, added on the device: one host sync per norm
        sq = sq + torch.linalg.vector_norm(flat[body:]).double().square()
    return math.sqrt(float(sq))


def row_norms(A: Tensor) -> Tensor:
    """Euclidean norms of the rows of ``A`` in float64: the norms of chunks of :data:`NORM_CHUNK` entries in
    ``A``'s dtype, their squares summed in float64 (as :func:`norm`, one call for all rows)."""
    m, n = A.shape
    rows = n // NORM_CHUNK
    body = rows * NORM_CHUNK
    sq = torch.linalg.vector_norm(A[:, :body].reshape(m, rows, NORM_CHUNK), dim=2).double().square().sum(1)
    if body < n:
        sq += torch.linalg.vector_norm(A[:, body:], dim=1).double().square()
    return sq.sqrt()


class Workspace:
    """Rows of scratch vectors kept from one eigensolve to the next (the Krylov basis of a cold start, LOBPCG's
    blocks of a warm one), so that a refresh writes into memory the process already has.

    A fresh block of this size is memory the operating system maps in page by page as it is first written: on this
    project's CPU a warm refresh at 4 pairs faulted in 60-95 thousand pages (0.25-0.4 GB) and spent more time on it
    than on its arithmetic. Rows that are never written are never mapped, so a workspace sized for a cold start
    holds only what the solves wrote."""

    def __init__(self):
        self._rows: Optional[Tensor] = None

    def rows(self, m: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An ``(m, n)`` block of scratch rows (contents undefined), the kept one when it is large enough."""
        rows = self._rows
        if rows is None or rows.shape[0] < m or rows.shape[1] != n or rows.dtype != dtype or rows.device != device:
            self._rows = rows = torch.empty(m, n, dtype=dtype, device=device)
        return rows[:m]


def scratch_rows(workspace: Optional[Workspace], m: int, like: Tensor) -> Tensor:
    """``(m, like.shape[0])`` scratch rows: from ``workspace``, or a new block without one."""
    n = like.shape[0]
    if workspace is None:
        return like.new_empty(m, n)
    return workspace.rows(m, n, like.dtype, like.device)


def apply(S: Tensor, Y: Tensor) -> Tensor:
    """``S @ Y`` with a float64 coefficient matrix, in S's dtype."""
    return S @ Y.to(S.dtype)


def drop_tol(dtype: torch.dtype) -> float:
    """Relative Gram eigenvalue below which a direction counts as dependent."""
    return 100 * torch.finfo(dtype).eps


def whitener(M: Tensor, dtype: torch.dtype) -> Tensor:
    """``T`` with ``T^T M T = I`` on the numerically independent part of a float64 Gram matrix ``M``."""
    M = (M + M.T) / 2
    vals, vecs = torch.linalg.eigh(M)
    keep = vals > drop_tol(dtype) * vals.max().clamp_min(1e-300)
    return vecs[:, keep] / vals[keep].sqrt()


def orthonormalize(W: Tensor) -> Tensor:
    """Orthonormalise the columns of ``W``, dropping dependent directions (SVQB, Stathopoulos & Wu 2002);
    two passes for stability."""
    for _ in range(2):
        if W.shape[1] == 0:
            return W
        W = apply(W, whitener(gram(W, W), W.dtype))
    return W


def random_columns(n: int, m: int, generator: Optional[torch.Generator], dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """``(n, m)`` standard normal starting vectors, drawn on the generator's device (torch's global RNG when
    ``generator`` is None) and moved to ``device``."""
    return torch.randn(n, m, generator=generator, dtype=dtype,
                       device=generator.device if generator is not None else "cpu").to(device)
