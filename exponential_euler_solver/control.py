"""Accept / reject decisions and step-size control.

A step proposes a candidate, the controller decides. The error of a proposed step is measured relative to
the step itself: ``ratio = ||e|| / (rtol * ||delta||)`` where ``e`` is the step's local error estimate and
``delta`` the parameter change, so ``rtol`` is the admitted relative error per step, independent of the scale
of the parameters. A step is accepted when ``ratio <= 1`` (and the loss decreased, when monotone).
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
    """Elementary (integral) controller: ``dt_next = dt * clip(SAFETY * ratio**(-1/order), MIN_SHRINK,
    MAX_GROWTH)``.

    ``order`` is the power of dt by which the error ratio grows: 1 for the Euler-type steps here (their local
    error is O(dt^2), i.e. O(dt) relative to the step), 4 for RK4.

    Attributes:
        rtol: the admitted relative local error per step, or None for no error control.
        order: see above.
        dt: the controller's proposal for the next step (None before the first accepted step).
    """

    rtol: Optional[float]
    order: int = 1
    dt: Optional[float] = None

    def accepts(self, ratio: Optional[float]) -> bool:
        """Whether an error ratio passes (always True without error control)."""
        return self.rtol is None or ratio is None or ratio <= 1.0

    def factor(self, ratio: Optional[float]) -> float:
        """Factor for the next dt from an error ratio (1 without error control)."""
        if self.rtol is None or ratio is None:
            return 1.0
        if not math.isfinite(ratio):
            return MIN_SHRINK
        if ratio <= 0.0:
            return MAX_GROWTH
        return min(MAX_GROWTH, max(MIN_SHRINK, SAFETY * ratio ** (-1.0 / self.order)))

    def rejected(self, dt: float, ratio: Optional[float]) -> float:
        """A smaller dt to retry with after a rejection."""
        if self.rtol is None or ratio is None or not math.isfinite(ratio) or ratio <= 1.0:
            return dt * FAILURE_SHRINK
        return dt * min(FAILURE_SHRINK, self.factor(ratio))

    def accepted(self, dt: float, ratio: Optional[float]) -> None:
        """Record an accepted step and propose the next dt."""
        if self.rtol is not None:
            self.dt = dt * self.factor(ratio)

    def limit(self, dt_max: float) -> float:
        """The dt to try next: the controller's proposal capped by ``dt_max``."""
        return dt_max if self.dt is None else min(dt_max, self.dt)

    def state_dict(self) -> dict:
        return {"rtol": self.rtol, "order": self.order, "dt": self.dt}

    def load_state_dict(self, state: dict) -> None:
        self.rtol, self.order, self.dt = state["rtol"], state["order"], state["dt"]
