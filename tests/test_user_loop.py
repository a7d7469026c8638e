"""The user's own loop, unchanged, runs to loss < 0.01 with both solvers (issue: the seed's API)."""

import pytest
import torch
from torch.utils.data import TensorDataset

import exponential_euler_solver as euler
from exponential_euler_solver.benchmark.datasets import load_dataset, select_subset


def mlp(width, depth, n_classes, n_in=3072):
    layers = [torch.nn.Linear(n_in, width), torch.nn.ELU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.ELU()]
    layers.append(torch.nn.Linear(width, n_classes))
    return torch.nn.Sequential(*layers)


def user_loop(ds, net, n_classes, which, seed=0):
    # --- the user's code, verbatim apart from the solver choice -------------------------------------------------
    loss_func = euler.LossFunction(ds, torch.nn.CrossEntropyLoss(), net, batch_size=len(ds))
    torch.manual_seed(seed)
    params = loss_func.initialize_parameters()
    if which == "euler":
        solver = euler.ExponentialEulerSolver(params, loss_func, 0.01, n_classes - 1)
    else:
        solver = euler.AdaptiveGradientDescent(params, loss_func, 0.01, warmup_iters=10, warmup_factor=0.01)
    loss = float('inf')
    while loss > 0.01:
        new_loss = solver.step().loss
        assert new_loss < loss
        loss = new_loss
    # -------------------------------------------------------------------------------------------------------------
    return solver, loss


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("which", ["euler", "adaptive"])
def test_user_loop_small_network(digits, which):
    X, y = select_subset(*digits, 16, 2, 0)
    net = mlp(64, 3, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    solver, loss = user_loop(TensorDataset(X, y), net, 2, which)
    assert loss <= 0.01
    # The reported loss is the loss at the parameters the solver holds (one step ago: report.loss is at the start).
    assert solver.loss.forward(solver.params).item() < loss
    assert solver.t > 0 and solver.n_grad >= solver.n_steps
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("which", ["euler", "adaptive"])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_user_loop_seed_network(digits, which, n_classes):
    X, y = select_subset(*digits, 64, n_classes, 0)
    solver, loss = user_loop(TensorDataset(X, y), mlp(512, 6, n_classes), n_classes, which)
    assert loss <= 0.01 and solver.n_steps > 1


def test_integrate_with_step_loss_is_the_user_loop(digits):
    # The one driver's Stop(step_loss=0.01) is the user's loop above: same steps, same parameters, bit for bit.
    X, y = select_subset(*digits, 16, 2, 0)
    ds = TensorDataset(X, y)
    solver, loss = user_loop(ds, mlp(64, 3, 2), 2, "euler")

    loss_func = euler.LossFunction(ds, torch.nn.CrossEntropyLoss(), mlp(64, 3, 2), batch_size=len(ds))
    torch.manual_seed(0)
    params = loss_func.initialize_parameters()
    again = euler.ExponentialEulerSolver(params, loss_func, 0.01, 1)
    trajectory = euler.integrate(again, euler.Stop(step_loss=0.01))
    assert trajectory.stop_reason == "target" and float(trajectory.loss[-1]) == loss
    assert again.n_steps == solver.n_steps and again.t == solver.t, (again.n_steps, solver.n_steps)
    assert torch.equal(again.params, solver.params), \
        f"max |integrate - loop| = {float((again.params - solver.params).abs().max()):.3e}"
