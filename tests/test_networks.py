"""The benchmark's networks (--net mlp/cnn) and losses (--loss ce/mse), and how they reach the solvers.

The end-to-end runs use the benchmark's own builders at a small width (the CNN with 4 channels, the MLP
swapped for a 3072 -> 16 -> 16 -> C one as in test_benchmark.py), on 16 examples, so that each runs in seconds;
gradients, Hessian-vector products and steps are counted from outside the solvers.
"""

from __future__ import annotations

import contextlib
import io
import json
import time

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import exponential_euler_solver.benchmark.cli as bench
import exponential_euler_solver.benchmark.problem as problem_module
import exponential_euler_solver.benchmark.suite as suite
from exponential_euler_solver import HessianOperator, LossFunction
from exponential_euler_solver.benchmark.criteria import OneHotMSELoss, build_criterion
from exponential_euler_solver.benchmark.datasets import N_FEATURES
from exponential_euler_solver.benchmark.grid_checkpoint import GridCheckpoint
from exponential_euler_solver.benchmark.networks import CNN_WIDTH, build_cnn, cnn_parameter_count
from exponential_euler_solver.benchmark.problem import build_model, build_problem
from exponential_euler_solver.solvers import SOLVERS
from exponential_euler_solver.solvers.registry import stiff_dim

from conftest import count_suite_work

SMALL_WIDTH = 16
CNN_TEST_WIDTH = 4
TARGETS = {"ce": 0.3, "mse": 0.15}  # C = 2: predicting 1/2 for both outputs is an MSE of 0.25


def _small_mlp(n_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(N_FEATURES, SMALL_WIDTH), nn.ELU(), nn.Linear(SMALL_WIDTH, SMALL_WIDTH), nn.ELU(),
                         nn.Linear(SMALL_WIDTH, n_classes))


def _small_cnn(n_classes: int) -> nn.Sequential:
    return build_cnn(n_classes, CNN_TEST_WIDTH)


@pytest.fixture
def small_networks(monkeypatch):
    monkeypatch.setattr(problem_module, "build_network", _small_mlp)
    monkeypatch.setattr(problem_module, "build_cnn", _small_cnn)


# --------------------------------------------------------------------------
# the CNN
@pytest.mark.parametrize("n_classes", [2, 10])
def test_cnn_parameter_count_and_output_shape_are_the_docstrings(n_classes):
    net = build_cnn(n_classes)
    n_params = sum(p.numel() for p in net.parameters())
    # the docstring's formula, written out, and its two quoted values
    w = CNN_WIDTH
    assert n_params == (27 * w + w) + (9 * w * w + w) + (64 * w * n_classes + n_classes) \
        == cnn_parameter_count(n_classes)
    assert n_params == {2: 14_242, 10: 30_634}[n_classes]
    assert net(torch.rand(5, N_FEATURES)).shape == (5, n_classes)


def test_cnn_is_cohen_et_al_avgpool_elu():
    net = build_cnn(3, 8)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == \
        [(3, 8, (3, 3), (1, 1)), (8, 8, (3, 3), (1, 1))]
    assert sum(isinstance(m, nn.ELU) for m in net) == 2
    assert sum(isinstance(m, nn.AvgPool2d) for m in net) == 2
    assert not any(isinstance(m, (nn.MaxPool2d, nn.ReLU, nn.BatchNorm2d, nn.Dropout)) for m in net.modules())
    (head,) = [m for m in net if isinstance(m, nn.Linear)]
    assert (head.in_features, head.out_features) == (8 * 8 * 8, 3)
    assert sum(p.numel() for p in net.parameters()) == cnn_parameter_count(3, 8)


def test_cnn_reads_the_inputs_as_channel_major_images():
    # one example whose only nonzero input is channel 2, row 0, column 0 -> only the corner of the first
    # convolution's output (after pooling: the (0, 0) cell) differs from a zero input
    net = build_cnn(2, 1)
    x = torch.zeros(2, N_FEATURES)
    x[1, 2 * 32 * 32] = 1.0
    with torch.no_grad():
        feature = net[:4](x)  # Unflatten, Conv2d, ELU, AvgPool2d
    diff = (feature[1] - feature[0]).abs()[0]
    assert diff[0, 0] > 0 and diff.sum() == diff[0, 0]
    assert float(net[1].weight.detach()[0, 2, 1, 1]) != 0  # the kernel's centre on channel 2 reached the corner


@pytest.mark.parametrize("width", [0, -1, 2.0, True])
def test_bad_widths_are_refused(width):
    with pytest.raises(ValueError, match="width"):
        build_cnn(2, width)
    with pytest.raises(ValueError, match="width"):
        build_model("mlp", 2, width)


def test_build_model_widths_and_names():
    mlp = build_model("mlp", 3, 8)
    assert [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)] == \
        [(N_FEATURES, 8)] + [(8, 8)] * 4 + [(8, 3)]
    assert sum(p.numel() for p in build_model("cnn", 3).parameters()) == cnn_parameter_count(3)
    with pytest.raises(ValueError, match="net must be one of"):
        build_model("resnet", 3)


# --------------------------------------------------------------------------
# the MSE criterion
def _reference_mse(outputs, labels):
    """0.5 * sum_c (f_c - [c == y])^2 per example, written out with loops."""
    losses = []
    for n in range(outputs.shape[0]):
        total = 0.0
        for c in range(outputs.shape[1]):
            target = 1.0 if c == int(labels[n]) else 0.0
            total += 0.5 * (float(outputs[n, c]) - target) ** 2
        losses.append(total)
    return torch.tensor(losses, dtype=torch.float64)


def test_mse_equals_the_hand_written_reference():
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2, 0, 3])
    ref = _reference_mse(outputs, labels)
    assert torch.allclose(OneHotMSELoss(4, reduction="none")(outputs, labels), ref, rtol=1e-14, atol=0)
    assert float(OneHotMSELoss(4)(outputs, labels)) == pytest.approx(float(ref.mean()), rel=1e-14)
    assert float(OneHotMSELoss(4, reduction="sum")(outputs, labels)) == pytest.approx(float(ref.sum()), rel=1e-14)
    # the benchmark's criterion for "mse" is this one, with the mean
    crit = build_criterion("mse", 4)
    assert isinstance(crit, OneHotMSELoss) and crit.reduction == "mean" and crit.n_classes == 4
    assert isinstance(build_criterion("ce", 4), nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="loss must be one of"):
        build_criterion("hinge", 4)


def test_mse_refuses_outputs_of_another_width():
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        OneHotMSELoss(3)(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_mse_loss_function_value_gradient_and_hvps_match_the_reference():
    """Through LossFunction (batches of 5 of 12 examples): the mean of the reference, its autograd gradient, and
    the same Hessian-vector products reverse-over-reverse and vmapped forward-over-reverse (the GPU path)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ELU(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    data = TensorDataset(X, y)
    loss = LossFunction(data, OneHotMSELoss(3), net, batch_size=5)
    params = loss.initialize_parameters(dtype=torch.float64)

    def reference(theta):
        out = torch.func.functional_call(net, loss.unflatten(theta), (X,))
        target = torch.zeros(12, 3, dtype=torch.float64)
        target[torch.arange(12), y] = 1.0
        return (0.5 * ((out - target) ** 2).sum(dim=1)).mean()

    value, grad = loss.gradient(params)
    with torch.no_grad():
        out = torch.func.functional_call(net, loss.unflatten(params), (X,))
    assert float(value) == pytest.approx(float(_reference_mse(out, y).mean()), rel=1e-12)
    theta = params.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(theta), theta)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-13)
    V = torch.randn(loss.n_params, 4, generator=gen, dtype=torch.float64)
    H = torch.func.hessian(reference)(params.detach())
    for chunk in (1, 4):
        HV = HessianOperator(loss, params, chunk_size=chunk) @ V
        assert torch.allclose(HV, H @ V, rtol=1e-9, atol=1e-11), chunk


# --------------------------------------------------------------------------
# the stiff dimension
@pytest.mark.parametrize("n_classes", [2, 3, 10])
def test_stiff_dim_is_c_for_mse_and_c_minus_1_for_ce(n_classes):
    assert stiff_dim(n_classes, "ce") == n_classes - 1
    assert stiff_dim(n_classes, "mse") == n_classes
    entry = SOLVERS["exponential-euler"]
    assert entry.arguments(n_classes) == {"max_step_size": 0.01, "stiff_dim": n_classes - 1}
    assert entry.arguments_for(n_classes, "ce")["stiff_dim"] == n_classes - 1
    assert entry.arguments_for(n_classes, "mse")["stiff_dim"] == n_classes
    # adaptive gradient descent's arguments do not depend on the loss
    assert SOLVERS["adaptive"].arguments_for(n_classes, "mse") == SOLVERS["adaptive"].arguments(n_classes)
    with pytest.raises(ValueError, match="loss must be one of"):
        stiff_dim(n_classes, "hinge")
    with pytest.raises(ValueError, match="loss must be one of"):
        entry.arguments_for(n_classes, "hinge")


def test_built_solver_gets_the_losss_stiff_dim():
    X, y = torch.rand(8, N_FEATURES), torch.arange(8) % 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(problem_module, "build_network", _small_mlp)
        for loss, expected in (("ce", 2), ("mse", 3)):
            problem = build_problem(X, y, 6, 3, 0, loss=loss)
            assert (problem.net, problem.loss) == ("mlp", loss)
            solver = SOLVERS["exponential-euler"].build(problem.init_params.clone(), problem.loss_func, 3, loss)
            assert solver.stiff_dim == expected


# --------------------------------------------------------------------------
# end to end: every network with every loss, counted from outside


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_seed_loop_reaches_the_target_monotone_with_counted_costs(one_thread, small_networks, monkeypatch, net,
                                                                  loss):
    counted = count_suite_work(monkeypatch)
    target = TARGETS[loss]
    start = time.perf_counter()
    (point,) = bench.run_suite(n_train=[16], n_classes=[2], target=target, quiet=True, device="cpu", net=net,
                               loss=loss, max_steps=2000)
    elapsed = time.perf_counter() - start
    assert set(counted) == {"exponential-euler", "adaptive"}
    for run in point.runs:
        c = counted[run.solver]
        problem = c["problem"]
        where = f"{net}/{loss} {run.solver}: counted {({k: c[k] for k in ('grad', 'hvp', 'steps')})}, " \
                f"recorded steps {run.steps} n_grad {run.n_grad} n_hvp {run.n_hvp}, stop {run.stop_reason}"
        # the problem is the one asked for
        assert (problem.net, problem.loss) == (net, loss), where
        params = problem.loss_func.n_params
        assert params == (cnn_parameter_count(2, CNN_TEST_WIDTH) if net == "cnn" else
                          sum(p.numel() for p in _small_mlp(2).parameters())), where
        assert isinstance(problem.loss_func.criterion, OneHotMSELoss if loss == "mse" else nn.CrossEntropyLoss)
        # the seed's loop to the target, every step lowering the loss
        h = run.history
        assert run.converged and run.stop_reason == "target" and run.error is None, where
        assert run.steps == len(h) > 1, where
        assert all(b < a for a, b in zip(h.loss.tolist(), h.new_loss.tolist())), where
        assert run.strictly_decreasing, where
        assert float(h.loss[-1]) <= target < float(h.loss[:-1].min()), where
        # the counts, against the ones counted from outside
        assert (run.steps, run.n_grad, run.n_hvp) == (c["steps"], c["grad"], c["hvp"]), where
        assert [(int(a), int(b)) for a, b in zip(h.n_grad.tolist(), h.n_hvp.tolist())] == c["after_step"], where
        assert c["hvp"] > 0, where
        # the stiff dimension reached the solver
        if run.solver == "exponential-euler":
            k = 2 if loss == "mse" else 1
            assert run.solver_args == {"max_step_size": 0.01, "stiff_dim": k}, where
            assert all(len(row["eigenvalues"]) == k + 1 for row in h.rows()), where
    assert elapsed < 120, elapsed


# --------------------------------------------------------------------------
# the command's options
def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--net {mlp,cnn}" in out and "--loss {ce,mse}" in out
    assert "cnn-avgpool-elu" in out and "onehot(y)" in out


def test_defaults_are_the_seeds():
    args = bench.build_parser().parse_args([])
    assert (args.net, args.loss) == ("mlp", "ce")


@pytest.mark.parametrize("argv, option", [(["--net", "resnet"], "--net"), (["--loss", "hinge"], "--loss")])
def test_bad_net_or_loss_exit_2(capsys, monkeypatch, argv, option):
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a grid point was built"))
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and option in err.strip().splitlines()[-1], err


def test_compare_with_mse_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a grid point was built"))
    monkeypatch.setattr(bench, "import_peer", lambda: None)  # whether or not stable-solvers is installed
    with pytest.raises(SystemExit) as info:
        bench.main(["--compare", "--loss", "mse", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    last = err.strip().splitlines()[-1]
    assert "--compare" in last and "--loss ce" in last and "mse" in last, last
    # the library's entry point refuses it too, before building anything
    X, y = torch.rand(8, N_FEATURES), torch.arange(8) % 2
    with pytest.raises(ValueError, match="--compare.*--loss ce"):
        suite.run_points(X, y, n_train=[4], n_classes=[2], seeds=[0], solvers=["adaptive"], target=0.3,
                         quiet=True, compare=True, loss="mse")


def test_peer_refuses_a_mse_problem():
    from exponential_euler_solver.benchmark.peer import PeerSolver
    X, y = torch.rand(8, N_FEATURES), torch.arange(8) % 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(problem_module, "build_network", _small_mlp)
        problem = build_problem(X, y, 6, 2, 0, loss="mse")
    with pytest.raises(ValueError, match="CrossEntropyLoss"):
        PeerSolver(problem, "adaptive")


def test_json_records_net_and_loss(one_thread, small_networks, tmp_path):
    path = tmp_path / "r.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--solvers", "adaptive",
                           "--net", "cnn", "--loss", "mse", "--quiet", "--device", "cpu", "--json", str(path)]) == 0
    config = json.loads(path.read_text())["configuration"]
    assert (config["net"], config["loss"]) == ("cnn", "mse")


@pytest.mark.parametrize("written, asked, option", [
    (["--net", "cnn"], [], "--net"),
    ([], ["--loss", "mse"], "--loss"),
])
def test_resume_refuses_a_checkpoint_of_another_net_or_loss(capsys, monkeypatch, tmp_path, written, asked, option):
    grid = ["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--device", "cpu"]
    path = tmp_path / "g.pt"
    ckpt = GridCheckpoint(path, bench.grid_config(vars(bench.build_parser().parse_args(grid + written))))
    _write_empty_checkpoint(ckpt)
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a grid point was built"))
    with pytest.raises(SystemExit) as info:
        bench.main(grid + asked + ["--quiet", "--checkpoint", str(path), "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert option + ":" in err and "Traceback" not in err, err


def test_a_checkpoint_written_before_net_and_loss_existed_resumes_as_mlp_ce(monkeypatch, tmp_path):
    grid = ["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--device", "cpu"]
    config = bench.grid_config(vars(bench.build_parser().parse_args(grid)))
    old = {k: v for k, v in config.items() if k not in ("net", "loss")}
    path = tmp_path / "old.pt"
    _write_empty_checkpoint(GridCheckpoint(path, old))
    ns = vars(bench.build_parser().parse_args(grid + ["--checkpoint", str(path), "--resume"]))
    assert bench._grid_checkpoint(ns).config == config
    ns = vars(bench.build_parser().parse_args(grid + ["--net", "cnn", "--checkpoint", str(path), "--resume"]))
    with pytest.raises(Exception, match="--net: 'mlp' in the checkpoint, 'cnn' now"):
        bench._grid_checkpoint(ns)


def _write_empty_checkpoint(ckpt: GridCheckpoint) -> None:
    """Save ``ckpt`` with no finished run, as a grid checkpoint file (a tiny solver state)."""
    from exponential_euler_solver import AdaptiveGradientDescent, save_checkpoint
    loss = LossFunction(TensorDataset(torch.rand(4, 3), torch.arange(4) % 2), nn.CrossEntropyLoss(),
                        nn.Sequential(nn.Linear(3, 2)))
    solver = AdaptiveGradientDescent(loss.initialize_parameters(device="cpu"), loss, lr=0.01)
    save_checkpoint(ckpt.path, solver, None, ckpt.extra)
