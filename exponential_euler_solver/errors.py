"""The library's own exceptions."""

from __future__ import annotations


class SolverError(RuntimeError):
    """Base class for numerical trouble during a solver step.

    Attributes:
        step: index of the step that failed (0 for the first step).
        t: flow time at the start of that step.
    """

    def __init__(self, message: str, *, step: int, t: float):
        super().__init__(f"{message} (step {step}, flow time {t:.6g})")
        self.step = step
        self.t = t


class NonFiniteError(SolverError):
    """The loss or gradient at the current point is NaN or infinite."""


class StepRejectedError(SolverError):
    """No step size in the allowed number of tries decreased the loss.

    Attributes:
        losses: the candidate losses that were tried, in order.
    """

    def __init__(self, message: str, *, step: int, t: float, losses: list[float]):
        super().__init__(message, step=step, t=t)
        self.losses = list(losses)


class UnstableStepError(SolverError):
    """A step size exceeded the stability bound 2/|lambda_max| (with ``error_if_unstable=True``)."""


class RankDivergenceError(SolverError):
    """The ranks of a data-parallel run hold different parameters (see
    :meth:`~exponential_euler_solver.distributed.DataParallel.check_replicas_agree`)."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not written by this library."""
