"""Tests for the benchmark's output (exponential_euler_solver.benchmark.report): declared tables, the comparison's
numbers and the JSON record."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from torch import nn

import exponential_euler_solver.benchmark.problem as problem_module
import exponential_euler_solver.benchmark.report as report
from exponential_euler_solver import StepReport, Trajectory
from exponential_euler_solver.benchmark.cli import main
from exponential_euler_solver.benchmark.datasets import N_FEATURES
from exponential_euler_solver.benchmark.report import (
    COMPARE_COLUMNS,
    DETAIL_COLUMNS,
    Column,
    benchmark_record,
    format_comparison,
    format_tables,
    geometric_mean_ratio,
    render,
    write_json,
)
from exponential_euler_solver.benchmark.results import PointResult, RunResult

from tables import table_rows

PEER = "stable-solvers 0.1"


def _history(losses, eig_ages=None):
    traj = Trajectory()
    for i, (a, b) in enumerate(zip(losses, losses[1:])):
        traj.append(StepReport(step=i, loss=a, new_loss=b, dt=0.1, t=0.1 * (i + 1), t_start=0.1 * i, slope=-1.0,
                               new_slope=-1.0, n_grad=2 * (i + 1), n_hvp=3 * (i + 1), n_rejected=0, sharpness=2.0,
                               eig_age=None if eig_ages is None else eig_ages[i], seconds=0.5))
    traj.stop_reason = "target"
    return traj


def _run(solver="adaptive", label="Adaptive Gradient", implementation="ours", wall=2.0, n_train=16, seed=0,
         converged=True, eig_ages=(0, 1, 2)):
    history = _history([1.0, 0.8, 0.5, 0.2], list(eig_ages))
    return RunResult(n_train=n_train, n_classes=2, seed=seed, solver=solver, solver_args={}, label=label,
                     target=0.3, converged=converged, error=None, wall_time=wall, steps=len(history), n_grad=6,
                     n_hvp=9, n_rejected=0, t_target=0.25, final_loss=0.2, strictly_decreasing=True,
                     history=history, implementation=implementation,
                     stop_reason="target" if converged else "max_seconds")


def _detail_table(text):
    return table_rows(text[text.index("\n\n") + 2:])


# --------------------------------------------------------------------------
# a column is one declaration
MAX_EIG_AGE = Column("Max eig age", lambda r: int(max(r.history.eig_age.tolist())))


def test_a_detail_column_is_one_declaration(monkeypatch):
    runs = [_run(eig_ages=(0, 1, 2)), _run(solver="exponential-euler", label="Exponential Euler", eig_ages=(0, 0, 5))]
    headers, _ = _detail_table(format_tables(runs))
    assert "Max eig age" not in headers
    monkeypatch.setattr(report, "DETAIL_COLUMNS", DETAIL_COLUMNS + [MAX_EIG_AGE])
    headers, rows = _detail_table(format_tables(runs))
    assert headers == [c.header for c in DETAIL_COLUMNS] + ["Max eig age"]
    assert [(r["Solver"], r["Max eig age"]) for r in rows] == [("Adaptive Gradient", "2"), ("Exponential Euler", "5")]


def test_a_comparison_column_is_one_declaration(monkeypatch):
    point = PointResult(16, 2, 0, runs=[_run()], peer_runs=[_run(implementation=PEER, wall=5.0)], gradient_time=0.25)
    monkeypatch.setattr(report, "COMPARE_COLUMNS", COMPARE_COLUMNS + [
        Column("Seconds per step", lambda p: f"{p.run.wall_time / p.run.steps:.2f}")])
    headers, rows = table_rows(format_comparison([point]), contains="Implementation")
    assert headers[-1] == "Seconds per step" and len(headers) == len(COMPARE_COLUMNS) + 1
    assert [(r["Implementation"], r["Seconds per step"]) for r in rows] == [("ours", "0.67"), (PEER, "1.67")]


@pytest.fixture
def small_network(monkeypatch):
    monkeypatch.setattr(problem_module, "build_network", lambda c: nn.Sequential(
        nn.Linear(N_FEATURES, 8), nn.ELU(), nn.Linear(8, c)))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_declared_column_reaches_the_command(monkeypatch, small_network):
    monkeypatch.setattr(report, "DETAIL_COLUMNS", DETAIL_COLUMNS + [MAX_EIG_AGE])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--solvers", "exponential-euler",
                     "--quiet", "--device", "cpu", "--threads", "1"]) == 0
    headers, rows = _detail_table(out.getvalue())
    assert headers[-1] == "Max eig age" and len(rows) == 1
    assert int(rows[0]["Max eig age"]) >= 0


# --------------------------------------------------------------------------
# pieces
def test_render_keeps_the_cells_as_formatted():
    columns = [Column("Name", lambda r: r[0]), Column("Value", lambda r: f"{r[1]:.2f}")]
    text = render(columns, [("a", 1.5), ("bb", 10.0)])
    headers, rows = table_rows(text, startswith="Name")
    assert headers == ["Name", "Value"]
    assert rows == [{"Name": "a", "Value": "1.50"}, {"Name": "bb", "Value": "10.00"}]  # no number parsing


def test_tables_with_several_seeds_have_a_seed_column():
    runs = [_run(seed=0, wall=1.0), _run(seed=1, wall=3.0)]
    headers, rows = table_rows(format_tables(runs))
    assert headers == ["# Train", "# Classes", "Seed", "Adaptive Gradient Time"]
    assert [(r["Seed"], r["Adaptive Gradient Time"]) for r in rows] == [("0", "1.000"), ("1", "3.000")]


def test_geometric_mean_ratio_over_grid_points():
    points = [PointResult(16, 2, 0, runs=[_run(wall=1.0)], peer_runs=[_run(implementation=PEER, wall=2.0)]),
              PointResult(64, 2, 0, runs=[_run(n_train=64, wall=1.0)],
                          peer_runs=[_run(n_train=64, implementation=PEER, wall=8.0, converged=False)]),
              PointResult(256, 2, 0, runs=[_run(n_train=256, wall=1.0)])]  # no peer run: left out
    mean, n, stopped = geometric_mean_ratio(points, "adaptive")
    assert mean == pytest.approx(4.0, rel=1e-12) and n == 2 and stopped == 1
    assert geometric_mean_ratio(points, "exponential-euler") == (None, 0, 0)
    line = next(line for line in format_comparison(points).splitlines() if "geometric mean" in line)
    assert "over 2 grid point(s), adaptive: 4.00" in line and "at least" in line, line


def test_benchmark_record_is_plain_json_without_non_finite_numbers(tmp_path):
    pytest.importorskip("stable_solvers")  # a record with compare names the peer's version
    run = _run()
    run.final_loss = math.inf
    peer = _run(implementation=PEER, wall=5.0)
    point = PointResult(16, 2, 0, runs=[run], peer_runs=[peer], gradient_time=0.25)
    options = {"n_train": [16], "n_classes": [2], "seeds": [0], "target": 0.3, "solvers": ["adaptive"],
               "max_steps": 10, "dataset": "digits", "device": "cpu", "dtype": "float32", "compare": True,
               "compare_max_seconds": 60.0}
    record = benchmark_record([run], options, ["--compare"], [point])
    path = tmp_path / "r.json"
    write_json(str(path), record)
    back = json.loads(path.read_text())
    assert back == record
    assert back["runs"][0]["final_loss"] is None  # inf is not JSON
    assert back["configuration"]["argv"] == ["--compare"] and back["configuration"]["compare"] is True
    (comparison,) = back["comparisons"]
    assert comparison["peer_over_ours_wall"] == pytest.approx(2.5) and comparison["floor"] == pytest.approx(0.75)
    assert comparison["first_step_hvp"] == {"ours": 3, "peer": 3}
    assert [r["implementation"] for r in back["peer_runs"]] == [PEER]
    assert back["points"] == [{"n_train": 16, "n_classes": 2, "seed": 0, "gradient_time": 0.25, "reference": None}]
