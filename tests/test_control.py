"""The step-size controller (solvers.control): its decisions and its formula, written out here."""

import math

import pytest

from exponential_euler_solver.solvers.control import FAILURE_SHRINK, MAX_GROWTH, MIN_SHRINK, SAFETY, StepSizeController


def expected_factor(ratio: float, error_order: int) -> float:
    """``clip(SAFETY * ratio^(-1/error_order), MIN_SHRINK, MAX_GROWTH)`` (the controller's docstring)."""
    return min(MAX_GROWTH, max(MIN_SHRINK, SAFETY * ratio ** (-1.0 / error_order)))


@pytest.mark.parametrize("error_order", [1, 2, 4])
@pytest.mark.parametrize("ratio", [1e-6, 0.05, 0.3, 0.9, 1.0, 1.7, 30.0, 1e6])
def test_factor_is_the_elementary_controller(error_order, ratio):
    c = StepSizeController(0.1, error_order=error_order)
    got = c.factor(ratio)
    want = expected_factor(ratio, error_order)
    assert got == pytest.approx(want, rel=1e-15), f"ratio {ratio}, order {error_order}: {got!r} vs {want!r}"
    assert MIN_SHRINK <= got <= MAX_GROWTH


def test_factor_edge_cases():
    c = StepSizeController(0.1)
    assert c.factor(0.0) == MAX_GROWTH and c.factor(math.inf) == MIN_SHRINK and c.factor(math.nan) == MIN_SHRINK
    assert c.factor(None) == 1.0
    assert StepSizeController(None).factor(5.0) == 1.0  # no error control


def test_accepts():
    c = StepSizeController(0.1, monotone=True)
    assert c.accepts(finite=True, decreased=True, ratio=1.0)
    assert not c.accepts(finite=True, decreased=True, ratio=1.0000001)
    assert not c.accepts(finite=True, decreased=False, ratio=0.1)
    assert not c.accepts(finite=False, decreased=True, ratio=0.1)
    assert c.accepts(finite=True, decreased=True, ratio=None)  # a method without an estimate
    loose = StepSizeController(None, monotone=False)
    assert loose.accepts(finite=True, decreased=False, ratio=50.0)
    assert not loose.accepts(finite=False, decreased=False, ratio=None)


def test_retry_and_accepted():
    c = StepSizeController(0.1, error_order=2)
    # Error too large: shrink by the formula, at least halved.
    assert c.retry(1.0, 4.0, finite=True, decreased=True) == pytest.approx(min(FAILURE_SHRINK,
                                                                               expected_factor(4.0, 2)))
    assert c.retry(1.0, 1.5, finite=True, decreased=True) == FAILURE_SHRINK  # formula says 0.73: halve anyway
    # The loss rose or was not finite: the ratio says nothing; halve.
    assert c.retry(1.0, 100.0, finite=True, decreased=False) == FAILURE_SHRINK
    assert c.retry(1.0, math.inf, finite=False, decreased=False) == FAILURE_SHRINK
    assert c.dt is None and c.limit(0.3) == 0.3
    c.accepted(0.2, 0.5)
    assert c.dt == pytest.approx(0.2 * expected_factor(0.5, 2), rel=1e-15)
    assert c.limit(10.0) == c.dt and c.limit(0.01) == 0.01
    plain = StepSizeController(None)
    plain.accepted(0.2, None)
    assert plain.dt is None and plain.limit(0.3) == 0.3


def test_state_dict_roundtrip_and_the_old_layout():
    c = StepSizeController(0.05, error_order=2, monotone=False, dt=0.125)
    state = c.state_dict()
    assert state == {"rtol": 0.05, "error_order": 2, "monotone": False, "dt": 0.125}
    d = StepSizeController(0.2)
    d.load_state_dict(state)
    assert d == c
    # Files written before the redesign: {"rtol", "order", "dt"}, monotone kept by the solver.
    e = StepSizeController(0.2, error_order=1, monotone=True)
    e.load_state_dict({"rtol": 0.01, "order": 4, "dt": 0.5})
    assert (e.rtol, e.error_order, e.dt, e.monotone) == (0.01, 4, 0.5, True)
