"""The training loss as a function of one flat parameter vector.

:class:`LossFunction` knows the dataset, the criterion and the network. It owns the parameter layout, the data
loop (:meth:`LossFunction.batches`), the loss and its gradient. Curvature products are built on its data loop by
the operators of :mod:`exponential_euler_solver.curvature`; everything above sees only flat parameter vectors.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .distributed import data_parallel_for

__all__ = ["LossFunction"]

_REDUCTIONS = ("mean", "sum", "none")


def _batch_statistics_template(net: torch.nn.Module) -> tuple[torch.nn.Module, set[str]]:
    """A private copy of ``net`` whose normalisation layers in training mode use the batch's statistics without
    keeping running ones, and the names of the running-statistics buffers it no longer has.

    In training mode a ``BatchNorm`` layer normalises with the batch's statistics and *updates* its running
    statistics in place; under :mod:`torch.func` that in-place update of a captured tensor is an error, and on the
    user's own module it would change their network. The copy computes the same outputs with nothing to update.
    """
    template = copy.deepcopy(net)
    dropped: set[str] = set()
    for name, module in template.named_modules():
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
            prefix = f"{name}." if name else ""
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(module, buffer, None) is not None:
                    dropped.add(prefix + buffer)
                setattr(module, buffer, None)
            module.track_running_stats = False
    return template, dropped


class LossFunction:
    """The mean loss over a whole dataset, as a function of a flat parameter vector.

    ``L(theta) = (1/N) sum_n loss(net(theta; x_n), y_n)``, accumulated over batches of ``batch_size`` examples
    (default: the whole dataset in one batch). The network is evaluated with :func:`torch.func.functional_call`,
    so the user's network and criterion objects are never modified: their parameters, buffers, device and the
    criterion's ``reduction`` stay as they were.

    The criterion may use any reduction. A scalar output is read as the mean over the batch unless the
    criterion's ``reduction`` attribute is ``'sum'``; an output with one entry per example (``reduction='none'``)
    is summed. The result is always the mean over all examples.

    Normalisation layers (``BatchNorm``) in training mode normalise each batch with its own statistics, as
    training does, and their running statistics are neither used nor updated (a private copy of the network's
    structure is evaluated); in eval mode they use the running statistics, read-only. ``Dropout`` in training
    mode is refused: it would make the loss random.

    Data-parallel (``distributed``, by default whenever a :mod:`torch.distributed` default process group is
    initialised): each rank evaluates only its contiguous shard of the examples (``data_parallel.shard``; uneven
    or empty shards are fine), divides by the global number of examples, and the loss, gradient and block
    products are summed over the ranks by one all-reduce each (:meth:`reduce`), so every rank gets the same
    global values. Every rank must call the same methods in the same order with the same parameters.

    Args:
        dataset: a map-style dataset of tuples ``(*inputs, labels)``. A :class:`~torch.utils.data.TensorDataset`
            is sliced directly (no per-example collation) and stays on the device of its tensors.
        criterion: callable ``criterion(outputs, labels)``, e.g. :class:`torch.nn.CrossEntropyLoss`.
        net: the network; ``net(*inputs)`` gives the outputs. Its parameters define the layout of the flat vector
            (``net.named_parameters()`` order); its buffers are used read-only.
        hvp_chunk_size: the default chunk of a block curvature product (see
            :class:`~exponential_euler_solver.curvature.HessianOperator`): 1 loops over the columns,
            differentiating one gradient graph per batch again for each (reverse-over-reverse); larger values vmap
            that many columns together (forward-over-reverse). Default: 1 on CPU (measured faster there), 64 on
            other devices.
        distributed: None (default): data-parallel exactly when a default process group is initialised; True:
            require one; False: evaluate the whole dataset in this process whatever the group.
        **dataloader_kwargs: passed to :class:`~torch.utils.data.DataLoader` for datasets that are not
            ``TensorDataset``s; ``batch_size`` (default ``len(dataset)``) is used for both. ``shuffle`` is not
            allowed: the loss is a fixed function of the parameters.

    Raises:
        ValueError: the dataset is empty, ``batch_size`` is not a positive int, ``shuffle=True`` is given, the
            criterion's output has neither one entry nor one entry per example, the network has ``Dropout`` in
            training mode, or ``distributed=True`` without an initialised process group.
        TypeError: ``net`` is not a :class:`torch.nn.Module` or ``criterion`` is not callable.
    """

    def __init__(self, dataset: Dataset, criterion: Callable, net: torch.nn.Module, *,
                 hvp_chunk_size: Optional[int] = None, distributed: Optional[bool] = None, **dataloader_kwargs):
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
        if not callable(criterion):
            raise TypeError(f"criterion must be callable; got {type(criterion).__name__}")
        try:
            n = len(dataset)
        except TypeError as exc:
            raise TypeError(f"dataset must be a map-style dataset with a length; got {type(dataset).__name__}") \
                from exc
        if n == 0:
            raise ValueError("dataset must not be empty; got a dataset of length 0")
        batch_size = dataloader_kwargs.pop("batch_size", None)
        if batch_size is None:
            batch_size = n
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if dataloader_kwargs.get("shuffle"):
            raise ValueError("shuffle must be False: the loss is a fixed function of the parameters; got True")
        if hvp_chunk_size is not None and (isinstance(hvp_chunk_size, bool) or not isinstance(hvp_chunk_size, int)
                                           or hvp_chunk_size < 1):
            raise ValueError(f"hvp_chunk_size must be a positive int or None; got {hvp_chunk_size!r}")
        reduction = getattr(criterion, "reduction", "mean")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"criterion.reduction must be one of {_REDUCTIONS}; got {reduction!r}")
        dropout = [name for name, m in net.named_modules() if isinstance(m, _DropoutNd) and m.training and m.p > 0]
        if dropout:
            raise ValueError(f"net has Dropout in training mode ({', '.join(dropout[:3])}): the loss would be random "
                             "and the flow undefined; call net.eval() (or use p=0) before building the LossFunction")

        self.dataset = dataset
        self.criterion = criterion
        self.net = net
        self.n_examples = n
        self.batch_size = min(batch_size, n)
        self.hvp_chunk_size = hvp_chunk_size
        self._reduction = reduction
        self._dataloader_kwargs = dataloader_kwargs
        named = list(net.named_parameters())
        self._names = [name for name, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._numels = [p.numel() for _, p in named]
        self.n_params = sum(self._numels)
        if self.n_params == 0:
            raise ValueError("net must have at least one parameter; got a network with none")
        self._module, dropped = net, set()
        if any(isinstance(m, _BatchNorm) and m.training and m.track_running_stats for m in net.modules()):
            self._module, dropped = _batch_statistics_template(net)
        self._buffers = {name: b for name, b in net.named_buffers() if name not in dropped}
        self._buffer_cache: dict = {}
        self._tensors: Optional[tuple[Tensor, ...]] = (
            tuple(dataset.tensors) if isinstance(dataset, TensorDataset) else None)
        if self._tensors is not None and len(self._tensors) < 2:
            raise ValueError("dataset must yield (*inputs, labels); got a TensorDataset with "
                             f"{len(self._tensors)} tensor(s)")
        self._check_criterion()
        # None when not data-parallel; else this rank's shard, the all-reduces and their byte count.
        self.data_parallel = data_parallel_for(n, distributed)

    # ----------------------------------------------------------------------------------------------------------
    # layout
    @property
    def data_device(self) -> Optional[torch.device]:
        """The device of the dataset's tensors, or None when the dataset is not a TensorDataset."""
        return self._tensors[0].device if self._tensors is not None else None

    @property
    def data_dtype(self) -> Optional[torch.dtype]:
        """The floating dtype of the dataset's first input tensor, or None when unknown."""
        if self._tensors is not None and self._tensors[0].is_floating_point():
            return self._tensors[0].dtype
        return None

    def unflatten(self, params: Tensor) -> dict[str, Tensor]:
        """Views of a flat vector as the network's named parameters (no copy)."""
        out, offset = {}, 0
        for name, shape, numel in zip(self._names, self._shapes, self._numels):
            out[name] = params[offset:offset + numel].view(shape)
            offset += numel
        return out

    def check_params(self, params: Tensor, name: str = "params") -> None:
        """Raise a clear error unless ``params`` is a 1-D floating tensor of the network's size on the data's
        device with the data's floating dtype.

        Raises:
            TypeError: not a tensor.
            ValueError: wrong shape, not floating, or device/dtype mismatch with the dataset.
        """
        if not isinstance(params, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(params).__name__}")
        if params.ndim != 1 or params.numel() != self.n_params:
            raise ValueError(f"{name} must be a 1-D tensor of the network's {self.n_params} parameters; "
                             f"got shape {tuple(params.shape)}")
        if not params.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor; got dtype {params.dtype}")
        if self.data_device is not None and params.device != self.data_device:
            raise ValueError(f"{name} is on {params.device} but the dataset's tensors are on {self.data_device}; "
                             f"move one of them (e.g. initialize_parameters(device={str(self.data_device)!r}))")
        if self.data_dtype is not None and params.dtype != self.data_dtype:
            raise ValueError(f"{name} has dtype {params.dtype} but the dataset's inputs have dtype "
                             f"{self.data_dtype}; convert one of them to match")

    def initialize_parameters(self, gain: float = math.sqrt(2.0), device=None,
                              dtype: torch.dtype = torch.float32) -> Tensor:
        """A fresh flat parameter vector: Xavier-normal weights, zero biases.

        In ``net.named_parameters()`` order, each parameter of two or more dimensions is drawn from
        ``N(0, gain**2 * 2 / (fan_in + fan_out))`` (:func:`torch.nn.init.xavier_normal_`) using torch's global
        RNG, so ``torch.manual_seed`` reproduces it. One-dimensional parameters are zero when their name ends in
        ``bias`` and one otherwise (normalisation layers' scales), as PyTorch's own modules start. When
        data-parallel, rank 0's vector is broadcast to every rank.

        Args:
            gain: the Xavier gain (default sqrt(2), for ReLU-like activations).
            device: where to create the vector. None means the device of the dataset's tensors when they have
                one, else CUDA when available, else CPU.
            dtype: floating dtype of the vector.

        Returns:
            A 1-D tensor of length ``n_params``. The network itself is not modified.

        Raises:
            ValueError: ``gain`` is not a positive number or ``dtype`` is not floating.
        """
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain > 0:
            raise ValueError(f"gain must be a positive number; got {gain!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype; got {dtype!r}")
        if device is None:
            device = self.data_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pieces = []
        for name, shape in zip(self._names, self._shapes):
            t = torch.empty(shape, device=device, dtype=dtype)
            if len(shape) >= 2:
                torch.nn.init.xavier_normal_(t, gain=gain)
            elif name.rsplit(".", 1)[-1].endswith("bias"):
                t.zero_()
            else:
                t.fill_(1.0)
            pieces.append(t.reshape(-1))
        params = torch.cat(pieces)
        return params if self.data_parallel is None else self.data_parallel.broadcast_(params, src=0)

    def parameters_of_net(self, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
        """The network's current parameters as one flat vector (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.net.parameters()]).to(device=device, dtype=dtype)

    # ----------------------------------------------------------------------------------------------------------
    # the data loop (used by the curvature operators too)
    def batches(self, device=None) -> Iterator[tuple[Tensor, ...]]:
        """Iterate over the dataset (this rank's shard when data-parallel) in fixed batches of ``batch_size``
        examples, as tuples of tensors ``(*inputs, labels)``."""
        shard = range(self.n_examples) if self.data_parallel is None else self.data_parallel.shard
        if self._tensors is not None:
            for start in range(shard.start, shard.stop, self.batch_size):
                yield tuple(t[start:min(start + self.batch_size, shard.stop)] for t in self._tensors)
            return
        dataset = self.dataset if self.data_parallel is None else Subset(self.dataset, shard)
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, **self._dataloader_kwargs)
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("dataset must yield (*inputs, labels) tuples; got a batch of type "
                                 f"{type(batch).__name__}")
            yield tuple(b.to(device, non_blocking=True) if device is not None else b for b in batch)

    def flatten(self, named: Mapping[str, Tensor]) -> Tensor:
        """One flat vector of the named parameter-shaped tensors ``named`` (the inverse of :meth:`unflatten`)."""
        return torch.cat([named[name].reshape(-1) for name in self._names])

    def outputs(self, params: Union[Tensor, Mapping[str, Tensor]], inputs: Sequence[Tensor]) -> Tensor:
        """The network's outputs on ``inputs`` with the flat parameters ``params``, or the named tensors of
        :meth:`unflatten` (the user's network is not run in place)."""
        named = self.unflatten(params) if isinstance(params, Tensor) else params
        like = next(iter(named.values()))
        return functional_call(self._module, {**self._buffers_for(like), **named}, tuple(inputs))

    def output_loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """A batch's contribution to the mean loss as a function of the network's outputs: the sum over the
        batch of the per-example loss, over the global number of examples."""
        value = self.criterion(outputs, labels)
        n = labels.shape[0]
        if value.ndim == 0:
            total = value if self._reduction == "sum" else value * n
        elif value.shape[0] != n:
            raise ValueError(f"criterion must return a scalar or one loss per example (shape ({n},)); got "
                             f"shape {tuple(value.shape)} for a batch of {n}")
        else:
            total = value.sum()
        return total / self.n_examples

    def batch_loss(self, params: Union[Tensor, Mapping[str, Tensor]], batch: Sequence[Tensor]) -> Tensor:
        """A batch's contribution to the mean loss at ``params``, flat or named as :meth:`unflatten` gives them
        (differentiable in ``params``)."""
        *inputs, labels = batch
        return self.output_loss(self.outputs(params, inputs), labels)

    def reduce(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The sums over the ranks (one all-reduce) when data-parallel, else the tensors themselves."""
        return tensors if self.data_parallel is None else self.data_parallel.all_reduce_sum(*tensors)

    def _buffers_for(self, like: Tensor) -> dict[str, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._buffer_cache:
            self._buffer_cache[key] = {
                name: b.detach().to(device=like.device, dtype=like.dtype if b.is_floating_point() else None)
                .clone() for name, b in self._buffers.items()}
        return self._buffer_cache[key]

    def _check_criterion(self) -> None:
        *inputs, labels = next(self._small_batch())
        # Through functional_call like every evaluation, so the user's network is never run in place.
        like = next((x for x in inputs if x.is_floating_point()), None)
        params = self.parameters_of_net(dtype=None if like is None else like.dtype, device=inputs[0].device)
        with torch.no_grad():
            value = self.criterion(self.outputs(params, inputs), labels)
        if not isinstance(value, Tensor):
            raise ValueError(f"criterion must return a tensor; got {type(value).__name__}")
        if value.ndim != 0 and (value.ndim != 1 or value.shape[0] != labels.shape[0]):
            raise ValueError(f"criterion must return a scalar or one loss per example (shape ({labels.shape[0]},)); "
                             f"got shape {tuple(value.shape)}")

    def _small_batch(self):
        if self._tensors is not None:
            yield tuple(t[:2] for t in self._tensors)
        else:
            loader = DataLoader(self.dataset, batch_size=min(2, self.n_examples), shuffle=False,
                                **self._dataloader_kwargs)
            yield tuple(next(iter(loader)))

    # ----------------------------------------------------------------------------------------------------------
    # value and gradient
    def forward(self, params: Tensor) -> Tensor:
        """The mean loss at ``params`` (a 0-dim tensor, no graph)."""
        total = None
        with torch.no_grad():
            for batch in self.batches(params.device):
                value = self.batch_loss(params, batch)
                total = value if total is None else total + value
        if total is None:  # an empty shard
            total = params.new_zeros(())
        return self.reduce(total)[0]

    __call__ = forward

    def gradient(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """The mean loss and its gradient at ``params``, in one pass over the data.

        Returns:
            ``(loss, grad)``: a 0-dim tensor and a tensor shaped like ``params`` (no graph attached).
        """
        # Differentiated with respect to the named views, not the flat vector: through the slices of a flat vector
        # each parameter's gradient would be padded to a zero vector of the full size and summed (at 2.6M
        # parameters and 12 tensors on this project's CPU, 33.6 ms a gradient against 12.6 ms). The views are
        # leaves of a plain autograd graph, as fast as module.backward() and a torch.cat of the .grad fields:
        # torch.func.grad_and_value gave the same bits about 2 ms a gradient slower (its wrapping of every
        # parameter tensor on every call; digits 64 x 4, 2 threads: 12.7-14.5 ms against 10.4-10.8 ms).
        named = {name: view.requires_grad_() for name, view in self.unflatten(params.detach()).items()}
        leaves = list(named.values())
        loss, g = None, None
        with torch.enable_grad():
            for batch in self.batches(params.device):
                lb = self.batch_loss(named, batch)
                grads = torch.autograd.grad(lb, leaves, allow_unused=True)
                flat = torch.cat([(torch.zeros_like(v) if x is None else x).reshape(-1) for x, v in zip(grads, leaves)])
                lb = lb.detach()
                loss = lb if loss is None else loss + lb
                g = flat if g is None else g.add_(flat)
        if loss is None:  # an empty shard
            loss, g = params.new_zeros(()), torch.zeros_like(params)
        return self.reduce(loss.detach(), g.detach())
