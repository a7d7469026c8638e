"""Shared fixtures: a tiny float64 classification problem and dense references built without the library.

The references here never call :mod:`exponential_euler_solver`: the loss is written out with
:func:`torch.func.functional_call` and :func:`torch.nn.functional.cross_entropy`, the Hessian comes from
:func:`torch.func.hessian` of that loss, and the Gauss-Newton matrix is assembled as
``G = (1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n`` from :func:`torch.func.jacrev` of the outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import TensorDataset

import exponential_euler_solver.benchmark.suite as suite
from exponential_euler_solver import HessianOperator, LossFunction
from exponential_euler_solver.solvers.base import Solver

# The tests multiply tiny matrices. With torch's intra-op pool on this 2-core machine under load from other
# processes, a 59 x 15 matmul was measured at 23 ms with 2 threads and 0.01 ms with 1: one thread keeps the suite
# fast and its timings independent of the machine's load.
torch.set_num_threads(1)

N_EXAMPLES = 12
N_INPUTS = 5
N_CLASSES = 3


def pytest_configure(config):
    # Raised inside torch's forward-mode AD on first use (torch/_decomp/decompositions_for_jvp.py), not by us.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def make_mlp(seed: int = 0) -> nn.Module:
    """A float64 MLP 5 -> 4 -> tanh -> 4 -> ELU -> 3 (59 parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_INPUTS, 4), nn.Tanh(), nn.Linear(4, 4), nn.ELU(),
                         nn.Linear(4, N_CLASSES)).double()


def unflatten_reference(net: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    """The net's named parameters as views of ``theta``, in ``named_parameters()`` order (written here, not
    taken from the library)."""
    out, offset = {}, 0
    for name, p in net.named_parameters():
        out[name] = theta[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    assert offset == theta.numel(), "reference layout does not cover theta"
    return out


@dataclass
class Problem:
    """A classification problem with a reference loss and dense curvature matrices."""

    net: nn.Module
    inputs: tuple[Tensor, ...]
    labels: Tensor
    theta: Tensor  # a float64 point to test at (not the net's own parameters)

    @property
    def dataset(self) -> TensorDataset:
        return TensorDataset(*self.inputs, self.labels)

    @property
    def n_params(self) -> int:
        return self.theta.numel()

    def outputs(self, theta: Tensor) -> Tensor:
        # Only the parameters are replaced; buffers are the net's own.
        return functional_call(self.net, unflatten_reference(self.net, theta), self.inputs)

    def loss(self, theta: Tensor) -> Tensor:
        return F.cross_entropy(self.outputs(theta), self.labels, reduction="mean")

    def hessian(self, theta: Tensor | None = None) -> Tensor:
        theta = self.theta if theta is None else theta
        H = hessian(self.loss)(theta.detach())
        return (H + H.T) / 2

    def gauss_newton(self, theta: Tensor | None = None) -> Tensor:
        theta = self.theta if theta is None else theta
        theta = theta.detach()
        J = jacrev(self.outputs)(theta)  # (N, C, P)
        p = torch.softmax(self.outputs(theta), dim=1)  # (N, C)
        H_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # per-example Hessian of CE w.r.t. logits
        G = torch.einsum("ncp,ncd,ndq->pq", J, H_out, J) / self.labels.shape[0]
        return (G + G.T) / 2


def make_problem(net: nn.Module, inputs: tuple[Tensor, ...], labels: Tensor, seed: int = 1,
                 scale: float = 0.7) -> Problem:
    """A problem at a seeded random float64 point ``theta ~ scale * N(0, 1)``."""
    n_params = sum(p.numel() for p in net.parameters())
    gen = torch.Generator().manual_seed(seed)
    theta = scale * torch.randn(n_params, generator=gen, dtype=torch.float64)
    return Problem(net=net, inputs=tuple(inputs), labels=labels, theta=theta)


def tiny_data(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N_EXAMPLES, N_INPUTS, generator=gen, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (N_EXAMPLES,), generator=gen)
    return X, y


def assert_close_normwise(actual: Tensor, expected: Tensor, rtol: float, what: str = "") -> None:
    """``max|actual - expected| <= rtol * max|expected|``; a failure prints both norms and the worst entry."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if err > rtol * scale:
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: max |actual - expected| = {err:.3e} > rtol * max|expected| = {rtol:.1e} * {scale:.6e} "
            f"= {rtol * scale:.3e}; worst entry {idx}: actual {float(actual[idx]):.17g}, expected "
            f"{float(expected[idx]):.17g}")


# ----------------------------------------------------------------------------------------------------------------
# fixtures
@pytest.fixture
def tiny_problem() -> Problem:
    """A fresh tiny MLP (59 float64 parameters) on 12 seeded examples with 3 classes."""
    X, y = tiny_data()
    return make_problem(make_mlp(), (X,), y)


@pytest.fixture(scope="session")
def tiny_problem_shared() -> Problem:
    """As :func:`tiny_problem`, shared across tests that only read it."""
    X, y = tiny_data()
    return make_problem(make_mlp(), (X,), y)


@pytest.fixture(scope="session")
def dense_hessian(tiny_problem_shared) -> Tensor:
    """``torch.func.hessian`` of the reference mean cross-entropy at ``tiny_problem_shared.theta``."""
    return tiny_problem_shared.hessian()


@pytest.fixture(scope="session")
def dense_gauss_newton(tiny_problem_shared) -> Tensor:
    """The Gauss-Newton matrix of the tiny problem, assembled from the Jacobian of the outputs."""
    return tiny_problem_shared.gauss_newton()


@pytest.fixture
def close() -> Callable[..., None]:
    """The normwise comparison :func:`assert_close_normwise`."""
    return assert_close_normwise


@pytest.fixture
def problem_factory() -> Callable[..., Problem]:
    """:func:`make_problem`, for tests that need their own network."""
    return make_problem


class VectorNet(torch.nn.Module):
    """A 'network' whose output for every example is its parameter vector."""

    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(x.shape[0], -1)


def quadratic_problem(eigvals, seed=0):
    """L(theta) = 1/2 (theta - theta*)^T A (theta - theta*) with A = Q diag(eigvals) Q^T."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigvals)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor(eigvals, dtype=torch.float64)) @ Q.T
    A = (A + A.T) / 2
    target = torch.randn(n, generator=g, dtype=torch.float64)

    def criterion(out, _y):
        d = out - target
        return 0.5 * ((d @ A) * d).sum(-1)  # one loss per example

    ds = TensorDataset(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))
    loss = LossFunction(ds, criterion, VectorNet(n))
    theta0 = target + torch.randn(n, generator=g, dtype=torch.float64)
    return loss, A, target, theta0


@pytest.fixture
def one_thread():
    """torch at one thread for the test, the caller's count restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_classifier(n_examples: int) -> tuple[LossFunction, Tensor]:
    """A float64 6 -> 8 -> tanh -> 3 MLP with cross-entropy on ``n_examples`` random points (seed 0), through the
    library's LossFunction, and its initial parameters."""
    torch.manual_seed(0)
    X = torch.randn(n_examples, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n_examples,))
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    loss = LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), net)
    return loss, loss.initialize_parameters(dtype=torch.float64)


def count_suite_work(mp: pytest.MonkeyPatch) -> dict:
    """Count, per run of the benchmark suite (``suite.run``), gradients (calls of LossFunction.gradient),
    Hessian-vector products (columns multiplied by HessianOperator._matmat, below the operators' own counting),
    accepted steps (returns of Solver.step) and the totals after each step; keep each run's problem and its
    elapsed seconds. Returns {solver name: counts}, filled as the runs go."""
    counted, current = {}, [None]
    gradient, matmat, step, run = LossFunction.gradient, HessianOperator._matmat, Solver.step, suite.run

    def bump(key, n=1):
        if current[0] is not None:
            counted[current[0]][key] += n

    def counting_gradient(self, params):
        bump("grad")
        return gradient(self, params)

    def counting_matmat(self, X, *out):
        bump("hvp", X.shape[1])
        return matmat(self, X, *out)

    def counting_step(self):
        report = step(self)
        bump("steps")
        if current[0] is not None:
            c = counted[current[0]]
            c["after_step"].append((c["grad"], c["hvp"]))
        return report

    def counting_run(problem, solver, target, *, name, **kwargs):
        counted[name] = {"grad": 0, "hvp": 0, "steps": 0, "after_step": [], "problem": problem}
        current[0] = name
        start = time.perf_counter()
        try:
            return run(problem, solver, target, name=name, **kwargs)
        finally:
            counted[name]["elapsed"] = time.perf_counter() - start
            current[0] = None

    mp.setattr(LossFunction, "gradient", counting_gradient)
    mp.setattr(HessianOperator, "_matmat", counting_matmat)
    mp.setattr(Solver, "step", counting_step)
    mp.setattr(suite, "run", counting_run)
    return counted
