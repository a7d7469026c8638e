"""Solver steps against independent references: torch.optim.SGD, closed forms from dense eigensystems, and the
exact flow of a quadratic loss."""

import pytest
import torch
from torch.func import functional_call, hessian
from torch.utils.data import TensorDataset

import exponential_euler_solver as euler
from exponential_euler_solver.errors import NonFiniteError, StepRejectedError

from conftest import VectorNet, quadratic_problem, tiny_classifier, unflatten_reference


# -- problems ------------------------------------------------------------------------------------------------
def exact_flow(A, target, theta0, t):
    return target + torch.linalg.matrix_exp(-t * A) @ (theta0 - target)


@pytest.fixture
def mlp_problem():
    return tiny_classifier(20)


def reference_loss(loss):
    """The mean loss of ``loss`` written out independently of the library: the network evaluated with
    ``functional_call`` on the flat vector laid out in ``named_parameters()`` order (conftest's
    ``unflatten_reference``), the criterion applied to the whole dataset, read as a mean unless it returns one
    value per example (then averaged)."""
    *inputs, labels = loss.dataset.tensors
    net, criterion = loss.net, loss.criterion

    def value(theta):
        out = criterion(functional_call(net, unflatten_reference(net, theta), tuple(inputs)), labels)
        return out.mean() if out.ndim else out

    return value


def dense_hessian(loss, params):
    """``torch.func.hessian`` of :func:`reference_loss` at ``params`` (symmetrised): the independent reference,
    not the library's HessianOperator."""
    H = hessian(reference_loss(loss))(params.detach().clone())
    return (H + H.T) / 2


def by_magnitude(H):
    vals, vecs = torch.linalg.eigh(H)
    order = torch.argsort(vals.abs(), descending=True)
    return vals[order], vecs[:, order]


# -- single steps against references ---------------------------------------------------------------------------
def sgd_step(loss, params, lr):
    p = params.clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=lr)
    opt.zero_grad()
    p.grad = loss.gradient(p.detach())[1]
    opt.step()
    return p.detach()


def test_gradient_descent_step_equals_sgd(mlp_problem):
    loss, params = mlp_problem
    expected = sgd_step(loss, params, 0.3)
    p = params.clone()
    report = euler.GradientDescent(p, loss, 0.3).step()
    assert torch.allclose(p, expected, rtol=0, atol=1e-14), (p - expected).abs().max()
    assert report.dt == 0.3 and report.t == 0.3 and report.n_grad == 2 and report.n_hvp == 0


def test_adaptive_step_equals_sgd_at_capped_lr(mlp_problem):
    loss, params = mlp_problem
    lam1 = by_magnitude(dense_hessian(loss, params))[0][0].item()
    lr = 10.0  # far above 1/|lambda_1|: the cap decides
    expected = sgd_step(loss, params, min(lr, 1 / abs(lam1)))
    p = params.clone()
    solver = euler.AdaptiveGradientDescent(p, loss, lr, rtol=None, eig_tol=1e-10, eig_max_iters=200)
    report = solver.step()
    assert report.sharpness == pytest.approx(abs(lam1), rel=1e-9)
    assert report.dt == pytest.approx(1 / abs(lam1), rel=1e-9)
    assert torch.allclose(p, expected, rtol=0, atol=1e-12), (p - expected).abs().max()


def test_adaptive_warmup_scales_lr(mlp_problem):
    loss, params = mlp_problem
    p = params.clone()
    solver = euler.AdaptiveGradientDescent(p, loss, 0.01, warmup_iters=2, warmup_factor=0.1, rtol=None)
    dts = [solver.step().dt for _ in range(3)]
    assert dts[0] == pytest.approx(0.001) and dts[1] == pytest.approx(0.001)
    assert dts[2] == pytest.approx(min(0.01, 1 / solver.sharpness))


def test_exponential_euler_step_equals_closed_form(mlp_problem):
    loss, params = mlp_problem
    k = 2
    vals, vecs = by_magnitude(dense_hessian(loss, params))
    g = loss.gradient(params)[1]
    dt = min(1.0, 1 / abs(vals[k].item()))
    expected = params - dt * g
    for i in range(k):
        lam, v = vals[i], vecs[:, i]
        h = min(dt, (-torch.expm1(-lam * dt) / lam).item())
        expected = expected + (dt - h) * (v @ g) * v
    p = params.clone()
    solver = euler.ExponentialEulerSolver(p, loss, 1.0, k, rtol=None, monotone=False, eig_tol=1e-10,
                                          eig_max_iters=200)
    report = solver.step()
    assert torch.allclose(report.eigvals, vals[:k + 1], rtol=1e-8), (report.eigvals, vals[:k + 1])
    assert report.dt == pytest.approx(dt, rel=1e-9)
    assert torch.allclose(p, expected, rtol=0, atol=1e-10), (p - expected).abs().max()


@pytest.mark.parametrize("max_step", [0.05, 1.0, 30.0])
def test_exponential_euler_is_exact_on_a_quadratic(max_step):
    # A's positive spectrum is covered by the stiff directions; the rest of A is zero, so every step size is exact.
    eigvals = [50.0, 7.0, 2.0] + [0.0] * 7
    loss, A, target, theta0 = quadratic_problem(eigvals)
    p = theta0.clone()
    solver = euler.ExponentialEulerSolver(p, loss, max_step, 3, eig_tol=1e-12, eig_max_iters=300)
    for _ in range(4):
        report = solver.step()
        ref = exact_flow(A, target, theta0, report.t)
        err = (p - ref).norm().item()
        assert err < 1e-10, (report.t, err)
    assert report.t == pytest.approx(4 * max_step)


def test_loss_is_monotone_and_flow_time_accumulates(mlp_problem):
    loss, params = mlp_problem
    solver = euler.ExponentialEulerSolver(params.clone(), loss, 0.5, 2)
    losses, t = [], 0.0
    for _ in range(15):
        r = solver.step()
        t += r.dt
        assert r.t == pytest.approx(t, rel=1e-15)
        losses.append(r.loss)
        assert r.new_loss < r.loss
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


# -- accept / reject ---------------------------------------------------------------------------------------------
def test_rejection_happens_and_recovers():
    # A stiff quadratic: with stiff_dim 1 and a huge max step, plain Euler in the second direction overshoots
    # when its curvature is underestimated; the solver must reject and shrink, then keep the loss falling.
    loss, A, target, theta0 = quadratic_problem([100.0, 40.0, 1.0, 0.5])
    p = theta0.clone()
    solver = euler.GradientDescent(p, loss, 0.1, monotone=True)  # 0.1 * 100 = 10 > 2: unstable
    reports = [solver.step() for _ in range(5)]
    assert reports[0].rejections >= 1, reports[0]
    assert all(r.new_loss < r.loss for r in reports)
    assert reports[0].dt < 0.02 + 1e-12


@pytest.mark.parametrize("scheme, grads_per_proposal", [("heun", 2), ("multistep", 1)])
def test_error_control_shrinks_the_step_without_new_hvps(mlp_problem, scheme, grads_per_proposal):
    loss, params = mlp_problem
    solver = euler.ExponentialEulerSolver(params.clone(), loss, 10.0, 1, rtol=1e-4, scheme=scheme)
    r = solver.step()
    assert r.error_ratio <= 1
    # Under heun the first step must have been rejected at least once (it tries dt = 1/|lambda_2|); the multistep
    # scheme's first step starts from its a priori bound SAFETY * rtol / |lambda_2| instead.
    if scheme == "heun":
        assert r.rejections >= 1
    else:
        assert r.dt <= 0.9 * 1e-4 / abs(float(r.eigvals[-1])) * (1 + 1e-12), (r.dt, r.eigvals)
    # (The same stability fraction: the cold start's tolerances follow from it.)
    plain = euler.ExponentialEulerSolver(params.clone(), loss, 10.0, 1, rtol=None,
                                         stability_fraction=solver.stability_fraction)
    rp = plain.step()
    assert r.dt < rp.dt
    # Retries reuse the eigenpairs: the HVP count equals the one of the plain solver's single proposal.
    assert r.n_hvp == rp.n_hvp
    # One evaluation at the start, then two per proposal with heun (the corrector's stage and the candidate), one
    # with the multistep scheme (the candidate: its first step is a one-step start with a first-order estimate).
    assert r.n_grad == 1 + grads_per_proposal * (1 + r.rejections)


def test_a_refresh_after_a_rejection_caps_the_retry():
    # The curvature along b jumps from ~1 to ~21 once the flow takes a below 1. The eigenpairs are refreshed only
    # after a rejection (max_eig_age is huge), so the first step past the jump uses a stale sharpness of ~1, its
    # loss rises, and the refresh must also cap the retry at 1/|lambda_1| of the fresh pair; halving dt alone
    # would need 3 rejections and land at 0.0625 > 1/21.
    def criterion(out, _y):
        a, b = out[:, 0], out[:, 1]
        kappa = 1 + 20 * torch.sigmoid((1 - a) / 0.05)
        return 0.5 * kappa * b ** 2 + 0.5 * a ** 2

    loss = euler.LossFunction(TensorDataset(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1)), criterion,
                              VectorNet(2))
    p = torch.tensor([3.0, 1.0], dtype=torch.float64)
    solver = euler.AdaptiveGradientDescent(p, loss, 0.5, rtol=None, max_eig_age=1000)
    for step in range(4):  # noqa: B007 (read after the loop)
        start = p.clone()
        r = solver.step()
        if r.rejections:
            break
    else:
        pytest.fail("no step was rejected: the test problem no longer crosses the curvature jump with stale pairs")
    assert step == 2 and r.eig_age == 0, (step, r.eig_age)
    true = float(torch.linalg.eigvalsh(dense_hessian(loss, start)).abs().max())
    assert r.sharpness == pytest.approx(true, rel=1e-8), (r.sharpness, true)
    assert true > 20, true
    assert r.rejections == 1 and r.dt == pytest.approx(1 / true, rel=1e-8), (r.rejections, r.dt, 1 / true)
    assert r.new_loss < r.loss


@pytest.mark.parametrize("make,age", [
    (lambda p, loss: euler.ExponentialEulerSolver(p, loss, 0.05, 2, scheme="heun"), 20),
    (lambda p, loss: euler.AdaptiveGradientDescent(p, loss, 0.05, scheme="heun"), 10),
    (lambda p, loss: euler.ExponentialEulerSolver(p, loss, 0.05, 2, max_eig_age=3, scheme="heun"), 3),
    (lambda p, loss: euler.ExponentialEulerSolver(p, loss, 0.05, 2, rtol=None), 1),
])
def test_eigenpairs_are_refreshed_on_schedule(mlp_problem, make, age):
    loss, params = mlp_problem
    solver = make(params.clone(), loss)
    assert solver.max_eig_age == age
    n_hvp = 0
    for step in range(2 * age + 3):
        r = solver.step()
        assert r.rejections == 0, f"step {step} was rejected: this test wants the schedule alone"
        # Products are made exactly at the refreshes, and the pairs a step uses are (step mod age) steps old.
        assert r.eig_age == step % age, (step, r.eig_age)
        assert (r.n_hvp > n_hvp) == (r.eig_age == 0), (step, r.n_hvp, n_hvp)
        n_hvp = r.n_hvp


def test_nan_network_raises_library_error():
    class NaNNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * float("nan")

    ds = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    loss = euler.LossFunction(ds, torch.nn.CrossEntropyLoss(), NaNNet())
    p = loss.initialize_parameters(device="cpu")
    with pytest.raises(NonFiniteError) as info:
        euler.GradientDescent(p, loss, 0.1).step()
    assert info.value.step == 0 and info.value.t == 0.0


def test_no_decrease_possible_raises_after_bounded_rejections():
    class Blowup(torch.nn.Module):
        """Finite at the start, NaN anywhere else: no step can be accepted."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            start = torch.tensor([0.25, -0.5])
            moved = (self.w - start).abs().sum()
            return x * self.w + torch.where(moved > 0, float("nan"), 0.0)

    ds = TensorDataset(torch.ones(4, 2), torch.zeros(4, 2))
    loss = euler.LossFunction(ds, torch.nn.MSELoss(), Blowup())
    p = torch.tensor([0.25, -0.5])
    solver = euler.GradientDescent(p, loss, 0.1, monotone=True, max_rejections=5)
    with pytest.raises(StepRejectedError) as info:
        solver.step()
    assert len(info.value.losses) == 5 and info.value.step == 0
    assert torch.equal(p, torch.tensor([0.25, -0.5]))  # nothing was accepted


# -- reference integrator ----------------------------------------------------------------------------------------
def test_rk4_has_order_four_on_a_quadratic():
    loss, A, target, theta0 = quadratic_problem([3.0, 2.0, 1.0, 0.5])
    T = 0.8
    errors = []
    for n in (8, 16, 32):
        p = theta0.clone()
        solver = euler.RungeKutta4Solver(p, loss, T / n, alpha=10.0)
        for _ in range(n):
            solver.step()
        errors.append((p - exact_flow(A, target, theta0, T)).norm().item())
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(14 < r < 18.5 for r in ratios), (errors, ratios)


def test_error_scales_with_rtol(mlp_problem):
    # Against a fine RK4 reference at the same final time, the error of the controlled solver falls with rtol.
    loss, params = mlp_problem
    T = 2.0
    ref = params.clone()
    rk = euler.RungeKutta4Solver(ref, loss, 0.01, alpha=0.5)
    while rk.t < T - 1e-12:
        rk.max_step_size = min(0.01, T - rk.t)
        rk.step()
    errors = []
    for rtol in (0.1, 0.01):
        p = params.clone()
        s = euler.AdaptiveGradientDescent(p, loss, 0.5, rtol=rtol)
        while s.t < T - 1e-12:
            s.lr = min(0.5, T - s.t)
            s.step()
        errors.append(((p - ref).norm() / (ref - params).norm()).item())
    assert errors[1] < errors[0] / 3, errors


# -- validation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(max_step_size=0.0, stiff_dim=1), "max_step_size"),
    (dict(max_step_size=0.1, stiff_dim=0), "stiff_dim"),
    (dict(max_step_size=0.1, stiff_dim=10_000), "stiff_dim"),
    (dict(max_step_size=0.1, stiff_dim=1, warmup_iters=-1), "warmup_iters"),
    (dict(max_step_size=0.1, stiff_dim=1, warmup_factor=0), "warmup_factor"),
    (dict(max_step_size=0.1, stiff_dim=1, rtol=-1.0), "rtol"),
])
def test_bad_arguments_name_the_argument(mlp_problem, kwargs, match):
    loss, params = mlp_problem
    with pytest.raises(ValueError, match=match) as info:
        euler.ExponentialEulerSolver(params.clone(), loss, **kwargs)
    assert "got" in str(info.value)


def test_params_checked_at_construction(mlp_problem):
    loss, params = mlp_problem
    with pytest.raises(ValueError, match="params"):
        euler.AdaptiveGradientDescent(params[:-1].clone(), loss, 0.1)
    with pytest.raises(ValueError, match="dtype"):
        euler.AdaptiveGradientDescent(params.float(), loss, 0.1)
    with pytest.raises(ValueError, match="lr"):
        euler.GradientDescent(params.clone(), loss, -0.1)


def test_state_dict_roundtrip_continues_identically(mlp_problem):
    loss, params = mlp_problem
    a = euler.ExponentialEulerSolver(params.clone(), loss, 0.5, 2)
    for _ in range(3):
        a.step()
    state = a.state_dict()
    b = euler.ExponentialEulerSolver(params.clone(), loss, 0.5, 2)
    b.load_state_dict(state)
    for _ in range(3):
        ra, rb = a.step(), b.step()
        assert ra.loss == rb.loss and ra.dt == rb.dt and ra.t == rb.t
    assert torch.equal(a.params, b.params)


# -- the corrector: second order ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda p, loss, h: euler.GradientDescent(p, loss, h, corrector=True),
    lambda p, loss, h: euler.ExponentialEulerSolver(p, loss, h, 1, rtol=None, scheme="heun", corrector=True,
                                                    eig_tol=1e-12, eig_max_iters=300),
], ids=["heun", "exponential-heun"])
def test_corrector_has_order_two(make):
    # The first direction is stiff (exactly integrated by the exponential solver); the others are not.
    loss, A, target, theta0 = quadratic_problem([40.0, 3.0, 2.0, 1.0])
    T = 0.4
    ref = exact_flow(A, target, theta0, T)
    errors = []
    for n in (20, 40, 80):
        p = theta0.clone()
        solver = make(p, loss, T / n)
        for _ in range(n):
            solver.step()
        errors.append((p - ref).norm().item())
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(3.3 < r < 4.8 for r in ratios), (errors, ratios)


# -- the references themselves -------------------------------------------------------------------------------------
def test_reference_hessian_of_the_quadratic_is_a():
    loss, A, target, theta0 = quadratic_problem([5.0, 2.0, -1.0, 0.5])
    H = dense_hessian(loss, theta0)
    err = float((H - A).abs().max())
    assert err <= 1e-12 * float(A.abs().max()), f"max |H_ref - A| = {err:.3e}"


# -- argument checks added with the redesign -----------------------------------------------------------------------
def test_rk4_refuses_rtol(mlp_problem):
    loss, params = mlp_problem
    with pytest.raises(ValueError, match=r"rtol must be None for RungeKutta4Solver.*got 0\.1") as info:
        euler.RungeKutta4Solver(params.clone(), loss, 0.1, rtol=0.1)
    assert "alpha" in str(info.value), info.value  # it says what to do instead
    # rtol=None (the default) is accepted.
    assert euler.RungeKutta4Solver(params.clone(), loss, 0.1, rtol=None).rtol is None


SOLVER_CLASSES = {
    "GradientDescent": lambda p, loss: euler.GradientDescent(p, loss, 0.1),
    "AdaptiveGradientDescent": lambda p, loss: euler.AdaptiveGradientDescent(p, loss, 0.1),
    "ExponentialEulerSolver": lambda p, loss: euler.ExponentialEulerSolver(p, loss, 0.1, 1),
    "RungeKutta4Solver": lambda p, loss: euler.RungeKutta4Solver(p, loss, 0.1),
}


@pytest.mark.parametrize("name", list(SOLVER_CLASSES))
@pytest.mark.parametrize("bad", [
    pytest.param(lambda theta: (theta ** 2).sum(), id="function"),
    pytest.param(torch.nn.CrossEntropyLoss(), id="criterion-module"),
    pytest.param(None, id="None"),
])
def test_a_loss_that_is_not_a_loss_function_raises_type_error(mlp_problem, name, bad):
    _, params = mlp_problem
    with pytest.raises(TypeError, match="LossFunction") as info:
        SOLVER_CLASSES[name](params.clone(), bad)
    assert type(bad).__name__ in str(info.value), info.value  # it names what it got


def test_exponential_euler_with_all_but_one_direction_stiff_is_exact():
    # stiff_dim = P - 1 (allowed now): all P eigenpairs are tracked (top_eigenpairs' dense k == n path), the five
    # positive ones are integrated exactly and the last, zero, explicitly (exact too: the gradient has no
    # component there). Every step follows the matrix-exponential flow.
    eigvals = [50.0, 7.0, 2.0, 1.0, 0.5, 0.0]
    loss, A, target, theta0 = quadratic_problem(eigvals, seed=3)
    P = len(eigvals)
    p = theta0.clone()
    solver = euler.ExponentialEulerSolver(p, loss, 0.3, P - 1)
    assert solver.stiff_dim == P - 1
    for step in range(5):
        report = solver.step()
        ref = exact_flow(A, target, theta0, report.t)
        err = float((p - ref).norm())
        assert err <= 1e-10, f"step {step}, t = {report.t}: ||theta - exact flow|| = {err:.3e}"
        assert report.new_loss < report.loss
    ev = torch.tensor(eigvals, dtype=torch.float64)
    assert torch.allclose(report.eigvals, ev, rtol=0, atol=1e-12), (report.eigvals.tolist(), eigvals)
    # dt = the step limit: the explicit direction has curvature 0, so no stability cap.
    assert report.t == pytest.approx(5 * 0.3, rel=1e-14), report.t
    with pytest.raises(ValueError, match=rf"stiff_dim must be a positive int smaller than the number of "
                                         rf"parameters \({P}\); got {P}"):
        euler.ExponentialEulerSolver(theta0.clone(), loss, 0.3, P)


def test_split_step_tolerances_loosen_the_pairs_near_the_cap():
    from exponential_euler_solver.solvers.tracking import LOOSE_TOL, split_step_tolerances

    # The seed's digits at 64x4 (initialisation): the cap pair 396.1 and the pairs within 1/0.8 of it are loose.
    theta = torch.tensor([811.7, -414.6, 413.9, 396.1], dtype=torch.float64)
    assert split_step_tolerances(1e-2, 0.8)(theta).tolist() == [1e-2, LOOSE_TOL, LOOSE_TOL, LOOSE_TOL]
    # With Euler's bound (fraction 1) only the cap pair and its ties.
    assert split_step_tolerances(1e-2, 1.0)(theta).tolist() == [1e-2, 1e-2, 1e-2, LOOSE_TOL]
    assert split_step_tolerances(1e-2, 1.0)(theta[:1]).tolist() == [LOOSE_TOL]
    # Never tighter than asked.
    assert split_step_tolerances(0.5, 0.8)(theta).tolist() == [0.5] * 4


@pytest.mark.parametrize("eig_tol", [None, 1e-9])
def test_cold_start_meets_the_tolerance_where_the_step_needs_it(mlp_problem, eig_tol):
    # Against the dense Hessian: by default, the pairs above |lambda_{k+1}| / fraction meet the default tolerance
    # and the others have relative residuals of at most LOOSE_TOL; a tolerance passed by the user holds for all.
    from exponential_euler_solver.solvers.tracking import DEFAULT_EIG_TOL, LOOSE_TOL

    loss, params = mlp_problem
    kwargs = {} if eig_tol is None else {"eig_tol": eig_tol}
    solver = euler.ExponentialEulerSolver(params.clone(), loss, 10.0, 3, **kwargs)
    solver.step()
    H = dense_hessian(loss, params)
    vals, V = solver.tracker.values, solver.tracker.vectors.double()
    assert solver.tracker.n_refreshes == 1
    rel = torch.linalg.norm(H @ V - V * vals, dim=0) / vals.abs()
    if eig_tol is None:
        tight = vals.abs() > vals[-1].abs() / solver.stability_fraction
        allowed = torch.where(tight, torch.tensor(DEFAULT_EIG_TOL), torch.tensor(LOOSE_TOL)).double()
    else:
        allowed = torch.full_like(vals, eig_tol)
    assert bool((rel <= allowed * (1 + 1e-6)).all()), (vals.tolist(), rel.tolist(), allowed.tolist())
    ev = torch.linalg.eigvalsh(H)
    top = ev[torch.argsort(ev.abs(), descending=True)][:4]
    assert float(vals[0]) == pytest.approx(float(top[0]), rel=1e-4)
