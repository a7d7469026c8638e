"""The training loss as a function of one flat parameter vector.

:class:`LossFunction` knows the dataset, the criterion and the network; everything above it in the library
sees only flat parameter vectors, values, gradients and Hessian-vector products.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .distributed import data_parallel_for

__all__ = ["LossFunction"]

_REDUCTIONS = ("mean", "sum", "none")


def _default_hvp_chunk(device: torch.device) -> int:
    # Measured on a 2-core CPU (shared/MEASURED.md): a vmapped block of 10 HVPs costs twice a Python loop of
    # single HVPs, and 2 columns are neutral; on a GPU vmapping the whole block amortises kernel launches.
    return 1 if device.type == "cpu" else 64


class LossFunction:
    """The mean loss over a whole dataset, as a function of a flat parameter vector.

    ``L(theta) = (1/N) sum_n loss(net(theta; x_n), y_n)``, accumulated over batches of ``batch_size`` examples
    (default: the whole dataset in one batch). The network is evaluated with :func:`torch.func.functional_call`,
    so the user's network and criterion objects are never modified: their parameters, buffers, device and the
    criterion's ``reduction`` stay as they were.

    The criterion may use any reduction. A scalar output is read as the mean over the batch unless the
    criterion's ``reduction`` attribute is ``'sum'``; an output with one entry per example (``reduction='none'``)
    is summed. The result is always the mean over all examples.

    Data-parallel (``distributed``, by default whenever a :mod:`torch.distributed` default process group is
    initialised): each rank evaluates only its contiguous shard of the examples (``data_parallel.shard``; uneven
    or empty shards are fine), divides by the global number of examples, and the loss, gradient and block
    products are summed over the ranks by one all-reduce each, so every rank gets the same global values. Every
    rank must call the same methods in the same order with the same parameters.

    Args:
        dataset: a map-style dataset of tuples ``(*inputs, labels)``. A :class:`~torch.utils.data.TensorDataset`
            is sliced directly (no per-example collation) and stays on the device of its tensors.
        criterion: callable ``criterion(outputs, labels)``, e.g. :class:`torch.nn.CrossEntropyLoss`.
        net: the network; ``net(*inputs)`` gives the outputs. Its parameters define the layout of the flat vector
            (``net.named_parameters()`` order); its buffers are used read-only.
        hvp_chunk_size: number of Hessian-vector products vmapped together inside a batch (forward-over-reverse);
            1 loops over the columns instead, differentiating one gradient graph per batch again for each column
            (reverse-over-reverse). Default: 1 on CPU (measured faster there), 64 on other devices.
        distributed: None (default): data-parallel exactly when a default process group is initialised; True:
            require one; False: evaluate the whole dataset in this process whatever the group.
        **dataloader_kwargs: passed to :class:`~torch.utils.data.DataLoader` for datasets that are not
            ``TensorDataset``s; ``batch_size`` (default ``len(dataset)``) is used for both. ``shuffle`` is not
            allowed: the loss is a fixed function of the parameters.

    Raises:
        ValueError: the dataset is empty, ``batch_size`` is not a positive int, ``shuffle=True`` is given, the
            criterion's output has neither one entry nor one entry per example, or ``distributed=True`` without
            an initialised process group.
        TypeError: ``net`` is not a :class:`torch.nn.Module` or ``criterion`` is not callable.

    Memory: a block product of ``m`` vectors holds the ``(P, m)`` result plus the graph of one batch's gradient
    (``hvp_chunk_size`` 1) or, per chunk of ``hvp_chunk_size`` columns, the activations of one batch for
    forward-over-reverse differentiation; it does not grow with the number of examples.
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
        if hvp_chunk_size is not None and (not isinstance(hvp_chunk_size, int) or hvp_chunk_size < 1):
            raise ValueError(f"hvp_chunk_size must be a positive int or None; got {hvp_chunk_size!r}")
        reduction = getattr(criterion, "reduction", "mean")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"criterion.reduction must be one of {_REDUCTIONS}; got {reduction!r}")

        self.dataset = dataset
        self.criterion = criterion
        self.net = net
        self.n_examples = n
        self.batch_size = min(batch_size, n)
        self._reduction = reduction
        self._dataloader_kwargs = dataloader_kwargs
        self._hvp_chunk_size = hvp_chunk_size
        self._names = [name for name, _ in net.named_parameters()]
        self._shapes = [p.shape for _, p in net.named_parameters()]
        self._numels = [p.numel() for _, p in net.named_parameters()]
        self.n_params = sum(self._numels)
        if self.n_params == 0:
            raise ValueError("net must have at least one parameter; got a network with none")
        self._buffers = dict(net.named_buffers())
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

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate tensors in the network's parameter order into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

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
    # batches
    def batches(self, device=None) -> Iterator[tuple[Tensor, ...]]:
        """Iterate over the dataset (this rank's shard when data-parallel) in fixed batches of ``batch_size``
        examples, as tuples of tensors."""
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

    def _buffers_for(self, like: Tensor) -> dict[str, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._buffer_cache:
            self._buffer_cache[key] = {
                name: b.detach().to(device=like.device, dtype=like.dtype if b.is_floating_point() else None)
                .clone() for name, b in self._buffers.items()}
        return self._buffer_cache[key]

    def _outputs(self, params: Tensor, inputs: Sequence[Tensor]) -> Tensor:
        state = {**self._buffers_for(params), **self.unflatten(params)}
        return functional_call(self.net, state, tuple(inputs))

    def _batch_total(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """Sum over the batch of the per-example loss, whatever the criterion's reduction."""
        value = self.criterion(outputs, labels)
        n = labels.shape[0]
        if value.ndim == 0:
            return value if self._reduction == "sum" else value * n
        if value.shape[0] != n:
            raise ValueError(f"criterion must return a scalar or one loss per example (shape ({n},)); got "
                             f"shape {tuple(value.shape)} for a batch of {n}")
        return value.sum()

    def _check_criterion(self) -> None:
        batch = next(iter(self._small_batch()))
        *inputs, labels = batch
        # Through functional_call like every evaluation, so the user's network (its buffers, e.g. BatchNorm
        # running statistics in training mode) is never run in place.
        like = next((x for x in inputs if x.is_floating_point()), None)
        params = self.parameters_of_net(dtype=None if like is None else like.dtype,
                                        device=inputs[0].device)
        with torch.no_grad():
            out = self._outputs(params, inputs)
            value = self.criterion(out, labels)
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

    def _reduce(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The sums over the ranks (one all-reduce) when data-parallel, else the tensors themselves."""
        return tensors if self.data_parallel is None else self.data_parallel.all_reduce_sum(*tensors)

    def _batch_loss(self, params: Tensor, batch: Sequence[Tensor]) -> Tensor:
        *inputs, labels = batch
        return self._batch_total(self._outputs(params, inputs), labels) / self.n_examples

    # ----------------------------------------------------------------------------------------------------------
    # value, gradient, curvature
    def forward(self, params: Tensor) -> Tensor:
        """The mean loss at ``params`` (a 0-dim tensor, no graph)."""
        total = None
        with torch.no_grad():
            for batch in self.batches(params.device):
                value = self._batch_loss(params, batch)
                total = value if total is None else total + value
        if total is None:  # an empty shard
            total = params.new_zeros(())
        return self._reduce(total)[0]

    __call__ = forward

    def gradient(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """The mean loss and its gradient at ``params``, in one pass over the data.

        Returns:
            ``(loss, grad)``: a 0-dim tensor and a tensor shaped like ``params`` (no graph attached).
        """
        loss, g = None, None
        f = grad_and_value(self._batch_loss)
        for batch in self.batches(params.device):
            gb, lb = f(params.detach(), batch)
            loss = lb if loss is None else loss + lb
            g = gb if g is None else g + gb
        if loss is None:  # an empty shard
            loss, g = params.new_zeros(()), torch.zeros_like(params)
        return self._reduce(loss.detach(), g.detach())

    def hvp(self, params: Tensor, vectors: Tensor) -> Tensor:
        """Hessian of the mean loss at ``params`` times ``vectors``, in one pass over the data.

        With ``hvp_chunk_size`` 1, reverse-over-reverse: per batch one gradient with its graph, differentiated
        again once per column (measured on this project's CPU, 2.6M-parameter MLP: 158 ms per column in a block
        of 16 against 242 ms forward-over-reverse). Otherwise forward-over-reverse (:func:`torch.func.jvp` of
        :func:`torch.func.grad`), the columns vmapped in chunks of ``hvp_chunk_size``.

        Args:
            params: flat parameters ``(P,)``.
            vectors: ``(P,)`` or a block ``(P, m)``.

        Returns:
            A tensor shaped like ``vectors``.
        """
        return self._block_product(params, vectors, self._batch_hvp, self._batch_hvp_loop)

    def gnvp(self, params: Tensor, vectors: Tensor) -> Tensor:
        """Gauss-Newton matrix ``G = (1/N) sum_n J_n^T H_n J_n`` at ``params`` times ``vectors``.

        ``J_n`` is the Jacobian of the network's outputs for example ``n`` with respect to the parameters and
        ``H_n`` the Hessian of the per-example loss with respect to those outputs. Shapes as in :meth:`hvp`.
        """
        return self._block_product(params, vectors, self._batch_gnvp)

    def _block_product(self, params: Tensor, vectors: Tensor, batch_fn, batch_loop=None) -> Tensor:
        if vectors.ndim not in (1, 2) or vectors.shape[0] != self.n_params:
            raise ValueError(f"vectors must have shape ({self.n_params},) or ({self.n_params}, m); "
                             f"got {tuple(vectors.shape)}")
        single = vectors.ndim == 1
        block = vectors.unsqueeze(1) if single else vectors
        block = block.to(dtype=params.dtype)
        params = params.detach()
        chunk = self._hvp_chunk_size or _default_hvp_chunk(params.device)
        out = torch.zeros_like(block)
        for batch in self.batches(params.device):
            if chunk == 1 and batch_loop is not None:
                batch_loop(params, batch, block, out)
                continue
            for start in range(0, block.shape[1], chunk):
                cols = block[:, start:start + chunk]
                if cols.shape[1] == 1:
                    out[:, start] += batch_fn(params, batch, cols[:, 0])
                else:
                    out[:, start:start + chunk] += vmap(lambda v: batch_fn(params, batch, v),
                                                        in_dims=1, out_dims=1)(cols)
        out = self._reduce(out)[0]
        return out[:, 0] if single else out

    def _batch_hvp(self, params: Tensor, batch, v: Tensor) -> Tensor:
        hv = jvp(grad(lambda p: self._batch_loss(p, batch)), (params,), (v,))[1]
        # Where the gradient does not depend on the parameters (zero curvature) jvp returns a tangent that does
        # not depend on v either, which vmap cannot batch; adding 0 * v makes it depend on v.
        return hv + 0 * v

    def _batch_hvp_loop(self, params: Tensor, batch, block: Tensor, out: Tensor) -> None:
        """``out += H_batch @ block``, column by column, reusing one graph of the batch's gradient."""
        with torch.enable_grad():
            p = params.detach().requires_grad_(True)
            g = torch.autograd.grad(self._batch_loss(p, batch), p, create_graph=True)[0]
            if not g.requires_grad:  # the loss is linear in the parameters
                return
            m = block.shape[1]
            for i in range(m):
                hv = torch.autograd.grad(g, p, block[:, i], retain_graph=i < m - 1, allow_unused=True)[0]
                if hv is not None:
                    out[:, i] += hv

    def _batch_gnvp(self, params: Tensor, batch, v: Tensor) -> Tensor:
        *inputs, labels = batch
        outputs, vjp_fn, jv = _linearize_outputs(lambda p: self._outputs(p, inputs), params, v)
        total = lambda o: self._batch_total(o, labels) / self.n_examples
        h_jv = jvp(grad(total), (outputs.detach(),), (jv,))[1]
        return vjp_fn(h_jv)[0]


def _linearize_outputs(f, params: Tensor, v: Tensor):
    """Outputs of ``f`` at ``params``, its VJP function and the JVP ``J v``."""
    outputs, vjp_fn = vjp(f, params)
    jv = jvp(f, (params,), (v,))[1]
    return outputs, vjp_fn, jv
