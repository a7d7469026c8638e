"""Exponential integrators on the gradient flow: a few stiff eigendirections integrated exactly for the local
quadratic, the rest explicitly.

With ``(lambda_i, v_i)`` the Hessian eigenpairs of largest magnitude at theta, ``g = grad L(theta)`` and
``c_i = v_i . g``, the flow splits into the ``k`` tracked (stiff) directions, where the local quadratic's flow is
exact, and the rest, where an explicit step is stable for ``dt <= 1/|lambda_{k+1}|``. :class:`StiffSplitSolver`
implements this for any ``k >= 0``; :class:`ExponentialEulerSolver` is ``k = stiff_dim`` and
:class:`~exponential_euler_solver.AdaptiveGradientDescent` is ``k = 0`` (gradient descent with
``dt <= 1/|lambda_1|``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._validate import positive_float
from ..linalg.blocks import gram, norm
from . import multistep
from .base import Proposal, check_loss
from .control import DEFAULT_RTOL, MAX_GROWTH, SAFETY
from .eigen_based import EigenSolverBase
from .phi import phi0, phi1, phi2
from .tracking import split_step_tolerances

__all__ = ["SplitSteps", "StiffSplitSolver", "ExponentialEulerSolver", "stiff_step_lengths", "SCHEMES",
           "DEFAULT_STABILITY_FRACTION", "MULTISTEP_MOMENTUM", "HEADROOM_AGE", "HEADROOM_GAIN"]


def stiff_step_lengths(eigvals: Tensor, dt: float) -> Tensor:
    """``h_i = min(dt, dt phi_1(-lambda_i dt)) = min(dt, (1 - exp(-lambda_i dt)) / lambda_i)``: the exact flow of
    the local quadratic for ``lambda_i > 0``, an Euler step (``h = dt``) for ``lambda_i <= 0``."""
    return torch.clamp(dt * phi1(-eigvals.double() * dt), max=dt)


SCHEMES = ("multistep", "heun")
#: The default ``rtol`` of each scheme. The multistep estimate is that of the accepted point's own error (AB2's
#: local error constant 5/12, the estimate's 1/2 before Milne's factor); heun's is the Euler-Heun difference, a
#: first-order estimate of a second-order point, so heun admits a larger value for the same fidelity. Measured on
#: the digits at 64x2, where steps are set by the error: multistep rtol 0.2 / 0.05 / 0.02 / 0.01 crossed loss 0.01
#: +1.3% / +1.5% / +0.70% / +0.39% off the converged reference; heun 0.2 +0.27%.
DEFAULT_RTOLS = {"multistep": 0.02, "heun": DEFAULT_RTOL}
#: LOBPCG iterations per warm refresh of each scheme (the multistep step tolerates looser eigenpairs: its
#: remainder term carries what the tracked part misses).
DEFAULT_EIG_MAX_ITERS = {"multistep": 1, "heun": 20}
# Fraction of the explicit part's stability bound 1/|lambda_{k+1}| that a multistep step may use: AB2 is stable for
# h lambda < 1, with a parasitic root -1 at the bound (-0.74 at 0.8).
DEFAULT_STABILITY_FRACTION = 0.8
# With the multistep scheme, eigenpairs age only while the stability cap binds (a refresh could then lengthen the
# steps); otherwise (max_step_size or the error binds) they are refreshed after this many times max_eig_age steps,
# or after a rejection that looks like stale curvature (STALE_RATIO).
MULTISTEP_AGE_BACKSTOP = 10
# Capped steps between refreshes under the multistep scheme (both solvers). Measured on the digits (2 threads):
# adaptive gradient descent with 20 instead of 10 took 7.3 s instead of 8.5 s at 64x4, 13.4 s instead of 15.1 s
# at 256x4, 10.6 s instead of 11.2 s at 64x10 and 3.3 s instead of 3.1 s at 64x2, same crossing times to 0.1%.
MULTISTEP_MAX_EIG_AGE = 20
# Multistep steps that the stability cap bound while the controller asked for its largest growth (error ratio at
# most (SAFETY / MAX_GROWTH)^2, about 0.2) trigger a refresh after HEADROOM_AGE of them instead of max_eig_age
# capped steps: the error sees a flow far smoother than the stale cap assumes, the mark of a spectrum that fell
# since the last refresh (exponential Euler's first refresh at n_train 64: |lambda_{k+1}| 366 -> 19 at 4 classes,
# 472 -> 20 at 2). A refresh so triggered that did not raise the cap by HEADROOM_GAIN turns the rule off for the
# rest of the run (a spectrum that falls slowly: the extra refreshes would cost more than the steps they save).
# Measured on the digits (2 threads, the rule on and off in one process): exponential Euler 7 / 5 / 0 / 7 / 7 / 0
# fewer steps at 64x2 / 64x4 / 64x10 / 256x2 / 256x4 / 256x10, no more HVPs; adaptive gradient descent 9 / 1 / 2 /
# 8 / 1 / 5 fewer, 0 / 0 / 2 / 2 / 0 / 0 more HVPs. Crossings of loss 0.01 moved later by at most 0.43% (64x2).
HEADROOM_AGE = 3
HEADROOM_GAIN = MAX_GROWTH
# A multistep rejection whose error ratio is above this (or whose loss rose) refreshes the eigenpairs; below it the
# step size alone is corrected.
STALE_RATIO = 4.0
#: Adaptive gradient descent's default ``momentum`` under the multistep scheme (see :func:`.multistep.propose`): the
#: two-step step is stable for ``h |lambda_1| < 1.25``, so the default stability fraction becomes
#: ``min(1, 0.8 * 1.25) = 1`` and the step is the seed's ``dt = min(lr, 1 / |lambda_1|)``. Measured on the digits
#: (2 threads, seed 0, each run's crossing of loss 0.01 against the converged RK4 reference): accepted steps 69,
#: 122, 187, 77, 164, 550 at 64x2, 64x4, 64x10, 256x2, 256x4, 256x10 against 69, 137, 208, 82, 190, 663 with AB2
#: (momentum 0, fraction 0.8); crossings +0.45, +0.06, +0.03, +0.30, +0.01, -0.00% against +0.31, +0.02, +0.02,
#: +0.12, -0.01, -0.00%. Momentum 0.5 (stable to 1.5) took more steps where the error sets them (75 at 64x2, 83 at
#: 256x2): its error constant is (5 + a) / (12 (1 - a)), against AB2's 5/12.
MULTISTEP_MOMENTUM = 0.25


class SplitSteps:
    """The step of an exponential integrator with ``n_stiff`` tracked directions (a mixin for
    :class:`~exponential_euler_solver.solvers.base.Solver` subclasses; ``n_stiff = 0`` is gradient descent).

    One plain step (exponential Euler)::

        h_i     = min(dt, dt phi_1(-lambda_i dt))                      i = 1..k
        theta  <- theta - dt * g + sum_i (dt - h_i) c_i v_i

    i.e. along each tracked eigenvector the move is ``-h_i c_i`` (the exact flow of the local quadratic for
    lambda_i > 0; an Euler step for lambda_i <= 0) and along the rest ``-dt g``. The step's model predicts the
    gradient at the new point, ``g_pred = g - sum_i (1 - p_i) c_i v_i`` with ``p_i = exp(-lambda_i dt)`` along
    exponentially integrated directions and 1 otherwise.

    Schemes with error control (``scheme``):

    ``"multistep"``: exponential Adams-Bashforth (ETD2) with Milne's error estimate, one gradient per step (see
        :mod:`.multistep`); the first step (and the first after a restart) is the plain step with the first-order
        estimate below.
    ``"heun"``: the plain step corrected by an exponential-Heun stage (two gradients per step): the gradient ``g*``
        is evaluated at the plain step's point and the mismatch ``r = g* - g_pred``, taken to grow linearly over
        the step, is integrated with the same propagators::

            theta <- theta_plain - (dt/2) r + sum_i (dt/2 - psi_i) (v_i . r) v_i,
            psi_i = dt phi_2(-lambda_i dt) = (lambda_i dt - 1 + exp(-lambda_i dt)) / (lambda_i^2 dt)
                    (lambda_i > 0; dt/2 otherwise)

        (second order); the norm of that correction, less the gradients' round-off, is the error estimate.

    Without error control (``rtol=None``) or with ``corrector=False`` under ``"heun"``, the plain step alone, with
    the first-order estimate ``(dt/2) ||g_new - g_pred||`` at its point when ``rtol`` is given.

    Attributes used: ``n_stiff``, ``scheme``, ``corrector``, ``_stiff()`` (the tracked ``(lambda, V)``),
    ``_basis_id()`` (changes when the tracked basis does) and the Solver's.
    """

    n_stiff = 0
    scheme = "heun"
    corrector = False
    _scratch_buffers: Optional[list] = None  # see _scratch()

    def _stiff(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract when n_stiff > 0
        raise NotImplementedError

    def _basis_id(self) -> int:
        return 0

    # -- the plain step and the Heun stage -----------------------------------------------------------------------
    def _plain(self, dt: float) -> tuple[Tensor, Tensor]:
        """The exponential Euler step and the gradient its model predicts at the new point."""
        g = self._grad
        if self.n_stiff == 0:
            return -dt * g, g
        lam, V = self._stiff()
        c = gram(V, g.unsqueeze(1))[:, 0]
        h = stiff_step_lengths(lam, dt)
        delta = -dt * g + V @ ((dt - h) * c).to(g.dtype)
        keep = torch.where(lam > 0, phi0(-lam * dt), torch.ones_like(lam))
        predicted = g - V @ ((1 - keep) * c).to(g.dtype)
        return delta, predicted

    def _mismatch_correction(self, dt: float, mismatch: Tensor) -> Tensor:
        """The position correction for a gradient mismatch ``r`` growing linearly over the step: ``-(dt/2) r``
        along explicit directions, ``-psi_i (v_i . r)`` along exponentially integrated ones."""
        correction = -(dt / 2) * mismatch
        if self.n_stiff == 0:
            return correction
        lam, V = self._stiff()
        r = gram(V, mismatch.unsqueeze(1))[:, 0]
        psi = torch.where(lam > 0, dt * phi2(-lam * dt), torch.full_like(lam, dt / 2))
        return correction + V @ ((dt / 2 - psi) * r).to(mismatch.dtype)

    def _heun(self, dt: float, delta: Tensor, predicted: Tensor) -> Proposal:
        stage_loss, stage_grad = self._evaluate(self.params + delta)
        if not (math.isfinite(stage_loss) and math.isfinite(norm(stage_grad))):
            return Proposal(delta=delta, finite=False, loss=stage_loss)
        mismatch = stage_grad - predicted
        correction = self._mismatch_correction(dt, mismatch)
        size = norm(mismatch)
        signal = max(0.0, 1.0 - self._gradient_noise(mismatch) / size) if size > 0 else 0.0
        err = signal * norm(correction)
        return Proposal(delta=delta + correction, cache={"error": err})

    # -- the multistep scheme ------------------------------------------------------------------------------------
    def _tracked(self):
        """``(V, mu)``: the tracked basis and its curvatures clipped at 0 (None, None without tracked
        directions)."""
        if self.n_stiff == 0:
            return None, None
        lam, V = self._stiff()
        return V, lam.clamp(min=0.0)

    def _coordinates(self, V: Tensor) -> multistep.Coordinates:
        coords = self._coords
        if coords is None or coords.basis != self._basis_id():
            coords = multistep.Coordinates.project(V, self._grad, self._history, self._basis_id())
            self._coords = coords
        return coords

    def _scratch(self) -> Tensor:
        """The ``delta`` buffer for a multistep step, kept from step to step (a fresh vector of the parameters' size
        is memory the operating system maps in page by page). There are two, used in turn: the previous step's,
        which the history holds, is never written over."""
        like, buffers = self.params, self._scratch_buffers
        if buffers is None or buffers[0].shape != like.shape or buffers[0].dtype != like.dtype \
                or buffers[0].device != like.device:
            buffers = self._scratch_buffers = [torch.empty_like(like) for _ in range(2)]
        held = None if self._history is None else self._history.delta
        return buffers[1] if held is not None and held.data_ptr() == buffers[0].data_ptr() else buffers[0]

    def _etd2(self, dt: float) -> Proposal:
        V, mu = self._tracked()
        coords = None if V is None else self._coordinates(V)
        # The candidate is formed in params itself, in the pass that forms delta (the loop undoes it on rejection):
        # no candidate buffer to write and no copy into params on acceptance, two passes over the parameters fewer.
        delta, info = multistep.propose(self._grad, self._history, V, mu, coords, dt, self.momentum,
                                        out=self._scratch(), params=self.params, candidate=self.params)
        return Proposal(delta=delta, cache={"kind": "etd2", "info": info, "coords": coords}, error_order=2,
                        candidate=self.params, size=info["size"], in_place=True)

    @property
    def _multistep(self) -> bool:
        """Whether steps follow the multistep scheme (``rtol=None`` is the plain one-step rule under any scheme)."""
        return self.scheme == "multistep" and self.rtol is not None

    # -- the contract --------------------------------------------------------------------------------------------
    def _propose(self, dt: float) -> Proposal:
        if self._multistep and self._history is not None:
            return self._etd2(dt)
        delta, predicted = self._plain(dt)
        if self.scheme == "heun" and self.corrector:
            return self._heun(dt, delta, predicted)
        return Proposal(delta=delta, cache={"kind": "plain", "predicted": predicted},
                        error_order=1 if self.scheme == "multistep" else None)

    def _error_norm(self, dt: float, proposal: Proposal, new_grad: Tensor) -> Optional[float]:
        cache = proposal.cache
        if "error" in cache:
            return cache["error"]
        if cache["kind"] == "etd2":
            V, mu = self._tracked()
            info = cache["info"]
            size, a_new = multistep.milne_error(dt, info, new_grad, self._grad, self._history, V, mu,
                                                cache["coords"])
            cache["a_new"] = a_new
            proposal.new_grad_norm = info.get("new_grad_norm")
            w, a = info["w"], info["momentum"]
            noise = self._gradient_noise(new_grad) * (2 + 2 * w + 2 * a / w)
            return multistep.milne_factor(w, a) * dt * max(0.0, size - noise)
        noise = self._gradient_noise(new_grad)
        mismatch = norm(new_grad - proposal.cache["predicted"])
        return 0.5 * dt * max(0.0, mismatch - noise)

    def _on_accept(self, dt: float, proposal: Proposal, new_grad: Tensor) -> None:
        if not self._multistep:
            return
        cache = proposal.cache
        coords = cache.get("coords") if cache.get("kind") == "etd2" else None
        if coords is not None and cache.get("a_new") is not None:
            info = cache["info"]
            self._coords = multistep.Coordinates(cache["a_new"], coords.a, info["e"], coords.basis)
        else:
            self._coords = None
        self._history = multistep.History(grad=self._grad, delta=proposal.delta, dt=dt, grad_norm=self._grad_norm)

    def _restart(self) -> None:
        """Forget the multistep history (the next step is a one-step start)."""
        self._history, self._coords = None, None

    def _scheme_state(self) -> dict:
        h, c = self._history, self._coords
        state = {}
        if h is not None:
            state["history"] = {"grad": h.grad.clone(), "delta": h.delta.clone(), "dt": h.dt, "grad_norm": h.grad_norm}
        if c is not None:  # carried from step to step; recomputing them would round differently
            state["coordinates"] = {"a": c.a, "a_prev": c.a_prev, "e_prev": c.e_prev, "basis": c.basis}
        return state

    def _load_scheme_state(self, state: dict) -> None:
        h, c = state.get("history"), state.get("coordinates")
        like = self.params
        self._history = None if h is None else multistep.History(
            grad=h["grad"].to(device=like.device, dtype=like.dtype),
            delta=h["delta"].to(device=like.device, dtype=like.dtype), dt=float(h["dt"]),
            grad_norm=float(h["grad_norm"]))
        self._coords = None if c is None else multistep.Coordinates(
            c["a"].to(like.device), c["a_prev"].to(like.device), c["e_prev"].to(like.device), int(c["basis"]))


class StiffSplitSolver(SplitSteps, EigenSolverBase):
    """:class:`SplitSteps` with the eigenpairs tracked along the trajectory and the explicit part's cap
    ``dt <= min(s * step_limit, c / |lambda_{k+1}|)`` (``s`` the warmup factor, ``c`` the ``stability_fraction``:
    1 for the one-step schemes, whose explicit part is an Euler step).

    Eigenpairs: under ``"heun"`` (and the plain rule) they are refreshed every ``max_eig_age`` accepted steps and
    after any rejection of a step that used older ones (:class:`~.eigen_based.EigenSolverBase`). Under
    ``"multistep"`` they age only while the stability cap binds, since only then can fresh (usually smaller)
    eigenvalues lengthen the steps: a refresh after ``max_eig_age`` capped steps (default
    :data:`MULTISTEP_MAX_EIG_AGE`), or after :data:`HEADROOM_AGE` capped steps whose error ratio had the controller
    ask for its largest growth (until such a refresh fails to raise the cap by :data:`HEADROOM_GAIN`), after
    :data:`MULTISTEP_AGE_BACKSTOP` times as many steps in all, and after a rejection that looks like stale curvature
    (the loss rose or was not finite, or the error ratio exceeded :data:`STALE_RATIO`).

    Subclasses give the user's step limit through :meth:`_step_limit` and the report through
    :meth:`_report_extras`.

    Args:
        params, loss: as :class:`~exponential_euler_solver.solvers.base.Solver`.
        n_stiff: tracked directions integrated exponentially, ``>= 0``; ``n_stiff + 1`` eigenpairs are tracked
            (the last sets the explicit part's cap).
        rtol: relative local error per step, or None (the plain rule); ``"auto"`` (default): the scheme's
            (:data:`DEFAULT_RTOLS`).
        scheme: ``"multistep"`` (default) or ``"heun"`` (see :class:`SplitSteps`).
        corrector: with ``"heun"``, the exponential-Heun stage; default: on when ``rtol`` is given.
        stability_fraction: ``c``, in ``(0, 1]``; default ``min(1, DEFAULT_STABILITY_FRACTION * (1 + momentum))``
            for ``"multistep"`` with error control (AB2's interval, widened by the momentum), 1 for the one-step
            rules (``"heun"``, or ``rtol=None``).
        momentum: ``a`` in ``[0, 1)``, the multistep step's weight on the previous step when no direction is
            tracked (``n_stiff = 0``): ``delta = alpha g_n + beta g_{n-1} + a delta_{n-1}`` with the second-order
            weights of :func:`.multistep.bulk_weights`, stable for ``h |lambda| < 1 + a``. It integrates the same
            flow (``a = 0`` is AB2); it is not the momentum of heavy-ball training. Default
            ``default_momentum`` (0 here; :data:`MULTISTEP_MOMENTUM` for adaptive gradient descent).
        eig_max_iters: LOBPCG iterations per warm refresh; default the scheme's (:data:`DEFAULT_EIG_MAX_ITERS`).
        eig_tol: the eigenpairs' relative residual tolerance, for every pair and refresh. When it is not given,
            the cold start asks it only of the pairs the step needs accurately (see
            :func:`~exponential_euler_solver.solvers.tracking.split_step_tolerances`; the others, the last among
            them, get a relative residual of 0.1 there).
        **kwargs: :class:`~exponential_euler_solver.solvers.eigen_based.EigenSolverBase` and
            :class:`~exponential_euler_solver.solvers.base.Solver` options.

    Raises:
        ValueError: an unknown ``scheme``, ``corrector`` given without ``scheme="heun"``, a
            ``stability_fraction`` outside ``(0, 1]``, or a ``momentum`` outside ``[0, 1)`` or given with tracked
            directions or without the multistep scheme.
    """

    default_scheme = "multistep"
    default_momentum = 0.0

    def __init__(self, params: Tensor, loss, n_stiff: int, *, rtol="auto", scheme: Optional[str] = None,
                 corrector: Optional[bool] = None, stability_fraction: Optional[float] = None,
                 eig_max_iters: Optional[int] = None, momentum: Optional[float] = None, **kwargs):
        scheme = self.default_scheme if scheme is None else scheme
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}")
        self.scheme = scheme
        if isinstance(rtol, str):
            if rtol != "auto":
                raise ValueError(f"rtol must be a positive number, None or 'auto'; got {rtol!r}")
            rtol = DEFAULT_RTOLS[scheme]
        if eig_max_iters is None:
            eig_max_iters = DEFAULT_EIG_MAX_ITERS[scheme]
        if corrector is not None and scheme != "heun":
            raise ValueError(f"corrector is the 'heun' scheme's stage; pass scheme='heun' with it (this solver's "
                             f"scheme is {scheme!r}); got corrector={corrector!r}")
        super().__init__(params, loss, n_stiff + 1, rtol=rtol, eig_max_iters=eig_max_iters, **kwargs)
        self.n_stiff = n_stiff
        self.corrector = (self.rtol is not None) if corrector is None else bool(corrector)
        if momentum is None:
            momentum = self.default_momentum if self._multistep else 0.0
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1); got {momentum!r}")
        if momentum and (n_stiff > 0 or not self._multistep):
            raise ValueError(f"momentum is a weight of the multistep scheme without tracked directions (adaptive "
                             f"gradient descent); got momentum={momentum!r} with {n_stiff} tracked directions and "
                             f"scheme {scheme!r}, rtol {self.rtol!r}")
        self.momentum = float(momentum)
        if stability_fraction is None:  # the plain rule (rtol=None) is one-step: Euler's bound
            stability_fraction = (min(1.0, DEFAULT_STABILITY_FRACTION * (1 + self.momentum)) if self._multistep
                                  else 1.0)
        stability_fraction = positive_float("stability_fraction", stability_fraction)
        if stability_fraction > 1:
            raise ValueError(f"stability_fraction must be in (0, 1]; got {stability_fraction!r}")
        self.stability_fraction = stability_fraction
        if "eig_tol" not in kwargs:  # a tolerance the user asked for holds for every pair
            self.tracker.cold_tol = split_step_tolerances(self.tracker.tol, stability_fraction)
        self._history: Optional[multistep.History] = None
        self._coords: Optional[multistep.Coordinates] = None
        self._capped_age = 0  # steps since the refresh that the stability cap bound (multistep)
        self._headroom_age = 0  # of them, those after which the controller asked for its largest growth
        self._headroom_on = True  # the rule is off after a refresh it triggered gained nothing

    def _step_limit(self) -> float:  # pragma: no cover - abstract
        """The user's largest step (``max_step_size`` or ``lr``)."""
        raise NotImplementedError

    def _stiff(self) -> tuple[Tensor, Tensor]:
        k = self.n_stiff
        return self.tracker.values[:k], self.tracker.vectors[:, :k]

    def _basis_id(self) -> int:
        return self.tracker.n_refreshes

    def _stability_curvature(self) -> Optional[float]:
        return abs(float(self.tracker.values[self.n_stiff]))

    def _stability_cap(self) -> float:
        curvature = self._stability_curvature()
        return math.inf if curvature == 0 else self.stability_fraction / curvature

    def _max_dt(self) -> float:
        return min(self._scale() * self._step_limit(), self._stability_cap())

    def _default_max_eig_age(self) -> int:
        return MULTISTEP_MAX_EIG_AGE if self.scheme == "multistep" else super()._default_max_eig_age()

    def _refresh_due(self) -> bool:
        if not self._multistep or self.tracker.vectors is None:
            return super()._refresh_due()
        return (self._capped_age >= self.max_eig_age
                or self.tracker.age >= MULTISTEP_AGE_BACKSTOP * self.max_eig_age)

    def _prepare(self) -> None:
        # The headroom rule's refresh, judged by what it did to the cap (the regular ones: EigenSolverBase's).
        if (self._multistep and self.tracker.vectors is not None and self._headroom_on
                and self._headroom_age >= HEADROOM_AGE and self._capped_age < self.max_eig_age):
            before = self._stability_cap()
            self._refresh()
            self._headroom_on = self._stability_cap() >= HEADROOM_GAIN * before
            return
        super()._prepare()

    def _refresh(self) -> None:
        super()._refresh()
        self._capped_age = self._headroom_age = 0

    def _on_reject(self, finite: bool, decreased: bool, ratio: Optional[float]) -> None:
        # The multistep scheme refreshes only when the rejection looks like stale curvature: a loss that rose or
        # was not finite, or an error far over the tolerance; a ratio a little over 1 is the controller reaching.
        if self._multistep and finite and decreased and (
                ratio is None or ratio <= STALE_RATIO):
            return
        super()._on_reject(finite, decreased, ratio)

    def _on_accept(self, dt: float, proposal: Proposal, new_grad: Tensor) -> None:
        cap = self._stability_cap()
        if dt >= 0.999 * cap and cap <= self._scale() * self._step_limit():
            self._capped_age += 1
            # The controller will ask for its largest growth: the error leaves room the stale cap does not.
            if proposal.error_ratio is not None and self.controller.factor(
                    proposal.error_ratio, proposal.error_order) >= MAX_GROWTH:
                self._headroom_age += 1
        super()._on_accept(dt, proposal, new_grad)

    def _first_dt(self) -> Optional[float]:
        """The first step of the multistep scheme (a one-step start): small enough that its first-order error
        ``(dt/2) |lambda_{k+1}| ||g||`` is within the tolerance, ``SAFETY * rtol / |lambda_{k+1}|``."""
        if not self._multistep:
            return None
        curvature = self._stability_curvature()
        return None if curvature == 0 else SAFETY * self.rtol / curvature

    def _method_state(self) -> dict:
        return {**super()._method_state(), **self._scheme_state(), "capped_age": self._capped_age,
                "headroom": [self._headroom_age, self._headroom_on],
                "scheme": self.scheme, "momentum": self.momentum}

    def _load_method_state(self, state: dict) -> None:
        saved = state.get("scheme", "heun")  # files written before the multistep scheme hold heun runs
        if saved != self.scheme:
            raise ValueError(f"the state was saved by a {saved!r} run; build the solver with scheme={saved!r} to "
                             f"continue it (this one is {self.scheme!r})")
        saved = float(state.get("momentum", 0.0))  # files written before momentum hold runs without it
        if saved != self.momentum:
            raise ValueError(f"the state was saved by a run with momentum={saved!r}; build the solver with it to "
                             f"continue (this one has momentum={self.momentum!r})")
        super()._load_method_state(state)
        self._load_scheme_state(state)
        self._capped_age = int(state.get("capped_age", 0))
        headroom = state.get("headroom", [0, True])  # files written before the rule: its initial state
        self._headroom_age, self._headroom_on = int(headroom[0]), bool(headroom[1])


class ExponentialEulerSolver(StiffSplitSolver):
    """Exponential Euler on the gradient flow with ``stiff_dim`` stiff Hessian directions.

    With ``(lambda_i, v_i)`` the ``stiff_dim + 1`` Hessian eigenpairs of largest magnitude at theta, the step is
    :class:`StiffSplitSolver`'s with ``k = stiff_dim`` and::

        dt = min(s * max_step_size, 1 / |lambda_{k+1}|)

    (``s = warmup_factor`` during the first ``warmup_iters`` steps, else 1); with error control the controller
    may take dt below that cap. ``params`` is updated in place by ``step()``.

    Args:
        params: flat parameters (updated in place).
        loss: the :class:`~exponential_euler_solver.LossFunction`.
        max_step_size: the largest step, > 0.
        stiff_dim: number of stiff directions k, ``1 <= k < P`` (C - 1 for C-class cross-entropy).
        warmup_iters: steps with the reduced cap ``warmup_factor * max_step_size``.
        warmup_factor: ``s`` during warmup, > 0.
        rtol: relative local error per step (default
            :data:`~exponential_euler_solver.solvers.control.DEFAULT_RTOL`), or None for the plain rule
            (eigenpairs refreshed every step, one gradient per step).
        **kwargs: ``corrector`` (:class:`StiffSplitSolver`), ``eig_tol``, ``eig_max_iters``, ``max_eig_age``,
            ``seed``, ``curvature`` (see :class:`~exponential_euler_solver.solvers.eigen_based.EigenSolverBase`)
            and the :class:`~exponential_euler_solver.solvers.base.Solver` options.

    The report's ``eigvals`` are the ``stiff_dim + 1`` eigenvalues used (float64).

    Raises:
        ValueError: ``stiff_dim`` not an int in ``[1, P)``, or a non-positive step size or warmup value.
        TypeError: ``loss`` is not a LossFunction.
    """

    # Measured with the benchmark's defaults (digits, seed 0, 2 threads): eigenpairs every 20 instead of 10 steps
    # took 64x10 from 95 s to 75 s and 256x10 from 252 s to 193 s (445 instead of 665 HVPs), crossing times moved
    # by at most 0.06%; 64x2 went from 13.7 s to 14.3 s (staler pairs, smaller steps).
    default_max_eig_age = 20

    def __init__(self, params: Tensor, loss, max_step_size: float, stiff_dim: int, warmup_iters: int = 0,
                 warmup_factor: float = 1.0, *, rtol="auto", **kwargs):
        check_loss(loss)
        n_params = loss.n_params
        if isinstance(stiff_dim, bool) or not isinstance(stiff_dim, int) or not 1 <= stiff_dim < n_params:
            raise ValueError(f"stiff_dim must be a positive int smaller than the number of parameters ({n_params}); "
                             f"got {stiff_dim!r}")
        super().__init__(params, loss, stiff_dim, warmup_iters=warmup_iters, warmup_factor=warmup_factor,
                         rtol=rtol, **kwargs)
        self.max_step_size = positive_float("max_step_size", max_step_size)
        self.stiff_dim = stiff_dim

    def _step_limit(self) -> float:
        return self.max_step_size

    def _report_extras(self) -> dict:
        extras = {"eigvals": self.tracker.values.clone()}
        if self.report_eigvecs:
            extras["eigvecs"] = self.tracker.vectors
        return extras
