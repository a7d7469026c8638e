"""The one integration driver: Stop conditions against hand-written loops, SaveAt, recorded errors, checkpoints
through SaveAt and their exact resumption."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import exponential_euler_solver as euler
from exponential_euler_solver import Checkpointer, SaveAt, Stop, integrate
from exponential_euler_solver.errors import NonFiniteError, StepRejectedError
from exponential_euler_solver.integrate import STOP_REASONS

TARGET = 0.65  # the tiny problem's loss falls from 2.02 through 0.65 in step 7 with the solver below


@pytest.fixture
def problem(tiny_problem):
    loss = euler.LossFunction(tiny_problem.dataset, torch.nn.CrossEntropyLoss(), tiny_problem.net)
    return loss, tiny_problem.theta.clone()


def make_solver(loss, theta):
    return euler.ExponentialEulerSolver(theta.clone(), loss, 1.0, 2)


def seed_loop(solver, target):
    """The seed's loop, verbatim: ``loss = inf; while loss > target: loss = solver.step().loss``."""
    reports = []
    loss = float("inf")
    while loss > target:
        report = solver.step()
        reports.append(report)
        loss = report.loss
    return reports


def _same_steps(a_reports, trajectory, what):
    got = [(r["loss"], r["new_loss"], r["dt"], r["t"], r["n_grad"], r["n_hvp"]) for r in trajectory.rows()]
    want = [(r.loss, r.new_loss, r.dt, r.t, r.n_grad, r.n_hvp) for r in a_reports]
    assert got == want, f"{what}: integrate's steps {got} != the hand-written loop's {want}"


# -- Stop ------------------------------------------------------------------------------------------------------
def test_stop_step_loss_reproduces_the_seed_loop_step_for_step(problem):
    loss, theta = problem
    by_hand = make_solver(loss, theta)
    reports = seed_loop(by_hand, TARGET)
    assert reports[0].loss > TARGET and len(reports) >= 3, [r.loss for r in reports]

    solver = make_solver(loss, theta)
    traj = integrate(solver, Stop(step_loss=TARGET))
    assert traj.stop_reason == "target"
    assert solver.n_steps == by_hand.n_steps == len(reports), (solver.n_steps, by_hand.n_steps)
    _same_steps(reports, traj, "Stop(step_loss)")
    assert torch.equal(solver.params, by_hand.params), \
        f"max |integrate - loop| = {float((solver.params - by_hand.params).abs().max()):.3e}"
    assert solver.t == by_hand.t
    # The seed's loop takes one step past the crossing: the last step starts at or below the target, the one
    # before above it.
    assert float(traj.loss[-1]) <= TARGET < float(traj.loss[-2])


def test_stop_loss_stops_one_step_earlier(problem):
    loss, theta = problem
    by_hand = make_solver(loss, theta)
    reports = seed_loop(by_hand, TARGET)
    solver = make_solver(loss, theta)
    traj = integrate(solver, Stop(loss=TARGET))
    assert traj.stop_reason == "target"
    assert solver.n_steps == len(reports) - 1, (solver.n_steps, len(reports))
    _same_steps(reports[:-1], traj, "Stop(loss)")
    # It stops as soon as the loss at the current point is at most the target: the last step ended there.
    assert solver.loss_value == float(traj.new_loss[-1]) <= TARGET < float(traj.loss[-1])
    # A run that already starts at or below the target takes no step.
    assert len(integrate(solver, Stop(loss=TARGET))) == 0 and solver.n_steps == len(reports) - 1


def test_stop_steps_and_time(problem):
    loss, theta = problem
    solver = make_solver(loss, theta)
    traj = integrate(solver, Stop(steps=3))
    assert (traj.stop_reason, len(traj), solver.n_steps) == ("max_steps", 3, 3)
    # `steps` counts the solver's total: continuing to 5 takes 2 more steps.
    traj = integrate(solver, Stop(steps=5), trajectory=traj)
    assert (len(traj), solver.n_steps) == (5, 5) and traj.step.tolist() == [0, 1, 2, 3, 4]

    solver = make_solver(loss, theta)
    T = 0.7
    traj = integrate(solver, Stop(time=T))
    assert traj.stop_reason == "time"
    assert float(traj.t[-2]) < T <= float(traj.t[-1]) == solver.t, traj.t.tolist()
    # Whichever condition holds first ends the run.
    solver = make_solver(loss, theta)
    traj = integrate(solver, Stop(time=T, steps=2))
    assert (traj.stop_reason, len(traj)) == ("max_steps", 2) and solver.t < T


def test_stop_seconds_and_caller(problem):
    loss, theta = problem
    solver = make_solver(loss, theta)
    traj = integrate(solver, Stop(seconds=0.0))
    assert (traj.stop_reason, len(traj), solver.n_steps) == ("max_seconds", 0, 0)
    seen = []
    traj = integrate(solver, Stop(steps=10), callback=lambda report, s: seen.append(report.step) or report.step == 1)
    assert (traj.stop_reason, len(traj), seen) == ("caller", 2, [0, 1])
    assert set(STOP_REASONS) == {"target", "time", "max_steps", "max_seconds", "error", "caller"}


def test_stop_needs_a_condition():
    with pytest.raises(ValueError, match="give at least one of"):
        Stop()
    with pytest.raises(ValueError, match="give at least one of"):
        Stop(errors="record")
    for kwargs, name in (({"loss": "0.1"}, "loss"), ({"time": float("nan")}, "time"), ({"steps": 2.0}, "steps"),
                         ({"steps": True}, "steps")):
        with pytest.raises(ValueError, match=name):
            Stop(**kwargs)


# -- errors ------------------------------------------------------------------------------------------------------
class _Vector(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(x.shape[0], -1)


def _cliff_loss():
    """L(w) = w^2 / 2 for w >= 0.5, NaN below: gradient descent walks into the cliff."""
    def criterion(out, _y):
        w = out[:, 0]
        return 0.5 * w ** 2 + torch.where(w < 0.5, float("nan"), 0.0)

    ds = TensorDataset(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))
    return euler.LossFunction(ds, criterion, _Vector([2.0]))


def test_errors_record_captures_a_solver_error():
    # lr 0.3 multiplies w by 0.7: w = 2, 1.4, 0.98, 0.686 accepted; from 0.686 the candidate 0.480 is NaN
    # (rejected) and the retry with dt 0.15 gives 0.5831, accepted; from 0.5831 both 0.408 and 0.4956 are NaN:
    # with max_rejections=2 step 4 raises.
    loss = _cliff_loss()

    def make():
        return euler.GradientDescent(torch.tensor([2.0], dtype=torch.float64), loss, 0.3, max_rejections=2)

    with pytest.raises(StepRejectedError):
        integrate(make(), Stop(steps=20))
    solver = make()
    traj = integrate(solver, Stop(steps=20, errors="record"), SaveAt(every_n=1))
    assert traj.stop_reason == "error", traj.stop_reason
    assert traj.error.startswith("StepRejectedError: 2 consecutive proposals were rejected"), traj.error
    assert "(step 4," in traj.error, traj.error
    assert len(traj) == 4 and solver.n_steps == 4 and traj.rejections.tolist() == [0, 0, 0, 1]
    expected = [2.0, 1.4, 0.98, 0.686, 0.686 * 0.85]
    assert [float(p) for p in traj.params] == pytest.approx(expected, rel=1e-12), [float(p) for p in traj.params]
    assert traj.new_loss.tolist() == pytest.approx([0.5 * w ** 2 for w in expected[1:]], rel=1e-12)
    # What was recorded before the error is kept, and the trajectory saves and reloads with its error.
    again = euler.Trajectory.from_dict(traj.to_dict())
    assert again.error == traj.error and again.stop_reason == "error" and len(again) == 4


def test_errors_record_captures_a_non_finite_start():
    loss = _cliff_loss()
    solver = euler.GradientDescent(torch.tensor([0.25], dtype=torch.float64), loss, 0.1)
    with pytest.raises(NonFiniteError):
        integrate(solver, Stop(steps=3))
    for save in (None, SaveAt(ts=[0.05])):  # with times pending the driver asks for the gradient first
        traj = integrate(euler.GradientDescent(torch.tensor([0.25], dtype=torch.float64), loss, 0.1),
                         Stop(steps=3, errors="record"), save)
        assert (traj.stop_reason, len(traj)) == ("error", 0)
        assert traj.error.startswith("NonFiniteError: the loss (nan)"), traj.error


# -- SaveAt ------------------------------------------------------------------------------------------------------
def test_save_at_times_and_every_n(problem):
    loss, theta = problem
    solver = euler.GradientDescent(theta.clone(), loss, 0.1)
    ends = []
    traj = integrate(solver, Stop(steps=7), SaveAt(ts=[0.45, 0.05, 0.2, 100.0], every_n=3),
                     callback=lambda report, s: ends.append((report.t, s.params.clone())))
    t = [0.0] + [e[0] for e in ends]
    # every_n=3: the start and after steps 3 and 6; ts: 0.05 in step 0, 0.2 (the end of step 1 up to rounding),
    # 0.45 in step 4; 100 is never reached.
    kept = sorted([(0.0, 0), (t[3], 3), (t[6], 6), (0.05, 0), (0.2, 1), (0.45, 4)])
    assert traj.param_t.tolist() == [k[0] for k in kept], (traj.param_t.tolist(), kept)
    assert traj.param_step.tolist() == [k[1] for k in kept], traj.param_step.tolist()
    assert traj.pending_times == [100.0] and traj.at_times == [0.05, 0.2, 0.45, 100.0]
    for tau, steps in ((t[3], 3), (t[6], 6)):
        assert torch.equal(traj.params_at(tau), ends[steps - 1][1]), tau
    assert torch.equal(traj.params_at(0.0), theta)
    # A time at a step's end (to rounding) is that step's end point.
    err = float((traj.params_at(0.2) - ends[1][1]).abs().max())
    assert err <= 1e-14, err
    assert traj.params_at(0.3) is None  # only kept points are returned


def test_save_at_nothing_keeps_no_parameters(problem):
    loss, theta = problem
    traj = integrate(make_solver(loss, theta), Stop(steps=2))
    assert traj.params == [] and not traj.stores_params and len(traj) == 2


# -- checkpoints through SaveAt --------------------------------------------------------------------------------
@pytest.mark.parametrize("save_at_end", [True, False])
def test_checkpoint_through_save_at_resumes_bit_identically(problem, tmp_path, save_at_end):
    loss, theta = problem
    path = tmp_path / "run.pt"
    a = make_solver(loss, theta)
    checkpointer = Checkpointer(path, 0, extra={"run": "a"}, save_at_end=save_at_end)
    traj = integrate(a, Stop(steps=4), SaveAt(every_n=2, checkpoint=checkpointer))
    # every_seconds=0: offered after each of the 4 steps, saved each time, plus once at the end when asked.
    assert checkpointer.n_saves == 4 + save_at_end
    state = euler.load_checkpoint(path)
    assert state["solver"]["n_steps"] == 4 and state["extra"] == {"run": "a"}
    assert torch.equal(state["solver"]["params"], a.params)
    ra = []
    integrate(a, Stop(steps=8), trajectory=traj, callback=lambda report, s: ra.append(report))

    b = make_solver(loss, 0.3 * theta)  # another start: everything comes from the file
    traj_b = euler.Trajectory()
    assert euler.resume(path, b, traj_b)["extra"] == {"run": "a"}
    assert len(traj_b) == 4 and traj_b.param_step.tolist() == [0, 2, 4]
    rb = []
    integrate(b, Stop(steps=8), trajectory=traj_b, callback=lambda report, s: rb.append(report))
    assert [(r.loss, r.new_loss, r.dt, r.t, r.n_grad, r.n_hvp) for r in ra] == \
           [(r.loss, r.new_loss, r.dt, r.t, r.n_grad, r.n_hvp) for r in rb]
    assert len(rb) == 4 and torch.equal(a.params, b.params), \
        f"max |a - b| = {float((a.params - b.params).abs().max()):.3e}"
    assert a.t == b.t and traj_b.param_step.tolist() == traj.param_step.tolist() == [0, 2, 4, 6, 8]
    assert all(torch.equal(p, q) for p, q in zip(traj.params, traj_b.params))


def test_an_interrupted_run_resumes_from_its_last_checkpoint(problem, tmp_path):
    # The caller stops the run after step 2; the checkpoint saved after that step (every_seconds=0) continues to
    # the parameters of a run that was never stopped.
    loss, theta = problem
    path = tmp_path / "run.pt"
    stopped = make_solver(loss, theta)
    traj = integrate(stopped, Stop(steps=6), SaveAt(checkpoint=Checkpointer(path, 0, save_at_end=False)),
                     callback=lambda report, s: report.step == 2)
    assert traj.stop_reason == "caller" and len(traj) == 3
    resumed = make_solver(loss, 2 * theta)
    traj_r = euler.Trajectory()
    euler.resume(path, resumed, traj_r)
    integrate(resumed, Stop(steps=6), trajectory=traj_r)
    reference = make_solver(loss, theta)
    traj_ref = integrate(reference, Stop(steps=6))
    assert torch.equal(resumed.params, reference.params), \
        f"max |resumed - uninterrupted| = {float((resumed.params - reference.params).abs().max()):.3e}"
    assert traj_r.t.tolist() == traj_ref.t.tolist() and traj_r.new_loss.tolist() == traj_ref.new_loss.tolist()
    assert math.isfinite(resumed.loss_value)
