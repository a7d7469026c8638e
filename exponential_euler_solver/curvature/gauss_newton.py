"""The Gauss-Newton matrix G and the residual H = Hessian - G (Lowell & Kastner's functional Hessian)."""

from __future__ import annotations

from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from .base import LossOperator
from .hessian import HessianOperator

__all__ = ["GaussNewtonOperator", "ResidualOperator"]


class GaussNewtonOperator(LossOperator):
    """The Gauss-Newton matrix ``G = (1/N) sum_n J_n^T H_n J_n`` of the loss at ``params``.

    ``J_n`` is the Jacobian of the network's outputs for example ``n`` with respect to the parameters and ``H_n``
    the Hessian of the per-example loss with respect to those outputs. Per batch and column: ``J v`` by forward
    mode, ``H_n (J v)`` by forward-over-reverse on the output loss, and ``J^T`` of that by reverse mode; columns
    are vmapped in chunks of ``chunk_size``.

    Args: see :class:`~exponential_euler_solver.curvature.base.LossOperator`.
    """

    def _batch_matmat(self, params: Tensor, batch, block: Tensor, out: Tensor) -> None:
        # With respect to the named parameter tensors (see LossFunction.gradient): through slices of the flat vector
        # every vjp would pad each parameter's part to the full size and sum them.
        loss = self.loss
        *inputs, labels = batch
        named = loss.unflatten(params.detach())
        f = lambda p: loss.outputs(p, inputs)  # noqa: E731
        outputs, vjp_fn = vjp(f, named)
        outputs = outputs.detach()
        total = lambda o: loss.output_loss(o, labels)  # noqa: E731

        def column(v: Tensor) -> Tensor:
            jv = jvp(f, (named,), (loss.unflatten(v),))[1]
            return loss.flatten(vjp_fn(jvp(grad(total), (outputs,), (jv,))[1])[0])

        for start in range(0, block.shape[1], self.chunk_size):
            cols = block[:, start:start + self.chunk_size]
            if cols.shape[1] == 1:
                out[:, start] += column(cols[:, 0])
            else:
                out[:, start:start + cols.shape[1]] += vmap(column, in_dims=1, out_dims=1)(cols)


class ResidualOperator(LossOperator):
    """The residual ``H = Hessian - G`` of the loss at ``params``; each product costs one Hessian and one
    Gauss-Newton product (in the same pass over the data).

    Args: see :class:`~exponential_euler_solver.curvature.base.LossOperator`.
    """

    def __init__(self, loss, params: Tensor, chunk_size=None):
        super().__init__(loss, params, chunk_size)
        self._hessian = HessianOperator(loss, params, self.chunk_size)
        self._gauss_newton = GaussNewtonOperator(loss, params, self.chunk_size)

    def _batch_matmat(self, params: Tensor, batch, block: Tensor, out: Tensor) -> None:
        self._hessian._batch_matmat(params, batch, block, out)
        out_g = out.new_zeros(out.shape)
        self._gauss_newton._batch_matmat(params, batch, block, out_g)
        out -= out_g
