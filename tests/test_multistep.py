"""The multistep scheme (exponential Adams-Bashforth, ETD2, with Milne's estimate): order, exactness, one gradient
per step, its error estimate, its refresh policy and its keyword."""

import math

import pytest
import torch

import exponential_euler_solver as euler
from exponential_euler_solver import SaveAt, Stop, integrate
from exponential_euler_solver.errors import CheckpointError
from exponential_euler_solver.solvers import exponential_euler, multistep
from exponential_euler_solver.solvers.control import MAX_GROWTH, SAFETY
from exponential_euler_solver.solvers.exponential_euler import DEFAULT_RTOLS, MULTISTEP_AGE_BACKSTOP

from conftest import VectorNet, quadratic_problem, tiny_classifier


@pytest.fixture
def mlp():
    loss, params = tiny_classifier(24)
    return loss, 2 * params


def _fixed_steps(make, loss, p0, h, T):
    """A solver run with every step h (rtol so loose that nothing is rejected, max step h below every cap)."""
    solver = make(p0.clone(), loss, h)
    integrate(solver, Stop(time=T - 1e-12))
    return solver


def _rk4(loss, p0, T, n):
    solver = euler.RungeKutta4Solver(p0.clone(), loss, T / n, alpha=100.0)
    integrate(solver, Stop(steps=n))
    return solver.params


@pytest.mark.parametrize("make", [
    lambda p, loss, h: euler.ExponentialEulerSolver(p, loss, h, 2, rtol=1e9, stability_fraction=1.0),
    lambda p, loss, h: euler.AdaptiveGradientDescent(p, loss, h, rtol=1e9, stability_fraction=1.0),
], ids=["exponential-euler", "adaptive"])
def test_second_order_at_one_gradient_per_step(mlp, make):
    loss, p0 = mlp
    T = 1.0
    errors = []
    for n in (50, 100, 200):
        solver = _fixed_steps(make, loss, p0, T / n, T)
        assert solver.n_steps == n and solver.t == pytest.approx(T, rel=1e-12)
        assert solver.n_grad == n + 1, (n, solver.n_grad)  # the start, then one per step
        errors.append(float((solver.params - _rk4(loss, p0, T, 4 * n)).norm()))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(3.5 < r < 4.6 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("max_step", [0.05, 1.0, 30.0])
def test_exact_on_a_quadratic_whose_curvature_is_tracked(max_step):
    # Every positive curvature is tracked and integrated exactly; the remainder D vanishes, so ETD2 is exact for
    # any step size (and the multistep history changes nothing).
    loss, A, target, theta0 = quadratic_problem([50.0, 7.0, 2.0] + [0.0] * 5)
    p = theta0.clone()
    solver = euler.ExponentialEulerSolver(p, loss, max_step, 3, eig_tol=1e-12, eig_max_iters=300)
    assert solver.scheme == "multistep"
    for _ in range(5):
        report = solver.step()
        exact = target + torch.linalg.matrix_exp(-report.t * A) @ (theta0 - target)
        assert float((p - exact).norm()) < 1e-10, (report.t, float((p - exact).norm()))


@pytest.mark.parametrize("momentum", [0.0, 0.25, 0.6])
def test_the_bulk_step_is_the_variable_step_two_step_method(momentum):
    # Adaptive gradient descent tracks no direction: with momentum 0 its multistep step is AB2 with the step ratio
    # w = h / h_prev, theta_{n+1} = theta_n - h (1 + w/2) g_n + h (w/2) g_{n-1}; with momentum a it adds
    # a' (theta_n - theta_{n-1}), a' = a min(1, w), and takes g_n, g_{n-1} with -h (w^2 + 2w - a') / (2w) and
    # h (w^2 + a') / (2w) (the second-order weights, derived by hand from exactness on 1, t, t^2). Written out here
    # from the recorded gradients, across the end of the warmup (a step-size change up) and a shorter step.
    loss, A, target, theta0 = quadratic_problem([3.0, 2.0, 1.0, 0.5])
    p = theta0.clone()
    solver = euler.AdaptiveGradientDescent(p, loss, 0.05, rtol=1e9, warmup_iters=3, warmup_factor=0.3,
                                           momentum=momentum)
    grads, points, dts = [], [p.clone()], []
    for i in range(7):
        if i == 5:
            solver.lr = 0.02  # a shorter step: w < 1
        grads.append(A @ (p - target))
        report = solver.step()
        points.append(p.clone())
        dts.append(report.dt)
    assert dts[2] < dts[3] and dts[5] < dts[4], dts
    for n in range(1, 7):
        h, w = dts[n], dts[n] / dts[n - 1]
        a = momentum * min(1.0, w)
        expected = (points[n] - h * (w * w + 2 * w - a) / (2 * w) * grads[n] + h * (w * w + a) / (2 * w) * grads[n - 1]
                    + a * (points[n] - points[n - 1]))
        if momentum == 0:
            assert torch.allclose(expected, points[n] - h * (1 + w / 2) * grads[n] + h * (w / 2) * grads[n - 1],
                                  rtol=1e-14, atol=0)
        assert float((points[n + 1] - expected).norm()) <= 1e-13 * float(expected.norm()), n


@pytest.mark.parametrize("momentum,stable,unstable", [(0.0, 0.95, 1.05), (0.25, 1.2, 1.3), (0.5, 1.45, 1.55)])
def test_momentum_widens_the_real_stability_interval_to_one_plus_a(momentum, stable, unstable):
    # On g = lambda theta at a fixed step the two-step recurrence is stable for h lambda < 1 + a: iterated here
    # through the library's step (propose), from a start with a small parasitic component.
    def final(z):
        lam, h = 1.0, z
        theta = torch.tensor([1.0], dtype=torch.float64)
        history = None
        for _ in range(400):
            g = lam * theta
            if history is None:
                delta = -h * g
            else:
                delta, _ = multistep.propose(g, history, None, None, None, h, momentum)
            history = multistep.History(grad=g, delta=delta, dt=h, grad_norm=float(g.abs()))
            theta = theta + delta
        return float(theta.abs())
    assert final(stable) < 1e-3
    assert final(unstable) > 1e3


@pytest.mark.parametrize("momentum", [0.0, 0.25, 0.5])
def test_milne_estimate_matches_the_local_error(momentum):
    # On y' = -lambda y (a direction the step does not track), the predictor's local error over one step from the
    # exact history is known in closed form; Milne's estimate milne_factor(w, a) |C - P| approaches it as h -> 0.
    lam = 3.0
    for h, w in ((0.02, 1.0), (0.01, 1.0), (0.01, 0.5), (0.01, 1.5)):
        hp = h / w
        y0 = 1.0
        y_prev = math.exp(lam * hp)  # the exact solution one step back
        g, g_prev = lam * y0, lam * y_prev
        history = multistep.History(grad=torch.tensor([g_prev], dtype=torch.float64),
                                    delta=torch.tensor([y0 - y_prev], dtype=torch.float64), dt=hp,
                                    grad_norm=abs(g_prev))
        delta, info = multistep.propose(torch.tensor([g], dtype=torch.float64), history, None, None, None, h,
                                        momentum)
        p = y0 + float(delta)
        size, _ = multistep.milne_error(h, info, torch.tensor([lam * p], dtype=torch.float64),
                                        torch.tensor([g], dtype=torch.float64), history, None, None, None)
        estimate = multistep.milne_factor(w, info["momentum"]) * h * size
        true = abs(math.exp(-lam * h) - p)
        assert estimate == pytest.approx(true, rel=0.15), (h, w, estimate, true)


def test_momentum_arguments():
    loss, A, target, theta0 = quadratic_problem([3.0, 1.0, 0.5])
    ad = euler.AdaptiveGradientDescent(theta0.clone(), loss, 0.1)
    assert ad.momentum == 0.25 and ad.stability_fraction == 1.0
    assert euler.AdaptiveGradientDescent(theta0.clone(), loss, 0.1, momentum=0).stability_fraction == 0.8
    assert euler.AdaptiveGradientDescent(theta0.clone(), loss, 0.1, scheme="heun").momentum == 0.0
    assert euler.ExponentialEulerSolver(theta0.clone(), loss, 0.1, 1).momentum == 0.0
    for bad in (1.0, -0.1, "0.2", True):
        with pytest.raises(ValueError, match=f"momentum must be a number in \\[0, 1\\); got {bad!r}"):
            euler.AdaptiveGradientDescent(theta0.clone(), loss, 0.1, momentum=bad)
    with pytest.raises(ValueError, match="momentum.*1 tracked directions"):
        euler.ExponentialEulerSolver(theta0.clone(), loss, 0.1, 1, momentum=0.25)
    with pytest.raises(ValueError, match="momentum.*scheme 'heun'"):
        euler.AdaptiveGradientDescent(theta0.clone(), loss, 0.1, scheme="heun", momentum=0.25)
    # A run's state continues only with the momentum it was saved with.
    integrate(ad, Stop(steps=3))
    with pytest.raises(ValueError, match="momentum=0.25"):
        euler.AdaptiveGradientDescent(theta0.clone(), loss, 0.1, momentum=0.5).load_state_dict(ad.state_dict())


def test_one_gradient_per_step_and_monotone_on_a_network(mlp):
    loss, p0 = mlp
    for solver in (euler.ExponentialEulerSolver(p0.clone(), loss, 0.5, 2),
                   euler.AdaptiveGradientDescent(p0.clone(), loss, 0.5)):
        traj = integrate(solver, Stop(loss=0.4, steps=400))
        assert traj.stop_reason == "target" and traj.strictly_decreasing
        assert solver.n_grad == 1 + len(traj) + solver.n_rejected, (solver.n_grad, len(traj), solver.n_rejected)


def test_the_first_step_is_bounded_a_priori(mlp):
    loss, p0 = mlp
    solver = euler.ExponentialEulerSolver(p0.clone(), loss, 10.0, 2)
    report = solver.step()
    bound = SAFETY * DEFAULT_RTOLS["multistep"] / abs(float(report.eigvals[-1]))
    assert report.dt == pytest.approx(bound, rel=1e-12) and report.rejections == 0, (report.dt, bound)


def test_eigenpairs_age_only_while_the_stability_cap_binds(mlp):
    loss, p0 = mlp
    # A max step far below 1/|lambda|: the cap never binds, so no refresh until the backstop.
    solver = euler.ExponentialEulerSolver(p0.clone(), loss, 1e-4, 2, max_eig_age=3)
    refreshes = []
    for step in range(3 * MULTISTEP_AGE_BACKSTOP + 2):
        report = solver.step()
        if report.eig_age == 0:
            refreshes.append(step)
    assert refreshes == [0, 3 * MULTISTEP_AGE_BACKSTOP], refreshes
    # A huge max step: the cap binds (once the error control lets the steps grow there) and every max_eig_age
    # capped steps the pairs are refreshed.
    solver = euler.ExponentialEulerSolver(p0.clone(), loss, 100.0, 2, max_eig_age=3, rtol=1.0)
    capped_run = 0
    for _ in range(40):
        report = solver.step()
        cap = solver.stability_fraction / abs(float(report.eigvals[-1]))
        if report.eig_age == 0:
            assert capped_run in (0, 3) or report.rejections, capped_run
            capped_run = 0
        if report.dt >= 0.999 * cap:
            capped_run += 1
    assert solver.tracker.n_refreshes >= 3


def _quartic(weights):
    """L(theta) = 1/4 sum_i w_i theta_i^4: the flow theta_i(t) = theta_i(0) / sqrt(1 + 2 w_i theta_i(0)^2 t) moves
    toward 0, where the curvature 3 w_i theta_i^2 falls like 1/t (a spectrum that falls along the trajectory)."""
    w = torch.tensor(weights, dtype=torch.float64)
    ds = torch.utils.data.TensorDataset(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))
    loss = euler.LossFunction(ds, lambda out, _y: 0.25 * (w * out ** 4).sum(-1), VectorNet(len(weights)))
    theta0 = torch.ones(len(weights), dtype=torch.float64)
    return loss, theta0, lambda t: theta0 / torch.sqrt(1 + 2 * w * theta0 ** 2 * t)


def _refresh_steps(reports):
    return [r.step for r in reports if r.eig_age == 0]


def test_a_falling_spectrum_is_refreshed_once_the_error_leaves_room(monkeypatch):
    loss, theta0, exact = _quartic([400.0, 50.0, 20.0, 5.0, 1.0, 0.5])
    T = 2.0
    age = exponential_euler.HEADROOM_AGE
    runs = {}
    for rule in ("on", "off"):
        if rule == "off":
            monkeypatch.setattr(exponential_euler, "HEADROOM_AGE", 10 ** 9)
        solver = euler.AdaptiveGradientDescent(theta0.clone(), loss, 10.0)
        reports = []
        traj = integrate(solver, Stop(time=T), SaveAt(ts=[T]),
                         callback=lambda report, _, kept=reports: kept.append(report))
        runs[rule] = (solver, reports)
        # Both follow the closed-form flow (the rule changes when the pairs are refreshed, not the tolerance).
        err = float((traj.params[-1] - exact(T)).norm() / exact(T).norm())
        assert err < 1e-2, (rule, err)
        assert traj.strictly_decreasing
    (on, on_reports), (_, off_reports) = runs["on"], runs["off"]
    first = _refresh_steps(on_reports)[1]
    # The first warm refresh came right after HEADROOM_AGE steps that the stale cap bound while the error ratio
    # asked for the controller's largest growth, long before max_eig_age capped steps.
    roomy = (SAFETY / MAX_GROWTH) ** 2
    before = on_reports[first - age:first]
    assert all(r.dt * r.sharpness >= 0.999 and r.error_ratio <= roomy for r in before), \
        [(r.dt * r.sharpness, r.error_ratio) for r in before]
    capped = sum(r.dt * r.sharpness >= 0.999 for r in on_reports[:first])
    assert capped < on.max_eig_age, capped
    # The sharpness had fallen by far more than HEADROOM_GAIN: the rule stays on, and the run needs fewer steps.
    assert on_reports[first - 1].sharpness >= 2 * on_reports[first].sharpness
    assert on._headroom_on
    assert _refresh_steps(off_reports)[1] > first and len(on_reports) < len(off_reports), \
        (_refresh_steps(off_reports), first, len(on_reports), len(off_reports))


def test_the_rule_turns_off_when_its_refresh_gains_nothing():
    # A quadratic's spectrum never moves: once the stiff component has decayed the error leaves room at the cap,
    # the rule's refresh finds the same sharpness, and from then on only max_eig_age capped steps refresh.
    loss, A, target, theta0 = quadratic_problem([100.0, 1.0, 0.01])
    solver = euler.AdaptiveGradientDescent(theta0.clone(), loss, 10.0)
    reports = [solver.step() for _ in range(90)]
    refreshes = _refresh_steps(reports)
    headroom = refreshes[1]
    assert reports[headroom].sharpness == pytest.approx(100.0, rel=1e-6)
    assert reports[headroom - 1].error_ratio <= (SAFETY / MAX_GROWTH) ** 2
    assert not solver._headroom_on
    gaps = [b - a for a, b in zip(refreshes[1:], refreshes[2:])]
    assert gaps and all(gap == solver.max_eig_age for gap in gaps), refreshes
    # The state survives a checkpoint: a resumed solver keeps the rule off.
    resumed = euler.AdaptiveGradientDescent(theta0.clone(), loss, 10.0)
    resumed.load_state_dict(solver.state_dict())
    assert not resumed._headroom_on
    for _ in range(25):
        ra, rb = solver.step(), resumed.step()
        assert (ra.dt, ra.eig_age, ra.new_loss) == (rb.dt, rb.eig_age, rb.new_loss)
    # A state saved before the rule existed loads with the rule's initial state (on, nothing counted).
    state = solver.state_dict()
    del state["method"]["headroom"]
    resumed.load_state_dict(state)
    assert resumed._headroom_on and resumed._headroom_age == 0


def test_scheme_keyword():
    loss, A, target, theta0 = quadratic_problem([3.0, 1.0, 0.5])
    assert euler.ExponentialEulerSolver(theta0.clone(), loss, 0.1, 1).scheme == "multistep"
    assert euler.ExponentialEulerSolver(theta0.clone(), loss, 0.1, 1).rtol == DEFAULT_RTOLS["multistep"]
    heun = euler.ExponentialEulerSolver(theta0.clone(), loss, 0.1, 1, scheme="heun")
    assert heun.rtol == DEFAULT_RTOLS["heun"] and heun.corrector
    with pytest.raises(ValueError, match="scheme must be one of"):
        euler.AdaptiveGradientDescent(theta0.clone(), loss, 0.1, scheme="rk45")
    with pytest.raises(ValueError, match="scheme='heun'"):
        euler.AdaptiveGradientDescent(theta0.clone(), loss, 0.1, corrector=True)
    with pytest.raises(ValueError, match="rtol must be"):
        euler.AdaptiveGradientDescent(theta0.clone(), loss, 0.1, rtol="tight")
    # A heun run's state continues only in a heun solver.
    integrate(heun, Stop(steps=2))
    with pytest.raises(ValueError, match="scheme='heun'"):
        euler.ExponentialEulerSolver(theta0.clone(), loss, 0.1, 1).load_state_dict(heun.state_dict())


def test_a_multistep_checkpoint_resumes_bit_identically(mlp, tmp_path):
    loss, p0 = mlp
    a = euler.ExponentialEulerSolver(p0.clone(), loss, 0.5, 2)
    integrate(a, Stop(steps=7))
    path = tmp_path / "ms.pt"
    euler.save_checkpoint(path, a)
    b = euler.ExponentialEulerSolver(p0.clone(), loss, 0.5, 2)
    euler.resume(path, b)
    assert b._history is not None and b._coords is not None
    for _ in range(8):
        ra, rb = a.step(), b.step()
        assert (ra.dt, ra.loss, ra.new_loss, ra.n_hvp) == (rb.dt, rb.loss, rb.new_loss, rb.n_hvp)
    assert torch.equal(a.params, b.params)
    with pytest.raises(CheckpointError, match="scheme='multistep'"):
        euler.resume(path, euler.ExponentialEulerSolver(p0.clone(), loss, 0.5, 2, scheme="heun"))


def test_a_rejection_refreshes_only_when_the_curvature_looks_stale(mlp):
    loss, p0 = mlp
    solver = euler.ExponentialEulerSolver(p0.clone(), loss, 0.5, 2)
    integrate(solver, Stop(steps=3))
    assert solver.tracker.age > 0
    n = solver.tracker.n_refreshes
    solver._on_reject(True, True, 2.0)  # the error a little over the tolerance: the step size alone is cut
    assert solver.tracker.n_refreshes == n
    solver._on_reject(True, False, 0.5)  # the loss rose: stale curvature, refreshed
    assert solver.tracker.n_refreshes == n + 1 and solver.tracker.age == 0
    integrate(solver, Stop(steps=5))
    solver._on_reject(True, True, 10.0)  # far over the tolerance: refreshed
    assert solver.tracker.n_refreshes == n + 2
    heun = euler.ExponentialEulerSolver(p0.clone(), loss, 0.5, 2, scheme="heun")
    integrate(heun, Stop(steps=3))
    m = heun.tracker.n_refreshes
    heun._on_reject(True, True, 2.0)  # the heun scheme refreshes on any rejection of older pairs
    assert heun.tracker.n_refreshes == m + 1


def test_refreshes_write_over_the_kept_vectors_but_never_over_what_was_handed_out(mlp):
    # By default a refresh writes the new eigenvectors into the previous ones' memory (no new memory per refresh);
    # a state_dict taken before keeps its own copy. With report_eigvecs every report's vectors stay as reported.
    loss, p0 = mlp
    solver = euler.ExponentialEulerSolver(p0.clone(), loss, 0.5, 2, max_eig_age=1, rtol=None, eig_max_iters=20)
    solver.step()
    kept = solver.tracker.vectors
    state = solver.state_dict()
    before = kept.clone()
    for _ in range(3):
        point = solver.params.clone()  # where the step's refresh happens
        solver.step()
    assert solver.tracker.vectors.data_ptr() == kept.data_ptr() and solver.tracker.n_refreshes == 4
    assert not torch.equal(kept, before)  # the refreshes moved them, in place
    assert torch.equal(state["method"]["tracker"]["vectors"], before)
    # Against a dense reference: the overwritten vectors are eigenpairs of the Hessian at the last refresh's
    # point, to the tracker's tolerance, and the top three by magnitude.
    H = torch.func.hessian(loss.batch_loss)(point, next(iter(loss.batches())))
    vals = torch.linalg.eigvalsh(H)
    lam = solver.tracker.values
    residuals = torch.linalg.vector_norm(H @ kept - kept * lam, dim=0)
    assert bool((residuals <= solver.tracker.tol * lam.abs()).all()), (residuals, lam)
    assert torch.allclose(lam, vals[vals.abs().argsort(descending=True)[:3]], rtol=1e-3)

    reporting = euler.ExponentialEulerSolver(p0.clone(), loss, 0.5, 2, max_eig_age=1, rtol=None, report_eigvecs=True)
    reports = [reporting.step() for _ in range(3)]
    copies = [r.eigvecs.clone() for r in reports]
    for _ in range(2):
        reporting.step()
    assert all(torch.equal(r.eigvecs, c) for r, c in zip(reports, copies))
    assert len({r.eigvecs.data_ptr() for r in reports}) == 3
