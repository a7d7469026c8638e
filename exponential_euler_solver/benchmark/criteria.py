"""The benchmark's losses (``--loss``): mean cross-entropy (``ce``, the seed's) and mean squared error against
one-hot targets (``mse``, as Cohen et al. 2021 train with).

``mse`` is :class:`OneHotMSELoss`: for an example with outputs ``f`` (``C`` values) and label ``y``,

    loss = 0.5 * sum_c (f_c - [c == y])^2        (targets: 1 for the labelled class, 0 for the others)

and the training loss is its mean over the examples, ``L = (1/N) sum_n 0.5 * ||f(x_n) - e_{y_n}||^2``: summed
over the outputs, averaged over the examples. Its Hessian in the outputs is the identity, so it has ``C`` sharp
directions where cross-entropy has ``C - 1`` (see :func:`~exponential_euler_solver.solvers.registry.stiff_dim`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..solvers.registry import LOSS_KINDS

__all__ = ["LOSS_KINDS", "OneHotMSELoss", "build_criterion"]

_REDUCTIONS = ("mean", "sum", "none")


class OneHotMSELoss(nn.Module):
    """``0.5 * ||outputs - onehot(labels)||^2`` per example (see the module docstring).

    The one-hot targets are built by comparing the labels with ``arange(n_classes)`` (no data-dependent shapes,
    so it runs under :mod:`torch.func` transforms such as the vmapped Hessian-vector products).

    Args:
        n_classes: the number of outputs ``C``; outputs of another width are refused.
        reduction: ``"mean"`` (default: the mean over the batch), ``"sum"`` or ``"none"`` (one loss per example),
            as :class:`~exponential_euler_solver.LossFunction` reads it.

    Raises:
        ValueError: ``n_classes`` is not a positive int or ``reduction`` is unknown; when called, outputs that are
            not ``(N, n_classes)`` for ``N`` labels.
    """

    def __init__(self, n_classes: int, reduction: str = "mean"):
        super().__init__()
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"n_classes must be a positive int; got {n_classes!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
        self.n_classes = n_classes
        self.reduction = reduction

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if outputs.ndim != 2 or outputs.shape[1] != self.n_classes or outputs.shape[0] != labels.shape[0]:
            raise ValueError(f"outputs must have shape (N, {self.n_classes}) for N = {labels.shape[0]} labels; got "
                             f"{tuple(outputs.shape)}")
        classes = torch.arange(self.n_classes, device=labels.device)
        targets = (labels.unsqueeze(1) == classes).to(outputs.dtype)
        per_example = 0.5 * (outputs - targets).pow(2).sum(dim=1)
        if self.reduction == "none":
            return per_example
        return per_example.sum() if self.reduction == "sum" else per_example.mean()

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, reduction={self.reduction!r}"


def build_criterion(loss: str, n_classes: int) -> nn.Module:
    """The criterion of the loss kind ``loss``: ``nn.CrossEntropyLoss()`` for ``"ce"``, ``OneHotMSELoss(n_classes)``
    for ``"mse"``.

    Raises:
        ValueError: ``loss`` is not one of :data:`LOSS_KINDS`.
    """
    if loss == "ce":
        return nn.CrossEntropyLoss()
    if loss == "mse":
        return OneHotMSELoss(n_classes)
    raise ValueError(f"loss must be one of {LOSS_KINDS}; got {loss!r}")
