"""Matrix-free curvature operators behind one small block linear-operator protocol.

An operator knows its ``shape``, ``dtype``, ``device``, whether it is ``symmetric``, and how to multiply a block
``(n, m)`` (:meth:`LinearOperator.matmat`). It counts the operator-vector products it has made
(``n_products``). ``to_dense`` materialises it column by column and exists for tests on tiny problems.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .loss import LossFunction

__all__ = ["LinearOperator", "DenseOperator", "HessianOperator", "GaussNewtonOperator", "ResidualOperator"]


class LinearOperator:
    """A square matrix-free operator ``A`` of shape ``(n, n)``.

    Subclasses implement :meth:`_matmat`; callers use :meth:`matmat` or ``A @ X``, which accept ``(n,)`` or
    ``(n, m)`` and count the ``m`` products in ``n_products``.
    """

    symmetric: bool = True

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.shape = (n, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_products = 0

    def _matmat(self, X: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matmat(self, X: Tensor) -> Tensor:
        """``A @ X`` for ``X`` of shape ``(n,)`` or ``(n, m)``."""
        if X.ndim not in (1, 2) or X.shape[0] != self.shape[0]:
            raise ValueError(f"X must have shape ({self.shape[0]},) or ({self.shape[0]}, m); got {tuple(X.shape)}")
        single = X.ndim == 1
        block = X.unsqueeze(1) if single else X
        if block.shape[1] == 0:
            return block.clone()
        out = self._matmat(block)
        self.n_products += block.shape[1]
        return out[:, 0] if single else out

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


class _LossOperator(LinearOperator):
    def __init__(self, loss: LossFunction, params: Tensor, product: Callable[[Tensor, Tensor], Tensor]):
        loss.check_params(params)
        super().__init__(loss.n_params, params.dtype, params.device)
        self.loss = loss
        self.params = params.detach()
        self._product = product

    def _matmat(self, X: Tensor) -> Tensor:
        return self._product(self.params, X)


class HessianOperator(_LossOperator):
    """The Hessian of ``loss`` at ``params`` (:meth:`LossFunction.hvp` products, one pass over the data per block).

    ``params`` is held by reference: an operator built on a tensor the solver updates in place follows it.
    """

    def __init__(self, loss: LossFunction, params: Tensor):
        super().__init__(loss, params, loss.hvp)


class GaussNewtonOperator(_LossOperator):
    """The Gauss-Newton matrix ``G = (1/N) sum_n J_n^T H_n J_n`` of ``loss`` at ``params``
    (see :meth:`LossFunction.gnvp`)."""

    def __init__(self, loss: LossFunction, params: Tensor):
        super().__init__(loss, params, loss.gnvp)


class ResidualOperator(_LossOperator):
    """The residual ``H = Hessian - G`` (Lowell & Kastner's functional Hessian) of ``loss`` at ``params``.

    Each product costs one Hessian and one Gauss-Newton product.
    """

    def __init__(self, loss: LossFunction, params: Tensor):
        super().__init__(loss, params, lambda p, X: loss.hvp(p, X) - loss.gnvp(p, X))
