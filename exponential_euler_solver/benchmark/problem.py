"""One benchmark problem: a subset of a dataset, the seed's network, the loss and the initial parameters.

The problem is the seed benchmark's: a subset of ``n_train`` examples of the first ``n_classes`` classes, the
6-layer ELU MLP below, mean cross-entropy over the full batch, and an initial parameter vector drawn after
``torch.manual_seed(seed)``. Every solver of a grid point starts from a clone of the same vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..loss import LossFunction
from .datasets import N_FEATURES, select_subset

__all__ = ["HIDDEN_WIDTH", "N_HIDDEN_BLOCKS", "DataError", "Problem", "build_network", "build_problem"]

HIDDEN_WIDTH = 512
N_HIDDEN_BLOCKS = 4          # Linear(512, 512) + ELU blocks between the input and output layers


class DataError(ValueError):
    """The dataset cannot be loaded, or it does not hold a grid point (too few examples or classes)."""


def build_network(n_classes: int) -> nn.Sequential:
    """The seed's network: Linear(3072, 512), ELU, 4 x [Linear(512, 512), ELU], Linear(512, n_classes)."""
    layers: List[nn.Module] = [nn.Linear(N_FEATURES, HIDDEN_WIDTH), nn.ELU()]
    for _ in range(N_HIDDEN_BLOCKS):
        layers += [nn.Linear(HIDDEN_WIDTH, HIDDEN_WIDTH), nn.ELU()]
    layers.append(nn.Linear(HIDDEN_WIDTH, n_classes))
    return nn.Sequential(*layers)


@dataclass
class Problem:
    """One grid point: the loss and the initial parameters every solver starts from (never modified)."""

    n_train: int
    n_classes: int
    seed: int
    loss_func: LossFunction
    init_params: Tensor

    @property
    def key(self) -> tuple[int, int, int]:
        return self.n_train, self.n_classes, self.seed


def build_problem(X: Tensor, y: Tensor, n_train: int, n_classes: int, seed: int, *, device="cpu",
                  dtype: torch.dtype = torch.float32) -> Problem:
    """Build the loss of one grid point and its initial parameters.

    The subset is :func:`~.datasets.select_subset` with ``seed``; the data and the network are put on
    ``device`` in ``dtype`` (the network is built here, so moving it changes nothing of the caller's). The
    initial vector is ``loss_func.initialize_parameters(device=device, dtype=dtype)`` right after
    ``torch.manual_seed(seed)``.

    Raises:
        ValueError: ``n_train`` or ``n_classes`` do not fit the data (see :func:`~.datasets.select_subset`).
    """
    X_sub, y_sub = select_subset(X, y, n_train, n_classes, seed)
    data = TensorDataset(X_sub.to(device=device, dtype=dtype), y_sub.to(device=device))
    net = build_network(n_classes).to(device=device, dtype=dtype)
    loss_func = LossFunction(data, nn.CrossEntropyLoss(), net)
    torch.manual_seed(seed)
    init_params = loss_func.initialize_parameters(device=device, dtype=dtype)
    return Problem(n_train, n_classes, seed, loss_func, init_params)
