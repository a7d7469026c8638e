"""Which eigenpairs are wanted, and the scale their residuals are judged against."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

__all__ = ["WHICH", "ZERO_FLOOR", "select", "scaled", "thresholds"]

WHICH = ("LM", "LA", "SA")
# Residuals are judged against max(|lambda_i|, ZERO_FLOOR * max_j |lambda_j|), so (near-)zero eigenvalues of a
# singular operator can converge.
ZERO_FLOOR = 1e-3


def scaled(theta: Tensor) -> Tensor:
    """``max(|theta_i|, ZERO_FLOOR * max_j |theta_j|)``: the scale each residual is judged against."""
    return torch.maximum(theta.abs(), ZERO_FLOOR * theta.abs().max())


def thresholds(theta: Tensor, k: int, tol: Union[float, Tensor, Callable[[Tensor], Tensor]]) -> Tensor:
    """The residual norm each of the first ``k`` pairs must reach: ``tol_i * scaled(theta)_i``, with ``tol`` one
    relative tolerance for all pairs, one per pair, or a callable giving them from ``theta[:k]``."""
    return (tol(theta[:k]) if callable(tol) else tol) * scaled(theta)[:k]


def select(values: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` wanted values, in the order ``which`` asks for (stable sort)."""
    if which == "LM":
        order = torch.argsort(values.abs(), descending=True, stable=True)
    elif which == "LA":
        order = torch.argsort(values, descending=True, stable=True)
    else:
        order = torch.argsort(values, descending=False, stable=True)
    return order[:k]
