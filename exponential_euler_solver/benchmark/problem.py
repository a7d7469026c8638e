"""One benchmark problem: a subset of a dataset, the network, the loss and the initial parameters.

The seed benchmark's problem is a subset of ``n_train`` examples of the first ``n_classes`` classes, the 6-layer
ELU MLP below (``net="mlp"``), mean cross-entropy over the full batch (``loss="ce"``), and an initial parameter
vector drawn after ``torch.manual_seed(seed)``. Every solver of a grid point starts from a clone of the same
vector. ``net="cnn"`` swaps in the small convolutional network of :mod:`.networks`, ``loss="mse"`` the squared
error against one-hot targets of :mod:`.criteria`; ``width`` changes the network's width (the MLP's hidden
layers, the CNN's channels) and ``batch_size`` the batches the loss is evaluated in (the value is the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..loss import LossFunction
from ..solvers.registry import LOSS_KINDS
from .criteria import build_criterion
from .datasets import N_FEATURES, select_subset
from .networks import CNN_WIDTH, build_cnn

__all__ = ["HIDDEN_WIDTH", "N_HIDDEN_BLOCKS", "NETWORKS", "DEFAULT_WIDTHS", "LOSS_KINDS", "DataError", "Problem",
           "build_network", "build_model", "build_problem"]

HIDDEN_WIDTH = 512
N_HIDDEN_BLOCKS = 4          # Linear(512, 512) + ELU blocks between the input and output layers
#: The benchmark's networks (``--net``): the seed's MLP and the convolutional network of :mod:`.networks`.
NETWORKS = ("mlp", "cnn")
#: Each network's default width: the MLP's hidden units, the CNN's channels.
DEFAULT_WIDTHS: Dict[str, int] = {"mlp": HIDDEN_WIDTH, "cnn": CNN_WIDTH}


class DataError(ValueError):
    """The dataset cannot be loaded, or it does not hold a grid point (too few examples or classes)."""


def build_network(n_classes: int, width: int = HIDDEN_WIDTH) -> nn.Sequential:
    """The seed's network: Linear(3072, 512), ELU, 4 x [Linear(512, 512), ELU], Linear(512, n_classes); ``width``
    replaces the 512 of every hidden layer.

    Raises:
        ValueError: ``width`` is not a positive int.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int; got {width!r}")
    layers: List[nn.Module] = [nn.Linear(N_FEATURES, width), nn.ELU()]
    for _ in range(N_HIDDEN_BLOCKS):
        layers += [nn.Linear(width, width), nn.ELU()]
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def build_model(net: str, n_classes: int, width: Optional[int] = None) -> nn.Module:
    """The network ``net`` (one of :data:`NETWORKS`) with ``n_classes`` outputs and ``width`` (None: its default).

    The builders are looked up in this module when called (:func:`build_network`, :func:`~.networks.build_cnn`),
    and at the default width called with ``n_classes`` alone, so that a test may swap either for a small one.

    Raises:
        ValueError: ``net`` is unknown or ``width`` is not a positive int.
    """
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive int or None; got {width!r}")
    if net == "mlp":
        builder = build_network
    elif net == "cnn":
        builder = build_cnn
    else:
        raise ValueError(f"net must be one of {NETWORKS}; got {net!r}")
    return builder(n_classes) if width is None else builder(n_classes, width)


@dataclass
class Problem:
    """One grid point: the loss and the initial parameters every solver starts from (never modified).

    ``net`` and ``loss`` name the network and the loss kind (:data:`NETWORKS`, :data:`LOSS_KINDS`); ``width`` is
    the width the network was asked for (None: its default, :data:`DEFAULT_WIDTHS`)."""

    n_train: int
    n_classes: int
    seed: int
    loss_func: LossFunction
    init_params: Tensor
    net: str = "mlp"
    loss: str = "ce"
    width: Optional[int] = None

    @property
    def key(self) -> tuple[int, int, int]:
        return self.n_train, self.n_classes, self.seed


def build_problem(X: Tensor, y: Tensor, n_train: int, n_classes: int, seed: int, *, device="cpu",
                  dtype: torch.dtype = torch.float32, net: str = "mlp", loss: str = "ce",
                  width: Optional[int] = None, batch_size: Optional[int] = None) -> Problem:
    """Build the loss of one grid point and its initial parameters.

    The subset is :func:`~.datasets.select_subset` with ``seed``; the data and the network
    (:func:`build_model` of ``net`` and ``width``) are put on ``device`` in ``dtype`` (the network is built here,
    so moving it changes nothing of the caller's); the criterion is :func:`~.criteria.build_criterion` of
    ``loss``. The loss is evaluated in batches of ``batch_size`` examples (None: the whole subset at once). The
    initial vector is ``loss_func.initialize_parameters(device=device, dtype=dtype)`` right after
    ``torch.manual_seed(seed)``.

    Raises:
        ValueError: ``n_train`` or ``n_classes`` do not fit the data (see :func:`~.datasets.select_subset`); an
            unknown ``net`` or ``loss``, or a ``width`` or ``batch_size`` that is not a positive int.
    """
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}; got {loss!r}")
    X_sub, y_sub = select_subset(X, y, n_train, n_classes, seed)
    data = TensorDataset(X_sub.to(device=device, dtype=dtype), y_sub.to(device=device))
    model = build_model(net, n_classes, width).to(device=device, dtype=dtype)
    loss_func = LossFunction(data, build_criterion(loss, n_classes), model, batch_size=batch_size)
    torch.manual_seed(seed)
    init_params = loss_func.initialize_parameters(device=device, dtype=dtype)
    return Problem(n_train, n_classes, seed, loss_func, init_params, net=net, loss=loss, width=width)
