"""The cost-growth command (python -m exponential_euler_solver.benchmark.scaling).

The runs use the digits dataset and the seed's MLP at 1/64 of the asked width (512 -> 8 hidden units), so that a
grid of sizes runs in seconds; gradients, Hessian-vector products and steps are counted from outside the solvers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

import exponential_euler_solver.benchmark.problem as problem_module
import exponential_euler_solver.benchmark.scaling as scaling
import exponential_euler_solver.benchmark.suite as suite_module
from exponential_euler_solver import HessianOperator, LossFunction
from exponential_euler_solver.benchmark.datasets import N_FEATURES
from exponential_euler_solver.solvers.base import Solver

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHRINK = 64
_real_build_network = problem_module.build_network


def _shrunk_network(n_classes: int, width: int = problem_module.HIDDEN_WIDTH):
    return _real_build_network(n_classes, max(1, width // SHRINK))


def _n_params(n_classes: int, width: int) -> int:
    w = max(1, width // SHRINK)
    return N_FEATURES * w + w + 4 * (w * w + w) + w * n_classes + n_classes


@pytest.fixture
def shrunk(monkeypatch):
    monkeypatch.setattr(problem_module, "build_network", _shrunk_network)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _main(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = scaling.main(argv)
    return code, out.getvalue()


# --------------------------------------------------------------------------
# pieces
def test_fit_exponent_of_synthetic_power_laws():
    xs = [64, 256, 1024, 4096]
    assert scaling.fit_exponent(xs, [3.0 * x ** 1.7 for x in xs]) == pytest.approx(1.7, rel=1e-12)
    assert scaling.fit_exponent(xs, [0.5 * x ** -0.25 for x in xs]) == pytest.approx(-0.25, rel=1e-12)
    assert scaling.fit_exponent(xs, [2.0] * 4) == pytest.approx(0.0, abs=1e-12)
    # with noise: the least-squares slope in log-log, as numpy's polyfit computes it
    ys = [1.0 * x ** 1.1 * f for x, f in zip(xs, (1.3, 0.8, 1.1, 0.95))]
    expected = np.polyfit(np.log(xs), np.log(ys), 1)[0]
    assert scaling.fit_exponent(xs, ys) == pytest.approx(expected, rel=1e-10)
    assert abs(expected - 1.1) > 1e-3  # the noise moved it, so the test tells a fit from the true exponent
    # not enough to fit
    assert scaling.fit_exponent([64], [1.0]) is None
    assert scaling.fit_exponent([64, 64], [1.0, 2.0]) is None
    assert scaling.fit_exponent([64, 256], [1.0, None]) is None
    assert scaling.fit_exponent([64, 256, 1024], [1.0, 0.0, 4.0]) == pytest.approx(0.5, rel=1e-12)  # drops the 0


def test_plan_sizes_order_and_shared_size():
    sizes = scaling.plan_sizes([256, 64], [10, 2], [1024, 256, 512], width_n_train=256, width_classes=2,
                               default_width=512)
    assert [(s.n_train, s.n_classes, s.width) for s in sizes] == [
        (64, 10, 512), (256, 10, 512), (64, 2, 512), (256, 2, 512), (256, 2, 256), (256, 2, 1024)]
    shared = [s for s in sizes if (s.n_train, s.n_classes, s.width) == (256, 2, 512)]
    assert len(shared) == 1 and shared[0].series == ("n_train", "width")
    assert scaling.plan_sizes([], [2], [8], width_n_train=16, width_classes=3, default_width=512) == [
        scaling.Size(16, 3, 8, ("width",))]


def test_defaults_are_the_briefs():
    args = scaling.build_parser().parse_args([])
    assert args.n_train == [64, 256, 1024, 4096] and args.n_classes == [2, 10]
    assert args.widths == [256, 512, 1024, 2048] and args.width_n_train == 256 and args.width_classes == 2
    assert args.dataset == "photos" and args.target == 0.01 and args.batch_size == 256
    assert args.max_seconds == 900 and args.solvers == ["exponential-euler", "adaptive"]
    assert args.net == "mlp" and args.loss == "ce" and not args.quiet


# --------------------------------------------------------------------------
# a tiny grid, end to end
def _counting(mp):
    counted = {"grad": 0, "hvp": 0, "steps": 0}
    gradient, matmat, step = LossFunction.gradient, HessianOperator._matmat, Solver.step

    def counting_gradient(self, params):
        counted["grad"] += 1
        return gradient(self, params)

    def counting_matmat(self, X, *out):
        counted["hvp"] += X.shape[1]
        return matmat(self, X, *out)

    def counting_step(self):
        report = step(self)
        counted["steps"] += 1
        return report

    mp.setattr(LossFunction, "gradient", counting_gradient)
    mp.setattr(HessianOperator, "_matmat", counting_matmat)
    mp.setattr(Solver, "step", counting_step)
    return counted


TINY = ["--dataset", "digits", "--n-train", "16", "32", "--n-classes", "2", "3", "--widths", "512", "256",
        "--width-n-train", "32", "--width-classes", "2", "--target", "0.3", "--batch-size", "16", "--threads", "1",
        "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scaling")
    json_path, png_path = folder / "s.json", folder / "s.png"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(problem_module, "build_network", _shrunk_network)
        # the once-per-process warm-up (one gradient, one HVP) runs here whatever ran before in this process
        mp.setattr(suite_module, "_WARM", set())
        counted = _counting(mp)
        try:
            code, text = _main(TINY + ["--json", str(json_path), "--plot", str(png_path)])
        finally:
            torch.set_num_threads(threads)
    assert code == 0
    return {"text": text, "record": json.loads(json_path.read_text()), "png": png_path, "counted": counted}


def test_tiny_grid_json_is_consistent(tiny_run):
    record, counted = tiny_run["record"], tiny_run["counted"]
    runs = record["runs"]
    expected_sizes = [(16, 2, 512), (32, 2, 512), (16, 3, 512), (32, 3, 512), (32, 2, 256)]
    assert [(r["solver"], r["n_train"], r["n_classes"], r["width"]) for r in runs] == \
        [(s, *size) for s in ("exponential-euler", "adaptive") for size in expected_sizes]
    for r in runs:
        where = json.dumps(r)[:1500]
        series = {(32, 2, 512): ["n_train", "width"], (32, 2, 256): ["width"]}.get(
            (r["n_train"], r["n_classes"], r["width"]), ["n_train"])
        assert r["series"] == series, where
        assert r["batch_size"] == min(r["n_train"], 16), where
        assert r["n_params"] == _n_params(r["n_classes"], r["width"]), where
        assert r["converged"] and r["stop_reason"] == "target" and not r["stopped"] and r["error"] is None, where
        assert r["steps"] > 1 and r["n_grad"] > r["steps"] and r["n_hvp"] > 0, where
        assert r["final_loss"] < r["initial_loss"] and r["t_target"] is not None, where
        assert 0 < r["t_target"] <= r["flow_time"], where
        assert r["wall_seconds"] > 0 and r["wall_per_step"] == pytest.approx(r["wall_seconds"] / r["steps"]), where
        assert 0 < r["wall_seconds"] <= r["elapsed_seconds"], where
        assert r["t_grad"] > 0 and r["gradient_repeats"] == 5, where
        split = [r["time_grad"], r["time_hvp"], r["time_eig"]]
        assert all(v >= 0 for v in split) and r["time_grad"] > 0 and r["time_hvp"] > 0, where
        assert r["time_other"] == pytest.approx(r["wall_seconds"] - sum(split), abs=1e-9), where
        assert sum(split) <= r["wall_seconds"] * 1.0001, where
        for key in ("grad", "hvp", "eig", "other"):
            total = r[f"time_{key}"]
            assert r[f"{key}_per_step"] == pytest.approx(total / r["steps"], abs=1e-12), where
        assert r["peak_rss_increase_mib"] is not None and r["peak_rss_increase_mib"] >= 0, where
        assert r["rss_peak_mib"] >= r["rss_before_mib"] > 0, where
        if r["solver"] == "exponential-euler":
            assert r["solver_args"]["stiff_dim"] == r["n_classes"] - 1, where
    # the solvers' counts against those counted from outside: every step, every HVP, and every gradient but the
    # six of each run's t_grad (one warm-up and five timed), and the process's one warm-up gradient and HVP
    assert counted["steps"] == sum(r["steps"] for r in runs)
    assert counted["hvp"] == sum(r["n_hvp"] for r in runs) + 1  # + the warm-up's
    assert counted["grad"] == sum(r["n_grad"] for r in runs) + 6 * len(runs) + 1
    # the fits: one per series, solver and class count, from the runs' own numbers
    fits = {(f["series"], f["solver"], f["n_classes"]): f for f in record["fits"]}
    assert set(fits) == {(series, s, c) for s in ("exponential-euler", "adaptive")
                         for series, c in (("n_train", 2), ("n_train", 3), ("width", 2))}
    for (series, solver, c), f in fits.items():
        xkey = "n_train" if series == "n_train" else "width"
        group = sorted((r for r in runs if r["solver"] == solver and r["n_classes"] == c and series in r["series"]),
                       key=lambda r: r[xkey])
        assert f["sizes"] == [r[xkey] for r in group] and len(group) == 2
        assert f["wall_per_step_exponent"] == pytest.approx(
            scaling.fit_exponent([r[xkey] for r in group], [r["wall_per_step"] for r in group]), rel=1e-12)
        assert f["t_grad_exponent"] == pytest.approx(
            scaling.fit_exponent([r[xkey] for r in group], [r["t_grad"] for r in group]), rel=1e-12)
    config = record["configuration"]
    assert config["dataset"] == "digits" and config["batch_size"] == 16 and config["max_seconds"] == 900
    assert config["argv"][:2] == ["--dataset", "digits"] and len(config["sizes"]) == 5
    assert record["memory_measured"] == scaling.MEMORY_MEASURED
    assert set(record["versions"]) == {"python", "torch", "numpy", "exponential_euler_solver"}


def test_tiny_grid_table_and_png(tiny_run):
    text = tiny_run["text"]
    for header in ("Wall/step (s)", "t_grad (s)", "Grad/step (s)", "HVP/step (s)", "Eig/step (s)", "Other/step (s)",
                   "Peak RSS + (MiB)", "Gradient evals", "HVPs", "Status"):
        assert header in text, header
    for f in tiny_run["record"]["fits"]:
        line = next(li for li in text.splitlines() if li.startswith(f"Fitted ({f['series']} series")
                    and f"{f['label']}, C={f['n_classes']}," in li)
        assert f"in {f['x']} {f['wall_per_step_exponent']:.2f}" in line, line
    assert "stopped by a cap" not in text
    data = tiny_run["png"].read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not [p for p in tiny_run["png"].parent.iterdir() if p.name.endswith(".tmp")]


def test_time_cap_stops_a_run_and_marks_it(shrunk, tmp_path):
    json_path = tmp_path / "cap.json"
    code, text = _main(["--dataset", "digits", "--n-train", "16", "--n-classes", "2", "--widths", "--target",
                        "1e-6", "--solvers", "adaptive", "--max-seconds", "1e-9", "--threads", "1", "--quiet",
                        "--json", str(json_path)])
    assert code == 0
    (run,) = json.loads(json_path.read_text())["runs"]
    # the cap is checked between steps: the first step ran, then the run stopped, not converged
    assert run["stop_reason"] == "max_seconds" and run["stopped"] and not run["converged"], run
    assert run["steps"] == 1 and run["t_target"] is None and run["flow_time"] > 0, run
    assert run["final_loss"] < run["initial_loss"], run
    assert "stopped: time cap" in text and "1 run(s) stopped by a cap" in text, text


def test_interrupt_keeps_the_finished_runs(shrunk, monkeypatch, tmp_path, capsys):
    json_path = tmp_path / "i.json"
    real, calls = scaling.measure_run, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scaling, "measure_run", interrupted)
    with pytest.raises(SystemExit) as info:
        scaling.main(["--dataset", "digits", "--n-train", "16", "32", "--n-classes", "2", "--widths", "--target",
                      "0.3", "--solvers", "adaptive", "--threads", "1", "--quiet", "--json", str(json_path)])
    assert info.value.code == 130
    out, err = capsys.readouterr()
    assert "interrupted after 1 run(s)" in err
    assert [r["n_train"] for r in json.loads(json_path.read_text())["runs"]] == [16]
    assert "Adaptive Gradient" in out


def test_a_size_out_of_memory_is_recorded_and_the_next_runs(shrunk, monkeypatch, tmp_path):
    json_path, png_path = tmp_path / "m.json", tmp_path / "m.png"
    real = scaling.measure_run

    def measure(X, y, size, solver, **kwargs):
        if size.n_train == 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(X, y, size, solver, **kwargs)

    monkeypatch.setattr(scaling, "measure_run", measure)
    code, text = _main(["--dataset", "digits", "--n-train", "16", "32", "64", "--n-classes", "2", "--widths",
                        "--target", "0.3", "--solvers", "adaptive", "--threads", "1", "--quiet", "--json",
                        str(json_path), "--plot", str(png_path)])
    assert code == 0
    record = json.loads(json_path.read_text())
    runs = record["runs"]
    assert [(r["n_train"], r["stop_reason"]) for r in runs] == [(16, "target"), (32, "error"), (64, "target")]
    failed = runs[1]
    assert failed["error"].startswith("OutOfMemoryError: CUDA out of memory") and failed["steps"] == 0
    assert failed["wall_per_step"] is None and failed["t_grad"] is None and not failed["converged"]
    (fit,) = record["fits"]
    assert fit["sizes"] == [16, 64]  # the failed size is left out of the fit
    assert "error: OutOfMemoryError" in text
    assert png_path.read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------
# bad options
@pytest.mark.parametrize("argv, option", [
    (["--n-train", "0"], "--n-train"),
    (["--n-train", "ten"], "--n-train"),
    (["--widths", "-4"], "--widths"),
    (["--n-classes", "11"], "--n-classes"),
    (["--width-classes", "1"], "--width-classes"),
    (["--width-n-train", "0"], "--width-n-train"),
    (["--max-seconds", "0"], "--max-seconds"),
    (["--max-seconds", "-5"], "--max-seconds"),
    (["--max-seconds", "inf"], "--max-seconds"),
    (["--batch-size", "0"], "--batch-size"),
    (["--target", "nan"], "--target"),
    (["--max-steps", "0"], "--max-steps"),
    (["--seed", "-1"], "--seed"),
    (["--solvers", "newton"], "--solvers"),
    (["--net", "resnet"], "--net"),
    (["--loss", "hinge"], "--loss"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--n-train", "--widths"], "--n-train/--widths"),
    (["--dataset", "digits", "--n-train", "100000"], "--n-train"),
    (["--dataset", "digits", "--n-train", "--width-n-train", "100000"], "--width-n-train"),
    (["--dataset", "cifar10", "--data-dir", "/no/such/folder"], "--dataset"),
    (["--json", "/no/such/folder/s.json"], "--json"),
    (["--plot", "/no/such/folder/s.png"], "--plot"),
])
def test_bad_options_exit_2_naming_the_option(capsys, monkeypatch, argv, option):
    monkeypatch.setattr(scaling, "measure_run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as info:
        scaling.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    last = err.strip().splitlines()[-1]
    assert option in last and "Traceback" not in err, err


def test_help_documents_the_command(capsys):
    with pytest.raises(SystemExit) as info:
        scaling.main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--n-train", "--widths", "--width-classes", "--batch-size", "--max-seconds", "--solvers",
                 "--dataset", "--json", "--plot", "--quiet", "default: photos", "default: 900"):
        assert text in out, text
    assert math.isclose(scaling.DEFAULT_MAX_SECONDS, 900.0)


def test_benchmark_scaling_option_runs_this_command(capsys, monkeypatch):
    """``python -m exponential_euler_solver.benchmark --scaling ...`` hands the other arguments to this command."""
    from exponential_euler_solver.benchmark import cli

    seen = []
    monkeypatch.setattr(scaling, "main", lambda argv: seen.append(list(argv)) or 7)
    assert cli.main(["--n-train", "64", "--scaling", "--widths"]) == 7
    assert seen == [["--n-train", "64", "--widths"]]
    monkeypatch.undo()
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "--scaling" in capsys.readouterr().out
