"""The work-precision benchmark on a tiny problem: every method runs, its numbers are consistent with independent
recomputation, the reference is cached and found again, and the command writes its table, JSON and figure."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

import exponential_euler_solver.benchmark.problem as problem_module
from exponential_euler_solver.benchmark import work_precision
from exponential_euler_solver.benchmark.cli import main
from exponential_euler_solver.benchmark.datasets import N_FEATURES, load_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGET = 0.2


def _small(n_classes, width=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_FEATURES, 12), nn.ELU(), nn.Linear(12, n_classes))


@pytest.fixture
def small_network(monkeypatch):
    monkeypatch.setattr(problem_module, "build_network", _small)
    torch.set_num_threads(1)


@pytest.fixture
def problem(small_network):
    X, y = load_dataset("digits")
    return problem_module.build_problem(X, y, 16, 3, 0)


def test_every_method_runs_and_its_numbers_hold(problem, tmp_path):
    lines = []
    result = work_precision.run_work_precision(problem, TARGET, dataset="digits", cache_dir=str(tmp_path),
                                               quick=True, progress=lines.append)
    families = {p["family"] for p in result["points"]}
    assert {"ours exponential-euler", "ours adaptive uncapped", "heun exponential-euler", "rk4", "gd", "dopri5",
            "bosh3", "dopri5 first step 1/lambda1"} <= families, families
    torchdiffeq_families = ("dopri5", "bosh3", "dopri5 first step 1/lambda1")
    ref = result["reference"]
    assert ref["crossing_time"] > 0 and len(ref["times"]) == 3
    for p in result["points"]:
        where = f"{p['family']} {p['knob']}={p['value']}"
        assert p["converged"], where
        assert p["relative_error"] == pytest.approx((p["crossing_time"] - ref["crossing_time"])
                                                    / ref["crossing_time"], rel=1e-12), where
        assert p["cost"] == pytest.approx(p["wall"] / result["t_grad"], rel=1e-12), where
        assert p["max_deviation"] == max(p["deviations"]) and len(p["deviations"]) == 3, where
        loose = p["family"] in torchdiffeq_families and p["value"] > 1e-4  # dopri5 at rtol 1e-2 lost the flow here
        if not loose and not p["family"].startswith("stable-solvers"):  # nor does the peer's follow it
            assert abs(p["relative_error"]) < 0.2 and p["max_deviation"] < 0.2, where
        if p["family"].startswith(("ours", "heun")):
            assert p["monotone"] is True and p["n_hvp"] > 0, where
        if p["family"] in torchdiffeq_families:
            assert p["n_loss"] > 0 and p["monotone"] is None and p["steps"] is None, where
        if p["family"] == "gd":
            assert p["n_hvp"] == 0 and p["n_grad"] == p["steps"] + 1, where
    # The knob does what it says: tighter tolerances stay closer to the reference trajectory.
    for family in ("ours exponential-euler", "ours adaptive", "dopri5"):
        pts = sorted((p for p in result["points"] if p["family"] == family), key=lambda p: -p["value"])
        assert pts[-1]["max_deviation"] < pts[0]["max_deviation"], [(p["value"], p["max_deviation"]) for p in pts]
    # The reference was written to the cache and is read back (not recomputed) the second time.
    cached = sorted(path.name for path in tmp_path.iterdir())
    assert len(cached) == 2 and cached[0].endswith(".json") and cached[1].endswith(".pt"), cached
    lines.clear()
    again = work_precision.run_work_precision(problem, TARGET, dataset="digits", cache_dir=str(tmp_path), quick=True,
                                              families=["rk4"], progress=lines.append)
    assert any("reference from" in line for line in lines), lines
    assert again["reference"] == result["reference"]
    assert {p["family"] for p in again["points"]} == {"rk4"}
    text = work_precision.format_work_precision(result)
    assert "Cheapest run within 1% crossing error" in text and "ours exponential-euler" in text


def test_dopri5_first_step_is_one_over_lambda1(problem, tmp_path, monkeypatch):
    """The first-step variant hands torchdiffeq ``first_step = 1/|lambda_1(theta_0)|`` (lambda_1 checked against
    ARPACK on autograd's Hessian-vector products); plain dopri5 passes no options."""
    import torchdiffeq

    seen = []

    def record(func, y0, t0, **kwargs):
        seen.append(kwargs.get("options"))
        raise AssertionError("stop here")

    monkeypatch.setattr(torchdiffeq, "odeint_event", record)
    result = work_precision.run_work_precision(problem, TARGET, dataset="digits", cache_dir=str(tmp_path),
                                               quick=True, families=["dopri5"])
    theta = problem.init_params.detach()

    def hvp(v):  # double backward through each batch's loss, solved by ARPACK: independent of our operators
        vec = torch.as_tensor(v, dtype=theta.dtype).reshape(-1)
        out = torch.zeros_like(theta)
        for batch in problem.loss_func.batches():
            p = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(problem.loss_func.batch_loss(p, batch), p, create_graph=True)
            out += torch.autograd.grad(g @ vec, p)[0]
        return out.double().numpy()

    n = theta.numel()
    operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=hvp, dtype=np.float64)
    lambda1 = float(np.abs(scipy.sparse.linalg.eigsh(operator, k=1, which="LM", tol=1e-4)[0]).max())
    assert [p["family"] for p in result["points"]] == ["dopri5"] * 3 + ["dopri5 first step 1/lambda1"] * 3
    assert seen[:3] == [None] * 3
    for options in seen[3:]:
        assert options["first_step"] == pytest.approx(1 / lambda1, rel=1e-2), (options, lambda1)


def test_a_torchdiffeq_breakdown_is_recorded_and_the_sweep_goes_on(problem, tmp_path, monkeypatch):
    """torchdiffeq's step-size underflow is an AssertionError: the run is recorded as an error with its counts, and
    the methods after it still run."""
    import torchdiffeq

    def underflow(func, y0, t0, **kwargs):
        func(t0, y0)  # one gradient, as a real run makes before it breaks down
        raise AssertionError("underflow in dt 0.0")

    monkeypatch.setattr(torchdiffeq, "odeint_event", underflow)
    result = work_precision.run_work_precision(problem, TARGET, dataset="digits", cache_dir=str(tmp_path),
                                               quick=True, families=["dopri5", "gd"])
    broken = [p for p in result["points"] if p["family"] == "dopri5"]
    assert len(broken) == 3
    for p in broken:
        assert p["stop_reason"] == "error" and not p["converged"] and p["crossing_time"] is None, p
        assert p["error"] == "torchdiffeq dopri5: AssertionError: underflow in dt 0.0" and p["n_grad"] == 1, p
    assert [p["converged"] for p in result["points"] if p["family"] == "gd"] == [True, True]


def test_the_command_writes_table_json_and_plot(small_network, tmp_path):
    json_path, png_path = tmp_path / "wp.json", tmp_path / "wp.png"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--work-precision", "--wp-quick", "--wp-methods", "ours", "gd", "--n-train", "16",
                     "--n-classes", "2", "--target", str(TARGET), "--quiet", "--reference-cache", "none",
                     "--json", str(json_path), "--plot", str(png_path)])
    assert code == 0
    record = json.loads(json_path.read_text())
    assert [(p["n_train"], p["n_classes"]) for p in record["points"]] == [(16, 2)]
    assert {p["family"].split()[0] for p in record["points"][0]["points"]} == {"ours", "gd"}
    assert "Wall / t_grad" in out.getvalue()
    assert png_path.read_bytes()[:8] == PNG_MAGIC
