"""Trajectory recording (through the one driver, ``integrate``), atomic checkpoints, exact resumption (also after
SIGKILL), files of the previous format version, and the cubic Hermite interpolation inside a step."""

import copy
import importlib.util
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch
from torch.utils.data import TensorDataset

import exponential_euler_solver as euler
import exponential_euler_solver.checkpoint as checkpoint_module
import exponential_euler_solver.trajectory as trajectory_module
from exponential_euler_solver import SaveAt, Stop, integrate
from exponential_euler_solver.errors import CheckpointError
from exponential_euler_solver.files import FORMAT_VERSION, deep_equal
from exponential_euler_solver.trajectory import COLUMNS, TIMING_COLUMNS, hermite_crossing, hermite_loss, hermite_point

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(euler.__file__)))


# -- problems ------------------------------------------------------------------------------------------------
@pytest.fixture
def problem(tiny_problem):
    """The tiny float64 MLP problem as a LossFunction and a starting point."""
    loss = euler.LossFunction(tiny_problem.dataset, torch.nn.CrossEntropyLoss(), tiny_problem.net)
    return loss, tiny_problem.theta.clone()


SOLVERS = {
    "exponential-euler": lambda p, loss, seed=0: euler.ExponentialEulerSolver(p, loss, 1.0, 2, seed=seed),
    "adaptive-gd": lambda p, loss, seed=0: euler.AdaptiveGradientDescent(p, loss, 1.0, seed=seed),
    "gd-stability-checked": lambda p, loss, seed=0: euler.GradientDescent(p, loss, 0.05, error_if_unstable=True),
}


# A tiny seeded float32 problem, shared verbatim by the killed child process and this process.
PROBLEM_SOURCE = '''
import torch
from torch.utils.data import TensorDataset
import exponential_euler_solver as euler

TOTAL_STEPS = 24


def build():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 6, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    loss = euler.LossFunction(TensorDataset(X, y), torch.nn.CrossEntropyLoss(), net)
    params = loss.initialize_parameters(dtype=torch.float32)
    return euler.ExponentialEulerSolver(params, loss, max_step_size=2.0, stiff_dim=2)
'''

CHILD_SOURCE = '''
import sys
sys.path[:0] = [{tmp!r}, {root!r}]
import torch
torch.set_num_threads(1)
import exponential_euler_solver as euler
from problem import build, TOTAL_STEPS

solver = build()
trajectory = euler.Trajectory(every_n=5)
checkpointer = euler.Checkpointer({path!r}, every_seconds=0)


def callback(report, solver):
    print(report.step, flush=True)
    if report.step >= 5:
        # Save the same state over and over until the parent's SIGKILL lands, most likely inside a write.
        for _ in range(500):
            checkpointer.save(solver, trajectory)


euler.integrate(solver, euler.Stop(steps=TOTAL_STEPS), euler.SaveAt(checkpoint=checkpointer), trajectory=trajectory,
                callback=callback)
print("finished", flush=True)
'''


def _import_problem(tmp_path):
    spec = importlib.util.spec_from_file_location("_checkpoint_problem", tmp_path / "problem.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _temp_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def assert_same_record(a: euler.Trajectory, b: euler.Trajectory, what: str = "") -> None:
    """Equal trajectories apart from the wall-clock ``seconds`` of each step (two runs never take the same time);
    a failure names the first field that differs."""
    sa, sb = a.to_dict(), b.to_dict()
    for state in (sa, sb):
        state["columns"] = {k: v for k, v in state["columns"].items() if k not in TIMING_COLUMNS}
    if deep_equal(sa, sb):
        return
    for key in sa:
        if key == "columns":
            for name in sa["columns"]:
                if not deep_equal(sa["columns"][name], sb["columns"].get(name)):
                    raise AssertionError(f"{what}: column {name!r} differs: {sa['columns'][name]} vs "
                                         f"{sb['columns'].get(name)}")
        elif not deep_equal(sa[key], sb.get(key)):
            raise AssertionError(f"{what}: {key!r} differs: {sa[key]} vs {sb.get(key)}")
    raise AssertionError(f"{what}: the trajectories differ")


def reference_gradient(tiny_problem, theta):
    """The gradient of the conftest reference loss (autograd, not the library)."""
    t = theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad(tiny_problem.loss(t), t)[0]


# -- recording -----------------------------------------------------------------------------------------------
def _collect(reports, ends):
    """An integrate() callback keeping each report and the parameters right after its step."""
    def callback(report, solver):
        reports.append(report)
        ends.append(solver.params.clone())
    return callback


def test_integrate_records_each_step_and_every_n_parameters(problem, tiny_problem):
    loss, theta = problem
    solver = euler.ExponentialEulerSolver(theta.clone(), loss, 1.0, 2)
    reports, ends = [], []
    traj = integrate(solver, Stop(steps=5), SaveAt(every_n=2), callback=_collect(reports, ends))
    assert traj.stop_reason == "max_steps" and traj.error is None
    assert len(traj) == 5 and traj.step.tolist() == [0, 1, 2, 3, 4]
    assert traj.t.tolist() == [r.t for r in reports] and traj.dt.tolist() == [r.dt for r in reports]
    assert traj.loss.tolist() == [r.loss for r in reports]
    assert traj.new_loss.tolist() == [r.new_loss for r in reports]
    assert traj.loss[1:].tolist() == traj.new_loss[:-1].tolist()
    assert traj.n_hvp.tolist() == [r.n_hvp for r in reports] and traj.n_grad.tolist() == [r.n_grad for r in reports]
    assert traj.rejections.tolist() == [r.rejections for r in reports]
    assert traj.eigenvalues.shape == (5, 3)
    assert torch.equal(traj.eigenvalues[0], reports[0].eigvals)
    assert traj.sharpness.tolist() == traj.eigenvalues.abs().max(dim=1).values.tolist()
    # New columns: each step starts where the previous one ended, and the slopes are -||grad L||^2 at both ends
    # (against autograd of the reference loss at the parameters the callback saw).
    assert traj.t_start.tolist() == [0.0] + traj.t[:-1].tolist()
    starts = [theta] + ends[:-1]
    for i, (a, b) in enumerate(zip(starts, ends)):
        for name, point, got in (("slope", a, traj.slope[i]), ("new_slope", b, traj.new_slope[i])):
            expected = -float(reference_gradient(tiny_problem, point).double().norm() ** 2)
            assert abs(float(got) - expected) <= 1e-12 * abs(expected), f"step {i} {name}: {float(got)!r} vs " \
                                                                        f"-||grad||^2 = {expected!r}"
    assert traj.eig_age.tolist() == [r.eig_age for r in reports]
    assert bool((traj.seconds > 0).all()) and traj.wall_time == pytest.approx(float(traj.seconds.sum()))
    assert traj.rows(2) == traj.head(2).rows() and [row["step"] for row in traj.rows()] == [0, 1, 2, 3, 4]
    assert list(traj.rows()[0]) == list(COLUMNS)
    # Kept at 0, 2 and 4 completed steps: the start, after step 1, after step 3.
    assert traj.param_step.tolist() == [0, 2, 4]
    assert traj.param_t.tolist() == [0.0, reports[1].t, reports[3].t]
    for kept, expected in zip(traj.params, [theta, ends[1], ends[3]]):
        assert torch.equal(kept, expected)
    # The run stops once the solver has 5 steps in total: continuing it with the same Stop does nothing.
    again = integrate(solver, Stop(steps=5), trajectory=traj)
    assert again is traj and len(traj) == 5 and traj.stop_reason == "max_steps"


def test_integrate_stops_at_loss_and_time(problem):
    loss, theta = problem
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    reports = []
    traj = integrate(solver, Stop(time=0.35), callback=_collect(reports, []))
    assert traj.stop_reason == "time"
    assert len(reports) == 4 and reports[-1].t >= 0.35 > reports[-2].t
    target = reports[-1].new_loss
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    traj = integrate(solver, Stop(loss=target))
    assert traj.stop_reason == "target"
    assert len(traj) == 4 and float(traj.new_loss[-1]) == target


def test_at_times_interpolate_with_cubic_hermite_within_the_step(problem, tiny_problem):
    # Changed behaviour: the parameters at a requested time inside a step used to be the linear interpolation of
    # the step's ends; they are now the cubic Hermite interpolant with the flow's derivatives -grad L at both ends.
    loss, theta = problem
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    reports, points = [], [theta.clone()]
    traj = integrate(solver, Stop(steps=4), SaveAt(ts=[0.25, 0.0, 0.3, 0.25]), callback=_collect(reports, points))
    assert traj.param_t.tolist() == [0.0, 0.25, 0.3] and traj.pending_times == []
    assert traj.param_step.tolist() == [0, 2, 2]  # 0.25 and 0.3 both fall in step 2, (0.2, 0.30000000000000004]
    t0, h = reports[2].t_start, reports[2].dt
    assert t0 == reports[1].t
    g0, g1 = (reference_gradient(tiny_problem, p) for p in (points[2], points[3]))
    for kept, tau in zip(traj.params[1:], (0.25, 0.3)):
        s = (tau - t0) / h
        # The cubic Hermite basis written out here; the derivative of theta along the flow is -grad L.
        h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
        expected = h00 * points[2] + h01 * points[3] - h * (h10 * g0 + h11 * g1)
        err = float((kept - expected).abs().max())
        assert err <= 1e-14 * float(expected.abs().max()), f"at t={tau}: max error {err:.3e}"
        # ... and it is not the old linear interpolation: for gradient descent the two differ by
        # h (h11 g1 - ... ), i.e. by the change of the gradient over the step, far above round-off here.
        lerp = points[2] + s * (points[3] - points[2])
        gap = float((kept - lerp).abs().max())
        if tau == 0.25:  # (0.3 is the step's end to rounding, where both give the end point)
            assert gap > 1e-8 * float((points[3] - points[2]).abs().max()) and gap > 1e3 * err, \
                f"at t={tau}: Hermite and linear differ by only {gap:.3e}"
    assert torch.equal(traj.params[0], theta)

    # A hand-written loop with the trajectory's public pieces (append, keep, hermite_point) records the same.
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    manual = euler.Trajectory(at_times=[0.0, 0.25, 0.3])
    manual.keep(solver.params, manual.pending_times.pop(0), 0)
    for _ in range(4):
        start, grad0 = solver.params.clone(), solver.current_gradient().clone()
        report = solver.step()
        manual.append(report)
        while manual.pending_times and manual.pending_times[0] <= report.t:
            tau = manual.pending_times.pop(0)
            manual.keep(hermite_point(start, grad0, solver.params, solver.current_gradient(), report.t_start,
                                      report.t, tau), tau, report.step)
    manual.stop_reason = "max_steps"
    assert_same_record(manual, traj, "hand-written loop vs integrate")


def test_trajectory_and_integrate_validate(problem):
    loss, theta = problem
    with pytest.raises(ValueError, match="every_n"):
        euler.Trajectory(every_n=0)
    with pytest.raises(ValueError, match="at_times"):
        euler.Trajectory(at_times=[-1.0])
    with pytest.raises(ValueError, match="give at least one of loss, step_loss, time, steps, seconds"):
        Stop()  # checked when the condition is built, before any step
    with pytest.raises(ValueError, match="errors"):
        Stop(steps=1, errors="ignore")
    with pytest.raises(ValueError, match="steps"):
        Stop(steps=-1)
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    with pytest.raises(TypeError, match="stop must be a Stop"):
        integrate(solver, {"steps": 3})
    with pytest.raises(TypeError, match="solver must be a Solver"):
        integrate(object(), Stop(steps=1))
    integrate(solver, Stop(steps=1))
    with pytest.raises(ValueError, match="before the run's start"):
        integrate(solver, Stop(steps=3), SaveAt(ts=[0.05]))  # the solver is at t = 0.1 already
    assert solver.n_steps == 1, "a refused run took steps"
    traj = integrate(solver, Stop(steps=2), SaveAt(every_n=1))
    with pytest.raises(ValueError, match="must match the trajectory being continued"):
        integrate(solver, Stop(steps=3), SaveAt(every_n=2), trajectory=traj)


def test_saved_trajectory_reloads_equal(problem, tmp_path):
    loss, theta = problem
    solver = euler.ExponentialEulerSolver(theta.clone(), loss, 1.0, 2)
    traj = integrate(solver, Stop(time=0.35), SaveAt(every_n=2, ts=[0.3, 100.0]))
    path = tmp_path / "trajectory.pt"
    traj.save(path)
    loaded = euler.Trajectory.load(path)
    assert loaded == traj and loaded is not traj
    assert loaded.pending_times == [100.0] and loaded.every_n == 2 and loaded.stop_reason == "time"
    assert torch.equal(loaded.eigenvalues, traj.eigenvalues) and torch.equal(loaded.t, traj.t)
    assert all(torch.equal(a, b) for a, b in zip(loaded.params, traj.params))
    assert euler.Trajectory.from_dict(traj.to_dict()) == traj
    assert _temp_files(tmp_path) == []
    loaded._columns["loss"][0] += 1e-12
    assert loaded != traj


# -- files of the previous format version (1) -----------------------------------------------------------------
# The per-step columns of format version 1 (`_COLUMNS` in exponential_euler_solver/trajectory.py before the
# redesign, commit 7a244a1).
V1_COLUMNS = ("step", "t", "dt", "loss", "new_loss", "rejections", "n_grad", "n_hvp", "n_rejected", "error_ratio",
              "sharpness", "eigenvalues")


def _v1_trajectory(traj: euler.Trajectory) -> dict:
    """``traj`` written out by hand in the layout of format version 1: no t_start, slopes, eig_age, seconds,
    stop_reason or error."""
    columns = traj.to_dict()["columns"]
    return {"format": trajectory_module.TRAJECTORY_FORMAT, "format_version": 1,
            "every_n": traj.every_n, "at_times": list(traj.at_times), "pending_times": list(traj.pending_times),
            "columns": {name: list(columns[name]) for name in V1_COLUMNS},
            "params": [p.clone() for p in traj.params], "param_t": traj.param_t.tolist(),
            "param_step": traj.param_step.tolist()}


def _v1_solver_state(state: dict) -> dict:
    """A solver state_dict in the layout of format version 1: the controller's exponent was called "order" and
    it had no "monotone"; the eigen-tracker also kept its residual norms."""
    old = {key: state[key] for key in ("class", "params", "t", "n_steps", "n_grad", "n_hvp", "n_rejected",
                                        "loss_value", "grad", "grad_scale", "loss_scale")}
    c = state["controller"]
    old["controller"] = {"rtol": c["rtol"], "order": c["error_order"], "dt": c["dt"]}
    method = dict(state["method"])
    if "tracker" in method:
        tracker = {key: method["tracker"][key] for key in ("values", "vectors", "age", "generator", "tol",
                                                           "max_iters")}
        tracker["residuals"] = torch.full_like(tracker["values"], 1e-3)
        method["tracker"] = tracker
    old["method"] = method
    return old


def test_a_version_1_trajectory_file_still_loads(problem, tmp_path):
    loss, theta = problem
    solver = euler.ExponentialEulerSolver(theta.clone(), loss, 1.0, 2, scheme="heun")  # version 1 ran heun
    traj = integrate(solver, Stop(steps=4), SaveAt(every_n=2, ts=[0.3, 100.0]))
    path = tmp_path / "v1.pt"
    torch.save(_v1_trajectory(traj), path)
    loaded = euler.Trajectory.load(path)
    assert len(loaded) == 4 and loaded.every_n == 2 and loaded.pending_times == [100.0]
    for name in V1_COLUMNS:
        assert deep_equal(loaded.rows()[-1][name], traj.rows()[-1][name]), name
        assert deep_equal(loaded.column(name), traj.column(name)), name  # NaN == NaN for the empty ones
    assert torch.equal(loaded.eigenvalues, traj.eigenvalues)
    # What version 1 did not keep: t_start from the previous step's t, the rest None (NaN as tensors).
    assert loaded.t_start.tolist() == [0.0] + traj.t[:-1].tolist()
    for name in ("slope", "new_slope", "eig_age", "seconds"):
        assert torch.isnan(loaded.column(name)).all(), name
    assert loaded.stop_reason is None and loaded.error is None and loaded.wall_time == 0.0
    assert all(torch.equal(a, b) for a, b in zip(loaded.params, traj.params))
    assert loaded.param_t.tolist() == traj.param_t.tolist()
    # Without slopes the crossing falls back to log-linear interpolation of the loss inside the step.
    i = 2
    l0, l1 = float(traj.loss[i]), float(traj.new_loss[i])
    target = (l0 * l1) ** 0.5  # the geometric mean: log-linear puts it at the step's middle
    t0, t1 = float(traj.t[i - 1]), float(traj.t[i])
    assert loaded.crossing_time(target) == pytest.approx(0.5 * (t0 + t1), rel=1e-12), (t0, t1)
    # The file of version 2 uses the slopes instead (cubic Hermite): another, nearby time.
    assert t0 < traj.crossing_time(target) < t1


def test_a_version_1_trajectory_that_started_late_keeps_its_first_step_start(problem, tmp_path):
    # Version 1 defined a step's start as t - dt (old Trajectory.record). A trajectory begun after a resume (a
    # fresh Trajectory().run(resumed_solver)) starts at the solver's flow time, not at 0.
    loss, theta = problem
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    integrate(solver, Stop(steps=5))
    late = integrate(solver, Stop(steps=8))
    assert late.t_start[0] == pytest.approx(0.5)
    path = tmp_path / "late_v1.pt"
    torch.save(_v1_trajectory(late), path)
    loaded = euler.Trajectory.load(path)
    expected = [t - dt for t, dt in zip(late.t.tolist(), late.dt.tolist())]
    # What it changes for a user: a crossing inside the first step is interpolated over [0, t] instead of the
    # step, [t - dt, t] (log-linear, the file has no slopes).
    l0, l1 = float(late.loss[0]), float(late.new_loss[0])
    target = (l0 * l1) ** 0.5
    assert loaded.crossing_time(target) == pytest.approx(0.5 * (expected[0] + float(late.t[0])), rel=1e-12), \
        f"crossing {loaded.crossing_time(target)!r} not in the middle of the first step [{expected[0]}, {late.t[0]}]"
    assert loaded.t_start.tolist() == pytest.approx(expected, rel=1e-12, abs=0), \
        f"t_start {loaded.t_start.tolist()} vs t - dt {expected}"


def test_a_version_1_checkpoint_still_resumes(problem, tmp_path):
    loss, theta = problem
    # Version 1 ran the heun scheme (the only one then): its checkpoints continue in a heun solver, and a solver of
    # another scheme refuses them by name.
    make = lambda p, loss, seed=0: euler.ExponentialEulerSolver(p, loss, 1.0, 2, seed=seed, scheme="heun")  # noqa: E731
    a = make(theta.clone(), loss)
    traj = integrate(a, Stop(steps=3), SaveAt(every_n=2))
    path = tmp_path / "v1_checkpoint.pt"
    torch.save({"format": checkpoint_module.CHECKPOINT_FORMAT, "format_version": 1, "library_version": "0.1.0",
                "solver": _v1_solver_state(a.state_dict()), "trajectory": _v1_trajectory(traj),
                "extra": {"note": "v1"}}, path)
    state = euler.load_checkpoint(path)
    assert state["format_version"] == 1 and state["extra"] == {"note": "v1"}

    with pytest.raises(CheckpointError, match="scheme='heun'"):
        euler.resume(path, SOLVERS["exponential-euler"](0.5 * theta.clone(), loss), euler.Trajectory())
    b = make(0.5 * theta.clone(), loss, seed=7)
    traj_b = euler.Trajectory()
    euler.resume(path, b, traj_b)
    assert b.n_steps == 3 and b.t == a.t and torch.equal(b.params, a.params)
    assert b.controller.error_order == a.controller.error_order and b.controller.dt == a.controller.dt
    assert len(traj_b) == 3 and traj_b.every_n == 2 and traj_b.t.tolist() == traj.t.tolist()
    ra, rb = [], []
    integrate(a, Stop(steps=6), trajectory=traj, callback=_collect(ra, []))
    integrate(b, Stop(steps=6), trajectory=traj_b, callback=_collect(rb, []))
    for x, y in zip(ra, rb):
        assert (x.loss, x.new_loss, x.dt, x.t, x.n_grad, x.n_hvp, x.rejections) == \
               (y.loss, y.new_loss, y.dt, y.t, y.n_grad, y.n_hvp, y.rejections), f"{x} != {y}"
    assert len(rb) == 3 and torch.equal(a.params, b.params), \
        f"max |a - b| = {float((a.params - b.params).abs().max()):.3e}"
    assert traj_b.param_step.tolist() == traj.param_step.tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize("kind", ["trajectory", "checkpoint"])
def test_format_version_99_is_refused_naming_the_version(problem, tmp_path, kind):
    loss, theta = problem
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    traj = integrate(solver, Stop(steps=1))
    path = tmp_path / f"{kind}_99.pt"
    if kind == "trajectory":
        state = traj.to_dict()
        state["format_version"] = 99
        torch.save(state, path)
        load = euler.Trajectory.load
    else:
        euler.save_checkpoint(path, solver, traj)
        state = torch.load(path, weights_only=True)
        state["format_version"] = 99
        torch.save(state, path)
        load = euler.load_checkpoint
    for reader in (load,) if kind == "trajectory" else (load, lambda p: euler.resume(p, solver)):
        with pytest.raises(CheckpointError, match="format version 99") as info:
            reader(path)
        message = str(info.value)
        assert str(path) in message and f"up to {FORMAT_VERSION}" in message and "upgrade" in message, message


# -- cubic Hermite interpolation -------------------------------------------------------------------------------
def _quadratic_flow(seed: int = 0):
    """L(theta) = 1/2 theta^T A theta with eigenvalues 4, 1, 0.25, -0.5; its flow is theta(t) = exp(-tA) theta0,
    with derivative -A theta(t) = -grad L."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([4.0, 1.0, 0.25, -0.5], dtype=torch.float64)) @ Q.T
    A = (A + A.T) / 2
    theta0 = torch.randn(4, generator=gen, dtype=torch.float64)
    flow = lambda t: torch.linalg.matrix_exp(-t * A) @ theta0  # noqa: E731
    return A, flow


def test_hermite_point_is_third_order_accurate_on_an_exact_flow():
    # With exact end values and gradients of the flow, the error at the middle of a step of length h is
    # O(h^4) (cubic Hermite); over a run of 1/h steps that is third order. Each halving of h must cut it by at
    # least 2^3 = 8 (16 expected).
    A, flow = _quadratic_flow()
    t0 = 0.3
    errors = []
    hs = [0.4 / 2 ** i for i in range(6)]
    for h in hs:
        theta0, theta1 = flow(t0), flow(t0 + h)
        mid = hermite_point(theta0, A @ theta0, theta1, A @ theta1, t0, t0 + h, t0 + h / 2)
        errors.append(float((mid - flow(t0 + h / 2)).norm()))
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert errors[-1] > 1e-14, f"errors reach round-off, the ratios mean nothing: {errors}"
    assert all(r >= 8 for r in ratios), f"h = {hs}: errors {errors}, ratios {ratios} (need >= 8, ~16 expected)"
    assert 14 <= ratios[-1] <= 18, f"not fourth-order local error: ratios {ratios}"
    # The ends are exact, and tau outside the step is clipped to it.
    theta0, theta1 = flow(t0), flow(t0 + 0.1)
    g0, g1 = A @ theta0, A @ theta1
    assert torch.equal(hermite_point(theta0, g0, theta1, g1, t0, t0 + 0.1, t0 + 0.1), theta1)
    assert torch.equal(hermite_point(theta0, g0, theta1, g1, t0, t0 + 0.1, t0), theta0)
    assert torch.equal(hermite_point(theta0, g0, theta1, g1, t0, t0 + 0.1, t0 + 5), theta1)


def test_hermite_point_has_the_flows_derivative_at_both_ends():
    A, flow = _quadratic_flow(seed=1)
    t0, h = 0.2, 0.3
    theta0, theta1 = flow(t0), flow(t0 + h)
    g0, g1 = A @ theta0, A @ theta1
    eps = 1e-6
    for end, g in ((t0, g0), (t0 + h, g1)):
        lo = hermite_point(theta0, g0, theta1, g1, t0, t0 + h, end - eps if end > t0 else end)
        hi = hermite_point(theta0, g0, theta1, g1, t0, t0 + h, end + eps if end < t0 + h else end)
        width = (eps if end > t0 else 0) + (eps if end < t0 + h else 0)
        slope = (hi - lo) / width
        err = float((slope + g).abs().max())
        assert err <= 1e-5 * float(g.abs().max()), f"derivative at t={end}: {slope.tolist()} vs -grad {(-g).tolist()}"


def test_hermite_crossing_finds_the_crossing_of_a_cubic_loss():
    # A loss that is itself a cubic in t is its own Hermite interpolant from its ends and slopes, so the crossing
    # must be the cubic's root to ~1e-12: L(t) = 3 - t - 0.3 t^2 + 0.1 t^3 on [0.5, 2.0] (decreasing and positive
    # there, from 2.4375 to 0.6).
    L = lambda t: 3 - t - 0.3 * t ** 2 + 0.1 * t ** 3  # noqa: E731
    dL = lambda t: -1 - 0.6 * t + 0.3 * t ** 2  # noqa: E731
    t0, t1 = 0.5, 2.0
    for target in (1.2, 0.7, float(L(1.7))):
        # The true crossing by bisection on the cubic itself.
        lo, hi = t0, t1
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if L(mid) > target else (lo, mid)
        got = hermite_crossing(t0, t1, L(t0), L(t1), dL(t0), dL(t1), target)
        assert abs(got - hi) <= 1e-12 * t1, f"target {target}: crossing {got!r} vs true {hi!r}"
        assert abs(hermite_loss(t0, t1, L(t0), L(t1), dL(t0), dL(t1), got) - target) <= 1e-12
    # The end of the step when it ends exactly on the target, the log-linear fallback without slopes.
    assert hermite_crossing(t0, t1, L(t0), L(t1), dL(t0), dL(t1), L(t1)) == pytest.approx(t1, abs=1e-12)
    frac = (math.log(L(t0)) - math.log(1.0)) / (math.log(L(t0)) - math.log(L(t1)))
    assert hermite_crossing(t0, t1, L(t0), L(t1), None, None, 1.0) == pytest.approx(t0 + frac * (t1 - t0), rel=1e-14)


def test_hermite_crossing_of_an_exponential_loss_converges_to_the_true_crossing():
    # L(t) = exp(-2t) on steps of length h: the crossing of its Hermite interpolant approaches the true
    # crossing log(1/target)/2 with an error O(h^4): each halving cuts it by about 16.
    target = 0.3
    true = math.log(1 / target) / 2
    errors = []
    for h in (0.2, 0.1, 0.05, 0.025):
        t0 = true - 0.4 * h  # the crossing at the same place inside each step
        t1 = t0 + h
        L0, L1 = math.exp(-2 * t0), math.exp(-2 * t1)
        got = hermite_crossing(t0, t1, L0, L1, -2 * L0, -2 * L1, target)
        errors.append(abs(got - true))
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert all(r >= 8 for r in ratios), f"errors {errors}, ratios {ratios}"
    # On a trajectory: the record's crossing_time of the exponential loss, steps of 1/64.
    h = 1 / 64
    rows = []
    t = 0.0
    for i in range(64):
        rows.append({"step": i, "t_start": t, "t": t + h, "dt": h, "loss": math.exp(-2 * t),
                     "new_loss": math.exp(-2 * (t + h)), "slope": -2 * math.exp(-2 * t),
                     "new_slope": -2 * math.exp(-2 * (t + h))})
        t += h
    traj = euler.Trajectory.from_rows(rows)
    # The Hermite error bound max|L''''| h^4 / 384 in the loss, over the smallest |L'| in the step, in time:
    # 16 e^{-2 t0} h^4 / 384 / (2 e^{-2 t1}) = h^4 e^{2h} / 48, 1.3e-9 here.
    bound = h ** 4 * math.exp(2 * h) / 48
    err = abs(traj.crossing_time(target) - true)
    assert err <= bound, f"crossing {traj.crossing_time(target)!r} vs true {true!r}: error {err:.3e} > {bound:.3e}"
    assert traj.crossing_time(1e-9) is None and traj.crossing_time(2.0) == 0.0


# -- checkpoints: exact continuation -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SOLVERS))
def test_resume_into_a_fresh_solver_continues_identically(problem, tmp_path, name):
    loss, theta = problem
    make = SOLVERS[name]
    a = make(theta.clone(), loss)
    traj = integrate(a, Stop(steps=3), SaveAt(every_n=2))
    path = tmp_path / "run.pt"
    euler.save_checkpoint(path, a, traj, extra={"note": "test", "lr": 1.0})

    # Built from another point with another seed: everything that matters comes from the checkpoint.
    b = make(0.5 * theta.clone(), loss, seed=7)
    traj_b = euler.Trajectory()
    state = euler.resume(path, b, traj_b)
    assert state["extra"] == {"note": "test", "lr": 1.0} and traj_b == traj

    more_a, more_b = [], []
    integrate(a, Stop(steps=6), trajectory=traj, callback=_collect(more_a, []))
    integrate(b, Stop(steps=6), trajectory=traj_b, callback=_collect(more_b, []))
    for ra, rb in zip(more_a, more_b):
        assert (ra.loss, ra.new_loss, ra.dt, ra.t, ra.n_grad, ra.n_hvp, ra.rejections) == \
               (rb.loss, rb.new_loss, rb.dt, rb.t, rb.n_grad, rb.n_hvp, rb.rejections), f"{ra} != {rb}"
    assert len(more_a) == 3 and torch.equal(a.params, b.params), \
        f"max |a - b| = {float((a.params - b.params).abs().max()):.3e}"
    assert_same_record(traj_b, traj, "resumed vs uninterrupted")


def test_load_state_dict_in_memory_continues_identically(problem):
    loss, theta = problem
    for name in ("exponential-euler", "adaptive-gd"):
        a = SOLVERS[name](theta.clone(), loss)
        for _ in range(3):
            a.step()
        b = SOLVERS[name](theta.clone() + 0.1, loss, seed=3)
        b.load_state_dict(a.state_dict())
        for _ in range(4):
            ra, rb = a.step(), b.step()
            assert (ra.new_loss, ra.dt, ra.n_hvp) == (rb.new_loss, rb.dt, rb.n_hvp), name
        assert torch.equal(a.params, b.params), name


def test_checkpoint_contents(problem, tmp_path):
    loss, theta = problem
    solver = euler.AdaptiveGradientDescent(theta.clone(), loss, 1.0)
    solver.step()
    path = tmp_path / "ck.pt"
    euler.save_checkpoint(path, solver)
    state = euler.load_checkpoint(path)
    assert state["format"] == checkpoint_module.CHECKPOINT_FORMAT
    assert state["format_version"] == FORMAT_VERSION == 2
    assert state["library_version"] == euler.__version__
    assert state["trajectory"] is None and state["extra"] is None
    assert state["solver"]["class"] == "AdaptiveGradientDescent" and state["solver"]["n_steps"] == 1
    assert torch.equal(state["solver"]["params"], solver.params)
    # Loadable without unpickling arbitrary objects.
    torch.load(path, weights_only=True)


def test_resume_rejects_another_solver_or_dtype(problem, tmp_path):
    loss, theta = problem
    path = tmp_path / "ck.pt"
    euler.save_checkpoint(path, euler.AdaptiveGradientDescent(theta.clone(), loss, 1.0))
    with pytest.raises(CheckpointError, match="does not fit"):
        euler.resume(path, euler.ExponentialEulerSolver(theta.clone(), loss, 1.0, 2))
    with pytest.raises(CheckpointError, match="no trajectory"):
        euler.resume(path, euler.AdaptiveGradientDescent(theta.clone(), loss, 1.0), euler.Trajectory())
    tensors = tuple(t.float() for t in loss.dataset.tensors[:1]) + loss.dataset.tensors[1:]
    net32 = copy.deepcopy(loss.net).float()
    loss32 = euler.LossFunction(TensorDataset(*tensors), torch.nn.CrossEntropyLoss(), net32)
    with pytest.raises(CheckpointError, match="float64"):
        euler.resume(path, euler.AdaptiveGradientDescent(theta.float(), loss32, 1.0))


def test_extra_must_be_plain(problem, tmp_path):
    loss, theta = problem
    path = tmp_path / "ck.pt"
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['f'\] is a function"):
        euler.save_checkpoint(path, euler.GradientDescent(theta.clone(), loss, 0.1), extra={"f": lambda: 0})
    assert not path.exists() and _temp_files(tmp_path) == []


# -- checkpoints: damaged files ------------------------------------------------------------------------------
def test_a_newer_format_version_is_refused_in_files_and_dicts(tmp_path):
    state = euler.Trajectory().to_dict()
    state["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
        euler.Trajectory.from_dict(state)
    path = tmp_path / "newer.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}") as info:
        euler.Trajectory.load(path)
    assert str(path) in str(info.value) and "upgrade" in str(info.value), info.value
    with pytest.raises(ValueError, match="no 'format'"):
        euler.Trajectory.from_dict({"columns": {}})


def test_damaged_files_raise_checkpoint_error_naming_the_path(problem, tmp_path):
    loss, theta = problem
    good = tmp_path / "good.pt"
    euler.save_checkpoint(good, euler.GradientDescent(theta.clone(), loss, 0.1), euler.Trajectory())
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    foreign = tmp_path / "foreign.pt"
    torch.save({"params": torch.zeros(3)}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": checkpoint_module.CHECKPOINT_FORMAT, "obj": types.SimpleNamespace(a=1)}, pickled)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = {truncated: "truncated or corrupt", noise: "truncated or corrupt", foreign: "marker",
             pickled: "other than tensors", empty: "empty", tmp_path / "missing.pt": "does not exist"}
    for path, what in cases.items():
        with pytest.raises(CheckpointError) as info:
            euler.load_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and what in message, message
        assert "Traceback" not in message and len(message) < 600, message
        if path not in (empty, tmp_path / "missing.pt", foreign):
            assert info.value.__cause__ is not None, f"{path.name}: the underlying error is not chained"
    with pytest.raises(CheckpointError, match="truncated"):
        euler.Trajectory.load(truncated)
    with pytest.raises(CheckpointError, match="marker"):
        euler.Trajectory.load(good)  # a checkpoint is not a trajectory file


def test_failed_write_leaves_the_previous_checkpoint_intact(problem, tmp_path, monkeypatch):
    loss, theta = problem
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    path = tmp_path / "ck.pt"
    euler.save_checkpoint(path, solver)
    before = path.read_bytes()
    solver.step()

    def failing_replace(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        euler.save_checkpoint(path, solver)
    monkeypatch.undo()
    assert path.read_bytes() == before and _temp_files(tmp_path) == []

    real_save = torch.save

    def interrupted_save(obj, f):
        real_save(obj, f)
        f.truncate(100)  # a partial file, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        euler.save_checkpoint(path, solver)
    monkeypatch.undo()
    assert path.read_bytes() == before and _temp_files(tmp_path) == []
    assert euler.load_checkpoint(path)["solver"]["n_steps"] == 0


def test_checkpointer_saves_by_wall_clock(problem, tmp_path, monkeypatch):
    loss, theta = problem
    clock = [100.0]
    monkeypatch.setattr(checkpoint_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    with pytest.raises(ValueError, match="every_seconds"):
        euler.Checkpointer(tmp_path / "x.pt", -1)
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    checkpointer = euler.Checkpointer(tmp_path / "ck.pt", every_seconds=10)
    saved = []
    for dt_wall in (3.0, 3.0, 5.0, 1.0, 12.0):
        solver.step()
        clock[0] += dt_wall
        saved.append(checkpointer.maybe_save(solver))
    assert saved == [False, False, True, False, True] and checkpointer.n_saves == 2
    assert euler.load_checkpoint(tmp_path / "ck.pt")["solver"]["n_steps"] == 5
    every_step = euler.Checkpointer(tmp_path / "each.pt", 0)
    assert all(every_step.maybe_save(solver) for _ in range(3)) and every_step.n_saves == 3


# -- SIGKILL -------------------------------------------------------------------------------------------------
def test_resume_after_sigkill_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    (tmp_path / "problem.py").write_text(PROBLEM_SOURCE)
    path = str(tmp_path / "run.pt")
    (tmp_path / "child.py").write_text(textwrap.dedent(CHILD_SOURCE).format(tmp=str(tmp_path), root=PACKAGE_ROOT,
                                                                            path=path))
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        while True:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"the child exited before step 5: {child.wait()} {child.stderr.read()}")
            if line.strip().isdigit() and int(line) >= 5:
                time.sleep(0.2)  # into the child's re-saving loop
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    problem = _import_problem(tmp_path)
    state = euler.load_checkpoint(path)
    done = state["solver"]["n_steps"]
    assert 6 <= done < problem.TOTAL_STEPS, f"checkpoint at {done} steps; the kill was not partway"

    resumed = problem.build()
    traj = euler.Trajectory()
    euler.resume(path, resumed, traj)
    assert len(traj) == done
    integrate(resumed, Stop(steps=problem.TOTAL_STEPS), trajectory=traj)

    reference = problem.build()
    traj_ref = integrate(reference, Stop(steps=problem.TOTAL_STEPS), SaveAt(every_n=5))
    assert resumed.n_steps == reference.n_steps == problem.TOTAL_STEPS
    assert resumed.params.dtype == torch.float32
    assert torch.equal(resumed.params, reference.params), \
        f"max |resumed - reference| = {float((resumed.params - reference.params).abs().max()):.3e}"
    assert resumed.t == reference.t
    assert_same_record(traj, traj_ref, "resumed after SIGKILL vs uninterrupted")
