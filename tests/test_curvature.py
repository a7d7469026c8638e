"""Tests for exponential_euler_solver.curvature: operators against dense torch.func references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import exponential_euler_solver as euler
from exponential_euler_solver import DenseOperator, GaussNewtonOperator, HessianOperator, LossFunction, ResidualOperator

from conftest import N_CLASSES, tiny_data

F64 = torch.float64
OPERATORS = {"hessian": HessianOperator, "gauss-newton": GaussNewtonOperator, "residual": ResidualOperator}


def _reference(kind, hessian, gauss_newton):
    return {"hessian": hessian, "gauss-newton": gauss_newton, "residual": hessian - gauss_newton}[kind]


@pytest.fixture(scope="module")
def tiny_loss(tiny_problem_shared):
    # Uneven batches (5, 5, 2); whole blocks vmapped, which on a 59-parameter net is far faster than a loop.
    return LossFunction(tiny_problem_shared.dataset, nn.CrossEntropyLoss(), tiny_problem_shared.net, batch_size=5,
                        hvp_chunk_size=64)


@pytest.fixture(scope="module")
def dense_operators(tiny_loss, tiny_problem_shared):
    return {kind: cls(tiny_loss, tiny_problem_shared.theta).to_dense() for kind, cls in OPERATORS.items()}


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_to_dense_equals_reference(kind, dense_operators, dense_hessian, dense_gauss_newton, close):
    D = dense_operators[kind]
    expected = _reference(kind, dense_hessian, dense_gauss_newton)
    assert D.shape == expected.shape and D.dtype == F64
    close(D, expected, 1e-8, f"{kind} to_dense vs torch.func reference")


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_operators_are_symmetric(kind, dense_operators):
    D = dense_operators[kind]
    asym = float((D - D.T).abs().max())
    scale = float(D.abs().max())
    assert asym <= 1e-10 * scale, f"{kind}: max |D - D^T| = {asym:.3e}, max |D| = {scale:.3e}"


def test_reference_splits_hessian_into_g_and_residual(dense_hessian, dense_gauss_newton):
    # Sanity of the references themselves: G is positive semi-definite and of rank <= N (C - 1).
    evals = torch.linalg.eigvalsh(dense_gauss_newton)
    assert float(evals.min()) >= -1e-12 * float(evals.max()), f"G has eigenvalue {float(evals.min()):.3e}"
    rank = int((evals > 1e-10 * evals.max()).sum())
    assert rank <= 12 * (N_CLASSES - 1), f"rank of G = {rank}"


def test_linear_model_has_no_residual(problem_factory, close):
    # For a linear model the outputs are linear in the parameters, so Hessian = G and the residual is zero.
    X, y = tiny_data()
    torch.manual_seed(0)
    problem = problem_factory(nn.Linear(5, N_CLASSES).double(), (X,), y, seed=8)
    loss = LossFunction(problem.dataset, nn.CrossEntropyLoss(), problem.net, hvp_chunk_size=64)
    H = problem.hessian()
    close(problem.gauss_newton(), H, 1e-12, "reference G vs reference Hessian, linear model")
    close(GaussNewtonOperator(loss, problem.theta).to_dense(), H, 1e-10, "library G, linear model")
    R = ResidualOperator(loss, problem.theta).to_dense()
    assert float(R.abs().max()) <= 1e-12 * float(H.abs().max()), \
        f"residual of a linear model: max |R| = {float(R.abs().max()):.3e}, max |H| = {float(H.abs().max()):.3e}"


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_applying_twice_gives_the_same_answer(kind, tiny_loss, tiny_problem_shared):
    op = OPERATORS[kind](tiny_loss, tiny_problem_shared.theta)
    gen = torch.Generator().manual_seed(31)
    V = torch.randn(tiny_problem_shared.n_params, 3, generator=gen, dtype=F64)
    first, second = op.matmat(V), op @ V
    assert torch.equal(first, second), f"{kind}: max |first - second| = {float((first - second).abs().max()):.3e}"
    # A column on its own gives the column of the block product.
    single = op.matmat(V[:, 1])
    err = float((single - first[:, 1]).abs().max())
    assert err <= 1e-12 * float(first[:, 1].abs().max()), f"{kind}: vector vs block column differ by {err:.3e}"


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_n_products_counts_columns(kind, tiny_loss, tiny_problem_shared):
    P = tiny_problem_shared.n_params
    op = OPERATORS[kind](tiny_loss, tiny_problem_shared.theta)
    assert op.n_products == 0 and op.shape == (P, P) and op.symmetric
    op.matmat(torch.ones(P, dtype=F64))
    assert op.n_products == 1, f"after one vector: {op.n_products}"
    op.matmat(torch.ones(P, 4, dtype=F64))
    assert op.n_products == 5, f"after a block of 4 more: {op.n_products}"
    out = op.matmat(torch.ones(P, 0, dtype=F64))
    assert out.shape == (P, 0) and op.n_products == 5, f"an empty block counted: {op.n_products}"
    op.to_dense()
    assert op.n_products == 5 + P, f"to_dense should cost {P} products; count is {op.n_products}"


def test_dense_operator(close):
    gen = torch.Generator().manual_seed(40)
    B = torch.randn(6, 6, generator=gen, dtype=F64)
    A = B + B.T
    op = DenseOperator(A)
    assert op.shape == (6, 6) and op.dtype == F64 and op.device.type == "cpu"
    assert torch.equal(op.to_dense(), A) and op.n_products == 6
    X = torch.randn(6, 2, generator=gen, dtype=F64)
    close(op.matmat(X), A @ X, 1e-14, "DenseOperator.matmat")
    with pytest.raises(ValueError, match="matrix"):
        DenseOperator(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="X"):
        op.matmat(torch.zeros(5, 2, dtype=F64))


def test_operator_follows_params_updated_in_place(tiny_loss, tiny_problem_shared, close):
    # Documented: params is held by reference, so an in-place update of the tensor moves the operator.
    theta = tiny_problem_shared.theta.clone()
    op = HessianOperator(tiny_loss, theta)
    gen = torch.Generator().manual_seed(41)
    theta.add_(0.3 * torch.randn(theta.shape, generator=gen, dtype=F64))
    v = torch.randn(theta.shape, generator=gen, dtype=F64)
    close(op.matmat(v), tiny_problem_shared.hessian(theta) @ v, 1e-8, "Hessian operator after in-place update")


def test_operator_rejects_params_of_the_wrong_dtype(tiny_loss, tiny_problem_shared):
    for cls in OPERATORS.values():
        with pytest.raises(ValueError, match="params"):
            cls(tiny_loss, tiny_problem_shared.theta.float())


# ----------------------------------------------------------------------------------------------------------------
# the registry: names -> operator classes, as the solvers' curvature= option and the analysis read it
REGISTRY_REFERENCES = {"hessian": "H", "gn": "G", "residual": "H - G"}


def test_registry_names_map_to_the_operator_classes():
    from exponential_euler_solver.curvature import operator_class

    assert set(euler.OPERATORS) == {"hessian", "gn", "residual"}, sorted(euler.OPERATORS)
    assert euler.OPERATORS["hessian"] is HessianOperator
    assert euler.OPERATORS["gn"] is GaussNewtonOperator
    assert euler.OPERATORS["residual"] is ResidualOperator
    for name, cls in euler.OPERATORS.items():
        assert operator_class(name) is cls
    custom = lambda loss, params: DenseOperator(torch.eye(loss.n_params, dtype=params.dtype))  # noqa: E731
    assert operator_class(custom) is custom
    for bad in ("fisher", "Hessian", 3):
        with pytest.raises(ValueError, match="curvature must be one of"):
            operator_class(bad)


@pytest.mark.parametrize("name", ["hessian", "gn", "residual"])
def test_registry_products_match_dense_references(name, tiny_loss, tiny_problem_shared, dense_hessian,
                                                  dense_gauss_newton, close):
    expected = {"hessian": dense_hessian, "gn": dense_gauss_newton, "residual": dense_hessian - dense_gauss_newton}
    op = euler.OPERATORS[name](tiny_loss, tiny_problem_shared.theta)
    gen = torch.Generator().manual_seed(42)
    V = torch.randn(tiny_problem_shared.n_params, 4, generator=gen, dtype=F64)
    close(op @ V, expected[name] @ V, 1e-8, f"OPERATORS[{name!r}] ({REGISTRY_REFERENCES[name]}) @ V")
    close(op @ V[:, 2], expected[name] @ V[:, 2], 1e-8, f"OPERATORS[{name!r}] @ v")


@pytest.mark.parametrize("which", ["adaptive", "exponential-euler"])
def test_solver_with_gn_curvature_tracks_the_top_eigenvalues_of_g(which, tiny_problem, close):
    # rtol=None refreshes the eigenpairs at every step: each step's values must be those of the dense G at the
    # step's starting point (G is positive semi-definite, so largest magnitude = largest).
    loss = LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net, hvp_chunk_size=64)
    params = tiny_problem.theta.clone()
    if which == "adaptive":
        solver = euler.AdaptiveGradientDescent(params, loss, 10.0, rtol=None, curvature="gn", eig_tol=1e-10,
                                               eig_max_iters=300)
    else:
        solver = euler.ExponentialEulerSolver(params, loss, 10.0, 2, rtol=None, curvature="gn", eig_tol=1e-10,
                                              eig_max_iters=300)
    for step in range(3):
        start = params.clone()
        G = tiny_problem.gauss_newton(start)
        ref = torch.linalg.eigvalsh(G).flip(0)
        lam_h = float(torch.linalg.eigvalsh(tiny_problem.hessian(start)).abs().max())
        # The test tells G from the Hessian: their top eigenvalues differ.
        assert abs(lam_h - float(ref[0])) > 1e-3 * float(ref[0]), (lam_h, float(ref[0]))
        report = solver.step()
        if which == "adaptive":
            got = torch.tensor([report.sharpness], dtype=F64)
            k = 1
        else:
            got = report.eigvals
            k = 3
        close(got, ref[:k], 1e-8, f"{which} step {step}: tracked eigenvalues vs eigh of the dense G")
        # The step size follows from G's spectrum: dt = min(max step, 1 / |lambda_{k}|) of G.
        assert report.dt == pytest.approx(min(10.0, 1 / float(ref[k - 1])), rel=1e-8), (report.dt, ref[:k])
