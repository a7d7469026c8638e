"""The phi-functions of exponential integrators, evaluated stably.

``phi_0(z) = e^z`` and ``phi_{j+1}(z) = (phi_j(z) - 1/j!) / z``, with ``phi_j(0) = 1/j!``; so ``phi_1(z) = (e^z - 1)/z``
and ``phi_2(z) = (e^z - 1 - z)/z^2``. On the gradient flow along an eigendirection of curvature ``lambda`` over a
step ``dt`` the argument is ``z = -lambda dt``: the exact flow of the local quadratic moves the gradient component
``c`` by ``-dt phi_1(-lambda dt) c`` (Hochbruck & Ostermann 2010, Acta Numerica 19).

Near ``z = 0`` the closed forms cancel (``phi_3`` by the recursion loses about ``6 eps / z^2``); there the Taylor
series is used (``|z| < SERIES_BELOW``), elsewhere :func:`torch.expm1` and the recursion
``phi_{j+1} = (phi_j - 1/j!) / z``, which never overflows; every function is good to about 1e-13 relative or better.
Inputs are float64 tensors (or anything :func:`torch.as_tensor` takes); outputs are float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["phi0", "phi1", "phi2", "phi3", "SERIES_BELOW"]

SERIES_BELOW = 0.1  # |z| below which the Taylor series replaces the closed form
_TERMS = 12         # series terms: the first one left out, |z|^12 / (12 + j)!, is below 3e-21 for |z| < 0.1


def _z(z) -> Tensor:
    return torch.as_tensor(z, dtype=torch.float64)


def _series(z: Tensor, j: int) -> Tensor:
    """``sum_{m >= 0} z^m / (m + j)!`` truncated to :data:`_TERMS` terms (Horner)."""
    out = torch.full_like(z, 1.0 / math.factorial(_TERMS - 1 + j))
    for m in range(_TERMS - 2, -1, -1):
        out = out * z + 1.0 / math.factorial(m + j)
    return out


def phi0(z) -> Tensor:
    """``e^z``."""
    return torch.exp(_z(z))


def _phi(z, j: int) -> Tensor:
    """``phi_j`` for ``j >= 1``: the series near 0, else ``(phi_{j-1}(z) - 1/(j-1)!) / z``."""
    z = _z(z)
    small = z.abs() < SERIES_BELOW
    safe = torch.where(small, torch.ones_like(z), z)
    # phi_0(z) - 1 = expm1(z), without the cancellation of (e^z) - 1
    numerator = torch.expm1(safe) if j == 1 else _phi(safe, j - 1) - 1.0 / math.factorial(j - 1)
    return torch.where(small, _series(z, j), numerator / safe)


def phi1(z) -> Tensor:
    """``(e^z - 1) / z``, 1 at 0."""
    return _phi(z, 1)


def phi2(z) -> Tensor:
    """``(e^z - 1 - z) / z^2 = (phi_1(z) - 1) / z``, 1/2 at 0."""
    return _phi(z, 2)


def phi3(z) -> Tensor:
    """``(e^z - 1 - z - z^2/2) / z^3 = (phi_2(z) - 1/2) / z``, 1/6 at 0."""
    return _phi(z, 3)
