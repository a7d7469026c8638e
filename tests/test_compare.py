"""Tests for the benchmark's comparison with stable-solvers (--compare, the peer adapter) and its RK4 reference
(--fidelity).

The end-to-end run swaps the benchmark's 2.6M-parameter network for a small MLP of the same input and output
shape (monkeypatching ``problem.build_network``), so that the command runs in seconds. The peer's tests need
``stable-solvers`` (the ``compare`` extra, installed in CI) and are skipped without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import exponential_euler_solver.benchmark.problem as problem_module
import exponential_euler_solver.benchmark.suite as suite
from exponential_euler_solver import LossFunction, StepReport, Stop, Trajectory, integrate
from exponential_euler_solver.benchmark.cli import build_parser, main, run_suite
from exponential_euler_solver.benchmark.peer import PEER_MISSING, PEER_SOLVERS, PeerMissingError, PeerSolver
from exponential_euler_solver.benchmark.problem import Problem
from exponential_euler_solver.benchmark.report import COMPARE_COLUMNS, format_comparison
from exponential_euler_solver.benchmark.results import PointResult, ReferenceResult, RunResult
from exponential_euler_solver.benchmark.suite import run_peer, run_solver
from exponential_euler_solver.fidelity import run_with_times
from exponential_euler_solver.solvers import SOLVERS, GradientDescent
from exponential_euler_solver.solvers.registry import SolverEntry
from exponential_euler_solver.trajectory import TIMING_COLUMNS

from tables import table_rows

HAVE_PEER = importlib.util.find_spec("stable_solvers") is not None
needs_peer = pytest.mark.skipif(not HAVE_PEER, reason="stable-solvers is not installed (the compare extra)")
SMALL_WIDTH = 16
PEER_VERSION = "stable-solvers 0.1"


def _small_network(n_classes):
    return nn.Sequential(nn.Linear(3072, SMALL_WIDTH), nn.ELU(), nn.Linear(SMALL_WIDTH, SMALL_WIDTH), nn.ELU(),
                         nn.Linear(SMALL_WIDTH, n_classes))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_grid_run(monkeypatch, tmp_path):
    """In a fresh folder, with building a grid point an error: a command that should exit on its arguments fails
    at once instead of running the default grid."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a grid point was built"))


# --------------------------------------------------------------------------
# arguments
def test_comparison_options_parse():
    args = build_parser().parse_args([])
    assert args.compare is False and args.fidelity is False and args.compare_max_seconds == 600
    args = build_parser().parse_args(["--compare", "--fidelity", "--compare-max-seconds", "12.5"])
    assert args.compare is True and args.fidelity is True and args.compare_max_seconds == 12.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_bad_compare_max_seconds_exits_2(capsys, no_grid_run, value):
    with pytest.raises(SystemExit) as info:
        main(["--compare-max-seconds", value])
    err = capsys.readouterr().err
    assert info.value.code == 2
    last = err.strip().splitlines()[-1]
    assert "--compare-max-seconds" in last and repr(value) in last, last


def test_compare_without_stable_solvers_is_a_clean_error(capsys, no_grid_run, monkeypatch, small_problem):
    monkeypatch.setitem(sys.modules, "stable_solvers", None)  # makes `import stable_solvers` raise ImportError
    with pytest.raises(SystemExit) as info:
        main(["--compare", "--n-train", "16", "--n-classes", "2", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert PEER_MISSING in err and "Traceback" not in err, err
    with pytest.raises(PeerMissingError, match=re.escape(PEER_MISSING)):
        run_suite(compare=True, n_train=[16], n_classes=[2], quiet=True)
    with pytest.raises(PeerMissingError, match=re.escape(PEER_MISSING)):
        PeerSolver(small_problem, "adaptive")


# --------------------------------------------------------------------------
# pieces
def _history(steps):
    traj = Trajectory()
    for i in range(steps):
        traj.append(StepReport(step=i, loss=1.0 - 0.1 * i, new_loss=0.9 - 0.1 * i, dt=0.1, t=0.1 * (i + 1),
                               t_start=0.1 * i, slope=-1.0, new_slope=-1.0, n_grad=i + 1, n_hvp=i + 1, n_rejected=0,
                               sharpness=1.0, seconds=0.5))
    return traj


def _run(implementation, converged, stop_reason, wall, steps=3):
    return RunResult(n_train=16, n_classes=2, seed=0, solver="adaptive", solver_args={}, label="Adaptive Gradient",
                     target=0.1, converged=converged, error=None, wall_time=wall, steps=steps, n_grad=steps,
                     n_hvp=steps, n_rejected=0, t_target=None, final_loss=0.7, strictly_decreasing=True,
                     history=_history(steps), implementation=implementation, stop_reason=stop_reason)


def test_comparison_table_marks_the_peer_stopped_by_its_time_cap():
    point = PointResult(16, 2, 0, runs=[_run("ours", True, "target", 2.0)],
                        peer_runs=[_run(PEER_VERSION, False, "max_seconds", 5.0)], gradient_time=0.25)
    text = format_comparison([point])
    assert "5.000*" in text and "--compare-max-seconds" in text
    assert " 2.50 " in text  # peer / ours wall
    assert " 0.750 " in text and " 2.67 " in text  # floor = 3 steps x 0.25 s; ours / floor
    headers, rows = table_rows(text, contains="Implementation")
    assert headers == [c.header for c in COMPARE_COLUMNS]
    assert [r["Implementation"] for r in rows] == ["ours", PEER_VERSION]
    assert rows[1]["Peer/ours wall"] == "2.50" and rows[0]["Peer/ours wall"] == "-"
    assert rows[0]["Floor (s)"] == "0.750" and rows[0]["Wall/floor"] == "2.67"
    assert rows[0]["HVPs step 0"] == rows[1]["HVPs step 0"] == "1"


@pytest.fixture(scope="module")
def small_problem():
    torch.manual_seed(0)
    X, y = torch.rand(16, 3072), torch.arange(16) % 2
    loss_func = LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), _small_network(2))
    return Problem(16, 2, 0, loss_func, loss_func.initialize_parameters(device="cpu"))


def _numbers(run: RunResult) -> dict:
    return {"steps": run.steps, "n_grad": run.n_grad, "n_hvp": run.n_hvp, "n_rejected": run.n_rejected,
            "t_target": run.t_target, "final_loss": run.final_loss, "converged": run.converged,
            "history": [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in run.history.rows()]}


def test_run_with_a_reference_keeps_its_parameters_at_the_reference_times(small_problem):
    """The run's parameters are kept at the reference's times (the last after the run's end, reached by extra
    steps that stay out of its record); against its own trajectory it deviates by nothing."""
    target = 1.0  # a dozen steps of adaptive gradient descent, three of exponential Euler
    plain = run_solver(small_problem, "adaptive", target, quiet=True)
    assert plain.converged and plain.fidelity is None
    crossing = plain.t_target
    last_t = float(plain.history.t[-1])
    times = [0.5 * crossing, crossing, 1.25 * last_t]

    def reference_of(name):
        solver = SOLVERS[name].build(small_problem.init_params.clone(), small_problem.loss_func, 2)
        trajectory, steps = run_with_times(solver, Stop(step_loss=target), times)
        head = trajectory.head(steps)
        assert trajectory.pending_times == []
        return ReferenceResult(crossing_time=head.crossing_time(target), alpha=None, times=times,
                               steps=steps, n_grad=0, n_hvp=0, wall_time=0.0, max_step_size=0.01,
                               trajectory=trajectory)

    same = run_solver(small_problem, "adaptive", target, quiet=True, reference=reference_of("adaptive"))
    assert _numbers(same) == _numbers(plain)  # the extra steps are outside the record and the counts
    fid = same.fidelity
    assert fid.times == times and fid.extra_steps > 0  # the last time lies after the run's end
    assert fid.deviations == [0.0, 0.0, 0.0] and fid.relative_error == 0.0
    assert fid.reference_crossing_time == crossing

    other = run_solver(small_problem, "adaptive", target, quiet=True,
                       reference=reference_of("exponential-euler"))
    assert _numbers(other) == _numbers(plain)
    fid = other.fidelity
    assert fid.times == times and all(0 < d < 1 for d in fid.deviations), fid
    assert fid.relative_error == pytest.approx((crossing - fid.reference_crossing_time)
                                               / fid.reference_crossing_time, rel=1e-12)


# --------------------------------------------------------------------------
# the peer in our step protocol
OFFSET = 0.125  # added to the loss the peer's own LossFunction reports, to tell it from the benchmark's


def _counting_peer(monkeypatch):
    """Count the peer's gradient calls and the columns its Hessian operator multiplies, from outside it."""
    from stable_solvers.loss_functions import LossFunction as PeerLossFunction
    from stable_solvers.operators import LossHessian
    counted = SimpleNamespace(grad=0, hvp=0)
    gradient, forward = PeerLossFunction.gradient, LossHessian.forward

    def counting_gradient(self, params):
        counted.grad += 1
        return gradient(self, params)

    def counting_forward(self, m):
        counted.hvp += m.shape[-1]
        return forward(self, m)

    monkeypatch.setattr(PeerLossFunction, "gradient", counting_gradient)
    monkeypatch.setattr(LossHessian, "forward", counting_forward)
    return counted


@needs_peer
@pytest.mark.parametrize("name, width", [("adaptive", 1), ("exponential-euler", 2)])
def test_peer_solver_steps_in_our_protocol(small_problem, monkeypatch, name, width):
    counted = _counting_peer(monkeypatch)
    peer = PeerSolver(small_problem, name)
    assert peer.params is not small_problem.init_params and torch.equal(peer.params, small_problem.init_params)
    assert peer.label == SOLVERS[name].label and peer.arguments == SOLVERS[name].arguments(2)
    own_gradient, peer_losses, peer_grads = peer._peer_loss.gradient, [], []

    def offset_gradient(params):  # the peer's own loss, shifted
        loss, grads = own_gradient(params)
        peer_losses.append(float(loss + OFFSET))
        peer_grads.append(grads.clone())
        return loss + OFFSET, grads

    peer._peer_loss.gradient = offset_gradient
    ours = small_problem.loss_func
    t = 0.0
    for i in range(3):
        before = peer.params.clone()
        loss0, grad0 = ours.gradient(before)
        report = peer.step()
        assert isinstance(report, StepReport) and report.step == i and peer.n_steps == i + 1
        # the loss at the start is the peer's own; at the end, the benchmark's at the new parameters
        assert report.loss == peer_losses[-1]
        assert report.loss - OFFSET == pytest.approx(float(loss0), rel=1e-5)
        new_loss, new_grad = ours.gradient(peer.params)
        assert report.new_loss == float(new_loss) and peer.loss_value == report.new_loss
        torch.testing.assert_close(peer.current_gradient(), new_grad, rtol=0, atol=0)
        assert report.slope == pytest.approx(-float(grad0.double().norm()) ** 2, rel=1e-12)
        assert report.new_slope == pytest.approx(-float(new_grad.double().norm()) ** 2, rel=1e-12)
        # flow time
        assert report.t_start == t and report.dt > 0 and report.t == t + report.dt == peer.t
        t = report.t
        if name == "adaptive":  # the peer's gradient descent step, with its own gradient
            torch.testing.assert_close(peer.params, before - report.dt * peer_grads[-1])
            assert report.sharpness > 0 and report.eigvals is None
            assert report.dt == pytest.approx(min(0.01 * 0.01, 1 / report.sharpness), rel=1e-6)  # warmup
        else:
            assert report.sharpness is None and report.eigvals.shape == (2,)
            assert report.eigvals.dtype == torch.float64
        # counts: the peer's gradients (one per step; the benchmark's evaluations are not counted) and the
        # columns its Hessian operator multiplied, in blocks of the power iteration's width
        assert report.n_grad == counted.grad == i + 1 == len(peer_losses)
        assert report.n_hvp == counted.hvp > 0 and report.n_hvp % width == 0
        assert report.n_rejected == report.rejections == peer.n_rejected == 0
        assert report.seconds > 0


@needs_peer
def test_integrate_runs_the_seeds_loop_on_the_peer(small_problem):
    target = 1.3  # six steps of the peer's adaptive gradient descent (in its warmup) on small_problem
    peer = PeerSolver(small_problem, "adaptive")
    trajectory = integrate(peer, Stop(step_loss=target))
    # the seed's loop by hand, on a fresh adapter
    fresh, losses, loss = PeerSolver(small_problem, "adaptive"), [], math.inf
    while loss > target:
        loss = fresh.step().loss
        losses.append(loss)
    assert len(losses) > 2
    assert trajectory.stop_reason == "target" and trajectory.loss.tolist() == losses
    assert len(trajectory) == peer.n_steps == fresh.n_steps
    assert trajectory.loss[-1] <= target < float(trajectory.loss[:-1].min())
    torch.testing.assert_close(peer.params, fresh.params, rtol=0, atol=0)
    assert trajectory.n_grad.tolist() == list(range(1, len(trajectory) + 1))
    assert trajectory.t_start[0] == 0.0 and torch.equal(trajectory.t_start[1:], trajectory.t[:-1])
    # the peer's loss at the start of a step and the benchmark's at the end of the previous one: the same
    # point, two implementations' round-off
    torch.testing.assert_close(trajectory.new_loss[:-1], trajectory.loss[1:], rtol=1e-5, atol=0)


@needs_peer
def test_peer_run_stops_at_its_caps(small_problem):
    # the time cap is checked between steps against the steps' own time: one step takes longer than 1e-9 s
    capped = run_peer(small_problem, "adaptive", 1e-6, max_seconds=1e-9, quiet=True)
    assert not capped.converged and capped.stop_reason == "max_seconds" and capped.steps == 1
    assert capped.implementation == PEER_VERSION and capped.wall_time > 1e-9
    two = run_peer(small_problem, "exponential-euler", 1e-6, max_steps=2, quiet=True)
    assert not two.converged and two.stop_reason == "max_steps" and two.steps == len(two.history) == 2
    assert two.n_grad == 2 and two.n_hvp > 0 and two.n_hvp % 2 == 0  # blocks of stiff_dim + 1 = 2 columns
    assert two.n_hvp == int(two.history.n_hvp[-1]) and two.first_step_hvp == int(two.history.n_hvp[0])
    assert float(two.history.new_loss[0]) == pytest.approx(float(two.history.loss[1]), rel=1e-5)
    assert math.isfinite(two.final_loss) and two.implementation.startswith("stable-solvers")
    assert two.label == "Exponential Euler" and two.solver_args == {"max_step_size": 0.01, "stiff_dim": 1}


@needs_peer
def test_peer_never_sees_the_benchmarks_objects(small_problem):
    net, criterion = small_problem.loss_func.net, small_problem.loss_func.criterion
    init = small_problem.init_params.clone()
    run_peer(small_problem, "adaptive", 1e-6, max_steps=1, quiet=True)
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert criterion.reduction == "mean"
    assert torch.equal(small_problem.init_params, init)


@needs_peer
def test_peer_of_a_solver_without_counterpart_is_a_key_error(small_problem, monkeypatch):
    monkeypatch.setitem(SOLVERS, "plain-gd", SolverEntry("Plain GD", GradientDescent, lambda c, loss="ce": {"lr": 0.01},
                                                         in_default_grid=False))
    with pytest.raises(KeyError, match="plain-gd"):
        run_peer(small_problem, "plain-gd", 0.1, quiet=True)


# --------------------------------------------------------------------------
# end to end: --compare (when stable-solvers is installed) and --fidelity, tiny grid
@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    json_path = folder / "c.json"
    argv = ["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--quiet", "--device", "cpu", "--threads", "1",
            "--fidelity", "--json", str(json_path)] + (["--compare"] if HAVE_PEER else [])
    threads = torch.get_num_threads()
    after_step = {}  # the peer's solver name -> (gradients, HVP columns) counted from outside after each step
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(problem_module, "build_network", _small_network)
        if HAVE_PEER:  # count the peer's gradients and HVP columns independently, per run and step
            counted = _counting_peer(mp)
            init, step = PeerSolver.__init__, PeerSolver.step

            def counting_init(self, problem, solver):
                counted.grad = counted.hvp = 0
                init(self, problem, solver)

            def counting_step(self):
                report = step(self)
                after_step.setdefault(self.name, []).append((counted.grad, counted.hvp))
                return report

            mp.setattr(PeerSolver, "__init__", counting_init)
            mp.setattr(PeerSolver, "step", counting_step)
        try:
            with contextlib.redirect_stdout(out):
                assert main(argv) == 0
        finally:
            torch.set_num_threads(threads)
    return out.getvalue(), json.loads(json_path.read_text()), after_step


@needs_peer
def test_comparison_table_agrees_with_json(tiny_compare):
    text, record, _ = tiny_compare
    headers, rows = table_rows(text, contains="Implementation")
    assert headers == [c.header for c in COMPARE_COLUMNS]
    comparisons = record["comparisons"]
    assert [c["solver"] for c in comparisons] == ["exponential-euler", "adaptive"]
    assert len(rows) == 2 * len(comparisons)
    for i, c in enumerate(comparisons):
        ours_row, peer_row = rows[2 * i], rows[2 * i + 1]
        assert ours_row["Implementation"] == "ours" and peer_row["Implementation"] == PEER_VERSION
        assert ours_row["Solver"] == peer_row["Solver"] == SOLVERS[c["solver"]].label
        for row, side in ((ours_row, c["ours"]), (peer_row, c["peer"])):
            where = f"{row} vs {side}"
            assert int(row["Steps"]) == side["steps"], where
            assert int(row["Gradient evals"]) == side["n_grad"], where
            assert int(row["HVPs"]) == side["n_hvp"], where
            assert row["HVPs/step"] == f"{side['n_hvp'] / side['steps']:.1f}", where
            assert row["Wall time (s)"] == f"{side['wall_time']:.3f}" + ("" if side["converged"] else "*"), where
            assert row["Flow time at target"] == f"{side['t_target']:.5g}", where
            assert row["Monotone"] == ("yes" if side["strictly_decreasing"] else "no"), where
        assert peer_row["Peer/ours wall"] == f"{c['peer_over_ours_wall']:.2f}"
        # Step 0's products (the cold start) from each run's own per-step history.
        histories = {(r["implementation"], r["solver"]): r["history"]
                     for r in record["runs"] + record["peer_runs"]}
        for row, key in ((ours_row, "ours"), (peer_row, "peer")):
            first = histories[(row["Implementation"], c["solver"])][0]["n_hvp"]
            assert c["first_step_hvp"][key] == first and row["HVPs step 0"] == str(first), (row, first)
        assert ours_row["Floor (s)"] == f"{c['floor']:.3f}"
        assert ours_row["Wall/floor"] == f"{c['ours_wall_over_floor']:.2f}"
        assert c["floor"] == pytest.approx(c["ours"]["steps"] * c["gradient_time"], rel=1e-12)
        assert c["peer_over_ours_wall"] == pytest.approx(c["peer"]["wall_time"] / c["ours"]["wall_time"], rel=1e-12)


@needs_peer
def test_comparison_prints_the_geometric_mean_of_the_wall_ratios(tiny_compare):
    text, record, _ = tiny_compare
    for solver in ("exponential-euler", "adaptive"):
        ratios = [c["peer"]["wall_time"] / c["ours"]["wall_time"] for c in record["comparisons"]
                  if c["solver"] == solver]
        expected = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        line = next(line for line in text.splitlines()
                    if line.startswith("Peer/ours wall, geometric mean") and solver in line)
        assert f"over {len(ratios)} grid point(s), {solver}: {expected:.2f}" in line, (line, ratios)


@needs_peer
def test_peer_runs_in_json(tiny_compare):
    _, record, after_step = tiny_compare
    assert record["versions"]["stable_solvers"] == "0.1"
    assert record["configuration"]["compare"] is True and record["peer"]["counted"]
    ours = {r["solver"]: r for r in record["runs"]}
    peers = {r["solver"]: r for r in record["peer_runs"]}
    assert set(peers) == set(ours) == set(after_step) == {"exponential-euler", "adaptive"}
    for name, peer in peers.items():
        hist = peer["history"]
        where = f"{name}: {peer}"[:2000]
        assert peer["implementation"] == PEER_VERSION and peer["converged"] and peer["stop_reason"] == "target"
        assert peer["label"] == ours[name]["label"] == SOLVERS[name].label, where
        assert peer["solver_args"] == ours[name]["solver_args"], where  # the seed's arguments for both
        assert peer["n_grad"] == peer["steps"] == len(hist) and peer["n_rejected"] == 0, where
        assert hist[-1]["loss"] <= peer["target"] < min(h["loss"] for h in hist[:-1]), where
        # the same initial parameters: the same first loss, up to the two implementations' round-off
        assert hist[0]["loss"] == pytest.approx(ours[name]["history"][0]["loss"], rel=1e-5), where
        # the counts of every step against those counted from outside the peer while it ran (steps taken after
        # the run, to reach the reference's last time, are left out of the record)
        counted = after_step[name]
        assert len(counted) >= len(hist), where
        assert [(h["n_grad"], h["n_hvp"]) for h in hist] == counted[:len(hist)], (counted, where)
        assert (peer["n_grad"], peer["n_hvp"]) == counted[len(hist) - 1], where
        assert peer["fidelity"]["extra_steps"] == len(counted) - len(hist), where
    assert peers["exponential-euler"]["n_hvp"] % 2 == 0  # blocks of stiff_dim + 1 = 2 columns


def test_fidelity_in_json_and_table(tiny_compare):
    text, record, _ = tiny_compare
    (point,) = record["points"]
    ref = point["reference"]
    assert ref["error"] is None and math.isfinite(ref["crossing_time"]) and ref["crossing_time"] > 0
    assert len(ref["times"]) == 3 and ref["times"] == sorted(ref["times"]) and ref["alpha"] > 0
    runs = record["runs"] + record.get("peer_runs", [])
    assert len(runs) == (4 if HAVE_PEER else 2)
    _, rows = table_rows(text, contains="Relative error")
    assert len(rows) == len(runs)
    for run in runs:
        fid = run["fidelity"]
        where = f"{run['implementation']} {run['solver']}: {fid}"
        assert fid["reference_crossing_time"] == ref["crossing_time"], where
        assert math.isfinite(fid["relative_error"]), where
        assert fid["relative_error"] == pytest.approx(
            (run["t_target"] - ref["crossing_time"]) / ref["crossing_time"], rel=1e-12), where
        assert fid["times"] == ref["times"][:len(fid["deviations"])] and len(fid["deviations"]) == 3, where
        assert all(math.isfinite(d) and d >= 0 for d in fid["deviations"]), where
        label = "ours" if run["implementation"] == "ours" else run["implementation"]
        row = next(r for r in rows if r["Implementation"] == label and r["Solver"] == SOLVERS[run["solver"]].label)
        assert row["Relative error"] == f"{100 * fid['relative_error']:+.2f}%", where
        assert row["Deviation at t3"] == f"{fid['deviations'][2]:.3g}", where
    # this library's solvers follow the flow: crossing within a few percent of the reference
    assert all(abs(r["fidelity"]["relative_error"]) < 0.1 for r in record["runs"]), [r["fidelity"] for r in runs]


# --------------------------------------------------------------------------
# a solver without a peer counterpart in a --compare grid
@needs_peer
def test_compare_skips_a_solver_without_peer_counterpart(monkeypatch, tmp_path):
    monkeypatch.setitem(SOLVERS, "plain-gd", SolverEntry("Plain GD", GradientDescent, lambda c, loss="ce": {"lr": 0.01},
                                                         in_default_grid=False))
    monkeypatch.setattr(problem_module, "build_network", _small_network)
    assert "plain-gd" not in PEER_SOLVERS
    assert "plain-gd" not in build_parser().parse_args([]).solvers  # not in the default grid
    json_path = tmp_path / "g.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--quiet", "--device", "cpu",
                     "--threads", "1", "--max-steps", "25", "--solvers", "plain-gd", "adaptive", "--compare",
                     "--json", str(json_path)]) == 0
    text, record = out.getvalue(), json.loads(json_path.read_text())
    # our runs of both solvers, the peer's of adaptive only
    assert [r["solver"] for r in record["runs"]] == ["plain-gd", "adaptive"]
    gd = record["runs"][0]
    assert gd["label"] == "Plain GD" and gd["solver_args"] == {"lr": 0.01} and gd["steps"] > 0
    assert gd["n_hvp"] == 0 and gd["n_grad"] == gd["steps"] + 1  # one at the start, one per step
    assert [r["solver"] for r in record["peer_runs"]] == ["adaptive"]
    assert [c["solver"] for c in record["comparisons"]] == ["adaptive"]
    # the tables print: the seed's and the details with both solvers, the comparison with adaptive only
    headers, _ = table_rows(text)
    assert headers == ["# Train", "# Classes", "Adaptive Gradient Time", "Plain GD Time"]  # SOLVERS order
    _, details = table_rows(text[text.index("\n\n") + 2:])
    assert [d["Solver"] for d in details] == ["Plain GD", "Adaptive Gradient"]
    _, rows = table_rows(text, contains="Implementation")
    assert [(r["Solver"], r["Implementation"]) for r in rows] == [("Adaptive Gradient", "ours"),
                                                                  ("Adaptive Gradient", PEER_VERSION)]
    means = [line for line in text.splitlines() if line.startswith("Peer/ours wall, geometric mean")]
    assert len(means) == 1 and "adaptive" in means[0] and "plain-gd" not in means[0], means


@needs_peer
def test_run_suite_compare_without_peer_counterpart(monkeypatch):
    monkeypatch.setitem(SOLVERS, "plain-gd", SolverEntry("Plain GD", GradientDescent, lambda c, loss="ce": {"lr": 0.01},
                                                         in_default_grid=False))
    monkeypatch.setattr(problem_module, "build_network", _small_network)
    (point,) = run_suite(n_train=[16], n_classes=[2], target=0.3, max_steps=3, quiet=True, device="cpu",
                         solvers=["plain-gd", "adaptive"], compare=True)
    gd, adaptive = point.runs
    assert gd.solver == "plain-gd" and point.peer_of(gd) is None
    assert point.peer_of(adaptive) is not None and point.peer_of(adaptive).implementation == PEER_VERSION
    assert point.gradient_time is not None and point.gradient_time > 0
    text = format_comparison([point])
    _, rows = table_rows(text, contains="Implementation")
    assert [r["Solver"] for r in rows] == ["Adaptive Gradient"] * 2
