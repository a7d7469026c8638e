"""Accept / reject decisions and step-size control.

A step proposes a candidate, the controller decides. The error of a proposed step is measured relative to
the step itself: ``ratio = ||e|| / (rtol * ||delta||)`` where ``e`` is the step's local error estimate and
``delta`` the parameter change, so ``rtol`` is the admitted relative error per step, independent of the scale
of the parameters. A candidate is accepted when its loss is finite, it decreased the loss (``monotone``; a
stationary point to working precision counts as decreased) and ``ratio <= 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["StepSizeController", "SAFETY", "MAX_GROWTH", "MIN_SHRINK", "FAILURE_SHRINK", "DEFAULT_RTOL"]

SAFETY = 0.9          # aim a little below the tolerance
MAX_GROWTH = 2.0      # largest factor by which dt may grow from one step to the next
MIN_SHRINK = 0.2      # smallest factor by which a rejection shrinks dt
FAILURE_SHRINK = 0.5  # factor applied when the loss rose or was not finite and no error ratio says more
DEFAULT_RTOL = 0.2    # default relative error estimate per step (see the fidelity table in the README)


@dataclass
class StepSizeController:
    """Elementary (integral) controller: ``dt_next = dt * clip(SAFETY * ratio**(-1/error_order), MIN_SHRINK,
    MAX_GROWTH)``.

    ``error_order`` is the power of dt by which the error ratio grows, i.e. the order of the local error estimate
    minus one (the ratio is relative to the step, which is O(dt)): 1 for an estimate of a first-order step's
    error (O(dt^2)), 2 for an O(dt^3) estimate.

    Attributes:
        rtol: the admitted relative local error per step, or None for no error control.
        error_order: see above.
        monotone: reject candidates that do not decrease the loss.
        dt: the controller's proposal for the next step (None before the first accepted step).
    """

    rtol: Optional[float]
    error_order: int = 1
    monotone: bool = True
    dt: Optional[float] = None

    def accepts(self, *, finite: bool, decreased: bool, ratio: Optional[float]) -> bool:
        """Whether a candidate passes: finite, decreased (when ``monotone``) and within the tolerance."""
        if not finite or (self.monotone and not decreased):
            return False
        return self.rtol is None or ratio is None or ratio <= 1.0

    def factor(self, ratio: Optional[float], error_order: Optional[int] = None) -> float:
        """Factor for the next dt from an error ratio (1 without error control); ``error_order`` overrides the
        controller's for an estimate of another order (e.g. a multistep method's first, one-step, step)."""
        if self.rtol is None or ratio is None:
            return 1.0
        if not math.isfinite(ratio):
            return MIN_SHRINK
        if ratio <= 0.0:
            return MAX_GROWTH
        order = self.error_order if error_order is None else error_order
        return min(MAX_GROWTH, max(MIN_SHRINK, SAFETY * ratio ** (-1.0 / order)))

    def retry(self, dt: float, ratio: Optional[float], *, finite: bool, decreased: bool,
              error_order: Optional[int] = None) -> float:
        """A smaller dt to retry with after a rejection: halved when the candidate was not finite or did not
        decrease the loss, else shrunk by the error ratio (at least halved)."""
        if not finite or (self.monotone and not decreased):
            ratio = None
        if self.rtol is None or ratio is None or not math.isfinite(ratio) or ratio <= 1.0:
            return dt * FAILURE_SHRINK
        return dt * min(FAILURE_SHRINK, self.factor(ratio, error_order))

    def accepted(self, dt: float, ratio: Optional[float], error_order: Optional[int] = None) -> None:
        """Record an accepted step and propose the next dt."""
        if self.rtol is not None:
            self.dt = dt * self.factor(ratio, error_order)

    def limit(self, dt_max: float) -> float:
        """The dt to try next: the controller's proposal capped by ``dt_max``."""
        return dt_max if self.dt is None else min(dt_max, self.dt)

    def state_dict(self) -> dict:
        return {"rtol": self.rtol, "error_order": self.error_order, "monotone": self.monotone, "dt": self.dt}

    def load_state_dict(self, state: dict) -> None:
        # Files written before the redesign call the exponent "order" and keep "monotone" on the solver.
        self.rtol, self.dt = state["rtol"], state["dt"]
        self.error_order = state.get("error_order", state.get("order", self.error_order))
        self.monotone = state.get("monotone", self.monotone)
