"""The solver contract and the step loop: a step proposes, the controller decides.

The contract
============
A solver integrates the gradient flow ``d theta/dt = -grad L(theta)`` of a
:class:`~exponential_euler_solver.LossFunction` in accepted steps. :meth:`Solver.step` updates ``params`` **in
place** and returns a :class:`StepReport`. The loop is written once, here; a method is a subclass that provides:

``_max_dt() -> float``
    The largest step the method may take from the current point (its stability cap and the user's step limit).
``_propose(dt) -> Proposal``
    The candidate parameter change for a step of ``dt`` from the current point ``params`` with gradient
    ``self._grad`` (cached, never recomputed). It may evaluate gradients at stage points through
    :meth:`Solver._evaluate`, which counts them; it must not change ``params`` or any state that a retry from
    the same point would see. A stage whose loss or gradient is not finite is reported with
    ``Proposal(delta, finite=False, loss=...)``. A method that forms the candidate point or ``||delta||`` in the
    same pass as ``delta`` hands them over (``Proposal.candidate``, ``Proposal.size``); the loop then does not
    form them again. The one exception to leaving ``params`` alone: a method may form the candidate in ``params``
    itself (``params += delta``, ``Proposal.in_place``); the loop then evaluates it there, keeps it on acceptance,
    and undoes it (``params -= delta``: the point it started from to one rounding per entry) before anything else
    when the candidate is rejected or its evaluation raises.
``_error_norm(dt, proposal, new_grad) -> float | None``
    The method's local error estimate for the accepted point, in parameter space (an absolute norm), given the
    gradient at the candidate (which the loop evaluates anyway: it is the next step's gradient). None: no
    estimate. Called before the loop takes the new gradient's norm (whenever the candidate's loss is finite); an
    estimate that computes that norm in passing sets ``proposal.new_grad_norm`` and saves the loop a pass. The
    controller works with ``ratio = error / (rtol * ||delta||)``.

and may override:

``_prepare()``
    Gather the curvature the step needs at the current point (may cost Hessian-vector products; add them to
    ``n_hvp``). Called once per step, before the first proposal.
``_on_reject(finite, decreased, ratio)``
    Called after each rejection, before the retry, with why the candidate failed (its loss or gradient was not
    finite; it did not decrease the loss; its error ratio): e.g. to refresh stale curvature. The cap is re-read
    after it.
``_on_accept(dt, proposal, new_grad)``
    Called once the candidate is accepted, before ``params`` and the cached gradient move to it: the place to
    keep what a multistep method needs from this step. ``proposal.error_ratio`` then holds the accepted error
    ratio.
``_report_extras() -> dict``
    Extra :class:`StepReport` fields (``sharpness``, ``eigvals``, ``eigvecs``).
``_method_state() / _load_method_state(state)``
    What the method caches between steps (eigenpairs, history), as tensors and plain containers, so that a
    checkpoint continues the run bit for bit.
``_stability_curvature() -> float | None``
    The ``|lambda|`` that ``error_if_unstable`` checks ``dt`` against.
``_first_dt() -> float | None``
    A bound on the very first step (before the controller has a proposal), e.g. from the method's a priori error;
    None: only ``_max_dt()``.

Class attributes: ``order`` (convergence order of the accepted solution) and ``error_order`` (the power of dt by
which the error *ratio* grows: the order of the error estimate minus one; the controller's exponent).

What the loop guarantees: the loss and gradient are evaluated at every candidate (one pass over the data); a
candidate is accepted when the controller says so (finite, decreased when ``monotone``, error ratio <= 1); a
rejected candidate is retried from the same point with a smaller dt and the same curvature unless
``_on_reject`` refreshes it; after ``max_rejections`` in a row :class:`StepRejectedError` is raised.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._timing import clock
from .._validate import non_negative_int, positive_float, positive_int
from ..errors import NonFiniteError, StepRejectedError, UnstableStepError
from ..linalg.blocks import norm as _norm
from .control import DEFAULT_RTOL, StepSizeController

__all__ = ["Solver", "StepReport", "Proposal", "DEFAULT_RTOL", "MAX_REJECTIONS", "check_loss"]

MAX_REJECTIONS = 30  # consecutive rejections before a step gives up (dt has then shrunk by 2**30 at least)
GRADIENT_NOISE_FACTOR = 16  # gradient differences below this many ulps of the largest gradient norm are noise
ROUNDOFF_FACTOR = 64  # loss changes below this many ulps of the loss count as "no change" (a stationary point)
DEFAULT_CHECK_EVERY = 100  # steps between data-parallel checks that all ranks hold the same parameters




def check_loss(loss) -> None:
    """Raise TypeError unless ``loss`` is a :class:`~exponential_euler_solver.LossFunction` (checked by what a
    solver uses of it, so a subclass or a wrapper with the same interface passes)."""
    from ..loss import LossFunction

    if isinstance(loss, LossFunction):
        return
    missing = [name for name in ("gradient", "check_params", "n_params", "batches", "batch_loss", "reduce")
               if not hasattr(loss, name)]
    if missing:
        raise TypeError(f"loss must be an exponential_euler_solver.LossFunction (build one with "
                        f"LossFunction(dataset, criterion, net)); got {type(loss).__name__}, which has no "
                        f"{', '.join(missing)}")


@dataclass
class StepReport:
    """What one call to ``step()`` did.

    Attributes:
        step: index of the step (0 for the first).
        loss: loss at the start of the step.
        new_loss: loss at the end of the step (at the new parameters).
        dt: flow time advanced by the step.
        t: flow time after the step (a Python float, accumulated in float64).
        t_start: flow time at the start of the step (the previous step's ``t``).
        slope, new_slope: ``dL/dt = -||grad L||^2`` at the start and at the end of the step (float64 norms),
            for interpolating the loss within the step.
        n_grad: gradient evaluations so far (cumulative; a loss-and-gradient pass counts one).
        n_hvp: Hessian-vector products so far (cumulative).
        n_rejected: rejected proposals so far (cumulative).
        rejections: rejected proposals within this step.
        error_ratio: the accepted step's error estimate over its tolerance (None without error control).
        sharpness: |lambda_1| used by the step (AdaptiveGradientDescent, RungeKutta4Solver), else None.
        eigvals: float64 eigenvalues used by the step (ExponentialEulerSolver), else None.
        gradient: the gradient at the start of the step, when ``report_gradient=True``.
        eigvecs: the eigenvectors used, when ``report_eigvecs=True``.
        eig_age: accepted steps since the eigenpairs used were computed (0: computed for this step), for the
            solvers that track eigenpairs.
        seconds: wall-clock seconds the step took (``time.perf_counter``, from entering ``step()`` to its return).
        time_grad, time_hvp, time_eig: cumulative wall-clock seconds so far in gradient evaluations, in curvature
            operator products, and in the eigensolver's own block work (its refreshes less their products).
    """

    step: int
    loss: float
    new_loss: float
    dt: float
    t: float
    n_grad: int
    n_hvp: int
    n_rejected: int
    rejections: int = 0
    error_ratio: Optional[float] = None
    sharpness: Optional[float] = None
    eigvals: Optional[Tensor] = None
    gradient: Optional[Tensor] = None
    eigvecs: Optional[Tensor] = None
    eig_age: Optional[int] = None
    t_start: Optional[float] = None
    slope: Optional[float] = None
    new_slope: Optional[float] = None
    seconds: Optional[float] = None
    time_grad: Optional[float] = None
    time_hvp: Optional[float] = None
    time_eig: Optional[float] = None


@dataclass
class Proposal:
    """A candidate step from the current point (see the contract in the module docstring).

    Attributes:
        delta: the parameter change.
        finite: False when a stage the method evaluated had a non-finite loss or gradient (the candidate is then
            rejected without being evaluated).
        loss: that stage's loss, for the rejection message; None otherwise.
        cache: what the method keeps for its own error estimate and acceptance (read only by the method).
        error_order: the order of this proposal's error ratio when it differs from the solver's ``error_order``
            (e.g. the one-step start of a multistep method); None: the solver's.
        candidate: ``params + delta``, when the method formed it with ``delta`` (in a buffer of its own, or in
            ``params`` itself with ``in_place``); None: the loop forms it.
        in_place: the method added ``delta`` to ``params`` (``candidate`` is ``params``); the loop undoes it when
            the candidate is rejected.
        size: ``||delta||`` when the method has it; None: the loop computes it (when the error ratio needs it).
        new_grad_norm: ``||grad L(candidate)||``, set by ``_error_norm`` when its estimate computed it in passing;
            None: the loop computes it.
        error_ratio: the error ratio of the accepted candidate, set by the loop before ``_on_accept``.
    """

    delta: Tensor
    finite: bool = True
    loss: Optional[float] = None
    cache: Optional[dict] = None
    error_order: Optional[int] = None
    candidate: Optional[Tensor] = None
    size: Optional[float] = None
    new_grad_norm: Optional[float] = None
    error_ratio: Optional[float] = None
    in_place: bool = False


class Solver:
    """Base class of the gradient-flow solvers for ``d theta/dt = -grad L(theta)`` (see the module docstring for
    the contract a method implements).

    ``step()`` updates ``params`` **in place** and returns a :class:`StepReport`. Each proposed step is
    evaluated at its candidate point (loss and gradient in one pass over the data; that gradient is the next
    step's, so nothing is computed twice). A proposal is rejected, and retried from the same point with a
    smaller dt, when the loss there is not finite, when it did not decrease (``monotone=True``), or when the
    error estimate exceeds ``rtol``.

    Args:
        params: 1-D floating tensor of the network's parameters, updated in place.
        loss: a :class:`~exponential_euler_solver.LossFunction`.
        rtol: admitted relative local error per step (see :mod:`.control`); None disables error control.
        monotone: reject steps that do not decrease the loss.
        max_rejections: consecutive rejections after which :class:`StepRejectedError` is raised.
        report_gradient: put the gradient at the start of each step into the report.
        report_eigvecs: put the eigenvectors used into the report.
        error_if_unstable: raise :class:`UnstableStepError` when a step's dt exceeds ``2/|lambda|`` for the
            curvature it was checked against.
        check_every: when ``loss`` is data-parallel (its ``data_parallel`` is not None), check every this many
            steps, starting with the first, that all ranks hold bit-identical parameters (one 16-byte
            all-reduce); 0 disables the check.

    Raises:
        TypeError: ``loss`` is not a LossFunction, or ``params`` not a tensor.
        ValueError: invalid arguments (see each solver).
    """

    order = 1
    error_order = 1

    def __init__(self, params: Tensor, loss, *, rtol: Optional[float] = None, monotone: bool = True,
                 max_rejections: int = MAX_REJECTIONS, report_gradient: bool = False, report_eigvecs: bool = False,
                 error_if_unstable: bool = False, check_every: int = DEFAULT_CHECK_EVERY):
        check_loss(loss)
        loss.check_params(params)
        if rtol is not None:
            rtol = positive_float("rtol", rtol)
        positive_int("max_rejections", max_rejections)
        self.params = params
        self.loss = loss
        self.max_rejections = max_rejections
        self.report_gradient = bool(report_gradient)
        self.report_eigvecs = bool(report_eigvecs)
        self.error_if_unstable = bool(error_if_unstable)
        self.check_every = non_negative_int("check_every", check_every)
        self.controller = StepSizeController(rtol, error_order=self.error_order, monotone=bool(monotone))
        self.t = 0.0
        self.n_steps = 0
        self.n_grad = 0
        self.n_hvp = 0
        self.n_rejected = 0
        self.time_grad = 0.0
        self._loss_value: Optional[float] = None
        self._grad: Optional[Tensor] = None
        self._grad_norm: Optional[float] = None  # float64 norm of the cached gradient
        self._grad_scale = 0.0  # largest gradient norm seen: the scale of the gradients' round-off
        self._loss_scale = 0.0  # largest |loss| seen: the scale of the loss's round-off

    @property
    def rtol(self) -> Optional[float]:
        return self.controller.rtol

    @property
    def monotone(self) -> bool:
        return self.controller.monotone

    @property
    def loss_value(self) -> Optional[float]:
        """The loss at the current parameters, once it has been evaluated (None before the first step)."""
        return self._loss_value

    def current_gradient(self) -> Tensor:
        """The gradient at the current parameters (evaluated now if it is not cached yet, and then reused by the
        next step; do not modify it).

        Raises:
            NonFiniteError: the loss or gradient at the current parameters is not finite.
        """
        self._ensure_gradient()
        return self._grad

    # -- hooks for subclasses (see the module docstring) -----------------------------------------------------
    def _prepare(self) -> None:
        pass

    def _max_dt(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _propose(self, dt: float) -> Proposal:  # pragma: no cover - abstract
        raise NotImplementedError

    def _error_norm(self, dt: float, proposal: Proposal, new_grad: Tensor) -> Optional[float]:
        return None

    def _on_reject(self, finite: bool, decreased: bool, ratio: Optional[float]) -> None:
        pass

    def _on_accept(self, dt: float, proposal: Proposal, new_grad: Tensor) -> None:
        pass

    def _stability_curvature(self) -> Optional[float]:
        return None

    def _first_dt(self) -> Optional[float]:
        return None

    def _report_extras(self) -> dict:
        return {}

    def _method_state(self) -> dict:
        return {}

    def _load_method_state(self, state: dict) -> None:
        pass

    def _curvature_seconds(self) -> tuple[float, float]:
        """Seconds so far in curvature products and in the eigensolver's own work (0, 0 without curvature)."""
        return 0.0, 0.0

    # -- shared machinery --------------------------------------------------------------------------------------
    def _evaluate(self, params: Tensor) -> tuple[float, Tensor]:
        """Loss and gradient at ``params`` (one pass over the data; counted in ``n_grad``)."""
        start = clock(params.device)
        loss, g = self.loss.gradient(params)
        value = float(loss)
        self.time_grad += clock(params.device) - start
        self.n_grad += 1
        return value, g

    def _ensure_gradient(self) -> None:
        if self._grad is None:
            self._loss_value, self._grad = self._evaluate(self.params)
            self._grad_norm = _norm(self._grad)
            self._grad_scale = max(self._grad_scale, self._grad_norm)
            self._loss_scale = max(self._loss_scale, abs(self._loss_value))
        # A NaN or infinite entry makes the norm NaN or infinite: no separate scan of the gradient.
        if not (math.isfinite(self._loss_value) and math.isfinite(self._grad_norm)):
            raise NonFiniteError(f"the loss ({self._loss_value}) or gradient at the current parameters is not "
                                 "finite", step=self.n_steps, t=self.t)

    def _gradient_noise(self, like: Tensor) -> float:
        """Gradients are known only to round-off of the largest gradient seen in the run; a gradient difference
        below this is noise, not error (it matters at stationary points of singular problems)."""
        return GRADIENT_NOISE_FACTOR * torch.finfo(like.dtype).eps * self._grad_scale

    def _error_ratio(self, dt: float, proposal: Proposal, new_grad: Tensor) -> Optional[float]:
        if self.controller.rtol is None:
            return None
        err = self._error_norm(dt, proposal, new_grad)
        if err is None:
            return None
        size = _norm(proposal.delta) if proposal.size is None else proposal.size
        return 0.0 if size == 0 else err / (self.controller.rtol * size)

    def _undo(self, proposal: Proposal) -> None:
        """Move ``params`` back from a candidate the method formed in place."""
        if proposal.in_place:
            with torch.no_grad():
                self.params.sub_(proposal.delta)
            proposal.in_place = False

    def _stationary(self, loss0: float, new_loss: float, delta: Tensor) -> bool:
        """True when both the loss change and the first-order predicted decrease ``-g . delta`` are at the
        loss's round-off level: the flow is at a stationary point to working precision and a strict decrease
        cannot be asked for."""
        # The loss is known to round-off of the largest loss seen in the run (its terms cancel near a minimum).
        tiny = ROUNDOFF_FACTOR * torch.finfo(self.params.dtype).eps * max(self._loss_scale, abs(new_loss))
        if abs(new_loss - loss0) > tiny:
            return False
        return abs(float(torch.dot(self._grad, delta))) <= tiny

    def step(self) -> StepReport:
        """Advance the flow by one accepted step; updates ``params`` in place.

        Returns:
            A :class:`StepReport`.

        Raises:
            NonFiniteError: the loss or gradient at the current point is not finite.
            StepRejectedError: ``max_rejections`` consecutive proposals were rejected.
            UnstableStepError: with ``error_if_unstable``, dt exceeded ``2/|lambda|``.
            RankDivergenceError: data-parallel ranks hold different parameters (checked every ``check_every``).
        """
        start = time.perf_counter()
        data_parallel = getattr(self.loss, "data_parallel", None)
        if data_parallel is not None and self.check_every and self.n_steps % self.check_every == 0:
            data_parallel.check_replicas_agree(self.params, step=self.n_steps, t=self.t)
        self._ensure_gradient()
        loss0, g0, norm0 = self._loss_value, self._grad, self._grad_norm
        self._prepare()
        dt = self.controller.limit(self._max_dt())
        first = self._first_dt() if self.controller.dt is None else None
        if first is not None:
            dt = min(dt, first)
        tried: list[float] = []
        rejections = 0
        while True:
            curvature = self._stability_curvature()
            if self.error_if_unstable and curvature is not None and dt * curvature > 2.0:
                raise UnstableStepError(f"dt = {dt:.6g} exceeds the stability bound 2/|lambda| = "
                                        f"{2.0 / curvature:.6g}", step=self.n_steps, t=self.t)
            proposal = self._propose(dt)
            finite, new_loss = proposal.finite, proposal.loss
            ratio = None
            if finite:
                candidate = self.params + proposal.delta if proposal.candidate is None else proposal.candidate
                try:
                    new_loss, new_grad = self._evaluate(candidate)
                    if math.isfinite(new_loss):  # the estimate first: it may give the new gradient's norm in passing
                        ratio = self._error_ratio(dt, proposal, new_grad)
                    new_norm = _norm(new_grad) if proposal.new_grad_norm is None else proposal.new_grad_norm
                except BaseException:
                    self._undo(proposal)
                    raise
                finite = math.isfinite(new_loss) and math.isfinite(new_norm)
            stationary = finite and self._stationary(loss0, new_loss, proposal.delta)
            decreased = finite and (new_loss < loss0 or stationary)
            # At a stationary point to working precision the error estimate is round-off: nothing to control.
            ratio = math.inf if not finite else 0.0 if stationary else ratio
            if self.controller.accepts(finite=finite, decreased=decreased, ratio=ratio):
                break
            self._undo(proposal)
            tried.append(new_loss)
            rejections += 1
            self.n_rejected += 1
            if rejections >= self.max_rejections:
                raise StepRejectedError(
                    f"{rejections} consecutive proposals were rejected from loss {loss0:.6g} (last dt {dt:.3g}; "
                    f"candidate losses {', '.join(f'{v:.6g}' for v in tried[-5:])})",
                    step=self.n_steps, t=self.t, losses=tried)
            dt = self.controller.retry(dt, ratio, finite=finite, decreased=decreased, error_order=proposal.error_order)
            self._on_reject(finite, decreased, ratio)
            dt = min(dt, self._max_dt())  # a refresh on rejection may have lowered the stability cap
        proposal.error_ratio = ratio
        self._on_accept(dt, proposal, new_grad)
        if not proposal.in_place:
            with torch.no_grad():
                self.params.copy_(candidate)
        self.controller.accepted(dt, ratio, proposal.error_order)
        t_start, self.t = self.t, self.t + dt
        self._loss_value, self._grad, self._grad_norm = new_loss, new_grad, new_norm
        self._grad_scale = max(self._grad_scale, self._grad_norm)
        report = StepReport(step=self.n_steps, loss=loss0, new_loss=new_loss, dt=dt, t=self.t, t_start=t_start,
                            slope=-norm0 ** 2, new_slope=-self._grad_norm ** 2,
                            n_grad=self.n_grad, n_hvp=self.n_hvp, n_rejected=self.n_rejected,
                            rejections=rejections, error_ratio=ratio,
                            gradient=g0 if self.report_gradient else None, **self._report_extras())
        report.time_grad = self.time_grad
        report.time_hvp, report.time_eig = self._curvature_seconds()
        self.n_steps += 1
        report.seconds = time.perf_counter() - start
        return report

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: parameters, flow time, counters, the cached loss and
        gradient at the current point, controller and method state (torch.optim convention)."""
        return {
            "class": type(self).__name__,
            "params": self.params.detach().clone(),
            "t": self.t, "n_steps": self.n_steps, "n_grad": self.n_grad, "n_hvp": self.n_hvp,
            "n_rejected": self.n_rejected,
            "loss_value": self._loss_value,
            "grad": None if self._grad is None else self._grad.clone(),
            "grad_norm": self._grad_norm,  # as the run computed it (a fused pass rounds differently from _norm)
            "grad_scale": self._grad_scale, "loss_scale": self._loss_scale, "time_grad": self.time_grad,
            "controller": self.controller.state_dict(),
            "method": self._method_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; ``params`` is overwritten in place.

        Raises:
            ValueError: the state was saved by another solver class or for a different parameter size.
        """
        if state.get("class") != type(self).__name__:
            raise ValueError(f"state was saved by {state.get('class')!r}, not {type(self).__name__!r}")
        if state["params"].shape != self.params.shape:
            raise ValueError(f"state holds {tuple(state['params'].shape)} parameters; this solver has "
                             f"{tuple(self.params.shape)}")
        with torch.no_grad():
            self.params.copy_(state["params"])
        self.t, self.n_steps = float(state["t"]), int(state["n_steps"])
        self.n_grad, self.n_hvp, self.n_rejected = state["n_grad"], state["n_hvp"], state["n_rejected"]
        self._loss_value = state["loss_value"]
        self._grad_scale, self._loss_scale = state["grad_scale"], state["loss_scale"]
        self.time_grad = float(state.get("time_grad", 0.0))
        g = state["grad"]
        self._grad = None if g is None else g.to(device=self.params.device, dtype=self.params.dtype).clone()
        saved_norm = state.get("grad_norm")  # files written before it was saved: recomputed
        self._grad_norm = None if g is None else float(saved_norm) if saved_norm is not None else _norm(self._grad)
        self.controller.load_state_dict(state["controller"])
        self._load_method_state(state["method"])
