"""The fidelity harness: a converged RK4 reference, cross-checked once against torchdiffeq's dopri5."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import exponential_euler_solver as euler
from exponential_euler_solver.fidelity import crossing_time, fidelity, reference_run


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


def test_crossing_time_interpolates_log_loss():
    # The loss halves over [0, 1] and again over [1, 2]: 0.3 is crossed inside the second step.
    losses = [(0.0, 1.0, 1.0, 0.5), (1.0, 2.0, 0.5, 0.25)]
    expected = 1.0 + (math.log(0.5) - math.log(0.3)) / (math.log(0.5) - math.log(0.25))
    assert crossing_time(losses, 0.3) == pytest.approx(expected)
    assert crossing_time(losses, 0.1) is None


def test_reference_agrees_with_dopri5(problem, reference):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    loss, p0 = problem
    record, alpha, times = reference

    def rhs(t, theta):
        return -loss.gradient(theta)[1]

    sol = torchdiffeq.odeint(rhs, p0.clone(), torch.tensor([0.0] + times, dtype=torch.float64), method="dopri5",
                             rtol=1e-10, atol=1e-12)
    for i, t in enumerate(times):
        ref = sol[i + 1]
        err = ((record.params_at[i] - ref).norm() / (ref - p0).norm()).item()
        # Linear interpolation inside an RK4 step of dt <= alpha/|lambda_1| bounds the agreement.
        assert err < 1e-4, (t, err)


def test_default_solvers_within_one_percent_and_tighter_rtol_is_closer(problem, reference):
    loss, p0 = problem
    errors = {}
    for rtol in (0.2, 0.02):
        rep = fidelity(loss, p0, lambda p: euler.ExponentialEulerSolver(p, loss, MAX_STEP, 2, rtol=rtol), TARGET,
                       reference=reference)
        assert rep.run.monotone
        errors[rtol] = abs(rep.relative_error)
        assert len(rep.deviations) == 3 and max(rep.deviations) < 0.01, rep.deviations
    assert errors[0.2] < 0.01, errors
    assert errors[0.02] < errors[0.2], errors
    rep = fidelity(loss, p0, lambda p: euler.AdaptiveGradientDescent(p, loss, MAX_STEP), TARGET,
                   reference=reference)
    assert abs(rep.relative_error) < 0.01, rep.relative_error
