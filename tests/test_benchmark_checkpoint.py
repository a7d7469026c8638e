"""The benchmark's grid checkpoint (--checkpoint, --checkpoint-every, --resume) and rank-0-only output.

The benchmark's network (3072 -> 512 x 5 -> C) is replaced by a 3072 -> 8 -> C one: what is tested here is the
bookkeeping (which runs are skipped, where the interrupted one continues, which numbers come out), and that a
resumed solver steps exactly as an uninterrupted one, which does not depend on the network's size.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math

import pytest
import torch
from torch import nn

import exponential_euler_solver.benchmark.cli as bench
import exponential_euler_solver.benchmark.problem as problem_module
import exponential_euler_solver.benchmark.suite as suite
import exponential_euler_solver.files as files_module
from exponential_euler_solver import (
    AdaptiveGradientDescent,
    CheckpointError,
    LossFunction,
    Trajectory,
    load_checkpoint,
    save_checkpoint,
)
from exponential_euler_solver.benchmark.datasets import N_FEATURES
from exponential_euler_solver.benchmark.grid_checkpoint import (
    GRID_CHECKPOINT_KIND,
    GRID_CHECKPOINT_VERSION,
    GridCheckpoint,
)
from exponential_euler_solver.benchmark.suite import check_options
from exponential_euler_solver.solvers.base import Solver
from exponential_euler_solver.trajectory import TIMING_COLUMNS

# --compare needs stable-solvers (the compare extra) before any other check of the options
needs_peer = pytest.mark.skipif(importlib.util.find_spec("stable_solvers") is None,
                                reason="stable-solvers is not installed (the compare extra)")
TINY_WIDTH = 8
GRID = ["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--device", "cpu", "--threads", "1"]
# What must come out of a resumed grid exactly as out of an uninterrupted one (wall times aside: the run's and
# each step's "seconds").
NUMBERS = ("solver", "label", "converged", "stop_reason", "error", "steps", "n_grad", "n_hvp", "n_rejected",
           "t_target", "final_loss", "strictly_decreasing", "history")


def _tiny_network(n_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(N_FEATURES, TINY_WIDTH), nn.ELU(), nn.Linear(TINY_WIDTH, n_classes))


@pytest.fixture(scope="module")
def tiny_network():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(problem_module, "build_network", _tiny_network)
        threads = torch.get_num_threads()
        yield
        torch.set_num_threads(threads)


def _main(argv):
    """main(argv): (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = bench.main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue()


def _numbers_of(run):
    out = {k: run[k] for k in NUMBERS}
    out["history"] = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in run["history"]]
    return out


def _numbers(record):
    return [_numbers_of(run) for run in record["runs"]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_network, tmp_path_factory):
    """The tiny grid run once without and once with a checkpoint saved after every step."""
    folder = tmp_path_factory.mktemp("ckpt")
    plain_json, json_path, ckpt = folder / "plain.json", folder / "a.json", folder / "a.pt"
    code, _ = _main(GRID + ["--quiet", "--json", str(plain_json)])
    assert code == 0
    code, text = _main(GRID + ["--quiet", "--json", str(json_path), "--checkpoint", str(ckpt),
                               "--checkpoint-every", "0"])
    assert code == 0
    return {"plain": json.loads(plain_json.read_text()), "record": json.loads(json_path.read_text()),
            "text": text, "checkpoint": ckpt}


def _interrupting_step(at: int, calls=None):
    """A replacement for Solver.step that raises KeyboardInterrupt instead of the ``at``-th step of the process
    (counted from 1; never when ``at`` is None), or AssertionError at any step when ``at`` is 0. Appends 1 to
    ``calls`` per step taken."""
    real_step, seen = Solver.step, [0]

    def step(solver):
        seen[0] += 1
        if at == 0:
            raise AssertionError("a solver stepped although every run had finished")
        if seen[0] == at:
            raise KeyboardInterrupt
        if calls is not None:
            calls.append(1)
        return real_step(solver)

    return step


def test_checkpointing_changes_no_number(uninterrupted):
    assert _numbers(uninterrupted["record"]) == _numbers(uninterrupted["plain"])
    state = load_checkpoint(uninterrupted["checkpoint"])
    extra = state["extra"]
    assert extra["config"] == {"n_train": [16], "n_classes": [2], "seeds": [0], "target": 0.3,
                               "solvers": ["exponential-euler", "adaptive"], "max_steps": 100_000, "max_seconds": None,
                               "net": "mlp", "loss": "ce", "dataset": "digits", "dtype": "float32", "device": "cpu"}
    assert extra["current"]["done"] and extra["current"]["solver"] == "adaptive"
    assert [r["solver"] for r in extra["finished"]] == ["exponential-euler", "adaptive"]
    assert extra["kind"] == GRID_CHECKPOINT_KIND and extra["version"] == GRID_CHECKPOINT_VERSION == 2
    assert [_numbers_of(r) for r in extra["finished"]] == _numbers(uninterrupted["record"])
    # the file's solver state and trajectory are the last run's
    assert state["solver"]["class"] == "AdaptiveGradientDescent"
    assert Trajectory.from_dict(state["trajectory"]).rows() == uninterrupted["record"]["runs"][1]["history"]


def test_resume_of_a_finished_grid_reports_the_saved_runs(uninterrupted, monkeypatch, tmp_path):
    monkeypatch.setattr(Solver, "step", _interrupting_step(0))
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a finished grid point was built"))
    json_path = tmp_path / "c.json"
    code, text = _main(GRID + ["--quiet", "--json", str(json_path), "--checkpoint",
                               str(uninterrupted["checkpoint"]), "--resume"])
    assert code == 0
    record = json.loads(json_path.read_text())
    assert record["runs"] == uninterrupted["record"]["runs"]  # wall times included
    assert text == uninterrupted["text"]
    assert record["configuration"]["resumed"] is True


@pytest.mark.parametrize("run, every", [
    ("exponential-euler", "0"),  # inside the exponential Euler run, saved after every step
    ("adaptive", "0"),           # inside the adaptive run, saved after every step
    ("adaptive", "3600"),        # inside the adaptive run, whose steps were never saved: it starts again from its start
])
def test_interrupted_grid_resumes_to_the_uninterrupted_numbers(uninterrupted, monkeypatch, tmp_path, capsys,
                                                               run, every):
    ee_steps, ad_steps = (r["steps"] for r in uninterrupted["record"]["runs"])
    assert ee_steps > 3 and ad_steps > 3, "the test's interruption points assume more than 3 steps per run"
    at = 3 if run == "exponential-euler" else ee_steps + 3  # the step of the process that is interrupted
    ckpt, json_path = tmp_path / "b.pt", tmp_path / "b.json"
    argv = GRID + ["--quiet", "--json", str(json_path), "--checkpoint", str(ckpt), "--checkpoint-every", every]
    with monkeypatch.context() as mp:
        mp.setattr(Solver, "step", _interrupting_step(at))
        code, text = _main(argv)
    assert code == 130 and text == ""
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and str(ckpt) in err, err
    assert not json_path.exists()

    state = load_checkpoint(ckpt)
    extra = state["extra"]
    current, finished = extra["current"], extra["finished"]
    if at <= ee_steps:
        assert current["solver"] == "exponential-euler" and not current["done"] and finished == []
        saved_steps = at - 1
    elif every == "0":
        assert current["solver"] == "adaptive" and not current["done"], current
        saved_steps = at - 1 - ee_steps
    else:
        assert current["solver"] == "exponential-euler" and current["done"], current
        saved_steps = 0
    assert len(finished) == (at > ee_steps)
    assert "wall_time" not in current  # the saved run's wall time is its trajectory's: the steps' own seconds
    saved = Trajectory.from_dict(state["trajectory"])
    saved_wall = saved.wall_time
    if not current["done"]:
        assert len(saved) == saved_steps, (len(saved), saved_steps)

    calls = []
    with monkeypatch.context() as mp:
        mp.setattr(Solver, "step", _interrupting_step(None, calls))
        code, _ = _main(argv + ["--resume"])
    assert code == 0
    record = json.loads(json_path.read_text())
    assert _numbers(record) == _numbers(uninterrupted["record"])
    # the finished run is not run again, the interrupted one continues after its saved steps
    total = sum(r["steps"] for r in record["runs"])
    assert len(calls) == total - len(finished) * ee_steps - saved_steps, (len(calls), total, saved_steps)
    resumed = record["runs"][0 if at <= ee_steps else 1]
    if saved_steps:
        assert resumed["wall_time"] > saved_wall > 0, (resumed["wall_time"], saved_wall)


def test_resume_with_another_configuration_exits_2_naming_the_differences(uninterrupted, capsys):
    path = str(uninterrupted["checkpoint"])
    argv = ["--n-train", "16", "--n-classes", "2", "--target", "0.25", "--solvers", "adaptive", "--device",
            "cpu", "--quiet", "--checkpoint", path, "--resume"]
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("euler-benchmark: error:") and "Traceback" not in err, err
    assert path in err and "--target: 0.3 in the checkpoint, 0.25 now" in err, err
    assert "--solvers" in err and "--n-train" not in err, err


def test_resume_without_the_file_exits_2_naming_it(capsys, tmp_path):
    missing = tmp_path / "nothing.pt"
    with pytest.raises(SystemExit) as info:
        bench.main(GRID + ["--quiet", "--checkpoint", str(missing), "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and str(missing) in lines[0] and "exist" in lines[0], err


def test_resume_of_another_torch_file_exits_2(capsys, tmp_path):
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(SystemExit) as info:
        bench.main(GRID + ["--quiet", "--checkpoint", str(other), "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and str(other) in err and "Traceback" not in err, err


def test_existing_checkpoint_without_resume_exits_2(uninterrupted, capsys):
    path = uninterrupted["checkpoint"]
    before = path.read_bytes()
    with pytest.raises(SystemExit) as info:
        bench.main(GRID + ["--quiet", "--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and str(path) in err and "--resume" in err, err
    assert path.read_bytes() == before


@pytest.fixture
def no_grid_run(monkeypatch, tmp_path):
    """In a fresh folder (relative checkpoint paths land there), with building a grid point an error: a command
    that should exit on its options fails at once instead of running the default grid."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a grid point was built"))


@pytest.mark.parametrize("argv, words", [
    (["--resume"], ["--resume", "--checkpoint"]),
    (["--checkpoint", "c.pt", "--fidelity"], ["--checkpoint", "fidelity"]),
    pytest.param(["--checkpoint", "c.pt", "--compare"], ["--checkpoint", "compare"], marks=needs_peer),
    (["--checkpoint-every", "-1"], ["--checkpoint-every", "'-1'"]),
])
def test_bad_checkpoint_options_exit_2(capsys, no_grid_run, argv, words):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2
    assert all(w in last for w in words), last


@pytest.mark.parametrize("option", ["--fidelity", pytest.param("--compare", marks=needs_peer)])
def test_checkpoint_with_compare_or_fidelity_names_the_command_option(capsys, no_grid_run, option):
    with pytest.raises(SystemExit) as info:
        bench.main(["--checkpoint", "c.pt", option])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2
    assert "--checkpoint" in last and option in last, last


# --------------------------------------------------------------------------
# the one check of options that do not go together (suite.check_options), directly and through the command
@pytest.mark.parametrize("compare, fidelity, named", [
    (True, False, "got --compare"),
    (False, True, "got --fidelity"),
    (True, True, "got --compare and --fidelity"),
])
def test_check_options_refuses_a_checkpoint_with_compare_or_fidelity(compare, fidelity, named):
    with pytest.raises(ValueError, match=r"checkpoint \(--checkpoint\) cannot be combined") as info:
        check_options(compare=compare, fidelity=fidelity, checkpoint="c.pt", compare_max_seconds=600.0)
    assert str(info.value).endswith(named), info.value
    # without a checkpoint they are fine, and so is a checkpoint alone
    check_options(compare=compare, fidelity=fidelity, checkpoint=None, compare_max_seconds=600.0)
    check_options(compare=False, fidelity=False, checkpoint="c.pt", compare_max_seconds=600.0)


@pytest.mark.parametrize("seconds", [0, -1.0, math.nan, math.inf, True, "60", None])
def test_check_options_refuses_a_bad_compare_max_seconds(seconds):
    with pytest.raises(ValueError, match="compare_max_seconds"):
        check_options(compare=True, fidelity=False, checkpoint=None, compare_max_seconds=seconds)
    check_options(compare=False, fidelity=False, checkpoint=None, compare_max_seconds=seconds)  # unused then


@pytest.mark.parametrize("option", ["compare", "fidelity"])
def test_run_suite_refuses_a_checkpoint_with_compare_or_fidelity_before_running(monkeypatch, tmp_path, option):
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a grid point was built"))
    path = tmp_path / "c.pt"
    with pytest.raises(ValueError, match=f"cannot be combined.*got --{option}$"):
        bench.run_suite(n_train=[16], n_classes=[2], quiet=True, checkpoint=str(path), **{option: True})
    assert not path.exists()


def test_run_points_refuses_a_grid_checkpoint_with_fidelity(monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a grid point was built"))
    ckpt = GridCheckpoint(tmp_path / "c.pt", {})
    X, y = torch.rand(8, N_FEATURES), torch.arange(8) % 2
    with pytest.raises(ValueError, match="cannot be combined.*got --fidelity$"):
        suite.run_points(X, y, n_train=[4], n_classes=[2], seeds=[0], solvers=["adaptive"], target=0.3,
                         quiet=True, fidelity=True, checkpoint=ckpt)
    assert not (tmp_path / "c.pt").exists()


# --------------------------------------------------------------------------
# grid checkpoint versions
def _grid_checkpoint_file(path, version):
    """A grid checkpoint of the tiny grid with no finished runs, of grid-checkpoint ``version``, written by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    loss = LossFunction(torch.utils.data.TensorDataset(torch.rand(4, 3), torch.arange(4) % 2), nn.CrossEntropyLoss(),
                        net)
    solver = AdaptiveGradientDescent(loss.initialize_parameters(device="cpu"), loss, lr=0.01)
    config = bench.grid_config(vars(bench.build_parser().parse_args(GRID)))
    extra = {"kind": GRID_CHECKPOINT_KIND, "version": version, "config": config, "finished": [], "current": None}
    save_checkpoint(path, solver, None, extra)
    return config


def test_version_1_grid_checkpoint_is_refused_naming_the_version(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "build_problem", lambda *a, **k: pytest.fail("a grid point was built"))
    path = tmp_path / "v1.pt"
    _grid_checkpoint_file(path, 1)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="has version 1;"):
        GridCheckpoint.load(path)
    with pytest.raises(SystemExit) as info:
        bench.main(GRID + ["--quiet", "--checkpoint", str(path), "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("euler-benchmark: error:") and "Traceback" not in err, err
    assert "--resume" in err and str(path) in err and "version 1" in err and "version 2" in err, err
    assert path.read_bytes() == before


def test_version_2_grid_checkpoint_written_the_same_way_loads(tmp_path):
    # the control of the test above: the same file with the current version is read
    path = tmp_path / "v2.pt"
    config = _grid_checkpoint_file(path, GRID_CHECKPOINT_VERSION)
    ckpt = GridCheckpoint.load(path)
    ckpt.check_config(config)
    assert ckpt.finished == [] and ckpt.interrupted(16, 2, 0, "adaptive") is None


def test_other_ranks_print_and_write_nothing(tiny_network, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "is_main_process", lambda: False)
    monkeypatch.setattr(files_module, "is_main_process", lambda: False)
    paths = [tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.pt"]
    assert bench.main(GRID + ["--solvers", "adaptive", "--json", str(paths[0]), "--plot", str(paths[1]),
                              "--checkpoint", str(paths[2])]) == 0  # no --quiet: the bars are off all the same
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert list(tmp_path.iterdir()) == []
