"""Tests for exponential_euler_solver.loss.LossFunction against plain autograd and dense torch.func references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from exponential_euler_solver import ExponentialEulerSolver, GaussNewtonOperator, HessianOperator, LossFunction

from conftest import N_CLASSES, make_mlp, tiny_data, unflatten_reference

F64 = torch.float64


def hvp(loss, theta, V, chunk_size=None):
    """The old ``loss.hvp(theta, V)``: the Hessian operator's product (``(P,)`` or ``(P, m)``)."""
    return HessianOperator(loss, theta, chunk_size=chunk_size) @ V


def gnvp(loss, theta, V, chunk_size=None):
    """The old ``loss.gnvp(theta, V)``: the Gauss-Newton operator's product."""
    return GaussNewtonOperator(loss, theta, chunk_size=chunk_size) @ V


def _block(n_params: int, m: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_params, m, generator=gen, dtype=F64)


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _assert_state_unchanged(net: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = net.state_dict()
    assert list(after) == list(before), f"state_dict keys changed: {list(before)} -> {list(after)}"
    for key, old in before.items():
        new = after[key]
        assert new.dtype == old.dtype and new.device == old.device and new.shape == old.shape, \
            f"{key}: {old.dtype}/{old.device}/{tuple(old.shape)} -> {new.dtype}/{new.device}/{tuple(new.shape)}"
        assert torch.equal(new, old), \
            f"{key} changed: max |new - old| = {float((new.double() - old.double()).abs().max()):.3e}; " \
            f"before {old.flatten()[:4].tolist()}, after {new.flatten()[:4].tolist()}"


# ----------------------------------------------------------------------------------------------------------------
# value and gradient
def test_forward_equals_reference_loss(tiny_problem):
    loss = LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net)
    value = loss.forward(tiny_problem.theta)
    expected = tiny_problem.loss(tiny_problem.theta)
    assert value.ndim == 0 and value.dtype == F64
    assert abs(float(value) - float(expected)) <= 1e-12 * abs(float(expected)), \
        f"forward {float(value):.17g} != reference {float(expected):.17g}"
    assert float(loss(tiny_problem.theta)) == float(value), "__call__ differs from forward"


@pytest.mark.parametrize("batch_size", [None, 5])
def test_gradient_equals_autograd(tiny_problem, close, batch_size):
    kwargs = {} if batch_size is None else {"batch_size": batch_size}
    loss = LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net, **kwargs)
    value, g = loss.gradient(tiny_problem.theta)

    theta = tiny_problem.theta.clone().requires_grad_(True)
    ref_value = tiny_problem.loss(theta)
    (ref_g,) = torch.autograd.grad(ref_value, theta)

    assert g.shape == theta.shape and g.dtype == F64 and not g.requires_grad and not value.requires_grad
    assert abs(float(value) - float(ref_value.detach())) <= 1e-12 * abs(float(ref_value.detach())), \
        f"loss {float(value):.17g} != reference {float(ref_value.detach()):.17g}"
    err = float((g - ref_g).abs().max())
    assert err <= 1e-12, f"max |grad - autograd| = {err:.3e} (max |autograd| = {float(ref_g.abs().max()):.3e})"
    close(g, ref_g, 1e-12, "gradient vs autograd (normwise)")


# ----------------------------------------------------------------------------------------------------------------
# curvature products
PRODUCT_CASES = [
    pytest.param(None, None, id="one-batch-default-chunk"),
    pytest.param(5, None, id="batch5-default-chunk"),
    pytest.param(None, 1, id="chunk1"),
    pytest.param(None, 2, id="chunk2"),
    pytest.param(None, 4, id="chunk4"),
    pytest.param(5, 2, id="batch5-chunk2"),
    pytest.param(5, 4, id="batch5-chunk4"),
]


def _loss(problem, batch_size, chunk):
    kwargs = {} if batch_size is None else {"batch_size": batch_size}
    return LossFunction(problem.dataset, nn.CrossEntropyLoss(), problem.net, hvp_chunk_size=chunk, **kwargs)


@pytest.mark.parametrize("batch_size,chunk", PRODUCT_CASES)
def test_hvp_equals_dense_hessian(tiny_problem_shared, dense_hessian, close, batch_size, chunk):
    problem = tiny_problem_shared
    loss = _loss(problem, batch_size, chunk)
    V = _block(problem.n_params, 4)
    v = V[:, 0].clone()

    hv = hvp(loss, problem.theta, v)
    assert hv.shape == v.shape and hv.dtype == F64
    close(hv, dense_hessian @ v, 1e-6, f"hvp(vector), batch_size={batch_size}, chunk={chunk}")

    HV = hvp(loss, problem.theta, V)
    assert HV.shape == V.shape
    close(HV, dense_hessian @ V, 1e-6, f"hvp(P x 4 block), batch_size={batch_size}, chunk={chunk}")

    # 3 columns: a chunk of 2 or 4 leaves a ragged last chunk.
    HV3 = hvp(loss, problem.theta, V[:, :3])
    close(HV3, dense_hessian @ V[:, :3], 1e-6, f"hvp(P x 3 block), batch_size={batch_size}, chunk={chunk}")


@pytest.mark.parametrize("chunk", [1, 2])
def test_hvp_of_a_loss_linear_in_the_parameters_is_zero(chunk):
    # A linear model under a criterion linear in its outputs: the gradient has no graph to differentiate again,
    # which the reverse-over-reverse loop (chunk 1) must read as a zero Hessian, as forward mode does.
    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(6, 3, generator=gen, dtype=F64), torch.zeros(6, dtype=F64))
    loss = LossFunction(ds, lambda out, y: (out[:, 0] - y).sum(), nn.Linear(3, 1).double(), hvp_chunk_size=chunk)
    V = _block(loss.n_params, 3)
    HV = hvp(loss, loss.initialize_parameters(dtype=F64), V)
    assert HV.shape == V.shape and torch.equal(HV, torch.zeros_like(V)), HV


@pytest.mark.parametrize("batch_size,chunk", PRODUCT_CASES)
def test_gnvp_equals_dense_gauss_newton(tiny_problem_shared, dense_gauss_newton, close, batch_size, chunk):
    problem = tiny_problem_shared
    loss = _loss(problem, batch_size, chunk)
    V = _block(problem.n_params, 4, seed=4)

    gv = gnvp(loss, problem.theta, V[:, 0])
    assert gv.shape == (problem.n_params,)
    close(gv, dense_gauss_newton @ V[:, 0], 1e-6, f"gnvp(vector), batch_size={batch_size}, chunk={chunk}")
    close(gnvp(loss, problem.theta, V), dense_gauss_newton @ V, 1e-6,
          f"gnvp(P x 4 block), batch_size={batch_size}, chunk={chunk}")


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunk_size_given_to_the_operator(tiny_problem_shared, dense_hessian, dense_gauss_newton, close, chunk):
    # The operators' own chunk_size= (instead of the LossFunction's hvp_chunk_size=) gives the same products.
    problem = tiny_problem_shared
    loss = _loss(problem, 5, None)
    V = _block(problem.n_params, 4, seed=5)
    op = HessianOperator(loss, problem.theta, chunk_size=chunk)
    assert op.chunk_size == chunk
    close(op @ V, dense_hessian @ V, 1e-6, f"HessianOperator(chunk_size={chunk})")
    close(gnvp(loss, problem.theta, V, chunk_size=chunk), dense_gauss_newton @ V, 1e-6,
          f"GaussNewtonOperator(chunk_size={chunk})")


def test_hvp_rejects_wrong_vector_shape(tiny_problem):
    # The operators' matmat names the block X and the shapes it accepts.
    loss = LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net)
    P = tiny_problem.n_params
    with pytest.raises(ValueError, match=rf"X must have shape \({P},\) or \({P}, m\)"):
        hvp(loss, tiny_problem.theta, torch.zeros(P + 1, dtype=F64))
    with pytest.raises(ValueError, match="X must have shape"):
        gnvp(loss, tiny_problem.theta, torch.zeros(2, P, dtype=F64))
    with pytest.raises(ValueError, match="X must have shape"):
        hvp(loss, tiny_problem.theta, torch.zeros(P, 2, 1, dtype=F64))


# ----------------------------------------------------------------------------------------------------------------
# criterion reductions
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_reduction_gives_the_mean_loss(tiny_problem, close, reduction):
    theta = tiny_problem.theta
    criterion = nn.CrossEntropyLoss(reduction=reduction)
    loss = LossFunction(tiny_problem.dataset, criterion, tiny_problem.net, batch_size=5)
    assert criterion.reduction == reduction, f"criterion.reduction changed to {criterion.reduction!r}"

    ref_theta = theta.clone().requires_grad_(True)
    ref_value = tiny_problem.loss(ref_theta)
    (ref_g,) = torch.autograd.grad(ref_value, ref_theta)

    value = loss.forward(theta)
    value_g, g = loss.gradient(theta)
    for name, got in (("forward", value), ("gradient's loss", value_g)):
        assert abs(float(got) - float(ref_value.detach())) <= 1e-12 * abs(float(ref_value.detach())), \
            f"reduction={reduction!r}: {name} {float(got):.17g} != mean loss {float(ref_value.detach()):.17g}"
    close(g, ref_g, 1e-12, f"gradient with reduction={reduction!r}")
    v = _block(tiny_problem.n_params, 1, seed=9)[:, 0]
    close(hvp(loss, theta, v), tiny_problem.hessian() @ v, 1e-6, f"hvp with reduction={reduction!r}")
    close(gnvp(loss, theta, v), tiny_problem.gauss_newton() @ v, 1e-6, f"gnvp with reduction={reduction!r}")
    assert criterion.reduction == reduction, f"criterion.reduction changed to {criterion.reduction!r}"


def test_plain_function_criterion_is_read_as_mean(tiny_problem):
    loss = LossFunction(tiny_problem.dataset, F.cross_entropy, tiny_problem.net, batch_size=7)
    value = float(loss.forward(tiny_problem.theta))
    expected = float(tiny_problem.loss(tiny_problem.theta))
    assert abs(value - expected) <= 1e-12 * abs(expected), f"{value:.17g} != {expected:.17g}"


# ----------------------------------------------------------------------------------------------------------------
# the caller's objects are left alone
class _Shift(nn.Module):
    """Adds a constant registered buffer."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, n, dtype=F64))

    def forward(self, x):
        return x + self.shift


def _net_with_buffers(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), _Shift(4), nn.Linear(4, N_CLASSES)).double()
    bn = net[1]
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial running statistics, so a wrong buffer shows in the loss
        bn.running_mean.copy_(torch.randn(4, generator=gen, dtype=F64))
        bn.running_var.copy_(0.5 + torch.rand(4, generator=gen, dtype=F64))
        bn.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_net_and_criterion_are_not_modified(reduction):
    X, y = tiny_data()
    net = _net_with_buffers()
    before = _state(net)
    params_before = [p for p in net.parameters()]
    requires_grad = [p.requires_grad for p in net.parameters()]
    criterion = nn.CrossEntropyLoss(reduction=reduction)

    loss = LossFunction(TensorDataset(X, y), criterion, net, batch_size=5, hvp_chunk_size=2)
    gen = torch.Generator().manual_seed(5)
    theta = 0.5 * torch.randn(loss.n_params, generator=gen, dtype=F64)
    V = torch.randn(loss.n_params, 3, generator=gen, dtype=F64)
    loss.forward(theta)
    loss.gradient(theta)
    hvp(loss, theta, V)
    gnvp(loss, theta, V)
    torch.manual_seed(0)
    loss.initialize_parameters(dtype=F64)
    loss.parameters_of_net()

    _assert_state_unchanged(net, before)
    assert not net.training, "net was switched to training mode"
    assert all(a is b for a, b in zip(params_before, net.parameters())), "the net's Parameter objects were replaced"
    assert [p.requires_grad for p in net.parameters()] == requires_grad
    assert all(p.grad is None for p in net.parameters()), "gradients were accumulated into the user's net"
    assert criterion.reduction == reduction, f"criterion.reduction changed from {reduction!r} to " \
                                             f"{criterion.reduction!r}"


def test_construction_does_not_run_the_users_net_in_train_mode():
    # A BatchNorm network in training mode: running the user's module itself (even under no_grad) updates its
    # running statistics. The loss wrapper promises never to change the caller's objects.
    X, y = tiny_data()
    net = _net_with_buffers().train()
    before = _state(net)
    loss = LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), net)
    _assert_state_unchanged(net, before)
    loss.forward(loss.parameters_of_net(dtype=F64))
    _assert_state_unchanged(net, before)


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm in training mode: batch statistics, the user's running statistics untouched; Dropout refused
BN_EPS = 1e-5


def _bn_train_net(seed: int = 0) -> nn.Module:
    """Linear(5, 6) -> BatchNorm1d(6) -> tanh -> Linear(6, 3), float64, in training mode, with running statistics
    far from any batch's (so using them instead of the batch's would show in the loss)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, eps=BN_EPS), nn.Tanh(), nn.Linear(6, N_CLASSES)).double()
    gen = torch.Generator().manual_seed(seed + 200)
    with torch.no_grad():
        net[1].running_mean.copy_(3 * torch.randn(6, generator=gen, dtype=F64))
        net[1].running_var.copy_(4 + torch.rand(6, generator=gen, dtype=F64))
        net[1].num_batches_tracked.fill_(11)
    return net.train()


def _bn_reference_loss(net: nn.Module, theta: torch.Tensor, X, y, batch_size: int) -> torch.Tensor:
    """The mean cross-entropy with each batch normalised by its own statistics (mean and biased variance over
    the batch), written out (no running statistics at all).

    The normalisation is spelled out rather than taken from ``F.batch_norm(training=True)``: their values agree
    (checked in the test), but in torch 2.13 ``torch.func.hessian`` (and ``jacrev(jacrev)``) of
    ``F.batch_norm(training=True)`` gets the block mixing the layer's input and its weight wrong (off by O(1)
    against central differences of the gradient), so it could not serve as the Hessian reference."""
    p = unflatten_reference(net, theta)
    total = theta.new_zeros(())
    for start in range(0, X.shape[0], batch_size):
        xb, yb = X[start:start + batch_size], y[start:start + batch_size]
        z = F.linear(xb, p["0.weight"], p["0.bias"])
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + BN_EPS) * p["1.weight"] + p["1.bias"]
        out = F.linear(torch.tanh(z), p["3.weight"], p["3.bias"])
        total = total + F.cross_entropy(out, yb, reduction="sum")
    return total / X.shape[0]


@pytest.mark.parametrize("batch_size", [12, 5])
def test_batchnorm_in_training_mode_uses_batch_statistics(close, batch_size):
    X, y = tiny_data()
    net = _bn_train_net()
    before = _state(net)
    loss = LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), net, batch_size=batch_size)
    gen = torch.Generator().manual_seed(31)
    theta = 0.6 * torch.randn(loss.n_params, generator=gen, dtype=F64)

    ref_theta = theta.clone().requires_grad_(True)
    ref_value = _bn_reference_loss(net, ref_theta, X, y, batch_size)
    (ref_g,) = torch.autograd.grad(ref_value, ref_theta)
    value, g = loss.gradient(theta)
    forward = float(loss.forward(theta))
    expected = float(ref_value.detach())
    # The written-out normalisation is torch's training-mode batch norm.
    z = F.linear(X[:batch_size], *(unflatten_reference(net, theta)[k] for k in ("0.weight", "0.bias")))
    p1 = unflatten_reference(net, theta)
    written = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + BN_EPS) * p1["1.weight"] + p1["1.bias"]
    close(written, F.batch_norm(z, None, None, p1["1.weight"], p1["1.bias"], training=True, eps=BN_EPS), 1e-13,
          "written-out batch norm vs F.batch_norm(training=True)")
    for name, got in (("forward", forward), ("gradient's loss", float(value))):
        assert abs(got - expected) <= 1e-12 * abs(expected), \
            f"batch_size={batch_size}: {name} {got:.17g} != batch-statistics reference {expected:.17g}"
    # With the running statistics the loss would be another number (the test data must tell them apart).
    running = float(F.cross_entropy(torch.func.functional_call(net.eval(), unflatten_reference(net, theta), (X,)), y))
    net.train()
    assert abs(running - expected) > 1e-3 * expected, (running, expected)
    close(g, ref_g, 1e-12, f"gradient with BatchNorm in training mode, batch_size={batch_size}")
    V = _block(loss.n_params, 2, seed=32)
    H = torch.func.hessian(lambda t: _bn_reference_loss(net, t, X, y, batch_size))(theta)
    close(hvp(loss, theta, V), H @ V, 1e-8, f"Hessian product with BatchNorm in training mode, batch_size={batch_size}")
    _assert_state_unchanged(net, before)
    assert net.training and net[1].training, "the user's net left training mode"


def test_batchnorm_in_training_mode_trains_and_leaves_the_net_alone():
    X, y = tiny_data()
    net = _bn_train_net(seed=1)
    before = _state(net)
    loss = LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), net)
    gen = torch.Generator().manual_seed(33)
    theta = 0.6 * torch.randn(loss.n_params, generator=gen, dtype=F64)
    params = theta.clone()
    solver = ExponentialEulerSolver(params, loss, 1.0, 2)
    reports = [solver.step() for _ in range(4)]
    # Every step lowers the loss, and the losses reported are those of the batch-statistics reference.
    for r in reports:
        assert r.new_loss < r.loss, f"step {r.step}: loss {r.loss!r} -> {r.new_loss!r}"
    start, end = (float(_bn_reference_loss(net, t, X, y, 12)) for t in (theta, params))
    assert abs(reports[0].loss - start) <= 1e-12 * start, (reports[0].loss, start)
    assert abs(reports[-1].new_loss - end) <= 1e-12 * end, (reports[-1].new_loss, end)
    assert end < start, (start, end)
    _assert_state_unchanged(net, before)  # running_mean, running_var, num_batches_tracked and the weights
    assert net.training and all(m.training for m in net.modules()), "the user's net left training mode"


def test_dropout_in_training_mode_is_refused():
    X, y = tiny_data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, N_CLASSES)).double().train()
    with pytest.raises(ValueError, match=r"Dropout in training mode.*net\.eval\(\)"):
        LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), net)
    # In eval mode (or with p = 0) Dropout is the identity and is accepted.
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    with torch.no_grad():
        reference = float(F.cross_entropy(net[3](torch.tanh(net[0](X))), y))
    for label, module in (("eval", net.eval()),
                          ("p=0", nn.Sequential(net[0], nn.Dropout(0.0), nn.Tanh(), net[3]).train())):
        value = float(LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), module).forward(theta))
        assert abs(value - reference) <= 1e-12 * reference, f"{label}: {value!r} != {reference!r}"


def test_float32_net_with_float64_data_and_params(close):
    # The net's parameters only define the layout (docstring); params and data are float64 here.
    X, y = tiny_data()
    net32 = make_mlp().float()
    net64 = make_mlp().double()  # same seed: the same architecture, used by the reference
    before = _state(net32)
    loss = LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), net32)
    gen = torch.Generator().manual_seed(2)
    theta = 0.7 * torch.randn(loss.n_params, generator=gen, dtype=F64)
    value, g = loss.gradient(theta)
    ref_theta = theta.clone().requires_grad_(True)
    ref_value = F.cross_entropy(torch.func.functional_call(net64, _unflatten(net64, ref_theta), (X,)), y)
    (ref_g,) = torch.autograd.grad(ref_value, ref_theta)
    assert g.dtype == F64
    assert abs(float(value) - float(ref_value.detach())) <= 1e-12 * float(ref_value.detach()), \
        f"{float(value):.17g} != {float(ref_value.detach()):.17g}"
    close(g, ref_g, 1e-12, "gradient with a float32 net")
    _assert_state_unchanged(net32, before)


def _unflatten(net, theta):
    out, offset = {}, 0
    for name, p in net.named_parameters():
        out[name] = theta[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    return out


def test_network_with_buffers(problem_factory, close):
    X, y = tiny_data()
    problem = problem_factory(_net_with_buffers(), (X,), y, seed=6)
    loss = LossFunction(problem.dataset, nn.CrossEntropyLoss(), problem.net, batch_size=5, hvp_chunk_size=2)
    assert loss.n_params == problem.n_params
    theta = problem.theta
    expected = float(problem.loss(theta))
    assert abs(float(loss.forward(theta)) - expected) <= 1e-12 * expected, \
        f"forward {float(loss.forward(theta)):.17g} != reference {expected:.17g}"
    ref_theta = theta.clone().requires_grad_(True)
    (ref_g,) = torch.autograd.grad(problem.loss(ref_theta), ref_theta)
    close(loss.gradient(theta)[1], ref_g, 1e-12, "gradient with buffers")
    V = _block(problem.n_params, 3, seed=7)
    close(hvp(loss, theta, V), problem.hessian() @ V, 1e-6, "hvp with buffers")
    close(gnvp(loss, theta, V), problem.gauss_newton() @ V, 1e-6, "gnvp with buffers")


class _TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.a = nn.Linear(5, 4).double()
        self.b = nn.Linear(2, 4).double()
        self.out = nn.Linear(4, N_CLASSES).double()

    def forward(self, x1, x2):
        return self.out(torch.tanh(self.a(x1) + self.b(x2)))


class _TupleDataset(Dataset):
    """A map-style dataset (not a TensorDataset) yielding (x1, x2, y)."""

    def __init__(self, x1, x2, y):
        self.x1, self.x2, self.y = x1, x2, y

    def __len__(self):
        return self.y.shape[0]

    def __getitem__(self, i):
        return self.x1[i], self.x2[i], self.y[i]


@pytest.mark.parametrize("kind", ["TensorDataset", "map-style"])
def test_two_input_network(problem_factory, close, kind):
    X1, y = tiny_data()
    gen = torch.Generator().manual_seed(12)
    X2 = torch.randn(X1.shape[0], 2, generator=gen, dtype=F64)
    problem = problem_factory(_TwoInputNet(), (X1, X2), y, seed=13)
    dataset = problem.dataset if kind == "TensorDataset" else _TupleDataset(X1, X2, y)
    loss = LossFunction(dataset, nn.CrossEntropyLoss(), problem.net, batch_size=5)
    theta = problem.theta
    expected = float(problem.loss(theta))
    assert abs(float(loss.forward(theta)) - expected) <= 1e-12 * expected, \
        f"forward {float(loss.forward(theta)):.17g} != reference {expected:.17g}"
    ref_theta = theta.clone().requires_grad_(True)
    (ref_g,) = torch.autograd.grad(problem.loss(ref_theta), ref_theta)
    value, g = loss.gradient(theta)
    close(g, ref_g, 1e-12, f"gradient, two inputs, {kind}")
    V = _block(problem.n_params, 2, seed=14)
    close(hvp(loss, theta, V), problem.hessian() @ V, 1e-6, f"hvp, two inputs, {kind}")
    close(gnvp(loss, theta, V), problem.gauss_newton() @ V, 1e-6, f"gnvp, two inputs, {kind}")


# ----------------------------------------------------------------------------------------------------------------
# initialisation
def _big_loss():
    torch.manual_seed(21)
    net = nn.Sequential(nn.Linear(300, 400), nn.BatchNorm1d(400), nn.Tanh(), nn.Linear(400, 7)).double().eval()
    gen = torch.Generator().manual_seed(22)
    X = torch.randn(3, 300, generator=gen, dtype=F64)
    y = torch.randint(0, 7, (3,), generator=gen)
    return net, LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), net)


@pytest.mark.parametrize("gain", [math.sqrt(2.0), 1.0])
def test_initialize_parameters(gain):
    net, loss = _big_loss()
    before = _state(net)
    torch.manual_seed(123)
    theta = loss.initialize_parameters(gain=gain, dtype=F64)
    torch.manual_seed(123)
    again = loss.initialize_parameters(gain=gain, dtype=F64)
    torch.manual_seed(124)
    other = loss.initialize_parameters(gain=gain, dtype=F64)

    assert theta.shape == (loss.n_params,) and theta.dtype == F64 and theta.device.type == "cpu"
    assert torch.equal(theta, again), "torch.manual_seed does not reproduce initialize_parameters"
    assert not torch.equal(theta, other), "a different seed gave the same parameters"

    pieces = _unflatten(net, theta)
    for name in ("0.bias", "1.bias", "3.bias"):
        assert torch.count_nonzero(pieces[name]) == 0, f"{name} is not zero: {pieces[name][:4].tolist()}"
    assert torch.all(pieces["1.weight"] == 1), f"BatchNorm weight does not start at one: {pieces['1.weight'][:4]}"
    w = pieces["0.weight"]  # (400, 300): fan_in 300, fan_out 400
    expected_std = gain * math.sqrt(2.0 / (300 + 400))
    std, mean = float(w.std()), float(w.mean())
    assert abs(std / expected_std - 1) < 0.03, f"std {std:.5f} vs Xavier-normal {expected_std:.5f}"
    assert abs(mean) < 0.03 * expected_std, f"mean {mean:.2e} (std {expected_std:.4f})"
    _assert_state_unchanged(net, before)


def test_initialize_parameters_default_device_is_the_data_device():
    net, loss = _big_loss()
    theta = loss.initialize_parameters(dtype=torch.float32)
    assert theta.device == loss.data_device and theta.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# errors
def test_empty_dataset_raises():
    empty = TensorDataset(torch.empty(0, 5, dtype=F64), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="dataset"):
        LossFunction(empty, nn.CrossEntropyLoss(), make_mlp())


@pytest.mark.parametrize("bad,why", [
    (lambda n: torch.zeros(n + 1, dtype=F64), "wrong length"),
    (lambda n: torch.zeros(n - 1, dtype=F64), "too short"),
    (lambda n: torch.zeros(1, n, dtype=F64), "2-D"),
    (lambda n: torch.zeros(n, dtype=torch.int64), "integer dtype"),
    (lambda n: torch.zeros(n, dtype=torch.float32), "float32 params with float64 data"),
])
def test_check_params_raises_naming_the_argument(tiny_problem, bad, why):
    loss = LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net)
    params = bad(loss.n_params)
    with pytest.raises(ValueError, match="params"):
        loss.check_params(params)
    with pytest.raises(ValueError, match="theta0"):  # the name the caller passes is the one reported
        loss.check_params(params, name="theta0")
    loss.check_params(tiny_problem.theta)  # the right one passes


def test_check_params_rejects_non_tensor(tiny_problem):
    loss = LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net)
    with pytest.raises(TypeError, match="params"):
        loss.check_params(tiny_problem.theta.tolist())


@pytest.mark.parametrize("criterion", [
    pytest.param(lambda out, y: F.cross_entropy(out, y, reduction="none")[:, None], id="(n, 1)"),
    pytest.param(lambda out, y: F.cross_entropy(out, y, reduction="none")[None, :], id="(1, n)"),
    pytest.param(lambda out, y: (out - F.one_hot(y, N_CLASSES)).pow(2).mean(0), id="(classes,)"),
    pytest.param(lambda out, y: F.cross_entropy(out, y, reduction="none")[:1], id="(1,)"),
])
def test_criterion_with_wrong_output_shape_raises_at_construction(tiny_problem, criterion):
    with pytest.raises(ValueError, match="criterion"):
        LossFunction(tiny_problem.dataset, criterion, tiny_problem.net)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_size_raises(tiny_problem, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net, batch_size=batch_size)


def test_shuffle_raises(tiny_problem):
    with pytest.raises(ValueError, match="shuffle"):
        LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net, shuffle=True)
    # shuffle=False is allowed
    LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net, shuffle=False)


@pytest.mark.parametrize("chunk", [0, -1, 1.5])
def test_bad_hvp_chunk_size_raises(tiny_problem, chunk):
    with pytest.raises(ValueError, match="hvp_chunk_size"):
        LossFunction(tiny_problem.dataset, nn.CrossEntropyLoss(), tiny_problem.net, hvp_chunk_size=chunk)


class _WithUnusedParameter(nn.Module):
    """Two layers and a parameter the forward never reads (its gradient and curvature are zero)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.unused = nn.Parameter(torch.ones(5))
        self.second = nn.Linear(4, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("batch_size", [3, 7])  # three uneven batches, one
def test_gradient_and_hessian_products_per_parameter_match_dense_references(batch_size, close):
    # The gradient and the reverse-over-reverse products are taken with respect to the named parameter tensors
    # and laid out flat: compare with torch.func on the flat vector (the reference layout of conftest).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    net = _WithUnusedParameter().double()
    loss = LossFunction(TensorDataset(x, y), nn.CrossEntropyLoss(), net, batch_size=batch_size)
    theta = torch.randn(loss.n_params, generator=gen, dtype=torch.float64)

    def reference(t):
        return F.cross_entropy(torch.func.functional_call(net, unflatten_reference(net, t), (x,)), y)

    value, g = loss.gradient(theta)
    close(value, reference(theta), 1e-12, "loss")
    close(g, torch.func.grad(reference)(theta), 1e-12, "gradient")
    assert bool((unflatten_reference(net, g)["unused"] == 0).all())
    H = torch.func.hessian(reference)(theta)
    V = torch.randn(loss.n_params, 4, generator=gen, dtype=torch.float64)
    close(HessianOperator(loss, theta, chunk_size=1).matmat(V), H @ V, 1e-10, "reverse-over-reverse H @ V")
