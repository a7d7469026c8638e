"""Layerwise Jacobians, spectra along a trajectory and plots, against independent float64 references."""

import os
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

import exponential_euler_solver as euler

from conftest import unflatten_reference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- layerwise Jacobians -----------------------------------------------------------------------------------------
def test_layerwise_jacobians_match_jacrev_of_each_sub_network(tiny_problem, close):
    net, theta = tiny_problem.net, tiny_problem.theta  # Linear(5,4) Tanh Linear(4,4) ELU Linear(4,3), float64
    x = tiny_problem.inputs[0][:6]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    jacobians = euler.make_layerwise_jacobian_function(net, theta)(x)

    # Reference: each sub-network written out with torch.nn.functional, differentiated per example.
    p = unflatten_reference(net, theta)
    W0, b0, W1, b1, W2, b2 = (p[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"))
    subnets = [lambda z: F.linear(z, W0, b0),
               lambda z: F.linear(torch.tanh(z), W1, b1),
               lambda z: F.linear(F.elu(z), W2, b2)]
    assert [tuple(j.shape) for j in jacobians] == [(6, 4, 5), (6, 4, 4), (6, 3, 4)]
    z = x
    for layer, (sub, J) in enumerate(zip(subnets, jacobians)):
        expected = torch.stack([jacrev(sub)(z[n]) for n in range(z.shape[0])])
        close(J, expected, 1e-10, f"layer {layer + 1}")
        z = sub(z)
    close(jacobians[0], W0.expand(6, -1, -1), 1e-15, "first layer = W_1")
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the network was modified"


def test_layerwise_jacobians_with_named_layers_prelu_and_no_bias(close):
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict([("fc1", nn.Linear(3, 4)), ("act", nn.PReLU()), ("soft", nn.Softplus()),
                                     ("fc2", nn.Linear(4, 2, bias=False))])).double()
    theta = torch.randn(sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    J1, J2 = euler.make_layerwise_jacobian_function(net, theta)(x)
    p = unflatten_reference(net, theta)
    z1 = F.linear(x, p["fc1.weight"], p["fc1.bias"])
    sub = lambda z: F.linear(F.softplus(F.prelu(z, p["act.weight"])), p["fc2.weight"])
    close(J1, p["fc1.weight"].expand(5, -1, -1), 1e-15, "layer 1")
    close(J2, torch.stack([jacrev(sub)(z1[n]) for n in range(5)]), 1e-10, "layer 2")


def test_layerwise_jacobians_reject_what_is_not_an_mlp(tiny_problem):
    theta = tiny_problem.theta
    for bad in (nn.Linear(5, 3), nn.Sequential(nn.Linear(5, 4), nn.Softmax(dim=1)),
                nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
                nn.Sequential(nn.Tanh())):
        with pytest.raises(TypeError, match="Sequential|Linear"):
            euler.make_layerwise_jacobian_function(bad, theta)
    with pytest.raises(TypeError, match=r"net\[1\] is a Softmax"):
        euler.make_layerwise_jacobian_function(nn.Sequential(nn.Linear(5, 4), nn.Softmax(dim=1)), theta)
    with pytest.raises(ValueError, match="59 parameters"):
        euler.make_layerwise_jacobian_function(tiny_problem.net, theta[:-1])


# -- spectra along a trajectory ----------------------------------------------------------------------------------
@pytest.fixture
def points(tiny_problem):
    gen = torch.Generator().manual_seed(5)
    theta = tiny_problem.theta
    return [theta, theta + 0.05 * torch.randn(theta.shape, generator=gen, dtype=theta.dtype)]


@pytest.mark.parametrize("operator", ["hessian", "gn", "residual"])
def test_top_eigenvalues_along_match_dense_references(tiny_problem, points, operator, close):
    loss = euler.LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net)
    k = 3
    values = euler.top_eigenvalues_along(points, loss, k, operator=operator, tol=1e-9)
    assert values.shape == (len(points), k) and values.dtype == torch.float64
    for i, theta in enumerate(points):
        H, G = tiny_problem.hessian(theta), tiny_problem.gauss_newton(theta)
        dense = {"hessian": H, "gn": G, "residual": H - G}[operator]
        ref = torch.linalg.eigvalsh(dense)
        ref = ref[torch.argsort(ref.abs(), descending=True)][:k]
        close(values[i], ref, 1e-7, f"{operator} at point {i}")


def test_top_eigenvalues_along_a_trajectory(tiny_problem, close):
    loss = euler.LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net)
    solver = euler.GradientDescent(tiny_problem.theta.clone(), loss, 0.1)
    traj = euler.integrate(solver, euler.Stop(steps=2), euler.SaveAt(every_n=2))
    assert len(traj.params) == 2
    values = euler.top_eigenvalues_along(traj, loss, 1, which="LA", operator="gn", tol=1e-9)
    ref = torch.stack([torch.linalg.eigvalsh(tiny_problem.gauss_newton(p))[-1:] for p in traj.params])
    close(values, ref, 1e-7, "largest G eigenvalue along the trajectory")
    with pytest.raises(ValueError, match="operator"):
        euler.top_eigenvalues_along(traj, loss, 1, operator="fisher")
    with pytest.raises(ValueError, match="no parameter vectors"):
        euler.top_eigenvalues_along(euler.Trajectory(), loss, 1)


# -- plots -------------------------------------------------------------------------------------------------------
@pytest.fixture
def recorded(tiny_problem):
    loss = euler.LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net)
    solver = euler.ExponentialEulerSolver(tiny_problem.theta.clone(), loss, 2.0, 2)
    traj = euler.integrate(solver, euler.Stop(steps=12), euler.SaveAt(every_n=4))
    return loss, traj


def test_plots_write_png_files(recorded, tmp_path):
    loss, traj = recorded
    euler.plot_loss(traj, tmp_path / "loss.png")
    euler.plot_eigenvalues(traj, tmp_path / "eigenvalues.png", step_size=0.5)
    g_values = euler.top_eigenvalues_along(traj, loss, 2, operator="gn")
    euler.plot_eigenvalues(traj, tmp_path / "g.png", eigenvalues=g_values, label="G")
    for name in ("loss.png", "eigenvalues.png", "g.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    assert sorted(os.listdir(tmp_path)) == ["eigenvalues.png", "g.png", "loss.png"]  # no temporary files left
    if os.environ.get("EULER_KEEP_PLOTS"):  # to look at them
        for name in ("loss.png", "eigenvalues.png", "g.png"):
            (tmp_path / name).replace(os.path.join(os.environ["EULER_KEEP_PLOTS"], name))


def test_plot_eigenvalues_needs_eigenvalues(tiny_problem, tmp_path):
    loss = euler.LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net)
    solver = euler.GradientDescent(tiny_problem.theta.clone(), loss, 0.1)
    traj = euler.integrate(solver, euler.Stop(steps=2))
    with pytest.raises(ValueError, match="top_eigenvalues_along"):
        euler.plot_eigenvalues(traj, tmp_path / "e.png")
    with pytest.raises(ValueError, match="at least one step"):
        euler.plot_loss(euler.Trajectory(), tmp_path / "l.png")
    assert os.listdir(tmp_path) == []


def test_plots_without_matplotlib_name_the_extra(recorded, tmp_path, monkeypatch):
    _, traj = recorded
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib..." now raises ImportError
    with pytest.raises(ImportError, match=r"\[plot\]"):
        euler.plot_loss(traj, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
