"""What the benchmark measured: one :class:`RunResult` per run, one :class:`PointResult` per grid point.

A run's steps are a :class:`~exponential_euler_solver.Trajectory` (its ``history``); everything else is derived
from it or counted by the solver. ``to_dict``/``from_dict`` give the plain JSON data of ``--json`` and of the grid
checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from torch import Tensor

from ..trajectory import Trajectory

__all__ = ["IMPLEMENTATION", "RunResult", "FidelityResult", "ReferenceResult", "PointResult"]

IMPLEMENTATION = "ours"      # RunResult.implementation of this library's runs (the peer's: see .peer)


@dataclass
class FidelityResult:
    """A run measured against a converged reference trajectory of the same flow.

    Attributes:
        reference_crossing_time: the reference's flow time at which the loss crossed the target.
        relative_error: ``(t_target - reference_crossing_time) / reference_crossing_time`` with the run's
            ``t_target``; None when the run never reached the target.
        times: the flow times of the parameter comparisons that the run reached.
        deviations: ``||theta(t) - theta_ref(t)|| / ||theta_ref(t) - theta_0||`` at ``times`` (float64 norms).
        extra_steps: steps taken after the run ended, outside its timing and counts, to reach the last time.
    """

    reference_crossing_time: float
    relative_error: Optional[float]
    times: List[float]
    deviations: List[float]
    extra_steps: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> "FidelityResult":
        """The inverse of :func:`dataclasses.asdict`."""
        return cls(**data)


# The values RunResult.to_dict adds beside its fields; from_dict recomputes them.
_DERIVED = ("hvp_per_step", "first_step_hvp", "grad_per_step", "time_split", "stiffness")


@dataclass
class RunResult:
    """One solver run on one problem.

    Attributes:
        n_train, n_classes, seed: the grid point.
        solver: the solver's name in :data:`~exponential_euler_solver.SOLVERS`; ``solver_args``: the arguments
            it was built with.
        label: the name in tables and plots.
        target: the loss target.
        converged: the loop ended because the loss reported by ``step()`` was ``<= target``.
        error: the message of a :class:`~exponential_euler_solver.SolverError` that ended the run, else None.
        wall_time: seconds the run's steps took (each step times itself, so saving checkpoints and keeping
            parameters are not counted).
        steps: accepted steps (``len(history)``).
        n_grad, n_hvp, n_rejected: gradient evaluations, Hessian-vector products and rejected proposals.
        t_target: flow time at which the loss first fell to the target (``history.crossing_time(target)``: cubic
            Hermite in the crossing step; 0.0 if the initial loss was already there); None if it never did.
        final_loss: the loss at the final parameters (the last step's ``new_loss``); None without steps.
        strictly_decreasing: every step's ``new_loss < loss``.
        history: the run's :class:`~exponential_euler_solver.Trajectory` (its steps, without parameters).
        implementation: :data:`IMPLEMENTATION` for this library's solvers; the peer's runs name the peer.
        stop_reason: why the loop ended: ``"target"``, ``"max_steps"``, ``"max_seconds"`` or ``"error"``.
        fidelity: the run against the reference trajectory (``--fidelity``), else None.
    """

    n_train: int
    n_classes: int
    seed: int
    solver: str
    solver_args: Dict[str, object]
    label: str
    target: float
    converged: bool
    error: Optional[str]
    wall_time: float
    steps: int
    n_grad: int
    n_hvp: int
    n_rejected: int
    t_target: Optional[float]
    final_loss: Optional[float]
    strictly_decreasing: bool
    history: Trajectory = field(default_factory=Trajectory)
    implementation: str = IMPLEMENTATION
    stop_reason: str = "target"
    fidelity: Optional[FidelityResult] = None

    @classmethod
    def from_run(cls, key: tuple, solver: str, solver_args: dict, label: str, target: float, history: Trajectory,
                 counts: tuple[int, int, int], implementation: str = IMPLEMENTATION) -> "RunResult":
        """The result of a run whose steps are ``history`` and whose solver counted ``counts`` (gradients, HVPs,
        rejections) when it stopped."""
        n, c, s = key
        converged = history.stop_reason == "target"
        return cls(n_train=n, n_classes=c, seed=s, solver=solver, solver_args=solver_args, label=label,
                   target=target, converged=converged, error=history.error, wall_time=history.wall_time,
                   steps=len(history), n_grad=counts[0], n_hvp=counts[1], n_rejected=counts[2],
                   t_target=history.crossing_time(target),
                   final_loss=float(history.new_loss[-1]) if len(history) else None,
                   strictly_decreasing=history.strictly_decreasing, history=history,
                   implementation=implementation, stop_reason=history.stop_reason or "target")

    @property
    def hvp_per_step(self) -> Optional[float]:
        return self.n_hvp / self.steps if self.steps else None

    @property
    def first_step_hvp(self) -> Optional[int]:
        """Hessian-vector products made by the first accepted step (the cold start of the eigen-solve, with any
        retries of that step); None without steps."""
        return int(self.history.n_hvp[0]) if len(self.history) else None

    @property
    def grad_per_step(self) -> Optional[float]:
        return self.n_grad / self.steps if self.steps else None

    def _last(self, column: str) -> Optional[float]:
        if not len(self.history):
            return None
        value = self.history.rows()[-1].get(column)
        return None if value is None else float(value)

    @property
    def stiffness(self) -> Optional[tuple[float, float]]:
        """``|lambda_1| / |lambda_{k+1}|`` at the first and at the last accepted step: the gain in step size that
        integrating the ``k`` tracked directions exactly buys over gradient descent's ``1/|lambda_1|`` (near 1:
        no spectral gap, the smooth regime; large: the stiff regime). Runs of solvers that track more than one
        eigenpair (exponential Euler) only; None otherwise."""
        rows = [row["eigenvalues"] for row in self.history.rows() if row["eigenvalues"]]
        if not rows or len(rows[0]) < 2:
            return None

        def ratio(ev):
            return abs(ev[0]) / abs(ev[-1]) if ev[-1] else math.inf

        return ratio(rows[0]), ratio(rows[-1])

    @property
    def time_split(self) -> Optional[Dict[str, float]]:
        """Seconds of the run in gradients, in curvature products (HVPs), in the eigensolver's own block work and
        in everything else (the wall time less those three); None when the steps were not timed."""
        grad, hvp, eig = (self._last(name) for name in ("time_grad", "time_hvp", "time_eig"))
        if grad is None or hvp is None or eig is None:
            return None
        return {"grad": grad, "hvp": hvp, "eig": eig, "other": self.wall_time - grad - hvp - eig}

    def to_dict(self) -> dict:
        """Plain JSON-ready data: every field, ``hvp_per_step``, ``first_step_hvp``, ``stiffness`` and the history
        as a list of per-step dicts (:meth:`~exponential_euler_solver.Trajectory.rows`)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("history", "fidelity")}
        out["fidelity"] = None if self.fidelity is None else asdict(self.fidelity)
        out["hvp_per_step"] = self.hvp_per_step
        out["first_step_hvp"] = self.first_step_hvp
        out["grad_per_step"] = self.grad_per_step
        out["time_split"] = self.time_split
        stiffness = self.stiffness
        out["stiffness"] = None if stiffness is None else list(stiffness)
        out["history"] = self.history.rows()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunResult":
        """The run of :meth:`to_dict` (the derived values are recomputed, not read).

        Raises:
            KeyError, TypeError: ``data`` is not shaped like :meth:`to_dict`'s output.
        """
        data = {k: v for k, v in data.items() if k not in _DERIVED}
        data["history"] = Trajectory.from_rows(data.get("history", []))
        if data.get("fidelity") is not None:
            data["fidelity"] = FidelityResult.from_dict(data["fidelity"])
        return cls(**data)


@dataclass
class ReferenceResult:
    """The converged RK4 reference of one grid point.

    Attributes:
        crossing_time: flow time at which its loss crossed the target; None when it failed (see ``error``).
        alpha: the RK4 ``alpha`` (step in units of ``1/|lambda_1|``) at which the crossing time settled.
        times: the flow times at which its parameters were kept (fractions of the first, coarsest run's
            crossing time).
        steps, n_grad, n_hvp: counts of the finest run alone.
        wall_time: seconds for the whole halving sequence.
        max_step_size: the reference's largest step.
        error: why no reference could be computed, else None.
        trajectory: its finest run with the parameters at ``times`` (not written to JSON).
    """

    crossing_time: Optional[float]
    alpha: Optional[float]
    times: List[float]
    steps: int
    n_grad: int
    n_hvp: int
    wall_time: float
    max_step_size: float
    error: Optional[str] = None
    trajectory: Optional[Trajectory] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "trajectory"}


@dataclass
class PointResult:
    """Everything measured on one grid point.

    Attributes:
        n_train, n_classes, seed: the grid point.
        runs: this library's runs, in solver order.
        peer_runs: the peer's runs of the same solvers (``compare``), else empty.
        gradient_time: median seconds of one full-batch gradient (``compare``), else None.
        reference: the RK4 reference (``fidelity``), else None.
        init_params: the initial parameters (not written to JSON).
    """

    n_train: int
    n_classes: int
    seed: int
    runs: List[RunResult] = field(default_factory=list)
    peer_runs: List[RunResult] = field(default_factory=list)
    gradient_time: Optional[float] = None
    reference: Optional[ReferenceResult] = None
    init_params: Optional[Tensor] = field(default=None, repr=False)

    def peer_of(self, run: RunResult) -> Optional[RunResult]:
        """The peer's run of ``run``'s solver, or None."""
        return next((p for p in self.peer_runs if p.solver == run.solver), None)

    def floor(self, run: RunResult) -> Optional[float]:
        """``run.steps * gradient_time`` (seconds), or None without a gradient time."""
        return None if self.gradient_time is None else run.steps * self.gradient_time
