"""Tests for the benchmark command (exponential_euler_solver.benchmark: .cli, .suite, .results, .report).

The end-to-end runs swap the benchmark's 2.6M-parameter network for a small MLP of the same input and output shape
(monkeypatching ``problem.build_network``), so that the command runs in seconds; what is tested here (arguments,
counts, records, tables, files) does not depend on the network's size.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import exponential_euler_solver.benchmark.problem as problem_module
import exponential_euler_solver.benchmark.suite as suite
from exponential_euler_solver import StepReport, Trajectory
from exponential_euler_solver.benchmark.cli import build_parser, main, run_benchmark
from exponential_euler_solver.benchmark.datasets import N_FEATURES
from exponential_euler_solver.benchmark.problem import DataError, build_network
from exponential_euler_solver.benchmark.report import PLOT_MISSING, format_tables
from exponential_euler_solver.benchmark.results import RunResult
from exponential_euler_solver.solvers import SOLVERS
from exponential_euler_solver.trajectory import COLUMNS, hermite_loss

from conftest import count_suite_work
from tables import table_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_WIDTH = 16


def _small_network(n_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(N_FEATURES, SMALL_WIDTH), nn.ELU(), nn.Linear(SMALL_WIDTH, SMALL_WIDTH), nn.ELU(),
                         nn.Linear(SMALL_WIDTH, n_classes))


@pytest.fixture
def small_network(monkeypatch):
    monkeypatch.setattr(problem_module, "build_network", _small_network)


@pytest.fixture
def no_grid_run(monkeypatch, tmp_path):
    """In a fresh folder, with building a grid point an error: a command that should exit on its arguments fails
    at once instead of running the default grid."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a grid point was built"))


def _exit_code_and_stderr(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


# --------------------------------------------------------------------------
# arguments
def test_defaults():
    args = build_parser().parse_args([])
    assert args.n_train == [64, 256]
    assert args.n_classes == [2, 4, 10]
    assert args.seeds == [0]
    assert args.target == 0.01
    assert args.solvers == ["exponential-euler", "adaptive"]
    assert args.dataset == "digits"
    assert args.dtype == "float32"
    assert args.max_steps == 100_000
    assert args.json is None and args.plot is None and not args.quiet


@pytest.mark.parametrize("argv, option, value", [
    (["--n-train", "0"], "--n-train", "'0'"),
    (["--n-train", "16", "-3"], "--n-train", "'-3'"),
    (["--n-train", "ten"], "--n-train", "'ten'"),
    (["--n-classes", "11"], "--n-classes", "'11'"),
    (["--n-classes", "1"], "--n-classes", "'1'"),
    (["--target", "0"], "--target", "'0'"),
    (["--target", "-0.1"], "--target", "'-0.1'"),
    (["--target", "inf"], "--target", "'inf'"),
    (["--target", "nan"], "--target", "'nan'"),
    (["--seeds", "-1"], "--seeds", "'-1'"),
    (["--max-steps", "0"], "--max-steps", "'0'"),
    (["--solvers", "newton"], "--solvers", "'newton'"),
    (["--dtype", "float16"], "--dtype", "'float16'"),
])
def test_bad_grid_values_exit_2_naming_option_and_value(capsys, no_grid_run, argv, option, value):
    code, err = _exit_code_and_stderr(capsys, argv)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert option in last and value in last, last


def test_unknown_dataset_exits_2(capsys, no_grid_run):
    code, err = _exit_code_and_stderr(capsys, ["--dataset", "imagenet"])
    assert code == 2
    assert "--dataset" in err and "imagenet" in err, err


def test_missing_cifar_dir_is_a_clean_error(capsys, no_grid_run, tmp_path):
    missing = tmp_path / "no-such-folder"
    code, err = _exit_code_and_stderr(
        capsys, ["--dataset", "cifar10", "--data-dir", str(missing), "--n-train", "16", "--n-classes", "2",
                 "--quiet"])
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("euler-benchmark: error:") and str(missing) in lines[0], err


def test_cifar_without_data_dir_names_the_option(capsys, no_grid_run):
    code, err = _exit_code_and_stderr(capsys, ["--dataset", "cifar10", "--quiet"])
    assert code == 2
    assert "--data-dir" in err and "Traceback" not in err, err


def test_grid_larger_than_the_data_fails_before_running(capsys, no_grid_run):
    code, err = _exit_code_and_stderr(capsys, ["--n-train", "100000", "--n-classes", "2", "--quiet"])
    assert code == 2
    assert "n_train" in err and "100000" in err and "Traceback" not in err, err


def test_missing_output_folder_fails_before_running(capsys, no_grid_run, tmp_path):
    code, err = _exit_code_and_stderr(capsys, ["--json", str(tmp_path / "nope" / "b.json")])
    assert code == 2
    assert "--json" in err, err


def test_plot_without_matplotlib_says_how_to_install(capsys, no_grid_run, monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    code, err = _exit_code_and_stderr(capsys, ["--plot", str(tmp_path / "b.png")])
    assert code == 2
    assert PLOT_MISSING in err, err


def test_run_benchmark_rejects_unknown_options():
    with pytest.raises(TypeError, match="n_trains"):
        run_benchmark(n_trains=[16])


def test_run_benchmark_data_error():
    with pytest.raises(DataError, match="n_train"):
        run_benchmark(n_train=[100000], n_classes=[2], quiet=True)


# --------------------------------------------------------------------------
# pieces
def test_network_is_the_seeds():
    net = build_network(4)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3072, 512)] + [(512, 512)] * 4 + [(512, 4)]
    assert sum(isinstance(m, torch.nn.ELU) for m in net) == 5
    assert sum(p.numel() for p in net.parameters()) == 3072 * 512 + 512 + 4 * (512 * 512 + 512) + 512 * 4 + 4


def _trajectory(ts, loss, slope=None, stop_reason="target"):
    """A trajectory of steps between the flow times ``ts`` with loss ``loss(t)`` and, when given, slopes
    ``slope(t)`` at both ends of each step."""
    traj = Trajectory()
    for i, (a, b) in enumerate(zip(ts, ts[1:])):
        traj.append(StepReport(step=i, loss=loss(a), new_loss=loss(b), dt=b - a, t=b, t_start=a, n_grad=i + 1,
                               n_hvp=i, n_rejected=0, sharpness=1.0, slope=None if slope is None else slope(a),
                               new_slope=None if slope is None else slope(b), seconds=0.25))
    traj.stop_reason = stop_reason
    return traj


def _result(history, target, counts=(1, 1, 0), solver="adaptive"):
    return RunResult.from_run((16, 2, 0), solver, {}, SOLVERS[solver].label, target, history, counts)


EXP_TS = [0.0, 0.5, 1.0, 1.5, 2.0]  # steps of 0.5 in units of the decay time


@pytest.mark.parametrize("target_time", [0.3, 0.5, 0.77, 1.2, 1.99])
def test_t_target_is_the_hermite_crossing_inside_the_crossing_step(target_time):
    # loss = exp(-t), slopes dL/dt = -exp(-t) at both ends of every step: the decay is exactly exponential.
    target = math.exp(-target_time)
    history = _trajectory(EXP_TS, lambda t: math.exp(-t), lambda t: -math.exp(-t))
    result = _result(history, target)
    assert result.t_target == history.crossing_time(target)
    # inside the first step whose new loss reached the target
    i = next(i for i in range(len(history)) if float(history.new_loss[i]) <= target)
    assert float(history.t_start[i]) < result.t_target <= float(history.t[i])
    assert float(history.loss[i]) > target
    # on the Hermite cubic of the loss, the crossing is the target
    row = history.rows()[i]
    assert hermite_loss(row["t_start"], row["t"], row["loss"], row["new_loss"], row["slope"], row["new_slope"],
                        result.t_target) == pytest.approx(target, rel=1e-12)
    # the cubic is within 1e-3 of the exact (exponential) crossing: log-linear would be exact here
    assert result.t_target == pytest.approx(target_time, rel=1e-3)


def test_hermite_crossing_is_not_log_linear():
    # A loss linear in t (slope -0.3 everywhere): the Hermite cubic reproduces it, so the crossing is exact, where
    # interpolating log L linearly would be off by about 2 %.
    loss = lambda t: 1.0 - 0.3 * t  # noqa: E731
    history = _trajectory([0.0, 1.0, 2.0], loss, lambda t: -0.3)
    target = loss(1.5)
    assert _result(history, target).t_target == pytest.approx(1.5, rel=1e-12)
    log_linear = 1.0 + (math.log(loss(1.0)) - math.log(target)) / (math.log(loss(1.0)) - math.log(loss(2.0)))
    assert abs(log_linear - 1.5) > 1e-2  # so the test above tells the two apart


def test_crossing_without_slopes_falls_back_to_log_linear():
    # Records without slopes (version-1 files): log L linear in t, exact for an exponential decay.
    history = _trajectory([0.0, 1.0, 2.5, 4.0], lambda t: math.exp(-t))
    assert history.crossing_time(math.exp(-2.0)) == pytest.approx(2.0, rel=1e-12)
    assert _result(history, math.exp(-1.0)).t_target == pytest.approx(1.0, rel=1e-12)


def test_crossing_at_the_start_or_never():
    history = _trajectory(EXP_TS, lambda t: math.exp(-t), lambda t: -math.exp(-t), stop_reason="max_steps")
    assert _result(history, 2.0).t_target == 0.0
    never = _result(history, math.exp(-5.0))
    assert never.t_target is None and not never.converged and never.stop_reason == "max_steps"


def test_run_result_round_trips_through_json():
    history = _trajectory(EXP_TS, lambda t: math.exp(-t), lambda t: -math.exp(-t))
    result = _result(history, math.exp(-1.2), counts=(5, 7, 1), solver="exponential-euler")
    data = json.loads(json.dumps(result.to_dict()))
    assert [sorted(row) for row in data["history"]] == [sorted(COLUMNS)] * len(history)
    assert data["label"] == "Exponential Euler" and data["wall_time"] == 1.0  # 4 steps of 0.25 s
    assert (data["n_grad"], data["n_hvp"], data["n_rejected"]) == (5, 7, 1)
    back = RunResult.from_dict(data)
    assert back.to_dict() == result.to_dict()
    assert back.history.rows() == history.rows() and back.t_target == result.t_target


def test_tables_mark_runs_that_did_not_converge():
    hist = _trajectory([0.0, 0.1], lambda t: 1.0 - 5 * t, lambda t: -5.0, stop_reason="max_steps")
    runs = [RunResult(n_train=16, n_classes=2, seed=0, solver=name, solver_args={}, label=entry.label, target=0.1,
                      converged=name == "adaptive", error=None, wall_time=1.23456, steps=1, n_grad=2, n_hvp=3,
                      n_rejected=0, t_target=None, final_loss=0.5, strictly_decreasing=True, history=hist,
                      stop_reason="target" if name == "adaptive" else "max_steps")
            for name, entry in SOLVERS.items() if entry.in_default_grid]
    text = format_tables(runs)
    assert "1.235*" in text and "did not reach the target" in text and "--max-steps" in text
    headers, rows = table_rows(text)
    assert headers == ["# Train", "# Classes", "Exponential Euler Time", "Adaptive Gradient Time"]
    assert rows == [{"# Train": "16", "# Classes": "2", "Exponential Euler Time": "1.235*",
                     "Adaptive Gradient Time": "1.235"}]


def test_max_steps_ends_the_run_unconverged(one_thread, small_network):
    (result,) = run_benchmark(n_train=[16], n_classes=[2], solvers=["adaptive"], target=1e-6, max_steps=2,
                              quiet=True, device="cpu")
    assert not result.converged and result.error is None and result.stop_reason == "max_steps"
    assert result.steps == len(result.history) == 2
    assert result.t_target is None


# --------------------------------------------------------------------------
# end to end through main(), with every gradient, Hessian-vector product and step counted from outside


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    json_path, png_path = folder / "b.json", folder / "b.png"
    argv = ["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--quiet", "--device", "cpu",
            "--threads", "1", "--json", str(json_path), "--plot", str(png_path)]
    threads = torch.get_num_threads()
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(problem_module, "build_network", _small_network)
        counted = count_suite_work(mp)
        try:
            with contextlib.redirect_stdout(out):
                assert main(argv) == 0
        finally:
            torch.set_num_threads(threads)
    return SimpleNamespace(text=out.getvalue(), record=json.loads(json_path.read_text()), png=png_path,
                           counted=counted)


def _detail_rows(text):
    return table_rows(text[text.index("\n\n") + 2:])[1]


def test_tiny_grid_tables(tiny_run):
    text, record = tiny_run.text, tiny_run.record
    headers, rows = table_rows(text)
    assert headers == ["# Train", "# Classes", "Exponential Euler Time", "Adaptive Gradient Time"]
    assert len(rows) == 1 and rows[0]["# Train"] == "16" and rows[0]["# Classes"] == "2"
    runs = {r["solver"]: r for r in record["runs"]}
    assert rows[0]["Exponential Euler Time"] == f"{runs['exponential-euler']['wall_time']:.3f}"
    assert rows[0]["Adaptive Gradient Time"] == f"{runs['adaptive']['wall_time']:.3f}"

    details = _detail_rows(text)
    assert [d["Solver"] for d in details] == ["Exponential Euler", "Adaptive Gradient"]
    for d, run in zip(details, record["runs"]):
        assert int(d["Steps"]) == run["steps"]
        assert int(d["Rejections"]) == run["n_rejected"]
        assert int(d["Gradient evals"]) == run["n_grad"]
        assert int(d["HVPs"]) == run["n_hvp"]
        assert d["HVPs/step"] == f"{run['hvp_per_step']:.1f}"
        assert d["Flow time at target"] == f"{run['t_target']:.5g}"
        assert d["Final loss"] == f"{run['final_loss']:.4g}"
        assert d["Monotone"] == "yes"
        assert d["Wall time (s)"] == f"{run['wall_time']:.3f}"
    # the regime: |lambda_1 / lambda_{k+1}| of the eigenvalues the first and the last step used (exponential
    # Euler tracks k + 1 = 2 pairs at 2 classes; adaptive gradient descent one, so no ratio)
    ee, ad = record["runs"]
    first, last = ee["history"][0]["eigenvalues"], ee["history"][-1]["eigenvalues"]
    assert len(first) == 2 and abs(first[0]) >= abs(first[1]) > 0
    expected = [abs(first[0] / first[1]), abs(last[0] / last[1])]
    assert ee["stiffness"] == pytest.approx(expected, rel=1e-12)
    assert details[0]["|l1/l(k+1)| first, last"] == "%.1f, %.1f" % tuple(expected)
    assert ad["stiffness"] is None and details[1]["|l1/l(k+1)| first, last"] == "-"


def test_tiny_grid_counts_match_independent_counts(tiny_run):
    """The printed and written counts against the gradients, Hessian-vector products and steps counted from
    outside the solvers while the grid ran."""
    counted = tiny_run.counted
    assert set(counted) == {"exponential-euler", "adaptive"}
    details = {d["Solver"]: d for d in _detail_rows(tiny_run.text)}
    for run in tiny_run.record["runs"]:
        c = counted[run["solver"]]
        where = f"{run['solver']}: counted {c}, recorded {({k: run[k] for k in ('steps', 'n_grad', 'n_hvp')})}"
        assert c["steps"] > 1 and c["hvp"] > 0, where
        assert run["steps"] == c["steps"] and run["n_grad"] == c["grad"] and run["n_hvp"] == c["hvp"], where
        assert run["hvp_per_step"] == pytest.approx(c["hvp"] / c["steps"], rel=1e-12), where
        # cumulative counts after each step, as counted while it ran
        assert [(h["n_grad"], h["n_hvp"]) for h in run["history"]] == c["after_step"], where
        assert run["first_step_hvp"] == c["after_step"][0][1], where
        # the printed cells
        row = details[run["label"]]
        assert int(row["Steps"]) == c["steps"] and int(row["Gradient evals"]) == c["grad"], (row, where)
        assert int(row["HVPs"]) == c["hvp"], (row, where)
        assert row["HVPs/step"] == f"{c['hvp'] / c['steps']:.1f}", (row, where)
        # the run's wall time is its steps' own time: within the time the whole run took
        assert 0 < run["wall_time"] <= c["elapsed"], where


def test_tiny_grid_json_is_consistent(tiny_run):
    record = tiny_run.record
    config = record["configuration"]
    assert config["grid"] == {"n_train": [16], "n_classes": [2], "seeds": [0]}
    assert config["dataset"] == "digits" and config["device"] == "cpu" and config["dtype"] == "float32"
    assert "--json" in config["argv"]
    assert set(record["versions"]) == {"python", "torch", "numpy", "exponential_euler_solver"}
    assert [r["solver"] for r in record["runs"]] == ["exponential-euler", "adaptive"]
    assert [r["label"] for r in record["runs"]] == ["Exponential Euler", "Adaptive Gradient"]
    for run in record["runs"]:
        hist = run["history"]
        where = f"{run['solver']}: {run}"[:2000]
        assert run["converged"] and run["error"] is None and run["stop_reason"] == "target", where
        assert run["implementation"] == "ours" and run["fidelity"] is None, where
        assert run["steps"] == len(hist) > 1, where
        assert all(sorted(h) == sorted(COLUMNS) for h in hist), where
        assert run["n_hvp"] == hist[-1]["n_hvp"] and run["n_grad"] == hist[-1]["n_grad"], where
        assert run["n_rejected"] == sum(h["rejections"] for h in hist) == hist[-1]["n_rejected"], where
        assert all(a["n_hvp"] <= b["n_hvp"] for a, b in zip(hist, hist[1:])), where
        assert all(a["n_grad"] < b["n_grad"] for a, b in zip(hist, hist[1:])), where
        # a step refreshed its eigenpairs exactly when its cumulative n_hvp grew; eig_age is then 0, else it aged
        assert hist[0]["n_hvp"] > 0 and hist[0]["eig_age"] == 0, where
        for a, b in zip(hist, hist[1:]):
            refreshed = b["n_hvp"] > a["n_hvp"]
            assert b["eig_age"] == (0 if refreshed else a["eig_age"] + 1), (a, b)
        assert [h["step"] for h in hist] == list(range(len(hist)))
        assert hist[0]["t_start"] == 0.0
        assert all(a["t"] == b["t_start"] and a["new_loss"] == b["loss"] for a, b in zip(hist, hist[1:]))
        assert all(h["t"] - h["t_start"] == pytest.approx(h["dt"], rel=1e-12) and h["dt"] > 0 for h in hist)
        # slopes -||grad||^2: the end of a step is the start of the next (one cached gradient)
        assert all(h["slope"] < 0 and h["new_slope"] < 0 for h in hist), where
        assert all(a["new_slope"] == b["slope"] for a, b in zip(hist, hist[1:])), where
        assert all(h["seconds"] > 0 for h in hist), where
        assert all(h["error_ratio"] is not None and 0 <= h["error_ratio"] <= 1 for h in hist), where
        # the seed's loop: stop at the first step whose reported (start) loss is <= target
        assert hist[-1]["loss"] <= run["target"] < min(h["loss"] for h in hist[:-1]), where
        assert run["final_loss"] == hist[-1]["new_loss"]
        assert run["strictly_decreasing"] is True
        assert all(h["new_loss"] < h["loss"] for h in hist), where
        # the crossing: inside the step whose new loss first reached the target (the one before the last), on
        # the Hermite cubic of that step
        crossing = hist[-2]
        assert crossing["new_loss"] <= run["target"] < crossing["loss"], where
        assert crossing["t_start"] < run["t_target"] <= crossing["t"], where
        assert run["t_target"] == Trajectory.from_rows(hist).crossing_time(run["target"]), where
        assert hermite_loss(crossing["t_start"], crossing["t"], crossing["loss"], crossing["new_loss"],
                            crossing["slope"], crossing["new_slope"], run["t_target"]) == pytest.approx(
                                run["target"], rel=1e-9), where
        if run["solver"] == "exponential-euler":
            assert all(len(h["eigenvalues"]) == 2 and h["sharpness"] is None for h in hist)
            assert run["solver_args"] == {"max_step_size": 0.01, "stiff_dim": 1}
        else:
            assert all(h["eigenvalues"] is None and h["sharpness"] > 0 for h in hist)
            assert run["solver_args"] == {"lr": 0.01, "warmup_iters": 10, "warmup_factor": 0.01}
        assert run["wall_time"] == pytest.approx(sum(h["seconds"] for h in hist), rel=1e-12)


def test_tiny_grid_same_start_for_both_solvers(tiny_run):
    first_losses = {r["solver"]: r["history"][0]["loss"] for r in tiny_run.record["runs"]}
    assert first_losses["exponential-euler"] == first_losses["adaptive"], first_losses


def test_tiny_grid_png(tiny_run):
    data = tiny_run.png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not [p for p in tiny_run.png.parent.iterdir() if p.name.endswith(".tmp")]
