"""The solver base class: a step proposes, the controller decides."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..control import DEFAULT_RTOL, StepSizeController
from ..errors import NonFiniteError, StepRejectedError, UnstableStepError
from ._validate import non_negative_int, positive_float, positive_int

__all__ = ["Solver", "StepReport", "Proposal", "DEFAULT_RTOL", "MAX_REJECTIONS"]

MAX_REJECTIONS = 30  # consecutive rejections before a step gives up (dt has then shrunk by 2**30 at least)
GRADIENT_NOISE_FACTOR = 16  # gradient differences below this many ulps of the largest gradient norm are noise
ROUNDOFF_FACTOR = 64  # loss changes below this many ulps of the loss count as "no change" (a stationary point)
DEFAULT_CHECK_EVERY = 100  # steps between data-parallel checks that all ranks hold the same parameters


@dataclass
class StepReport:
    """What one call to ``step()`` did.

    Attributes:
        step: index of the step (0 for the first).
        loss: loss at the start of the step.
        new_loss: loss at the end of the step (at the new parameters).
        dt: flow time advanced by the step.
        t: flow time after the step (a Python float, accumulated in float64).
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


@dataclass
class Proposal:
    """A candidate step from the current point.

    Attributes:
        delta: the parameter change.
        predicted_gradient: the gradient the step's own model predicts at the candidate, for the embedded
            error estimate ``e = (dt/2) (g_new - predicted_gradient)``; None when the method estimates
            nothing this way.
        error_norm: an error estimate the proposal already made (a corrected step's correction), else None.
    """

    delta: Tensor
    predicted_gradient: Optional[Tensor] = None
    error_norm: Optional[float] = None


class Solver:
    """Base class of the gradient-flow solvers for ``d theta/dt = -grad L(theta)``.

    ``step()`` updates ``params`` **in place** and returns a :class:`StepReport`. Each proposed step is
    evaluated at its candidate point (loss and gradient in one pass over the data; that gradient is the next
    step's, so nothing is computed twice). A proposal is rejected, and retried from the same point with a
    smaller dt and the same curvature information (no new Hessian-vector products), when the loss there is not
    finite, when it did not decrease (``monotone=True``), or when the error estimate exceeds ``rtol``.

    Args:
        params: 1-D floating tensor of the network's parameters, updated in place.
        loss: a :class:`~exponential_euler_solver.LossFunction` (or anything with ``gradient``, ``hvp``,
            ``n_params`` and ``check_params``).
        rtol: admitted relative local error per step (see :mod:`..control`); None disables error control.
        monotone: reject steps that do not decrease the loss.
        max_rejections: consecutive rejections after which :class:`StepRejectedError` is raised.
        report_gradient: put the gradient at the start of each step into the report.
        report_eigvecs: put the eigenvectors used into the report.
        error_if_unstable: raise :class:`UnstableStepError` when a step's dt exceeds ``2/|lambda|`` for the
            curvature it was checked against.
        corrector: take a second-order (Heun-type) step: evaluate the gradient at the plain step's point, and
            correct the step by the integral of the model's gradient mismatch, assumed to grow linearly over the
            step (``-(dt/2) r`` for Euler directions; see each solver). Costs one more gradient evaluation per
            proposal; the size of the correction is the error estimate. Default: on when ``rtol`` is given,
            off for ``rtol=None`` (the plain step rule).
        check_every: when ``loss`` is data-parallel (its ``data_parallel`` is not None), check every this many
            steps, starting with the first, that all ranks hold bit-identical parameters (one 16-byte
            all-reduce); 0 disables the check.

    Raises:
        TypeError, ValueError: invalid arguments (see each solver).
    """

    order = 1

    def __init__(self, params: Tensor, loss, *, rtol: Optional[float] = None, monotone: bool = True,
                 corrector: Optional[bool] = None, max_rejections: int = MAX_REJECTIONS, report_gradient: bool = False,
                 report_eigvecs: bool = False, error_if_unstable: bool = False,
                 check_every: int = DEFAULT_CHECK_EVERY):
        loss.check_params(params)
        if rtol is not None:
            rtol = positive_float("rtol", rtol)
        positive_int("max_rejections", max_rejections)
        self.params = params
        self.loss = loss
        self.monotone = bool(monotone)
        self.corrector = (rtol is not None) if corrector is None else bool(corrector)
        self.max_rejections = max_rejections
        self.report_gradient = bool(report_gradient)
        self.report_eigvecs = bool(report_eigvecs)
        self.error_if_unstable = bool(error_if_unstable)
        self.check_every = non_negative_int("check_every", check_every)
        self.controller = StepSizeController(rtol, order=self.order)
        self.t = 0.0
        self.n_steps = 0
        self.n_grad = 0
        self.n_hvp = 0
        self.n_rejected = 0
        self._loss_value: Optional[float] = None
        self._grad: Optional[Tensor] = None
        self._grad_scale = 0.0  # largest gradient norm seen: the scale of the gradients' round-off
        self._loss_scale = 0.0  # largest |loss| seen: the scale of the loss's round-off

    @property
    def rtol(self) -> Optional[float]:
        return self.controller.rtol

    @property
    def loss_value(self) -> Optional[float]:
        """The loss at the current parameters, once it has been evaluated (None before the first step)."""
        return self._loss_value

    # -- hooks for subclasses ----------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Gather the curvature the step needs at the current point (may cost HVPs)."""

    def _max_dt(self) -> float:
        """The step-size cap of the plain method at the current point."""
        raise NotImplementedError

    def _propose(self, dt: float) -> Proposal:
        raise NotImplementedError

    def _stability_curvature(self) -> Optional[float]:
        """|lambda| that dt is checked against with ``error_if_unstable``; None when not known."""
        return None

    def _report_extras(self) -> dict:
        return {}

    # -- shared machinery --------------------------------------------------------------------------------------
    def _evaluate(self, params: Tensor) -> tuple[float, Tensor]:
        loss, g = self.loss.gradient(params)
        self.n_grad += 1
        return float(loss), g

    def _hvp(self, vectors: Tensor) -> Tensor:
        out = self.loss.hvp(self.params, vectors)
        self.n_hvp += 1 if vectors.ndim == 1 else vectors.shape[1]
        return out

    def _ensure_gradient(self) -> None:
        if self._grad is None:
            self._loss_value, self._grad = self._evaluate(self.params)
            self._grad_scale = max(self._grad_scale, float(torch.linalg.vector_norm(self._grad.double())))
            self._loss_scale = max(self._loss_scale, abs(self._loss_value))
        if not (math.isfinite(self._loss_value) and bool(torch.isfinite(self._grad).all())):
            raise NonFiniteError(f"the loss ({self._loss_value}) or gradient at the current parameters is not "
                                 "finite", step=self.n_steps, t=self.t)

    def _warmup_scale(self, warmup_iters: int, warmup_factor: float) -> float:
        return warmup_factor if self.n_steps < warmup_iters else 1.0

    def _mismatch_weights(self, dt: float, proposal: Proposal, mismatch: Tensor) -> Tensor:
        """The position correction for a gradient mismatch ``r`` growing linearly over the step:
        ``-(dt/2) r`` (Euler directions; solvers with exactly integrated directions override this)."""
        return -(dt / 2) * mismatch

    def _gradient_noise(self, like: Tensor) -> float:
        # Gradients are known only to round-off of the largest gradient seen in the run; a model mismatch below
        # that is noise, not error (it matters at stationary points of singular problems).
        return GRADIENT_NOISE_FACTOR * torch.finfo(like.dtype).eps * self._grad_scale

    def _corrected(self, dt: float, proposal: Proposal, stage_grad: Tensor) -> Proposal:
        mismatch = stage_grad - proposal.predicted_gradient
        correction = self._mismatch_weights(dt, proposal, mismatch)
        size = float(torch.linalg.vector_norm(mismatch.double()))
        signal = max(0.0, 1.0 - self._gradient_noise(mismatch) / size) if size > 0 else 0.0
        err = signal * float(torch.linalg.vector_norm(correction.double()))
        return Proposal(delta=proposal.delta + correction, predicted_gradient=None, error_norm=err)

    def _error_ratio(self, dt: float, proposal: Proposal, new_grad: Tensor) -> Optional[float]:
        if self.controller.rtol is None:
            return None
        if proposal.error_norm is not None:
            size = float(torch.linalg.vector_norm(proposal.delta.double()))
            return 0.0 if size == 0 else proposal.error_norm / (self.controller.rtol * size)
        if proposal.predicted_gradient is None:
            return None
        noise = self._gradient_noise(new_grad)
        mismatch = float(torch.linalg.vector_norm((new_grad - proposal.predicted_gradient).double()))
        err = 0.5 * dt * max(0.0, mismatch - noise)
        size = torch.linalg.vector_norm(proposal.delta.double())
        if size == 0:
            return 0.0
        return float(err / (self.controller.rtol * size))

    def _stationary(self, loss0: float, new_loss: float, delta: Tensor) -> bool:
        """True when both the loss change and the first-order predicted decrease ``-g . delta`` are at the
        loss's round-off level: the flow is at a stationary point to working precision and a strict decrease
        cannot be asked for."""
        # The loss is known to round-off of the largest loss seen in the run (its terms cancel near a minimum).
        tiny = ROUNDOFF_FACTOR * torch.finfo(self.params.dtype).eps * max(self._loss_scale, abs(new_loss))
        predicted = -float(torch.dot(self._grad.double(), delta.double()))
        return abs(new_loss - loss0) <= tiny and abs(predicted) <= tiny

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
        data_parallel = getattr(self.loss, "data_parallel", None)
        if data_parallel is not None and self.check_every and self.n_steps % self.check_every == 0:
            data_parallel.check_replicas_agree(self.params, step=self.n_steps, t=self.t)
        self._ensure_gradient()
        loss0, g0 = self._loss_value, self._grad
        self._prepare()
        dt = self.controller.limit(self._max_dt())
        tried: list[float] = []
        rejections = 0
        while True:
            curvature = self._stability_curvature()
            if self.error_if_unstable and curvature is not None and dt * curvature > 2.0:
                raise UnstableStepError(f"dt = {dt:.6g} exceeds the stability bound 2/|lambda| = "
                                        f"{2.0 / curvature:.6g}", step=self.n_steps, t=self.t)
            proposal = self._propose(dt)
            finite = True
            if self.corrector:
                stage_loss, stage_grad = self._evaluate(self.params + proposal.delta)
                finite = math.isfinite(stage_loss) and bool(torch.isfinite(stage_grad).all())
                if finite:
                    proposal = self._corrected(dt, proposal, stage_grad)
            if finite:
                candidate = self.params + proposal.delta
                new_loss, new_grad = self._evaluate(candidate)
                finite = math.isfinite(new_loss) and bool(torch.isfinite(new_grad).all())
            else:
                new_loss = stage_loss
            stationary = finite and self._stationary(loss0, new_loss, proposal.delta)
            # At a stationary point to working precision the error estimate is round-off: nothing to control.
            ratio = math.inf if not finite else 0.0 if stationary else self._error_ratio(dt, proposal, new_grad)
            decreased = finite and (not self.monotone or new_loss < loss0 or stationary)
            if decreased and self.controller.accepts(ratio):
                break
            tried.append(new_loss)
            rejections += 1
            self.n_rejected += 1
            if rejections >= self.max_rejections:
                raise StepRejectedError(
                    f"{rejections} consecutive proposals were rejected from loss {loss0:.6g} (last dt {dt:.3g}; "
                    f"candidate losses {', '.join(f'{v:.6g}' for v in tried[-5:])})",
                    step=self.n_steps, t=self.t, losses=tried)
            dt = self.controller.rejected(dt, ratio if finite and decreased else None)
            self._on_reject()
            dt = min(dt, self._max_dt())  # a refresh on rejection may have lowered the stability cap
        with torch.no_grad():
            self.params.copy_(candidate)
        self.controller.accepted(dt, ratio)
        self.t += dt
        report = StepReport(step=self.n_steps, loss=loss0, new_loss=new_loss, dt=dt, t=self.t,
                            n_grad=self.n_grad, n_hvp=self.n_hvp, n_rejected=self.n_rejected,
                            rejections=rejections, error_ratio=ratio,
                            gradient=g0 if self.report_gradient else None, **self._report_extras())
        self._loss_value, self._grad = new_loss, new_grad
        self._grad_scale = max(self._grad_scale, float(torch.linalg.vector_norm(new_grad.double())))
        self.n_steps += 1
        return report

    def _on_reject(self) -> None:
        """Called after each rejection, before the retry (the same curvature is reused by default)."""

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
            "grad_scale": self._grad_scale, "loss_scale": self._loss_scale,
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
        g = state["grad"]
        self._grad = None if g is None else g.to(device=self.params.device, dtype=self.params.dtype).clone()
        self.controller.load_state_dict(state["controller"])
        self._load_method_state(state["method"])

    def _method_state(self) -> dict:
        return {}

    def _load_method_state(self, state: dict) -> None:
        pass
