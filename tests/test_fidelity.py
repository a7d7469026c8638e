"""The fidelity harness: a converged RK4 reference, cross-checked once against torchdiffeq's dopri5."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import exponential_euler_solver as euler
from exponential_euler_solver import Stop
from exponential_euler_solver.fidelity import fidelity, reference_run, run_with_times

TARGET, MAX_STEP = 0.1, 1.0


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    net = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.ELU(), torch.nn.Linear(12, 3)).double()
    loss = euler.LossFunction(TensorDataset(X, y), torch.nn.CrossEntropyLoss(), net)
    torch.manual_seed(0)
    return loss, loss.initialize_parameters(gain=3.0, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(problem):
    loss, p0 = problem
    return reference_run(loss, p0, TARGET, MAX_STEP, alpha=1.0, reference_rtol=1e-4)


def test_crossing_time_interpolates_log_loss_without_slopes():
    # The old fidelity.crossing_time is Trajectory.crossing_time now. Without slopes (records of format 1) it
    # interpolates log L linearly: the loss halves over [0, 1] and again over [1, 2]; 0.3 is crossed inside the
    # second step.
    rows = [{"step": 0, "t_start": 0.0, "t": 1.0, "dt": 1.0, "loss": 1.0, "new_loss": 0.5},
            {"step": 1, "t_start": 1.0, "t": 2.0, "dt": 1.0, "loss": 0.5, "new_loss": 0.25}]
    traj = euler.Trajectory.from_rows(rows)
    expected = 1.0 + (math.log(0.5) - math.log(0.3)) / (math.log(0.5) - math.log(0.25))
    assert traj.crossing_time(0.3) == pytest.approx(expected, rel=1e-14)
    assert traj.crossing_time(0.1) is None
    # Changed behaviour: with the slopes dL/dt at both ends (every step reports them now) the crossing is that of
    # the cubic Hermite interpolant. For L = 2^-t (slopes -ln2 L) it lies within the interpolant's error bound
    # of the true crossing log2(1/0.3): the fourth derivative's largest value ln2^4 * 0.5 times h^4 / 384, over
    # the smallest |L'| on [1, 2], ln2 * 0.25.
    ln2 = math.log(2)
    for row in rows:
        row["slope"], row["new_slope"] = -ln2 * row["loss"], -ln2 * row["new_loss"]
    hermite = euler.Trajectory.from_rows(rows).crossing_time(0.3)
    true = math.log2(1 / 0.3)
    bound = ln2 ** 4 * 0.5 / 384 / (ln2 * 0.25)
    assert abs(hermite - true) <= bound, (hermite, true, bound)


def test_reference_agrees_with_dopri5(problem, reference):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    loss, p0 = problem
    times = reference.times
    assert len(times) == 3 and reference.alpha < 1.0 and reference.steps > 0
    assert reference.crossing_time == reference.trajectory.crossing_time(TARGET)

    def rhs(t, theta):
        return -loss.gradient(theta)[1]

    sol = torchdiffeq.odeint(rhs, p0.clone(), torch.tensor([0.0] + times, dtype=torch.float64), method="dopri5",
                             rtol=1e-10, atol=1e-12)
    errors = []
    for i, t in enumerate(times):
        ref = sol[i + 1]
        kept = reference.trajectory.params_at(t)
        assert kept is not None, f"the reference did not keep its parameters at t={t}"
        errors.append(((kept - ref).norm() / (ref - p0).norm()).item())
    # The parameters inside an RK4 step of dt <= alpha/|lambda_1| are its cubic Hermite interpolant now (they were
    # linear): the old bound still holds.
    assert max(errors) < 1e-4, (times, errors)


def test_default_solvers_within_one_percent_and_tighter_rtol_is_closer(problem, reference):
    loss, p0 = problem
    errors = {}
    for rtol in ("auto", 0.002):  # the default (0.02 for the multistep scheme) and ten times tighter
        rep = fidelity(loss, p0, lambda p, rtol=rtol: euler.ExponentialEulerSolver(p, loss, MAX_STEP, 2, rtol=rtol),
                       TARGET, reference=reference)
        assert rep.trajectory.strictly_decreasing  # was rep.run.monotone
        assert rep.reference_crossing_time == reference.crossing_time and rep.reference_alpha == reference.alpha
        assert rep.relative_error == pytest.approx(
            (rep.crossing_time - rep.reference_crossing_time) / rep.reference_crossing_time, rel=1e-12)
        assert rep.times == reference.times and rep.steps <= len(rep.trajectory)
        errors[rtol] = abs(rep.relative_error)
        assert len(rep.deviations) == 3 and max(rep.deviations) < 0.01, rep.deviations
    assert errors["auto"] < 0.01, errors
    assert errors[0.002] < errors["auto"], errors
    rep = fidelity(loss, p0, lambda p: euler.AdaptiveGradientDescent(p, loss, MAX_STEP), TARGET,
                   reference=reference)
    assert abs(rep.relative_error) < 0.01, rep.relative_error


def test_run_with_times_goes_on_until_the_last_time(problem):
    # The run stops at its target, then continues (without counting those steps) until every requested time has
    # passed, so the comparison points exist even when the target is crossed early.
    loss, p0 = problem
    first = euler.integrate(euler.AdaptiveGradientDescent(p0.clone(), loss, MAX_STEP), Stop(loss=0.5))
    t_cross = first.crossing_time(0.5)
    times = [0.5 * t_cross, 3 * t_cross]
    traj, steps = run_with_times(euler.AdaptiveGradientDescent(p0.clone(), loss, MAX_STEP), Stop(loss=0.5), times)
    assert steps == len(first) and len(traj) > steps, (steps, len(traj))
    assert traj.stop_reason == "target" and traj.pending_times == []
    assert float(traj.t[-2]) < times[-1] <= float(traj.t[-1])
    assert traj.param_t.tolist() == times and traj.head(steps).rows() == traj.rows(steps)
