"""The fused CPU passes of the multistep step: the compiled loops and their torch fallback against float64
references, determinism across thread counts, the fallback rules, and the solvers with and without them."""

import pytest
import torch

import exponential_euler_solver as euler
from exponential_euler_solver import Stop, integrate
from exponential_euler_solver.linalg import fused

from conftest import tiny_classifier

COMPILED = fused.available(torch.zeros(1))
needs_compiler = pytest.mark.skipif(not COMPILED, reason="no C compiler: the compiled loops are not built")


@pytest.fixture(params=["compiled", "torch"])
def mode(request, monkeypatch):
    """Run a test with the compiled loops (skipped without a compiler) and with torch operations."""
    if request.param == "compiled" and not COMPILED:
        pytest.skip("no C compiler")
    monkeypatch.setenv(fused.ENV_SWITCH, "1" if request.param == "compiled" else "0")
    fused._library.cache_clear()
    yield request.param
    fused._library.cache_clear()


def _vectors(n, m, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # entries over several decades, as gradients have
    return [torch.randn(n, generator=gen, dtype=torch.float64).mul_(10.0 ** torch.randint(-3, 3, (n,), generator=gen))
            .to(dtype) for _ in range(m)]


def _basis(n, k, dtype, layout, seed=1):
    gen = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0].to(dtype)
    if layout == "columns":  # one vector per row of a (k, n) block, as the tracker stores them
        V = V.T.contiguous().T
    return V


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("k,layout", [(0, None), (1, "columns"), (3, "columns"), (3, "rows")])
@pytest.mark.parametrize("three", [False, True])
def test_combine_against_float64(mode, dtype, rel, k, layout, three):
    n = 3 * fused.BLOCK + 123  # a ragged last block
    x0, x1, x2, base = _vectors(n, 4, dtype)
    terms = [(x0, -0.013), (x1, 0.0071)] + ([(x2, 0.25)] if three else [])
    V = _basis(n, k, dtype, layout) if k else None
    coef = torch.tensor([0.3, -1.7, 2.2][:k], dtype=torch.float64) if k else None
    out, shifted = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    inputs = [t.clone() for t in (x0, x1, x2, base)]
    sq = fused.combine(terms, V, coef, out=out, base=base, shifted=shifted)
    ref = sum(c * x.double() for x, c in terms)
    if k:
        ref = ref + V.double() @ coef
    assert torch.allclose(out.double(), ref, rtol=0, atol=rel * 10 * ref.abs().max())
    moved = base.double() + ref
    assert torch.allclose(shifted.double(), moved, rtol=0, atol=rel * 10 * moved.abs().max())
    assert sq == pytest.approx(float(ref @ ref), rel=10 * rel)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (x0, x1, x2, base)))  # inputs untouched


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("k", [0, 2])
def test_combine_moves_the_base_in_place(mode, dtype, rel, k):
    n = 2 * fused.BLOCK + 77
    x0, x1, base = _vectors(n, 3, dtype)
    V = _basis(n, k, dtype, "columns") if k else None
    coef = torch.tensor([0.4, -1.1][:k], dtype=torch.float64) if k else None
    before, out = base.clone(), torch.empty(n, dtype=dtype)
    sq = fused.combine([(x0, 0.02), (x1, -0.5)], V, coef, out=out, base=base, shifted=base)
    ref = 0.02 * x0.double() - 0.5 * x1.double() + (V.double() @ coef if k else 0)
    assert torch.allclose(out.double(), ref, rtol=0, atol=rel * 10 * ref.abs().max())
    moved = before.double() + ref
    assert torch.allclose(base.double(), moved, rtol=0, atol=rel * 10 * moved.abs().max())
    assert sq == pytest.approx(float(ref @ ref), rel=10 * rel)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("k,layout", [(0, None), (2, "columns"), (4, "rows")])
@pytest.mark.parametrize("four", [False, True])
def test_residual_against_float64(dtype, rel, k, layout, four):
    if not COMPILED:
        pytest.skip("no C compiler")
    n = 2 * fused.BLOCK + 77
    x0, x1, x2, x3 = _vectors(n, 4, dtype, seed=3)
    terms = [(x0, 1.0), (x1, -2.2), (x2, 1.15)] + ([(x3, 0.05)] if four else [])
    V = _basis(n, k, dtype, layout) if k else None
    q = torch.tensor([0.5, -0.25, 1.5, 0.1][:k], dtype=torch.float64) if k else None
    ee, proj, sq0 = fused.residual(terms, V, q)
    assert sq0 == pytest.approx(float(x0.double() @ x0.double()), rel=10 * rel)
    e = sum(c * x.double() for x, c in terms)
    if k:
        e = e + V.double() @ q
        assert proj.dtype == torch.float64
        assert torch.allclose(proj, V.double().T @ x0.double(), rtol=0, atol=10 * rel * x0.double().norm())
    else:
        assert proj is None
    assert ee == pytest.approx(float(e @ e), rel=10 * rel)


def test_residual_keeps_its_digits_where_the_terms_cancel():
    """A second difference of nearly equal gradients: the sum is formed entry by entry, so ||e|| is relative to
    itself, not to the terms (the torch path's expansion would lose it)."""
    if not COMPILED:
        pytest.skip("no C compiler")
    n = fused.BLOCK + 5
    (g,) = _vectors(n, 1, torch.float64, seed=4)
    d = 1e-6 * _vectors(n, 1, torch.float64, seed=5)[0]
    terms = [(g + 2 * d, 1.0), (g + d, -2.0), (g, 1.0)]  # e = 0 exactly in exact arithmetic, up to rounding of d
    exact = sum(c * x for x, c in terms)
    ee, _, _ = fused.residual(terms)
    assert ee == pytest.approx(float(exact @ exact), rel=1e-6)


@needs_compiler
def test_sums_do_not_depend_on_the_number_of_threads():
    n = 5 * fused.BLOCK + 9
    x0, x1, x2, base = _vectors(n, 4, torch.float32, seed=6)
    V = _basis(n, 3, torch.float32, "columns")
    coef = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out, sh = torch.empty(n), torch.empty(n)
            sq = fused.combine([(x0, 0.1), (x1, -0.2), (x2, 0.3)], V, coef, out=out, base=base, shifted=sh)
            ee, proj, sq0 = fused.residual([(x0, 1.0), (x1, -2.0), (x2, 1.0)], V, coef)
            results.append((sq, out, sh, ee, proj, sq0))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert (r[0], r[3], r[5]) == (results[0][0], results[0][3], results[0][5])
        assert all(torch.equal(a, b) for a, b in zip(r[1:3] + r[4:5], results[0][1:3] + results[0][4:5]))


@needs_compiler
def test_what_the_loops_do_not_take_goes_to_torch():
    x = torch.zeros(10)
    assert fused.available(x, None, torch.zeros(10, 2))
    assert not fused.available(x, torch.zeros(10, dtype=torch.float64))  # mixed dtypes
    assert not fused.available(torch.zeros(10, dtype=torch.float16))
    assert not fused.available(torch.zeros(20)[::2])  # a strided vector
    assert fused.residual([(torch.zeros(10)[::2], 1.0)] * 3) is None
    out = torch.empty(5)
    assert fused.combine([(torch.arange(10.0)[::2], 2.0), (torch.ones(5), 1.0)], out=out) == pytest.approx(
        float(((2 * torch.arange(10.0)[::2] + 1) ** 2).sum()))
    with pytest.raises(ValueError, match="two or three terms"):
        fused.combine([(x, 1.0)], out=torch.empty(10))
    with pytest.raises(ValueError, match="three or four terms"):
        fused.residual([(x, 1.0)] * 5)


def test_a_compiler_that_fails_warns_once_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that exits 1
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    monkeypatch.setattr(fused, "cache_dir", lambda: str(tmp_path / "kernels"))
    fused._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built with 'false'"):
            assert not fused.available(torch.zeros(3))
        assert not fused.available(torch.zeros(3))  # decided once per process: no second warning
        out = torch.empty(3)
        assert fused.combine([(torch.ones(3), 2.0), (torch.ones(3), 1.0)], out=out) == pytest.approx(27.0)
        assert list((tmp_path / "kernels").iterdir()) == []  # nothing half-written left behind
    finally:
        fused._library.cache_clear()


def test_the_switch_turns_the_loops_off(monkeypatch):
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    fused._library.cache_clear()
    try:
        assert fused._library() is None and not fused.available(torch.zeros(3))
    finally:
        fused._library.cache_clear()


@needs_compiler
@pytest.mark.parametrize("make", [
    lambda p, loss: euler.AdaptiveGradientDescent(p, loss, 0.5),
    lambda p, loss: euler.ExponentialEulerSolver(p, loss, 0.5, 2),
], ids=["adaptive", "exponential-euler"])
def test_solvers_follow_the_same_trajectory_with_and_without_the_loops(make, monkeypatch):
    loss, params = tiny_classifier(24)
    runs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(fused.ENV_SWITCH, switch)
        fused._library.cache_clear()
        solver = make(2 * params.clone(), loss)
        reports = [solver.step() for _ in range(25)]
        runs[switch] = (solver.params.clone(), [r.dt for r in reports], solver.n_grad, solver.n_rejected)
    fused._library.cache_clear()
    (p1, dt1, g1, r1), (p0, dt0, g0, r0) = runs["1"], runs["0"]
    assert (g1, r1) == (g0, r0)
    assert dt1 == pytest.approx(dt0, rel=1e-9)
    assert torch.allclose(p1, p0, rtol=0, atol=1e-10 * p0.abs().max())


def test_the_step_never_writes_over_the_delta_its_history_holds():
    loss, params = tiny_classifier(24)
    solver = euler.AdaptiveGradientDescent(2 * params.clone(), loss, 0.5)
    propose, seen = solver._propose, []

    def checked(dt):
        held = None if solver._history is None else solver._history.delta
        kept = None if held is None else held.clone()
        proposal = propose(dt)
        if held is not None:
            assert torch.equal(held, kept)  # read, not written over
            assert proposal.delta.data_ptr() != held.data_ptr()
            seen.append(proposal.delta.data_ptr())
        return proposal

    solver._propose = checked
    for _ in range(8):
        before = solver.params.clone()
        solver.step()
        assert torch.allclose(solver._history.delta, solver.params - before, rtol=0, atol=1e-14)
    assert len(seen) >= 6 and len(set(seen)) == 2  # two buffers, used in turn: no new memory per step


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_new_gradients_norm_from_the_error_pass_is_its_norm(dtype):
    """The error estimate's pass also sums ||g_new||^2, which the loop then takes instead of its own pass: the
    reports' slopes (-||g||^2) and the non-finite check rest on it."""
    loss, params = tiny_classifier(24)
    if dtype == torch.float32:
        loss = euler.LossFunction(torch.utils.data.TensorDataset(*(t.float() if t.is_floating_point() else t
                                                                    for t in loss.dataset.tensors)),
                                  loss.criterion, loss.net.float(), batch_size=loss.batch_size)
        params = params.float()
    solver = euler.AdaptiveGradientDescent(2 * params.clone(), loss, 0.5)
    error_norm, given = solver._error_norm, []

    def recorded(dt, proposal, new_grad):
        err = error_norm(dt, proposal, new_grad)
        given.append(proposal.new_grad_norm)
        return err

    solver._error_norm = recorded
    for _ in range(6):
        report = solver.step()
        g = solver.current_gradient().double()
        assert -report.new_slope == pytest.approx(float(g @ g), rel=1e-12 if dtype == torch.float64 else 1e-6)
    assert given[0] is None and len(given) >= 6 and all(n is not None for n in given[1:])  # the first step is one-step


def _ulps(a, b):
    """Largest |a - b| in units of the spacing of floats at |b| (float64 arithmetic)."""
    spacing = torch.finfo(b.dtype).eps * b.abs().clamp_min(torch.finfo(b.dtype).tiny)
    return float(((a.double() - b.double()).abs() / spacing.double()).max())


@pytest.mark.parametrize("make", [
    lambda p, loss: euler.AdaptiveGradientDescent(p, loss, 0.5),
    lambda p, loss: euler.ExponentialEulerSolver(p, loss, 0.5, 1)])
def test_a_rejected_candidate_formed_in_params_is_undone(make, monkeypatch):
    # The multistep step forms its candidate in params. Every retry must start from the point the step started
    # from (to one rounding per entry: params - delta after params + delta), and the run must agree with one whose
    # candidates are formed in a buffer of their own.
    loss, params = tiny_classifier(24)
    solver = make(2 * params.clone(), loss)
    integrate(solver, Stop(steps=4))  # past the one-step start
    start, seen = None, []
    propose = solver._propose

    def checked(dt):
        assert _ulps(solver.params, start) <= 1.0, _ulps(solver.params, start)
        proposal = propose(dt)
        seen.append(proposal.in_place)
        return proposal

    accepts = solver.controller.accepts
    calls = {"n": 0}

    def reject_every_first(**kw):  # each step's first candidate is rejected (as a rise of the loss would be)
        calls["n"] += 1
        return accepts(**kw) and calls["n"] % 2 == 0

    monkeypatch.setattr(solver, "_propose", checked)
    monkeypatch.setattr(solver.controller, "accepts", reject_every_first)
    for _ in range(3):
        start = solver.params.clone()
        report = solver.step()
        assert report.rejections == 1 and report.new_loss < report.loss
    assert seen.count(True) == 6
    # The same rejections with the candidate in a buffer of its own (the loop forms params + delta and copies it).
    other = make(2 * params.clone(), loss)
    integrate(other, Stop(steps=4))
    accepts2, calls2 = other.controller.accepts, {"n": 0}

    def reject_every_first2(**kw):
        calls2["n"] += 1
        return accepts2(**kw) and calls2["n"] % 2 == 0

    def in_buffer(dt, propose=other._propose):
        proposal = propose(dt)
        other.params.sub_(proposal.delta)  # as the loop undoes it, then hand it over as a plain proposal
        proposal.in_place, proposal.candidate = False, None
        return proposal

    monkeypatch.setattr(other, "_propose", in_buffer)
    monkeypatch.setattr(other.controller, "accepts", reject_every_first2)
    for _ in range(3):
        other.step()
    assert torch.allclose(other.params, solver.params, rtol=1e-6, atol=1e-9)


def test_an_error_while_evaluating_a_candidate_in_params_leaves_the_start_point(monkeypatch):
    loss, params = tiny_classifier(24)
    solver = euler.AdaptiveGradientDescent(2 * params.clone(), loss, 0.5)
    integrate(solver, Stop(steps=4))
    start = solver.params.clone()
    gradient = loss.gradient

    def interrupted(p):
        raise KeyboardInterrupt

    monkeypatch.setattr(loss, "gradient", interrupted)
    with pytest.raises(KeyboardInterrupt):
        solver.step()
    assert _ulps(solver.params, start) <= 1.0
    monkeypatch.setattr(loss, "gradient", gradient)
    report = solver.step()  # the run goes on from there
    assert report.new_loss < report.loss
