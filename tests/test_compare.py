"""Tests for the benchmark's comparison with stable-solvers (--compare) and its RK4 reference (--fidelity).

The end-to-end run swaps the benchmark's 2.6M-parameter network for a small MLP of the same input and output
shape (monkeypatching ``runner.build_network``), so that the command runs in seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from exponential_euler_solver import LossFunction
from exponential_euler_solver.benchmark import runner
from exponential_euler_solver.benchmark.__main__ import COMPARE_HEADERS, format_comparison, main, run_suite
from exponential_euler_solver.benchmark.compare import PointResult
from exponential_euler_solver.benchmark.peer import PEER_MISSING, PeerMissingError, run_peer
from exponential_euler_solver.benchmark.runner import ParamSampler, Problem, RunResult, StepRecord
from tables import table_rows

HAVE_PEER = importlib.util.find_spec("stable_solvers") is not None
needs_peer = pytest.mark.skipif(not HAVE_PEER, reason="stable-solvers is not installed")
SMALL_WIDTH = 16


def _small_network(n_classes):
    return nn.Sequential(nn.Linear(3072, SMALL_WIDTH), nn.ELU(), nn.Linear(SMALL_WIDTH, SMALL_WIDTH), nn.ELU(),
                         nn.Linear(SMALL_WIDTH, n_classes))


# --------------------------------------------------------------------------
# arguments
def test_comparison_options_parse():
    from exponential_euler_solver.benchmark.__main__ import build_parser
    args = build_parser().parse_args([])
    assert args.compare is False and args.fidelity is False and args.compare_max_seconds == 600
    args = build_parser().parse_args(["--compare", "--fidelity", "--compare-max-seconds", "12.5"])
    assert args.compare is True and args.fidelity is True and args.compare_max_seconds == 12.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_bad_compare_max_seconds_exits_2(capsys, value):
    with pytest.raises(SystemExit) as info:
        main(["--compare-max-seconds", value])
    err = capsys.readouterr().err
    assert info.value.code == 2
    last = err.strip().splitlines()[-1]
    assert "--compare-max-seconds" in last and repr(value) in last, last


def test_compare_without_stable_solvers_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "stable_solvers", None)  # makes `import stable_solvers` raise ImportError
    with pytest.raises(SystemExit) as info:
        main(["--compare", "--n-train", "16", "--n-classes", "2", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert PEER_MISSING in err and "Traceback" not in err, err
    with pytest.raises(PeerMissingError, match=re.escape(PEER_MISSING)):
        run_suite(compare=True, n_train=[16], n_classes=[2], quiet=True)


# --------------------------------------------------------------------------
# pieces
def test_param_sampler_interpolates_within_steps():
    v = torch.arange(1.0, 5.0, dtype=torch.float64)
    sampler = ParamSampler([0.25, 1.5, 0.7, 9.0])
    assert sampler.times == [0.25, 0.7, 1.5, 9.0]
    params = torch.zeros(4, dtype=torch.float64)
    ends = [0.0, 0.5, 1.0, 2.0]
    for t0, t1 in zip(ends, ends[1:]):  # theta(t) = t v, exactly linear
        sampler.before_step(params)
        params.copy_(t1 * v)
        sampler.after_step(t0, t1, params)
    assert sampler.recorded_times == [0.25, 0.7, 1.5] and not sampler.done
    for t, p in zip(sampler.recorded_times, sampler.params):
        torch.testing.assert_close(p, t * v, rtol=1e-15, atol=1e-15)


def _run(implementation, converged, stop_reason, wall, steps=3):
    hist = [StepRecord(step=i, t_start=0.1 * i, t=0.1 * (i + 1), dt=0.1, loss=1.0 - 0.1 * i, new_loss=0.9 - 0.1 * i,
                       eigvals=None, sharpness=1.0, n_grad=i + 1, n_hvp=i + 1, rejections=0, eig_refreshed=True)
            for i in range(steps)]
    return RunResult(n_train=16, n_classes=2, seed=0, solver="adaptive", solver_args={}, target=0.1,
                     converged=converged, error=None, wall_time=wall, steps=steps, n_grad=steps, n_hvp=steps,
                     n_rejected=0, t_target=None, final_loss=0.7, strictly_decreasing=True, history=hist,
                     implementation=implementation, stop_reason=stop_reason)


def test_comparison_table_marks_the_peer_stopped_by_its_time_cap():
    point = PointResult(16, 2, 0, runs=[_run("ours", True, "target", 2.0)],
                        peer_runs=[_run("stable-solvers 0.1", False, "max_seconds", 5.0)], gradient_time=0.25)
    text = format_comparison([point])
    assert "5.000*" in text and "--compare-max-seconds" in text
    assert " 2.50 " in text  # peer / ours wall
    assert " 0.750 " in text and " 2.67 " in text  # floor = 3 steps x 0.25 s; ours / floor


@pytest.fixture(scope="module")
def small_problem():
    torch.manual_seed(0)
    X, y = torch.rand(16, 3072), torch.arange(16) % 2
    loss_func = LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), _small_network(2))
    return Problem(16, 2, 0, loss_func, loss_func.initialize_parameters(device="cpu"))


@needs_peer
def test_peer_run_stops_at_its_caps(small_problem):
    capped = run_peer(small_problem, "adaptive", 1e-6, max_seconds=1e-9, quiet=True)
    assert not capped.converged and capped.stop_reason == "max_seconds" and capped.steps == 0
    two = run_peer(small_problem, "exponential-euler", 1e-6, max_steps=2, quiet=True)
    assert not two.converged and two.stop_reason == "max_steps" and two.steps == len(two.history) == 2
    assert two.n_grad == 2 and two.n_hvp > 0 and two.n_hvp % 2 == 0  # blocks of stiff_dim + 1 = 2 columns
    assert two.history[0].new_loss == two.history[1].loss
    assert math.isfinite(two.final_loss) and two.implementation.startswith("stable-solvers")


def test_peer_never_sees_the_benchmarks_objects(small_problem):
    pytest.importorskip("stable_solvers")
    net, criterion = small_problem.loss_func.net, small_problem.loss_func.criterion
    run_peer(small_problem, "adaptive", 1e-6, max_steps=1, quiet=True)
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert criterion.reduction == "mean"


# --------------------------------------------------------------------------
# end to end: --compare (when stable-solvers is installed) and --fidelity, tiny grid
@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    json_path = folder / "c.json"
    argv = ["--n-train", "16", "--n-classes", "2", "--target", "0.3", "--quiet", "--device", "cpu", "--threads", "1",
            "--fidelity", "--json", str(json_path)] + (["--compare"] if HAVE_PEER else [])
    threads = torch.get_num_threads()
    columns = []
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "build_network", _small_network)
        if HAVE_PEER:  # count the peer's Hessian-vector products independently: the columns its operator sees
            from stable_solvers.operators import LossHessian
            forward = LossHessian.forward

            def counting_forward(self, m):
                columns.append(m.shape[-1])
                return forward(self, m)

            mp.setattr(LossHessian, "forward", counting_forward)
        try:
            with contextlib.redirect_stdout(out):
                assert main(argv) == 0
        finally:
            torch.set_num_threads(threads)
    return out.getvalue(), json.loads(json_path.read_text()), sum(columns)


@needs_peer
def test_comparison_table_agrees_with_json(tiny_compare):
    text, record, _ = tiny_compare
    headers, rows = table_rows(text, contains="Implementation")
    assert tuple(headers) == COMPARE_HEADERS
    comparisons = record["comparisons"]
    assert [c["solver"] for c in comparisons] == ["exponential-euler", "adaptive"]
    assert len(rows) == 2 * len(comparisons)
    for i, c in enumerate(comparisons):
        ours_row, peer_row = rows[2 * i], rows[2 * i + 1]
        assert ours_row["Implementation"] == "ours" and peer_row["Implementation"] == "stable-solvers 0.1"
        for row, side in ((ours_row, c["ours"]), (peer_row, c["peer"])):
            where = f"{row} vs {side}"
            assert int(row["Steps"]) == side["steps"], where
            assert int(row["Gradient evals"]) == side["n_grad"], where
            assert int(row["HVPs"]) == side["n_hvp"], where
            assert row["HVPs/step"] == f"{side['hvp_per_step']:.1f}", where
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
    _, record, hvp_columns = tiny_compare
    assert record["versions"]["stable_solvers"] == "0.1"
    assert record["configuration"]["compare"] is True and record["peer"]["counted"]
    ours = {r["solver"]: r for r in record["runs"]}
    peers = {r["solver"]: r for r in record["peer_runs"]}
    assert set(peers) == set(ours) == {"exponential-euler", "adaptive"}
    for name, peer in peers.items():
        where = f"{name}: {peer}"[:2000]
        assert peer["implementation"] == "stable-solvers 0.1" and peer["converged"] and peer["stop_reason"] == "target"
        assert peer["solver_args"] == ours[name]["solver_args"], where  # the seed's arguments for both
        assert peer["n_grad"] == peer["steps"] == len(peer["history"]) and peer["n_rejected"] == 0, where
        assert peer["history"][-1]["loss"] <= peer["target"] < min(h["loss"] for h in peer["history"][:-1]), where
        # the same initial parameters: the same first loss, up to the two implementations' round-off
        assert peer["history"][0]["loss"] == pytest.approx(ours[name]["history"][0]["loss"], rel=1e-5), where
    assert peers["exponential-euler"]["n_hvp"] % 2 == 0  # blocks of stiff_dim + 1 = 2 columns
    assert sum(p["n_hvp"] for p in peers.values()) == hvp_columns


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
        row = next(r for r in rows if r["Implementation"] == label and r["Solver"] ==
                   runner.SOLVERS[run["solver"]].label)
        assert row["Relative error"] == f"{100 * fid['relative_error']:+.2f}%", where
        assert row["Deviation at t3"] == f"{fid['deviations'][2]:.3g}", where
    # this library's solvers follow the flow: crossing within a few percent of the reference
    assert all(abs(r["fidelity"]["relative_error"]) < 0.1 for r in record["runs"]), [r["fidelity"] for r in runs]
