"""Tests for exponential_euler_solver.linalg (the eigensolver) against torch.linalg.eigh."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exponential_euler_solver import (
    DenseOperator,
    LossFunction,
    g_eigenvector,
    h_eigenvector,
    loss_hessian_eigenvector,
    top_eigenpairs,
)
from exponential_euler_solver.curvature import LinearOperator
from exponential_euler_solver.linalg import blocks, lobpcg

F64 = torch.float64
N = 50
TOP = (-19.86, -4.73, 4.70)  # |-4.73| and |4.70| nearly tie: LM must still pick -4.73, with its sign
TOL = 1e-10
# LA k=2 wants 0.9988 next to 0.887 with -19.86 at the other end of the spectrum: unpreconditioned LOBPCG with
# block 4 contracts by about 0.83 per iteration there and needs ~135 iterations for 1e-10, more than the default.
MAX_ITERS = 300


def _spectrum_matrix(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q diag(ev) Q^T`` with ``ev`` = TOP and 47 values uniform in (-1, 1); returns (A, ev)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=F64))
    ev = torch.cat([torch.tensor(TOP, dtype=F64), 2 * torch.rand(N - 3, generator=gen, dtype=F64) - 1])
    A = (Q * ev) @ Q.T
    return (A + A.T) / 2, ev


@pytest.fixture(scope="module")
def matrix() -> torch.Tensor:
    return _spectrum_matrix()[0]


def _expected(A: torch.Tensor, k: int, which: str) -> torch.Tensor:
    vals = torch.linalg.eigvalsh(A)
    if which == "LM":
        order = torch.argsort(vals.abs(), descending=True)
    elif which == "LA":
        order = torch.argsort(vals, descending=True)
    else:
        order = torch.argsort(vals)
    return vals[order[:k]]


def _residuals(A: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    V = vectors.to(A.dtype)
    return torch.linalg.norm(A @ V - V * values.to(A.dtype), dim=0)


def _check_result(A, result, k, which, tol, rtol_values):
    expected = _expected(A, k, which)
    vals, V = result.eigenvalues, result.eigenvectors
    assert vals.shape == (k,) and vals.dtype == F64, f"eigenvalues {tuple(vals.shape)} {vals.dtype}"
    assert V.shape == (A.shape[0], k), f"eigenvectors {tuple(V.shape)}"
    rel = ((vals - expected).abs() / expected.abs())
    assert bool((rel <= rtol_values).all()), \
        f"which={which} k={k}: got {vals.tolist()}, eigh {expected.tolist()}, relative errors {rel.tolist()}"
    # Residuals recomputed here, against what the code promises: ||A v - lambda v|| <= tol * |lambda|.
    res = _residuals(A, vals, V)
    assert bool((res <= tol * vals.abs()).all()), \
        f"which={which} k={k}: residuals {res.tolist()} exceed tol*|lambda| = {(tol * vals.abs()).tolist()}"
    # The reported residual norms are the true ones (up to rounding of A @ V).
    slack = 1e-13 * float(torch.linalg.matrix_norm(A, ord=2))
    assert bool(((result.residual_norms - res).abs() <= slack + 1e-2 * res).all()), \
        f"reported residuals {result.residual_norms.tolist()} vs recomputed {res.tolist()}"
    assert result.converged, f"converged=False with residuals {res.tolist()}"


@pytest.mark.parametrize("which,k", [("LM", 1), ("LM", 2), ("LM", 3), ("LA", 1), ("LA", 2), ("SA", 1), ("SA", 2)])
def test_eigenpairs_match_eigh(matrix, which, k):
    op = DenseOperator(matrix)
    result = top_eigenpairs(op, k, which=which, tol=TOL, max_iters=MAX_ITERS,
                            generator=torch.Generator().manual_seed(1))
    _check_result(matrix, result, k, which, TOL, 1e-8)
    V = result.eigenvectors
    ortho = float((V.T @ V - torch.eye(k, dtype=F64)).abs().max())
    assert ortho <= 1e-12, f"which={which} k={k}: max |V^T V - I| = {ortho:.3e}"
    assert result.n_products == op.n_products, f"n_products {result.n_products} vs operator's {op.n_products}"
    assert result.residual_norms.shape == (k,) and result.residual_norms.dtype == F64


@pytest.mark.parametrize("which,k", [("LM", 3), ("LA", 2)])
def test_ragged_chunks_match_eigh(matrix, monkeypatch, which, k):
    # Long reductions and in-place rotations run over column chunks; 7 leaves a ragged last chunk of 50 entries.
    # (The reductions' chunks are linalg.blocks.CHUNK, the in-place rotation's linalg.lobpcg.ROTATE_CHUNK.)
    monkeypatch.setattr(blocks, "CHUNK", 7)
    monkeypatch.setattr(lobpcg, "ROTATE_CHUNK", 7)
    calls = []
    real_gram = blocks.gram

    def counting_gram(A, B):
        calls.append(A.shape[0])
        return real_gram(A, B)

    monkeypatch.setattr(blocks, "gram", counting_gram)
    result = top_eigenpairs(DenseOperator(matrix), k, which=which, tol=TOL, max_iters=MAX_ITERS,
                            generator=torch.Generator().manual_seed(1))
    _check_result(matrix, result, k, which, TOL, 1e-8)
    # The chunked reduction was used on vectors of N = 50 entries (chunks 7, ..., 7, 1).
    assert blocks.CHUNK == 7 and N in calls, f"gram called on row counts {sorted(set(calls))}"


class _ReflectedDiagonal(LinearOperator):
    """``H diag(ev) H`` with ``H = I - 2 h h^T`` a Householder reflection: exact eigenpairs ``(ev_i, H e_i)`` at
    any size, applied in O(n) per vector."""

    def __init__(self, ev: torch.Tensor, h: torch.Tensor):
        super().__init__(ev.shape[0], ev.dtype, ev.device)
        self.ev, self.h = ev, h / h.norm()

    def reflect(self, X: torch.Tensor) -> torch.Tensor:
        return X - 2 * self.h[:, None] * (self.h @ X)[None, :]

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.reflect(self.ev[:, None] * self.reflect(X))


def test_float32_operator_larger_than_a_chunk():
    # 40,000 entries = 3 chunks of 16k: float32 products per chunk, float64 sums across them.
    n = 40_000
    gen = torch.Generator().manual_seed(4)
    bulk = 2 * torch.rand(n - 3, generator=gen, dtype=F64) - 1
    ev64 = torch.cat([torch.tensor([-30.0, 12.0, 11.5], dtype=F64), bulk])
    h64 = torch.randn(n, generator=gen, dtype=F64)
    op = _ReflectedDiagonal(ev64.float(), h64.float())
    result = top_eigenpairs(op, 3, tol=1e-3, max_iters=200, generator=gen)
    assert result.converged, f"residuals {result.residual_norms.tolist()}"
    rel = (result.eigenvalues - ev64[:3]).abs() / ev64[:3].abs()
    assert bool((rel <= 1e-5).all()), f"eigenvalues {result.eigenvalues.tolist()}, relative errors {rel.tolist()}"
    # Against the exact eigenvectors H e_i, and residuals recomputed in float64 with the exact operator.
    exact = _ReflectedDiagonal(ev64, h64)
    E = exact.reflect(torch.eye(n, 3, dtype=F64))
    V = result.eigenvectors.double()
    overlap = (E.T @ V).abs().diagonal()
    assert bool((overlap >= 1 - 1e-5).all()), f"|<H e_i, v_i>| = {overlap.tolist()}"
    res = torch.linalg.norm(exact.matmat(V) - V * result.eigenvalues, dim=0)
    assert bool((res <= 1e-3 * result.eigenvalues.abs()).all()), f"residuals {res.tolist()}"
    # Reported residuals match the recomputed ones, except below what a float32 vector can represent (about
    # eps * |lambda| * sqrt(n)), where a cold start's Krylov-relation residual is smaller than the stored vector's.
    floor = torch.finfo(torch.float32).eps * result.eigenvalues.abs() * n ** 0.5
    agree = (result.residual_norms - res).abs() <= 1e-2 * res + 1e-5
    assert bool((agree | ((res <= floor) & (result.residual_norms <= floor))).all()), \
        f"reported residuals {result.residual_norms.tolist()} vs recomputed {res.tolist()} (floor {floor.tolist()})"


@pytest.mark.parametrize("krylov_dim", [0, None], ids=["lobpcg", "krylov"])
@pytest.mark.parametrize("max_iters", [0, 3])
def test_converged_flag_is_honest(matrix, max_iters, krylov_dim):
    op = DenseOperator(matrix)
    result = top_eigenpairs(op, 2, which="LA", tol=TOL, max_iters=max_iters,
                            generator=torch.Generator().manual_seed(1), krylov_dim=krylov_dim)
    res = _residuals(matrix, result.eigenvalues, result.eigenvectors)
    assert not result.converged, f"converged=True with residuals {res.tolist()} and tol {TOL}"
    assert bool((res > TOL * result.eigenvalues.abs()).any())
    assert torch.allclose(result.residual_norms, res, rtol=1e-8, atol=1e-13), \
        f"reported {result.residual_norms.tolist()} vs recomputed {res.tolist()}"
    assert result.n_products == op.n_products
    # block_size k + max(2, k // 2) = 4; a cold start spends at most what max_iters LOBPCG iterations could.
    assert result.n_products <= 4 * (max_iters + 1), f"{result.n_products} products with max_iters={max_iters}"
    if krylov_dim == 0:
        assert result.n_iterations == max_iters, f"{result.n_iterations} iterations with max_iters={max_iters}"
        if max_iters == 0:  # one Rayleigh-Ritz on the starting block
            assert result.n_products == 4, f"n_products {result.n_products}"


@pytest.mark.parametrize("seed", range(10))
def test_lm_picks_the_negative_pair_for_every_start(matrix, seed):
    result = top_eigenpairs(DenseOperator(matrix), 2, which="LM", tol=TOL,
                            generator=torch.Generator().manual_seed(100 + seed))
    vals, V = result.eigenvalues, result.eigenvectors
    target = torch.tensor(TOP[:2], dtype=F64)
    assert bool(((vals - target).abs() <= 1e-8 * target.abs()).all()), \
        f"seed {seed}: LM k=2 gave {vals.tolist()}, expected {target.tolist()}"
    assert bool((vals < 0).all()), f"seed {seed}: signs wrong: {vals.tolist()}"
    rayleigh = torch.einsum("ik,ij,jk->k", V, matrix, V) / (V * V).sum(0)
    err = (rayleigh - vals).abs()
    assert bool((err <= 1e-12 * vals.abs()).all()), \
        f"seed {seed}: Rayleigh quotients {rayleigh.tolist()} vs eigenvalues {vals.tolist()}"
    res = _residuals(matrix, vals, V)
    assert bool((res <= TOL * vals.abs()).all()), f"seed {seed}: residuals {res.tolist()}"
    ortho = float((V.T @ V - torch.eye(2, dtype=F64)).abs().max())
    assert ortho <= 1e-12, f"seed {seed}: max |V^T V - I| = {ortho:.3e}"


def test_warm_start_needs_fewer_products(matrix):
    first = top_eigenpairs(DenseOperator(matrix), 2, tol=TOL, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(8)
    E = torch.randn(N, N, generator=gen, dtype=F64)
    perturbed = matrix + 1e-4 * (E + E.T) / 2

    cold_op, warm_op = DenseOperator(perturbed), DenseOperator(perturbed)
    cold = top_eigenpairs(cold_op, 2, tol=TOL, generator=torch.Generator().manual_seed(9))
    warm = top_eigenpairs(warm_op, 2, tol=TOL, init=first.eigenvectors)
    for result in (cold, warm):
        _check_result(perturbed, result, 2, "LM", TOL, 1e-8)
    assert warm.n_products == warm_op.n_products and cold.n_products == cold_op.n_products
    assert warm.n_products < cold.n_products, \
        f"warm start used {warm.n_products} products ({warm.n_iterations} iterations), cold start " \
        f"{cold.n_products} ({cold.n_iterations} iterations)"


@pytest.mark.parametrize("krylov_dim", [8, 12, None])
@pytest.mark.parametrize("which,k", [("LM", 3), ("LA", 2), ("SA", 2)])
def test_krylov_cold_start_matches_eigh(matrix, which, k, krylov_dim):
    # krylov_dim 8 and 12 force thick restarts (k=3: block 5; k=2: block 4); None is the default 6 * block.
    op = DenseOperator(matrix)
    result = top_eigenpairs(op, k, which=which, tol=TOL, max_iters=MAX_ITERS, krylov_dim=krylov_dim,
                            generator=torch.Generator().manual_seed(2))
    _check_result(matrix, result, k, which, TOL, 1e-8)
    V = result.eigenvectors
    ortho = float((V.T @ V - torch.eye(k, dtype=F64)).abs().max())
    assert ortho <= 1e-12, f"which={which} k={k}: max |V^T V - I| = {ortho:.3e}"
    assert result.n_products == op.n_products
    if krylov_dim == 8:
        assert result.n_iterations > 0, "a basis of 8 vectors must have restarted"


@pytest.mark.parametrize("which,k", [("LM", 3), ("LA", 2)])
def test_krylov_cold_start_needs_fewer_products_than_lobpcg(matrix, which, k):
    # The measured reason for the Krylov cold start, on the test spectrum: same answers, fewer products.
    counts = {}
    for name, kd in (("krylov", None), ("lobpcg", 0)):
        op = DenseOperator(matrix)
        result = top_eigenpairs(op, k, which=which, tol=TOL, max_iters=MAX_ITERS, krylov_dim=kd,
                                generator=torch.Generator().manual_seed(3))
        _check_result(matrix, result, k, which, TOL, 1e-8)
        counts[name] = result.n_products
    assert counts["krylov"] < counts["lobpcg"], f"products: {counts}"


@pytest.mark.parametrize("spectrum,k", [((6.0, -4.0, 2.5), 4), ((6.0, -4.75, 3.5, -2.25, 1.0), 2)])
def test_krylov_cold_start_on_a_low_rank_operator(spectrum, k):
    # The Krylov space of two random vectors has at most rank + 2 dimensions, so a block soon has a dependent
    # direction and the Krylov search stops; LOBPCG takes over from its Ritz vectors. Rank 3 with k = 4 stops
    # short of the block size (4 Ritz vectors for a block of 6, topped up with random ones); rank 5 with k = 2
    # stops with all 4 of the block, unconverged (both seen in the code's own trace). The nonzero pairs must be
    # exact and any further one zero.
    gen = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=F64))
    ev = torch.zeros(N, dtype=F64)
    ev[:len(spectrum)] = torch.tensor(spectrum, dtype=F64)
    A = (Q * ev) @ Q.T
    A = (A + A.T) / 2
    result = top_eigenpairs(DenseOperator(A), k, tol=1e-10, generator=gen)
    assert result.converged, f"residuals {result.residual_norms.tolist()}"
    expected = torch.tensor((list(spectrum) + [0.0] * k)[:k], dtype=F64)
    assert torch.allclose(result.eigenvalues, expected, atol=1e-10), f"eigenvalues {result.eigenvalues.tolist()}"
    res = _residuals(A, result.eigenvalues, result.eigenvectors)
    assert bool((res <= 1e-9).all()), f"residuals {res.tolist()}"


def test_float32_operator_matches_float64(matrix):
    result = top_eigenpairs(DenseOperator(matrix.float()), 3, generator=torch.Generator().manual_seed(3))
    expected = _expected(matrix, 3, "LM")
    assert result.eigenvectors.dtype == torch.float32 and result.eigenvalues.dtype == F64
    rel = (result.eigenvalues - expected).abs() / expected.abs()
    assert bool((rel <= 1e-4).all()), \
        f"float32 eigenvalues {result.eigenvalues.tolist()} vs float64 {expected.tolist()}: relative {rel.tolist()}"
    assert result.converged, f"float32 residuals {result.residual_norms.tolist()}"


@pytest.mark.parametrize("seed", range(6))
def test_partial_warm_start_still_finds_the_wanted_pairs(matrix, seed):
    # init has 1 column for k = 2: the second column is random, a cold start, so it needs the guard vectors a
    # cold start gets. The default block_size = max(k, j) = 2 gives none.
    vals, vecs = torch.linalg.eigh(matrix)
    init = vecs[:, vals.argmin()]  # the exact eigenvector of -19.86
    result = top_eigenpairs(DenseOperator(matrix), 2, which="LM", init=init, tol=TOL, max_iters=MAX_ITERS,
                            generator=torch.Generator().manual_seed(seed))
    target = torch.tensor(TOP[:2], dtype=F64)
    assert bool(((result.eigenvalues - target).abs() <= 1e-8 * target.abs()).all()), \
        f"seed {seed}: LM k=2 warm-started with one exact column gave {result.eigenvalues.tolist()} " \
        f"(converged={result.converged}); expected {target.tolist()}"


def test_init_with_fewer_columns_than_k(matrix):
    first = top_eigenpairs(DenseOperator(matrix), 1, tol=TOL, generator=torch.Generator().manual_seed(4))
    result = top_eigenpairs(DenseOperator(matrix), 2, tol=TOL, init=first.eigenvectors[:, 0],
                            generator=torch.Generator().manual_seed(5), block_size=4)
    _check_result(matrix, result, 2, "LM", TOL, 1e-8)


# ----------------------------------------------------------------------------------------------------------------
# argument errors
@pytest.mark.parametrize("kwargs,name", [
    pytest.param({"k": 0}, "k", id="k=0"),
    pytest.param({"k": N + 3}, "k", id="k>n"),
    pytest.param({"k": 1.0}, "k", id="k-float"),
    pytest.param({"which": "XX"}, "which", id="which=XX"),
    pytest.param({"which": "lm"}, "which", id="which-lowercase"),
    pytest.param({"tol": 0.0}, "tol", id="tol=0"),
    pytest.param({"tol": -1e-8}, "tol", id="tol<0"),
    pytest.param({"max_iters": -1}, "max_iters", id="max_iters<0"),
    pytest.param({"block_size": 1}, "block_size", id="block_size<k"),
    pytest.param({"krylov_dim": -1}, "krylov_dim", id="krylov_dim<0"),
    pytest.param({"krylov_dim": 12.0}, "krylov_dim", id="krylov_dim-float"),
    pytest.param({"init": torch.zeros(N - 1, 2, dtype=F64)}, "init", id="init-(n-1,2)"),
    pytest.param({"init": torch.zeros(N - 1, dtype=F64)}, "init", id="init-(n-1,)"),
    pytest.param({"init": torch.zeros(N, 2, 1, dtype=F64)}, "init", id="init-3d"),
    pytest.param({"init": torch.ones(N, 2, dtype=F64)}, "init", id="init-rank1"),
    pytest.param({"init": torch.tensor(1.0, dtype=F64)}, "init", id="init-0d"),
])
def test_bad_arguments_raise_naming_the_argument(matrix, kwargs, name):
    args = {"k": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        top_eigenpairs(DenseOperator(matrix), args.pop("k"), **args)


def test_k_out_of_range_names_the_range(matrix):
    # k == n is accepted now (the dense path below); the message gives the allowed range 1 <= k <= n.
    for k in (0, N + 1):
        with pytest.raises(ValueError, match=rf"1 <= k <= {N}"):
            top_eigenpairs(DenseOperator(matrix), k)


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_k_equal_to_n_is_the_whole_spectrum(matrix, which):
    # Changed behaviour: k == n used to be refused; it now materialises the operator (n products) and
    # decomposes it densely. The result must be eigh's, ordered as `which` asks.
    op = DenseOperator(matrix)
    result = top_eigenpairs(op, N, which=which)
    vals, vecs = torch.linalg.eigh(matrix)
    order = {"LM": torch.argsort(vals.abs(), descending=True), "LA": torch.argsort(vals, descending=True),
             "SA": torch.argsort(vals)}[which]
    expected = vals[order]
    err = float((result.eigenvalues - expected).abs().max())
    assert err <= 1e-13 * float(expected.abs().max()), \
        f"which={which}: max |eigenvalue - eigh| = {err:.3e}; got {result.eigenvalues[:4].tolist()}..., eigh " \
        f"{expected[:4].tolist()}..."
    V = result.eigenvectors
    assert V.shape == (N, N) and V.dtype == F64
    ortho = float((V.T @ V - torch.eye(N, dtype=F64)).abs().max())
    assert ortho <= 1e-12, f"max |V^T V - I| = {ortho:.3e}"
    # Each vector is eigh's up to sign (the spectrum is simple: TOP and 47 uniform values).
    cos = (V.T @ vecs[:, order]).diagonal().abs()
    assert bool((cos >= 1 - 1e-10).all()), f"|cos| to eigh's vectors: min {float(cos.min()):.3e}"
    res = _residuals(matrix, result.eigenvalues, V)
    assert bool((res <= 1e-12 * float(expected.abs().max())).all()), f"residuals up to {float(res.max()):.3e}"
    assert result.converged and result.n_products == N == op.n_products, \
        (result.converged, result.n_products, op.n_products)


# ----------------------------------------------------------------------------------------------------------------
# the seed library's helpers on the tiny MLP
def _lm_eigh(M: torch.Tensor, n: int):
    vals, vecs = torch.linalg.eigh(M)
    order = torch.argsort(vals.abs(), descending=True)
    return vals[order], vecs[:, order]


@pytest.fixture(scope="module")
def tiny_loss(tiny_problem_shared):
    return LossFunction(tiny_problem_shared.dataset, nn.CrossEntropyLoss(), tiny_problem_shared.net, batch_size=5,
                        hvp_chunk_size=16)


@pytest.mark.parametrize("helper", ["hessian", "g", "h"])
def test_seed_helpers_match_eigh_of_dense_references(helper, tiny_loss, tiny_problem_shared, dense_hessian,
                                                     dense_gauss_newton):
    fn, M = {"hessian": (loss_hessian_eigenvector, dense_hessian),
             "g": (g_eigenvector, dense_gauss_newton),
             "h": (h_eigenvector, dense_hessian - dense_gauss_newton)}[helper]
    n = 3
    torch.manual_seed(0)
    vals, vecs = fn(tiny_loss, tiny_problem_shared.theta, n=n)
    ref_vals, ref_vecs = _lm_eigh(M, n)
    # The comparison of vectors needs each wanted eigenvalue separated from the rest of the spectrum.
    gaps = [min(abs(float(ref_vals[i] - ref_vals[j])) for j in range(M.shape[0]) if j != i) for i in range(n)]
    assert min(gaps) > 1e-3 * float(ref_vals[0].abs()), f"{helper}: test data has a near-degenerate top: " \
                                                         f"{ref_vals[:n + 1].tolist()}"
    assert vals.shape == (n,) and vecs.shape == (M.shape[0], n)
    rel = (vals - ref_vals[:n]).abs() / ref_vals[:n].abs()
    assert bool((rel <= 1e-8).all()), \
        f"{helper}: eigenvalues {vals.tolist()} vs eigh {ref_vals[:n].tolist()}; relative errors {rel.tolist()}"
    cos = (vecs.T @ ref_vecs[:, :n]).diagonal().abs()
    # sin(angle) <= residual / gap, and the default tolerance is sqrt(eps) ~ 1.5e-8 relative.
    assert bool((cos >= 1 - 1e-6).all()), f"{helper}: |cos| between eigenvectors and eigh's: {cos.tolist()}"
    res = _residuals(M, vals, vecs)
    bound = 1.5e-8 * torch.maximum(vals.abs(), 1e-3 * vals.abs().max()) + 1e-13 * float(M.abs().max())
    assert bool((res <= bound).all()), f"{helper}: residuals {res.tolist()} vs bound {bound.tolist()}"


@pytest.mark.parametrize("n", [0, 5, blocks.NORM_CHUNK, 3 * blocks.NORM_CHUNK + 17])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_norm_matches_float64_norm(n, dtype):
    # Rows of NORM_CHUNK entries and a ragged tail; entries spread over 8 decades, where a float32 norm over all
    # entries at once loses ~1e-4 at millions of entries. The float64 reference sees the same (rounded) entries.
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen, dtype=F64) * 10 ** (8 * torch.rand(n, generator=gen, dtype=F64) - 6)).to(dtype)
    ref = float(torch.linalg.vector_norm(x.double()))
    assert blocks.norm(x) == pytest.approx(ref, rel=1e-6 if dtype == torch.float32 else 1e-13, abs=0)
    assert blocks.norm(x.view(-1, 1)) == pytest.approx(ref, rel=1e-6 if dtype == torch.float32 else 1e-13, abs=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [0, blocks.NORM_CHUNK + 3])  # in a row, in the tail
def test_norm_is_not_finite_with_a_non_finite_entry(bad, where):
    x = torch.ones(blocks.NORM_CHUNK + 5)
    x[where] = bad
    assert not torch.isfinite(torch.tensor(blocks.norm(x)))


def test_cold_tol_per_pair_stops_when_each_pair_meets_its_own(matrix):
    # The first pair (-19.86) to 1e-10, the nearly tied pair (-4.73, 4.70) only to 1e-2: fewer products than
    # asking 1e-10 of all three, and each pair's true residual (recomputed against A) within its own tolerance.
    k, tols = 3, torch.tensor([1e-10, 1e-2, 1e-2], dtype=F64)
    seen = []

    def cold_tol(theta):
        seen.append(theta.clone())
        return tols

    loose = top_eigenpairs(DenseOperator(matrix), k, tol=1e-10, max_iters=MAX_ITERS, cold_tol=cold_tol,
                           generator=torch.Generator().manual_seed(1))
    tight = top_eigenpairs(DenseOperator(matrix), k, tol=1e-10, max_iters=MAX_ITERS,
                           generator=torch.Generator().manual_seed(1))
    assert seen and all(t.shape == (k,) and t.dtype == F64 for t in seen)
    assert loose.converged and tight.converged
    assert loose.n_products < tight.n_products, (loose.n_products, tight.n_products)
    res = _residuals(matrix, loose.eigenvalues, loose.eigenvectors)
    assert bool((res <= tols * loose.eigenvalues.abs()).all()), (res.tolist(), loose.eigenvalues.tolist())
    expected = _expected(matrix, k, "LM")
    assert float(loose.eigenvalues[0]) == pytest.approx(float(expected[0]), rel=1e-12)
    # A residual r puts an eigenvalue within r of each Ritz value (and the loose ones keep their signs).
    assert bool(((loose.eigenvalues - expected).abs() <= res).all()), (loose.eigenvalues.tolist(), expected.tolist())


@pytest.mark.parametrize("layout", ["rows", "columns"])  # the basis stored one vector per row, or per column
@pytest.mark.parametrize("a", [1, 3, blocks.LOOP_FROM_COLUMNS + 1])  # batched, and the row-major loop
def test_gram_and_row_norms_match_float64(monkeypatch, layout, a):
    monkeypatch.setattr(blocks, "CHUNK", 64)
    monkeypatch.setattr(blocks, "NORM_CHUNK", 32)
    gen = torch.Generator().manual_seed(a)
    n = 10 * 64 + 13  # ten chunks and a ragged tail
    rows_a = torch.randn(a, n, generator=gen)
    rows_b = torch.randn(2, n, generator=gen)
    A, B = (rows_a.T, rows_b.T) if layout == "rows" else (rows_a.T.contiguous(), rows_b.T.contiguous())
    ref = rows_a.double() @ rows_b.double().T
    got = blocks.gram(A, B)
    assert got.dtype == F64 and got.shape == (a, 2)
    assert float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    norms = blocks.row_norms(rows_a)
    assert norms.dtype == F64
    assert torch.allclose(norms, torch.linalg.vector_norm(rows_a.double(), dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("which,k", [("LM", 3), ("LA", 2)])
def test_a_workspace_kept_between_solves_gives_the_same_pairs(matrix, which, k):
    # A cold start and two warm ones through one workspace (its rows reused, not reallocated) against eigh and
    # against the same solves without a workspace; the last one writes its vectors over its own starting vectors.
    op = DenseOperator(matrix)
    workspace = blocks.Workspace()
    cold = top_eigenpairs(op, k, which=which, tol=TOL, max_iters=MAX_ITERS, generator=torch.Generator().manual_seed(0),
                          workspace=workspace)
    _check_result(matrix, cold, k, which, TOL, 1e-9)
    rows = workspace._rows
    start = cold.eigenvectors + 1e-3 * torch.randn(N, k, generator=torch.Generator().manual_seed(1), dtype=F64)
    plain = top_eigenpairs(op, k, which=which, init=start, tol=TOL, max_iters=MAX_ITERS)
    kept = top_eigenpairs(op, k, which=which, init=start, tol=TOL, max_iters=MAX_ITERS, workspace=workspace)
    assert workspace._rows is rows and not any(t.data_ptr() == rows.data_ptr()
                                                for t in (kept.eigenvectors, cold.eigenvectors))
    _check_result(matrix, kept, k, which, TOL, 1e-9)
    assert torch.equal(kept.eigenvalues, plain.eigenvalues) and torch.equal(kept.eigenvectors, plain.eigenvectors)
    own = start.T.contiguous()  # the starting vectors' memory receives the result
    into = top_eigenpairs(op, k, which=which, init=own.T, tol=TOL, max_iters=MAX_ITERS, workspace=workspace, out=own)
    assert into.eigenvectors.data_ptr() == own.data_ptr()
    assert torch.equal(into.eigenvalues, plain.eigenvalues) and torch.equal(into.eigenvectors, plain.eigenvectors)


def test_lobpcg_moves_the_active_residuals_up_in_place(matrix):
    # The residuals are formed in the rows of S that expand() fills; with a converged pair between two active ones
    # the active residuals must move up, normalised, exactly as the gathered copy R[idx] / ||R[idx]|| would be.
    X = torch.linalg.qr(torch.randn(N, 4, generator=torch.Generator().manual_seed(2), dtype=F64))[0]
    solve = lobpcg.LOBPCG(DenseOperator(matrix), X, 4, "LM", 1e-12)
    solve.update()
    R = solve._R.clone()
    assert torch.allclose(R, (matrix @ solve.S[:4].T).T - solve.theta[:, None] * solve.S[:4], atol=1e-12)
    solve._active = torch.tensor([True, False, True, True])
    solve.expand()
    idx = [0, 2, 3]
    expected = R[idx] / blocks.row_norms(R[idx])[:, None]
    assert solve._m == 4 + 3
    assert torch.equal(solve.S[4:7], expected)
    assert torch.allclose(solve.AS[4:7], (matrix @ expected.T).T, atol=1e-12)
