"""The block linear-operator protocol, and the base class of the operators defined by a loss.

An operator knows its ``shape``, ``dtype``, ``device``, whether it is ``symmetric``, and how to multiply a block
``(n, m)`` (:meth:`LinearOperator.matmat`, also ``A @ X``). It counts the operator-vector products it has made
(``n_products``). ``to_dense`` materialises it column by column and exists for tests on tiny problems.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._timing import clock

__all__ = ["LinearOperator", "DenseOperator", "LossOperator", "default_chunk_size"]


def default_chunk_size(device: torch.device) -> int:
    """Columns of a block product handled together per batch: 1 on CPU, 64 elsewhere.

    Measured on this project's 2-core CPU (seed network, n_train 64, 1 thread): one column reverse-over-reverse
    took 110 ms against 205 ms forward-over-reverse, and a vmapped block of 10 cost twice a loop of single
    columns; on a GPU vmapping a block amortises kernel launches (not yet measured there).
    """
    return 1 if torch.device(device).type == "cpu" else 64


class LinearOperator:
    """A square matrix-free operator ``A`` of shape ``(n, n)``.

    Subclasses implement :meth:`_matmat` for a block ``(n, m)`` with ``m >= 1``; callers use :meth:`matmat` or
    ``A @ X``, which accept ``(n,)`` or ``(n, m)`` and count the ``m`` products in ``n_products``.

    Attributes:
        shape: ``(n, n)``.
        dtype, device: those of the blocks it multiplies and returns.
        symmetric: whether ``A`` is symmetric (the eigensolvers require it).
        n_products: operator-vector products made so far.
        seconds: wall-clock seconds spent in those products.
    """

    symmetric: bool = True

    def __init__(self, n: int, dtype: torch.dtype, device):
        self.shape = (n, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_products = 0
        self.seconds = 0.0

    def _matmat(self, X: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``A @ X`` for a block ``X`` ``(n, m)``, ``m >= 1``."""
        raise NotImplementedError

    def _matmat_into(self, X: Tensor, out: Tensor) -> Tensor:
        """``A @ X`` written into ``out`` (by default computed, then copied; operators that can accumulate in
        place override this)."""
        return out.copy_(self._matmat(X))

    def matmat(self, X: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``A @ X`` for ``X`` of shape ``(n,)`` or ``(n, m)``, written into ``out`` (same shape) when given.

        Raises:
            ValueError: ``X`` or ``out`` has another shape.
        """
        if X.ndim not in (1, 2) or X.shape[0] != self.shape[0]:
            raise ValueError(f"X must have shape ({self.shape[0]},) or ({self.shape[0]}, m); got {tuple(X.shape)}")
        if out is not None and out.shape != X.shape:
            raise ValueError(f"out must have the shape of X, {tuple(X.shape)}; got {tuple(out.shape)}")
        single = X.ndim == 1
        block = X.unsqueeze(1) if single else X
        if block.shape[1] == 0:
            return block.clone() if out is None else out
        start = clock(self.device)
        if out is None:
            result = self._matmat(block)
        else:
            result = self._matmat_into(block, out.unsqueeze(1) if single else out)
        self.seconds += clock(self.device) - start
        self.n_products += block.shape[1]
        return result[:, 0] if single else result

    __matmul__ = matmat

    def to_dense(self) -> Tensor:
        """The dense ``(n, n)`` matrix (n products; for tests on tiny problems)."""
        return self.matmat(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))


class DenseOperator(LinearOperator):
    """A dense symmetric matrix as an operator (tests and small problems)."""

    def __init__(self, matrix: Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square; got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, X: Tensor) -> Tensor:
        return self.matrix @ X


class LossOperator(LinearOperator):
    """An operator defined by a loss at a point, as a sum over the loss's batches.

    :meth:`_matmat` runs the data loop of :class:`~exponential_euler_solver.LossFunction` once per block (one
    pass over the data), asks the subclass for each batch's contribution (:meth:`_batch_matmat`, which adds into
    ``out``), and sums over data-parallel ranks with one all-reduce (:meth:`LossFunction.reduce`).

    ``params`` is held by reference: an operator built on a tensor that a solver updates in place follows it.

    Args:
        loss: a :class:`~exponential_euler_solver.LossFunction`.
        params: the flat parameters at which the operator is taken.
        chunk_size: columns handled together per batch (see :func:`default_chunk_size`); default the loss's
            ``hvp_chunk_size``, else by device.

    Raises:
        TypeError, ValueError: ``params`` do not fit the loss (see ``LossFunction.check_params``), or a bad
            ``chunk_size``.
    """

    def __init__(self, loss, params: Tensor, chunk_size=None):
        loss.check_params(params)
        super().__init__(loss.n_params, params.dtype, params.device)
        if chunk_size is None:
            chunk_size = getattr(loss, "hvp_chunk_size", None) or default_chunk_size(params.device)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
        self.loss = loss
        self.params = params
        self.chunk_size = chunk_size

    def _batch_matmat(self, params: Tensor, batch, block: Tensor, out: Tensor) -> None:  # pragma: no cover
        """Add this batch's contribution to ``A @ block`` into ``out``."""
        raise NotImplementedError

    def _matmat(self, X: Tensor, out: Optional[Tensor] = None) -> Tensor:
        block = X.to(dtype=self.dtype)
        params = self.params.detach()
        if out is None:
            # One column per vector, each contiguous (the (m, P) storage seen as (P, m)): the per-column products
            # write in place without strides, and callers that keep vectors as rows (the eigensolvers) take out.T
            # without a copy.
            out = torch.zeros(block.shape[1], block.shape[0], dtype=block.dtype, device=block.device).T
        else:
            out.zero_()
        for batch in self.loss.batches(params.device):
            self._batch_matmat(params, batch, block, out)
        if self.loss.data_parallel is None:
            return out
        return out.copy_(self.loss.reduce(out)[0])

    def _matmat_into(self, X: Tensor, out: Tensor) -> Tensor:
        return self._matmat(X, out)
