"""The phi-functions of the exponential integrators (solvers.phi) against closed forms far from 0 and against
high-precision values (mpmath) near 0, where the closed forms cancel.

The module promises about 1e-13 relative accuracy or better everywhere (series for |z| < SERIES_BELOW = 0.1,
expm1 elsewhere); the tests hold it to RTOL = 1e-13.
"""

import math

import pytest
import torch

from exponential_euler_solver.solvers.phi import SERIES_BELOW, phi0, phi1, phi2, phi3

mpmath = pytest.importorskip("mpmath")

RTOL = 1e-13
PHI = {0: phi0, 1: phi1, 2: phi2, 3: phi3}
TINY = 2.2250738585072014e-308  # below this a reference value is compared absolutely (phi0 underflows to 0)


def reference(j: int, z: float):
    """``phi_j(z) = (e^z - sum_{m<j} z^m/m!) / z^j`` (``1/j!`` at 0) in mpmath, with enough digits that the
    cancellation near 0 costs nothing: 60 digits plus (j+1) per decade of |z| below 1."""
    if z == 0:
        return mpmath.mpf(1) / math.factorial(j)
    x = mpmath.mpf(z)  # the float64 value exactly
    decades = max(0, -int(mpmath.floor(mpmath.log10(abs(x)))))
    with mpmath.workdps(60 + (j + 1) * decades):
        s = mpmath.exp(x)
        for m in range(j):
            s -= x ** m / mpmath.factorial(m)
        return +(s / x ** j)


def closed_form(j: int, z: float) -> float:
    """The closed forms in float64 (fine far from 0)."""
    e = math.expm1(z)
    return [math.exp(z), e / z, (e - z) / z ** 2, (e - z - z * z / 2) / z ** 3][j]


def _relative_error(got: float, ref) -> float:
    if abs(ref) < TINY:
        return abs(got - float(ref)) / TINY
    return float(abs(mpmath.mpf(got) - ref) / abs(ref))


def _check(j: int, zs, what: str) -> None:
    values = PHI[j](torch.tensor(zs, dtype=torch.float64))
    assert values.dtype == torch.float64 and values.shape == (len(zs),)
    bad = []
    for z, got in zip(zs, values.tolist()):
        ref = reference(j, z)
        err = _relative_error(got, ref)
        if not err <= RTOL:
            bad.append(f"z={z!r}: phi{j} = {got!r}, reference {mpmath.nstr(ref, 20)}, relative error {err:.2e}")
    assert not bad, f"{what}, rtol {RTOL}:\n" + "\n".join(bad[:10])


def _around_threshold() -> list:
    t = SERIES_BELOW
    out = []
    for sign in (1.0, -1.0):
        x = t
        below = [math.nextafter(t, 0)]
        above = [math.nextafter(t, 1)]
        for _ in range(3):
            below.append(math.nextafter(below[-1], 0))
            above.append(math.nextafter(above[-1], 1))
        out += [sign * v for v in [x] + below + above + [t * (1 - 1e-6), t * (1 + 1e-6), 0.099, 0.101, 0.12]]
    return out


NEAR_ZERO = [0.0, -0.0, 5e-324, -5e-324, 1e-300, -1e-300, 1e-100, 1e-20, -1e-20, 1e-12, 1e-8, -1e-8, 1e-5, -1e-5,
             1e-3, -1e-3, 0.01, -0.01, 0.03, -0.07, 0.05, -0.05, 0.09, -0.09]
FAR = [0.2, -0.2, 0.5, -0.5, 1.0, -1.0, 2.5, -3.0, 10.0, -10.0, 30.0, -40.0, 100.0, -100.0, 500.0]
LARGE_NEGATIVE = [-200.0, -700.0, -745.0, -746.0, -1e4, -1e6, -1e50, -1e100]


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_phi_near_zero_against_high_precision(j):
    _check(j, NEAR_ZERO, "near 0 (the series)")


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_phi_on_both_sides_of_the_series_threshold(j):
    # Just below 0.1 the series is used, from 0.1 on the closed form, where phi3 loses the most (~6 eps / z^2).
    _check(j, _around_threshold(), f"around |z| = {SERIES_BELOW}")


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_phi_far_from_zero_and_large_negative_against_high_precision(j):
    _check(j, FAR + LARGE_NEGATIVE, "far from 0")


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_phi_far_from_zero_against_float64_closed_forms(j):
    zs = [z for z in FAR + LARGE_NEGATIVE if 1 <= abs(z) <= 1e6]  # beyond, z**3 overflows in the closed form
    got = PHI[j](torch.tensor(zs, dtype=torch.float64)).tolist()
    for z, value in zip(zs, got):
        expected = closed_form(j, z)
        assert abs(value - expected) <= RTOL * abs(expected) + (TINY if j == 0 else 0.0), \
            f"z={z!r}: phi{j} = {value!r}, closed form {expected!r}"


def test_phi_at_zero_is_exactly_one_over_j_factorial():
    for j, f in PHI.items():
        for zero in (0.0, -0.0):
            assert float(f(zero)) == 1.0 / math.factorial(j), (j, zero, float(f(zero)))


def test_phi_limits_for_large_negative_z():
    # e^z -> 0, so phi_j(z) -> -(sum_{m<j} z^m/m!) / z^j: 1/|z| for phi1, and the leading terms for phi2, phi3.
    z = -1e6
    assert float(phi0(z)) == 0.0
    assert float(phi1(z)) == pytest.approx(1e-6, rel=1e-15)
    assert float(phi2(z)) == pytest.approx((-1 - z) / z ** 2, rel=1e-15)
    assert float(phi3(z)) == pytest.approx((-1 - z - z * z / 2) / z ** 3, rel=1e-15)


def test_phi_accepts_scalars_lists_and_float32_and_returns_float64_elementwise():
    zs = [-3.0, -0.05, 0.0, 1e-9, 0.1, 2.0]
    for j, f in PHI.items():
        block = f(torch.tensor(zs, dtype=torch.float64))
        assert block.dtype == torch.float64
        for z, value in zip(zs, block.tolist()):
            assert float(f(z)) == value, (j, z)  # elementwise: the same as one at a time
        assert torch.equal(f(zs), block)
        assert f(torch.tensor(zs, dtype=torch.float32)).dtype == torch.float64
        matrix = f(torch.tensor(zs, dtype=torch.float64).reshape(2, 3))
        assert matrix.shape == (2, 3) and torch.equal(matrix.reshape(-1), block)


def test_phi_recurrence_holds():
    # phi_{j+1}(z) = (phi_j(z) - 1/j!) / z, checked where it does not cancel (|z| >= 1).
    zs = torch.tensor([-20.0, -3.0, -1.0, 1.0, 4.0], dtype=torch.float64)
    for j in range(3):
        lhs = PHI[j + 1](zs)
        rhs = (PHI[j](zs) - 1.0 / math.factorial(j)) / zs
        err = float(((lhs - rhs) / rhs).abs().max())
        assert err <= 1e-14, f"phi{j + 1} vs recurrence from phi{j}: relative {err:.2e}"


@pytest.mark.parametrize("j,z", [(2, -1e300), (3, -1e120), (3, -1e300)])
def test_phi_for_astronomically_large_negative_z(j, z):
    # Far outside what a solver meets (z = -lambda dt), but within float64 and within the module's promise.
    _check(j, [z], "huge negative z")
