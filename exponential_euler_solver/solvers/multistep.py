"""The exponential Adams-Bashforth step (ETD2) with Milne's error estimate: second order at one gradient per step.

With the tracked stiff part ``H_s = V diag(mu) V^T`` (``mu_i = max(lambda_i, 0)``: directions of negative curvature
are left to the explicit part), the flow ``theta' = -g(theta)`` splits into ``-H_s (theta - theta_n)`` and the rest.
Cox & Matthews' exponential time differencing of second order (J. Comput. Phys. 176, 2002; Hochbruck & Ostermann,
Acta Numerica 2010), with variable steps ``h = dt``, ``h_p`` the previous accepted step and ``w = h / h_p``::

    D_n          = (g_n - g_{n-1}) - H_s (theta_n - theta_{n-1})          (the change of the non-stiff gradient)
    theta_{n+1}  = theta_n - h phi_1(-h H_s) g_n - h w phi_2(-h H_s) D_n

Along untracked directions ``phi_1 = 1`` and ``phi_2 = 1/2``: variable-step AB2, whose real stability interval is
``h lambda < 1``; the caller caps ``h`` by a fraction of ``1/|lambda_{k+1}|``. Along tracked directions of positive
curvature the local quadratic is integrated exactly, so a stiff direction costs nothing in step size. Without
tracked directions a ``momentum`` ``a`` widens the interval to ``h lambda < 1 + a`` (:func:`propose`,
:func:`bulk_weights`; adaptive gradient descent uses it).

The error is estimated by Milne's device from the gradient at the new point, which the next step needs anyway: the
exponential trapezoidal corrector ``theta^C = theta_n - h phi_1 g_n - h phi_2 D_{n+1}`` differs from the accepted
(predictor) point by ``-h phi_2(-h H_s) (D_{n+1} - w D_n)``, and for smooth solutions the predictor's local error
is ``(2w + 3) / (3w + 3)`` times that difference (5/6 for equal steps: AB2's error constant 5/12 against the
trapezoid's -1/12; with momentum see :func:`milne_factor`). It is third order in ``h``, so the controller's error
ratio (relative to the step) grows like ``h^2``.

Everything along ``V`` is kept in ``k`` coordinates (``V^T g``, ``V^T delta``, ...), so a step reads ``V`` twice
(``V^T g_new`` and ``V c``). On the CPU the step's arithmetic is two fused passes
(:mod:`~exponential_euler_solver.linalg.fused`): one forms ``delta``, the candidate and ``||delta||``, the other
``||E||`` and ``V^T g_new`` from the new gradient; elsewhere it is about ten torch operations on vectors of the
parameters' size, with no float64 copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..linalg import fused
from ..linalg.blocks import norm
from .phi import phi1, phi2

__all__ = ["History", "Coordinates", "etd2_weights", "milne_factor", "bulk_weights", "propose", "milne_error",
           "CANCELLATION"]

# ||E||^2 is expanded as ||r||^2 + 2 q.(V^T r) + ||q||^2 (no pass over V) unless it comes out below this fraction of
# ||r||^2: ||r||^2 of a float32 vector is good to about 1e-7 relative, so the expansion keeps 3 digits or more.
CANCELLATION = 1e-4


def milne_factor(w: float, momentum: float = 0.0) -> float:
    """``(2w^3 + 3w^2 + a) / (3w^3 + 3w^2 + a)``: the predictor's local error over the difference between the
    predictor and the trapezoidal corrector, for a step ratio ``w = h / h_prev`` and the two-step family's
    ``a = momentum`` (AB2, ``a = 0``: ``(2w + 3) / (3w + 3)``, 5/6 at ``w = 1``)."""
    a = momentum
    return (2 * w ** 3 + 3 * w ** 2 + a) / (3 * w ** 3 + 3 * w ** 2 + a)


def bulk_weights(h: float, w: float, momentum: float = 0.0) -> tuple[float, float]:
    """``(alpha, beta)`` of the explicit step ``delta = alpha g_n + beta g_{n-1} + a delta_{n-1}`` (``a =
    momentum``), second order for variable steps (``w = h / h_prev``): ``alpha = -h (w^2 + 2w - a) / (2w)``,
    ``beta = h (w^2 + a) / (2w)``; ``a = 0`` is AB2, ``-(h + h w / 2)`` and ``h w / 2``."""
    a = momentum
    return -h * (w * w + 2 * w - a) / (2 * w), h * (w * w + a) / (2 * w)


def etd2_weights(mu: Tensor, h: float) -> tuple[Tensor, Tensor]:
    """``(phi_1(-h mu), phi_2(-h mu))`` in float64 for the tracked curvatures ``mu >= 0``."""
    z = -h * mu
    return phi1(z), phi2(z)


@dataclass
class History:
    """What the step needs from the previous accepted step.

    Attributes:
        grad: ``g_{n-1}``, the gradient at the previous point.
        delta: ``theta_n - theta_{n-1}``, the previous step.
        dt: ``h_p``, its size.
        grad_norm: ``||g_{n-1}||`` (float64).
    """

    grad: Tensor
    delta: Tensor
    dt: float
    grad_norm: float


class Coordinates:
    """The ``k`` coordinates along the tracked basis ``V`` of the current and previous gradients and of the previous
    step (``a = V^T g_n``, ``a_prev = V^T g_{n-1}``, ``e_prev = V^T delta_{n-1}``, float64), for one basis: they are
    recomputed (one pass over ``V``) after the eigenpairs are refreshed, else carried from step to step."""

    def __init__(self, a: Tensor, a_prev: Tensor, e_prev: Tensor, basis: int):
        self.a, self.a_prev, self.e_prev, self.basis = a, a_prev, e_prev, basis

    @classmethod
    def project(cls, V: Tensor, g: Tensor, history: History, basis: int) -> "Coordinates":
        c = (V.T @ torch.stack([g, history.grad, history.delta], dim=1)).double()
        return cls(c[:, 0], c[:, 1], c[:, 2], basis)


def propose(g: Tensor, history: History, V: Optional[Tensor], mu: Optional[Tensor], coords: Optional[Coordinates],
            h: float, momentum: float = 0.0, *, out: Optional[Tensor] = None, params: Optional[Tensor] = None,
            candidate: Optional[Tensor] = None) -> tuple[Tensor, dict]:
    """The ETD2 step ``delta`` from the current point and what the error estimate needs.

    ``delta = -(h + h w / 2) g + (h w / 2) g_prev + V c`` with, per tracked direction,
    ``c_i = (h w / 2) mu_i e_i - h (phi_1i - 1) a_i - h w (phi_2i - 1/2) d_i``, where ``a = V^T g``,
    ``e = V^T delta_prev`` and ``d = V^T D_n = (a - a_prev) - mu e``. Returns ``delta`` (written into ``out`` when
    given) and a dict with ``w``, ``momentum``, ``size`` (``||delta||``) and, with tracked directions, ``f2``
    (``phi_2`` weights), ``e`` (``V^T delta``). With ``params`` and ``candidate`` given, ``params + delta`` is
    written into ``candidate`` in the same pass (:func:`~exponential_euler_solver.linalg.fused.combine`);
    ``candidate`` may be ``params`` itself (the step then moves ``params`` in place).

    Without tracked directions a ``momentum`` ``a`` in ``[0, 1)`` gives the explicit two-step family
    ``delta = alpha g + beta g_prev + a delta_prev`` (:func:`bulk_weights`), still second order, whose real
    stability interval is ``h lambda < 1 + a`` (AB2's is 1) and whose spurious root ``a`` at ``h = 0`` damps the
    difference of successive steps.
    """
    w = h / history.dt
    tracked = V is not None and V.shape[1] > 0
    if momentum and tracked:
        raise ValueError(f"momentum applies to steps without tracked directions; got momentum={momentum!r} with "
                         f"{V.shape[1]} tracked")
    # A step shorter than the previous one (w < 1, e.g. a retry after a rejection) takes the momentum scaled by w:
    # with a fixed a the step would tend to a (h_prev / 2) (g + g_prev + (2 / h_prev) delta_prev), not to 0, as
    # h -> 0. Any a >= 0 keeps the order, and h lambda <= w < 1 + a keeps it stable.
    momentum = momentum * min(1.0, w)
    alpha, beta = bulk_weights(h, w, momentum)
    terms = [(g, alpha), (history.grad, beta)]
    if momentum:
        terms.append((history.delta, momentum))
    info = {"w": w, "momentum": momentum}
    c = None
    if tracked:
        f1, f2 = etd2_weights(mu, h)
        d = (coords.a - coords.a_prev) - mu * coords.e_prev
        c = beta * mu * coords.e_prev - h * (f1 - 1) * coords.a - h * w * (f2 - 0.5) * d
        info.update(f2=f2, e=alpha * coords.a + beta * coords.a_prev + c)
    delta = torch.empty_like(g) if out is None else out
    size_sq = fused.combine(terms, V if tracked else None, c, out=delta, base=params, shifted=candidate)
    info["size"] = math.sqrt(size_sq)
    return delta, info


def milne_error(h: float, info: dict, g_new: Tensor, g: Tensor, history: History, V: Optional[Tensor],
                mu: Optional[Tensor], coords: Optional[Coordinates]) -> tuple[float, Optional[Tensor]]:
    """``||phi_2(-h H_s) (D_{n+1} - w D_n)||`` and ``a_new = V^T g_new`` (None without tracked directions).

    With ``r = g_new - (1 + w) g + w g_prev`` (a second difference of gradients) and
    ``q = mu (w e_prev - e)``, ``E = D_{n+1} - w D_n = r + V q``; ``phi_2`` weighs its coordinates
    ``V^T E = (a_new - (1 + w) a + w a_prev) + q`` (``1/2`` elsewhere), so
    ``||phi_2 E||^2 = ||E||^2 / 4 + sum_i (phi_2i^2 - 1/4) (V^T E)_i^2``.

    ``||E||^2``, ``V^T g_new`` and ``||g_new||`` (recorded as ``info["new_grad_norm"]``) come from one pass over
    ``g_new, g, g_prev (, delta_prev), V`` where the compiled loops apply
    (:func:`~exponential_euler_solver.linalg.fused.residual`; ``E`` is summed, never stored). Else
    ``r`` is formed and ``||E||^2`` expanded as ``||r||^2 + 2 q.(V^T r) + ||q||^2`` (no further pass over ``V``),
    or ``E`` formed when that expansion cancels (:data:`CANCELLATION`).
    """
    w = info["w"]
    a = info["momentum"]
    # With momentum a (no tracked directions) the corrector differs from the predictor by (h/2) (r + (a/w) m),
    # m = g + g_prev + (2/h_prev) delta_prev: the previous step's trapezoidal defect, O(h^2).
    terms = [(g_new, 1.0), (g, -(1 + w) + a / w), (history.grad, w + a / w)]
    if a:
        terms.append((history.delta, 2 * a / h))
    tracked = V is not None and V.shape[1] > 0
    q = mu * (w * coords.e_prev - info["e"]) if tracked else None
    done = fused.residual(terms, V if tracked else None, q)  # ||E||^2, V^T g_new and ||g_new||^2 in one pass
    if done is not None:
        ee, a_new, new_sq = done
        info["new_grad_norm"] = math.sqrt(new_sq)
        if not tracked:
            return 0.5 * math.sqrt(ee), None
        vr = a_new - (1 + w) * coords.a + w * coords.a_prev  # V^T r
    else:
        r = torch.add(g_new, g, alpha=terms[1][1])
        for x, c in terms[2:]:
            r.add_(x, alpha=c)
        if not tracked:
            return 0.5 * norm(r), None
        a_new = (V.T @ g_new).double()
        vr = a_new - (1 + w) * coords.a + w * coords.a_prev  # V^T r
        rr = norm(r) ** 2
        ee = rr + 2 * float(q @ vr) + float(q @ q)
        if ee < CANCELLATION * rr:
            # Along a stiff direction r and V q nearly cancel: the expansion lost its digits, so E is formed.
            r.addmv_(V, q.to(r.dtype))
            ee = norm(r) ** 2
    ve = vr + q
    weighted = ee / 4 + float(((info["f2"] ** 2 - 0.25) * ve * ve).sum())
    return math.sqrt(max(weighted, 0.0)), a_new
