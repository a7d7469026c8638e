"""Trajectory recording, atomic checkpoints and exact resumption (also after SIGKILL)."""

import copy
import importlib.util
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
import exponential_euler_solver.trajectory as trajectory_module
from exponential_euler_solver.errors import CheckpointError

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
for report in trajectory.run(solver, max_steps=TOTAL_STEPS, checkpointer=checkpointer):
    print(report.step, flush=True)
    if report.step >= 5:
        # Save the same state over and over until the parent's SIGKILL lands, most likely inside a write.
        for _ in range(500):
            checkpointer.save(solver, trajectory)
print("finished", flush=True)
'''


def _import_problem(tmp_path):
    spec = importlib.util.spec_from_file_location("_checkpoint_problem", tmp_path / "problem.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _temp_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


# -- recording -----------------------------------------------------------------------------------------------
def test_run_records_each_step_and_every_n_parameters(problem):
    loss, theta = problem
    solver = euler.ExponentialEulerSolver(theta.clone(), loss, 1.0, 2)
    traj = euler.Trajectory(every_n=2)
    reports, ends = [], []
    for report in traj.run(solver, max_steps=5):
        reports.append(report)
        ends.append(solver.params.clone())
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
    # Kept at 0, 2 and 4 completed steps: the start, after step 1, after step 3.
    assert traj.param_step.tolist() == [0, 2, 4]
    assert traj.param_t.tolist() == [0.0, reports[1].t, reports[3].t]
    for kept, expected in zip(traj.params, [theta, ends[1], ends[3]]):
        assert torch.equal(kept, expected)
    # The run stops once the solver has 5 steps in total: a second run does nothing.
    assert list(traj.run(solver, max_steps=5)) == [] and len(traj) == 5


def test_run_stops_at_loss_and_time(problem):
    loss, theta = problem
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    traj = euler.Trajectory()
    reports = list(traj.run(solver, until_time=0.35))
    assert len(reports) == 4 and reports[-1].t >= 0.35 > reports[-2].t
    target = reports[-1].new_loss
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    reports = list(euler.Trajectory().run(solver, until_loss=target))
    assert len(reports) == 4 and reports[-1].new_loss == target


def test_at_times_interpolate_linearly_within_the_step(problem):
    loss, theta = problem
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    traj = euler.Trajectory(at_times=[0.25, 0.0, 0.3, 0.25])
    reports, points = [], [theta.clone()]
    for report in traj.run(solver, max_steps=4):
        reports.append(report)
        points.append(solver.params.clone())
    assert traj.param_t.tolist() == [0.0, 0.25, 0.3] and traj.pending_times == []
    assert traj.param_step.tolist() == [0, 2, 2]  # 0.25 and 0.3 both fall in step 2, (0.2, 0.30000000000000004]
    start = reports[2].t - reports[2].dt
    for kept, tau in zip(traj.params[1:], (0.25, 0.3)):
        w = (tau - start) / reports[2].dt
        expected = points[2] + w * (points[3] - points[2])
        err = float((kept - expected).abs().max())
        assert err <= 1e-14 * float(expected.abs().max()), f"at t={tau}: max error {err:.3e}"
    assert torch.equal(traj.params[0], theta)

    # A hand-written loop that passes params at each step records the same trajectory.
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    manual = euler.Trajectory(at_times=[0.0, 0.25, 0.3])
    manual.start(solver.params, solver.t, solver.n_steps)
    for _ in range(4):
        manual.record(solver.step(), solver.params)
    assert manual == traj


def test_record_validates(problem):
    loss, theta = problem
    with pytest.raises(ValueError, match="every_n"):
        euler.Trajectory(every_n=0)
    with pytest.raises(ValueError, match="at_times"):
        euler.Trajectory(at_times=[-1.0])
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    traj = euler.Trajectory(every_n=1)
    with pytest.raises(ValueError, match="params"):
        traj.record(solver.step())
    with pytest.raises(TypeError, match="StepReport"):
        traj.record(object(), solver.params)
    with pytest.raises(ValueError, match="until_loss, until_time, max_steps"):
        traj.run(solver)  # checked at the call, not at the first step
    traj = euler.Trajectory(at_times=[0.15])
    with pytest.raises(ValueError, match="start"):
        traj.record(solver.step(), solver.params)  # the step (0.1, 0.2] has no known start
    with pytest.raises(ValueError, match="before the run's start"):
        euler.Trajectory(at_times=[0.05]).run(solver, max_steps=3)


def test_saved_trajectory_reloads_equal(problem, tmp_path):
    loss, theta = problem
    solver = euler.ExponentialEulerSolver(theta.clone(), loss, 1.0, 2)
    traj = euler.Trajectory(every_n=2, at_times=[0.3, 100.0])
    list(traj.run(solver, max_steps=4))
    path = tmp_path / "trajectory.pt"
    traj.save(path)
    loaded = euler.Trajectory.load(path)
    assert loaded == traj and loaded is not traj
    assert loaded.pending_times == [100.0] and loaded.every_n == 2
    assert torch.equal(loaded.eigenvalues, traj.eigenvalues) and torch.equal(loaded.t, traj.t)
    assert all(torch.equal(a, b) for a, b in zip(loaded.params, traj.params))
    assert euler.Trajectory.from_dict(traj.to_dict()) == traj
    assert _temp_files(tmp_path) == []
    loaded._columns["loss"][0] += 1e-12
    assert loaded != traj


# -- checkpoints: exact continuation -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SOLVERS))
def test_resume_into_a_fresh_solver_continues_identically(problem, tmp_path, name):
    loss, theta = problem
    make = SOLVERS[name]
    a = make(theta.clone(), loss)
    traj = euler.Trajectory(every_n=2)
    list(traj.run(a, max_steps=3))
    path = tmp_path / "run.pt"
    euler.save_checkpoint(path, a, traj, extra={"note": "test", "lr": 1.0})

    # Built from another point with another seed: everything that matters comes from the checkpoint.
    b = make(0.5 * theta.clone(), loss, seed=7)
    traj_b = euler.Trajectory()
    state = euler.resume(path, b, traj_b)
    assert state["extra"] == {"note": "test", "lr": 1.0} and traj_b == traj

    more_a = list(traj.run(a, max_steps=6))
    more_b = list(traj_b.run(b, max_steps=6))
    for ra, rb in zip(more_a, more_b):
        assert (ra.loss, ra.new_loss, ra.dt, ra.t, ra.n_grad, ra.n_hvp, ra.rejections) == \
               (rb.loss, rb.new_loss, rb.dt, rb.t, rb.n_grad, rb.n_hvp, rb.rejections), f"{ra} != {rb}"
    assert len(more_a) == 3 and torch.equal(a.params, b.params), \
        f"max |a - b| = {float((a.params - b.params).abs().max()):.3e}"
    assert traj_b == traj


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
    assert state["format"] == trajectory_module.CHECKPOINT_FORMAT
    assert state["format_version"] == trajectory_module.FORMAT_VERSION
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
    state["format_version"] = trajectory_module.FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=f"format version {trajectory_module.FORMAT_VERSION + 1}"):
        euler.Trajectory.from_dict(state)
    path = tmp_path / "newer.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"format version {trajectory_module.FORMAT_VERSION + 1}") as info:
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
    torch.save({"format": trajectory_module.CHECKPOINT_FORMAT, "obj": types.SimpleNamespace(a=1)}, pickled)
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
    monkeypatch.setattr(trajectory_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
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
    list(traj.run(resumed, max_steps=problem.TOTAL_STEPS))

    reference = problem.build()
    traj_ref = euler.Trajectory(every_n=5)
    list(traj_ref.run(reference, max_steps=problem.TOTAL_STEPS))
    assert resumed.n_steps == reference.n_steps == problem.TOTAL_STEPS
    assert resumed.params.dtype == torch.float32
    assert torch.equal(resumed.params, reference.params), \
        f"max |resumed - reference| = {float((resumed.params - reference.params).abs().max()):.3e}"
    assert resumed.t == reference.t and traj == traj_ref
