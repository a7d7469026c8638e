"""The benchmark's convolutional network (``--net cnn``); the seed's MLP (``--net mlp``) is
:func:`~.problem.build_network`.

:func:`build_cnn` is Cohen et al. (2021)'s ``cnn-avgpool-elu`` ("Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability", the small CIFAR-10 network of their experiments), on the benchmark's inputs::

    Unflatten(1, (3, 32, 32))                       the dataset's 3072 channel-major values as an image
    Conv2d(3, w, 3, padding=1), ELU, AvgPool2d(2)   32 x 32 -> 16 x 16
    Conv2d(w, w, 3, padding=1), ELU, AvgPool2d(2)   16 x 16 -> 8 x 8
    Flatten, Linear(w * 8 * 8, C)

with ``w = width`` channels (default :data:`CNN_WIDTH` = 32) and ``C`` outputs: ``(27w + w) + (9w^2 + w) +
(64wC + C)`` parameters (:func:`cnn_parameter_count`; 14,242 at C = 2 and 30,634 at C = 10 with w = 32). The
output of a batch of ``N`` examples has shape ``(N, C)``.

Why these choices: the flow and its exponential integrator read the Hessian, so the network is kept as smooth as
the family allows. ELU (alpha = 1) is continuously differentiable (its second derivative jumps at 0, so the
Hessian is bounded, if not continuous, there); ReLU's derivative jumps at 0, so the gradient itself jumps whenever
a pre-activation changes sign, which no local quadratic model sees. Average pooling is linear; max pooling is
piecewise linear, its gradient jumping wherever the largest entry of a window changes. No BatchNorm (it couples
the examples of a batch, so the loss would depend on the batch size) and no Dropout (a random loss). Parameters
are initialised by the benchmark like the MLP's
(:meth:`~exponential_euler_solver.LossFunction.initialize_parameters`: Xavier-normal weights with gain sqrt(2),
the convolutions' fans counting the 3 x 3 kernel, zero biases).
"""

from __future__ import annotations

from torch import nn

from .datasets import IMAGE_SHAPE

__all__ = ["CNN_WIDTH", "CNN_KERNEL", "CNN_BLOCKS", "build_cnn", "cnn_parameter_count"]

CNN_WIDTH = 32      # channels of each convolution
CNN_KERNEL = 3      # kernel size (padding 1 keeps the image size; each pooling halves it)
CNN_BLOCKS = 2      # [Conv2d, ELU, AvgPool2d(2)] blocks


def _final_side() -> int:
    return IMAGE_SHAPE[1] // 2 ** CNN_BLOCKS


def build_cnn(n_classes: int, width: int = CNN_WIDTH) -> nn.Sequential:
    """The convolutional network of the module docstring, with ``width`` channels and ``n_classes`` outputs.

    Raises:
        ValueError: ``n_classes`` or ``width`` is not a positive int.
    """
    for name, value in (("n_classes", n_classes), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    channels, side = IMAGE_SHAPE[0], IMAGE_SHAPE[1]
    layers: list = [nn.Unflatten(1, IMAGE_SHAPE)]
    for _ in range(CNN_BLOCKS):
        layers += [nn.Conv2d(channels, width, CNN_KERNEL, padding=CNN_KERNEL // 2), nn.ELU(), nn.AvgPool2d(2)]
        channels, side = width, side // 2
    layers += [nn.Flatten(), nn.Linear(width * side * side, n_classes)]
    return nn.Sequential(*layers)


def cnn_parameter_count(n_classes: int, width: int = CNN_WIDTH) -> int:
    """The number of parameters of ``build_cnn(n_classes, width)``, from the module docstring's formula."""
    k2 = CNN_KERNEL ** 2
    convs = (IMAGE_SHAPE[0] * k2 * width + width) + (CNN_BLOCKS - 1) * (width * k2 * width + width)
    return convs + width * _final_side() ** 2 * n_classes + n_classes
