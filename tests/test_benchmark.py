"""Tests for the benchmark command (exponential_euler_solver.benchmark.__main__ and .runner)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from exponential_euler_solver.benchmark.__main__ import (PLOT_MISSING, build_parser, format_tables, main,
                                                         run_benchmark)
from exponential_euler_solver.benchmark.runner import (SOLVERS, DataError, RunResult, StepRecord,
                                                       build_network, crossing_time)
from tables import table_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
def test_bad_grid_values_exit_2_naming_option_and_value(capsys, argv, option, value):
    code, err = _exit_code_and_stderr(capsys, argv)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert option in last and value in last, last


def test_unknown_dataset_exits_2(capsys):
    code, err = _exit_code_and_stderr(capsys, ["--dataset", "imagenet"])
    assert code == 2
    assert "--dataset" in err and "imagenet" in err, err


def test_missing_cifar_dir_is_a_clean_error(capsys, tmp_path):
    missing = tmp_path / "no-such-folder"
    code, err = _exit_code_and_stderr(
        capsys, ["--dataset", "cifar10", "--data-dir", str(missing), "--n-train", "16", "--n-classes", "2",
                 "--quiet"])
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("euler-benchmark: error:") and str(missing) in lines[0], err


def test_cifar_without_data_dir_names_the_option(capsys):
    code, err = _exit_code_and_stderr(capsys, ["--dataset", "cifar10", "--quiet"])
    assert code == 2
    assert "--data-dir" in err and "Traceback" not in err, err


def test_grid_larger_than_the_data_fails_before_running(capsys):
    code, err = _exit_code_and_stderr(capsys, ["--n-train", "100000", "--n-classes", "2", "--quiet"])
    assert code == 2
    assert "n_train" in err and "100000" in err and "Traceback" not in err, err


def test_missing_output_folder_fails_before_running(capsys, tmp_path):
    code, err = _exit_code_and_stderr(capsys, ["--json", str(tmp_path / "nope" / "b.json")])
    assert code == 2
    assert "--json" in err, err


def test_plot_without_matplotlib_says_how_to_install(capsys, monkeypatch, tmp_path):
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


def _record(step, t_start, t, loss, new_loss):
    return StepRecord(step=step, t_start=t_start, t=t, dt=t - t_start, loss=loss, new_loss=new_loss,
                      eigvals=None, sharpness=1.0, n_grad=step + 1, n_hvp=step, rejections=0, eig_refreshed=True)


def test_crossing_time_interpolates_log_loss():
    # loss = exp(-t): log-linear, so the interpolation is exact.
    ts = [0.0, 1.0, 2.5, 4.0]
    history = [_record(i, a, b, math.exp(-a), math.exp(-b)) for i, (a, b) in enumerate(zip(ts, ts[1:]))]
    assert crossing_time(history, math.exp(-2.0)) == pytest.approx(2.0, rel=1e-12)
    assert crossing_time(history, math.exp(-1.0)) == pytest.approx(1.0, rel=1e-12)
    assert crossing_time(history, 2.0) == 0.0
    assert crossing_time(history, math.exp(-5.0)) is None


def test_tables_mark_runs_that_did_not_converge():
    hist = [_record(0, 0.0, 0.1, 1.0, 0.5)]
    runs = [RunResult(n_train=16, n_classes=2, seed=0, solver=name, solver_args={}, target=0.1,
                      converged=name == "adaptive", error=None, wall_time=1.23456, steps=1, n_grad=2, n_hvp=3,
                      n_rejected=0, t_target=None, final_loss=0.5, strictly_decreasing=True, history=hist)
            for name in SOLVERS]
    text = format_tables(runs)
    assert "1.235*" in text and "did not reach the target" in text and "--max-steps" in text


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_max_steps_ends_the_run_unconverged(one_thread):
    (result,) = run_benchmark(n_train=[16], n_classes=[2], solvers=["adaptive"], target=1e-6, max_steps=2,
                              quiet=True, device="cpu")
    assert not result.converged and result.error is None
    assert result.steps == len(result.history) == 2
    assert result.t_target is None


# --------------------------------------------------------------------------
# end to end through main()
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    json_path, png_path = folder / "b.json", folder / "b.png"
    argv = ["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--quiet", "--device", "cpu",
            "--threads", "1", "--json", str(json_path), "--plot", str(png_path)]
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out.getvalue(), json.loads(json_path.read_text()), png_path


def test_tiny_grid_tables(tiny_run):
    text, record, _ = tiny_run
    headers, rows = table_rows(text)
    assert headers == ["# Train", "# Classes", "Exponential Euler Time", "Adaptive Gradient Time"]
    assert len(rows) == 1 and rows[0]["# Train"] == "16" and rows[0]["# Classes"] == "2"
    runs = {r["solver"]: r for r in record["runs"]}
    assert rows[0]["Exponential Euler Time"] == f"{runs['exponential-euler']['wall_time']:.3f}"
    assert rows[0]["Adaptive Gradient Time"] == f"{runs['adaptive']['wall_time']:.3f}"

    detail_text = text[text.index("\n\n") + 2:]
    _, details = table_rows(detail_text)
    assert [d["Solver"] for d in details] == ["Exponential Euler", "Adaptive Gradient"]
    for d, run in zip(details, record["runs"]):
        assert int(d["Steps"]) == run["steps"]
        assert int(d["Rejections"]) == run["n_rejected"]
        assert int(d["Gradient evals"]) == run["n_grad"]
        assert int(d["HVPs"]) == run["n_hvp"]
        assert d["HVPs/step"] == f"{run['hvp_per_step']:.1f}"
        assert d["Flow time at target"] == f"{run['t_target']:.5g}"
        assert d["Wall time (s)"] == f"{run['wall_time']:.3f}"


def test_tiny_grid_json_is_consistent(tiny_run):
    _, record, _ = tiny_run
    config = record["configuration"]
    assert config["grid"] == {"n_train": [16], "n_classes": [2], "seeds": [0]}
    assert config["dataset"] == "digits" and config["device"] == "cpu" and config["dtype"] == "float32"
    assert "--json" in config["argv"]
    assert set(record["versions"]) == {"python", "torch", "numpy", "exponential_euler_solver"}
    assert [r["solver"] for r in record["runs"]] == ["exponential-euler", "adaptive"]
    for run in record["runs"]:
        hist = run["history"]
        where = f"{run['solver']}: {run}"[:2000]
        assert run["converged"] and run["error"] is None, where
        assert run["steps"] == len(hist) > 0, where
        assert run["n_hvp"] == hist[-1]["n_hvp"] and run["n_grad"] == hist[-1]["n_grad"], where
        assert run["n_rejected"] == sum(h["rejections"] for h in hist), where
        assert run["hvp_per_step"] == run["n_hvp"] / run["steps"]
        assert all(a["n_hvp"] <= b["n_hvp"] for a, b in zip(hist, hist[1:])), where
        assert all(a["n_grad"] < b["n_grad"] for a, b in zip(hist, hist[1:])), where
        assert hist[0]["eig_refreshed"] and hist[0]["n_hvp"] > 0, where
        assert all(b["eig_refreshed"] == (b["n_hvp"] > a["n_hvp"]) for a, b in zip(hist, hist[1:])), where
        assert [h["step"] for h in hist] == list(range(len(hist)))
        assert hist[0]["t_start"] == 0.0
        assert all(a["t"] == b["t_start"] and a["new_loss"] == b["loss"] for a, b in zip(hist, hist[1:]))
        assert all(h["t"] - h["t_start"] == pytest.approx(h["dt"], rel=1e-12) and h["dt"] > 0 for h in hist)
        # the seed's loop: stop at the first step whose reported (start) loss is <= target
        assert hist[-1]["loss"] <= run["target"] < min(h["loss"] for h in hist[:-1]), where
        assert run["final_loss"] == hist[-1]["new_loss"]
        assert run["strictly_decreasing"] is True
        assert all(h["new_loss"] < h["loss"] for h in hist), where
        assert hist[0]["t_start"] <= run["t_target"] <= hist[-1]["t"], where
        # ... and inside the step whose new loss first reached the target (the one before the last)
        assert hist[-2]["t_start"] < run["t_target"] <= hist[-2]["t"], where
        if run["solver"] == "exponential-euler":
            assert all(len(h["eigvals"]) == 2 and h["sharpness"] is None for h in hist)
            assert run["solver_args"] == {"max_step_size": 0.01, "stiff_dim": 1}
        else:
            assert all(h["eigvals"] is None and h["sharpness"] > 0 for h in hist)
            assert run["solver_args"] == {"lr": 0.01, "warmup_iters": 10, "warmup_factor": 0.01}
        assert run["wall_time"] > 0


def test_tiny_grid_same_start_for_both_solvers(tiny_run):
    _, record, _ = tiny_run
    first_losses = {r["solver"]: r["history"][0]["loss"] for r in record["runs"]}
    assert first_losses["exponential-euler"] == first_losses["adaptive"], first_losses


def test_tiny_grid_png(tiny_run):
    _, _, png_path = tiny_run
    data = png_path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not [p for p in png_path.parent.iterdir() if p.name.endswith(".tmp")]
