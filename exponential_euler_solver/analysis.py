"""The analysis these solvers exist for: layerwise Jacobians, curvature spectra along a trajectory, and plots.

* :func:`make_layerwise_jacobian_function`: per-example Jacobians between consecutive pre-activations of an MLP.
* :func:`top_eigenvalues_along`: top eigenvalues of the Hessian, the Gauss-Newton matrix G or the residual
  H = Hessian - G at each parameter vector a :class:`~exponential_euler_solver.trajectory.Trajectory` kept.
* :func:`plot_loss`, :func:`plot_eigenvalues`: PNG figures of a trajectory (needs the ``plot`` extra,
  matplotlib; imported only when a plot is drawn, with the Agg canvas, so the user's pyplot backend is untouched).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from .curvature import OPERATORS, GaussNewtonOperator, HessianOperator, ResidualOperator
from .files import atomic_write
from .linalg import top_eigenpairs
from .trajectory import Trajectory

__all__ = ["make_layerwise_jacobian_function", "top_eigenvalues_along", "loss_hessian_eigenvector", "g_eigenvector",
           "h_eigenvector", "plot_loss", "plot_eigenvalues", "ELEMENTWISE_ACTIVATIONS"]

# Modules that act on each entry of their input separately (their Jacobian is diagonal).
ELEMENTWISE_ACTIVATIONS = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.LogSigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardtanh, nn.Hardsigmoid,
    nn.Hardswish, nn.Hardshrink, nn.Softshrink, nn.Threshold,
)

_GUARD = 2  # extra search vectors per eigensolve beyond k (see top_eigenpairs' block_size)
PNG_DPI = 120
LOG_SCALE_RATIO = 30.0  # plot_eigenvalues uses a log y axis when the values span more than this factor


# ----------------------------------------------------------------------------------------------------------------
# layerwise Jacobians
def _check_mlp(net) -> list[int]:
    """Indices of the Linear layers of a Sequential MLP; TypeError for anything else."""
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"net must be a torch.nn.Sequential of Linear layers and elementwise activations; got "
                        f"{type(net).__name__}")
    linear = []
    for i, module in enumerate(net):
        if isinstance(module, nn.Linear):
            linear.append(i)
        elif isinstance(module, nn.PReLU) and module.num_parameters != 1:
            raise TypeError(f"net[{i}] is a PReLU with one slope per channel; only elementwise activations with "
                            "one shared slope (num_parameters=1) are supported")
        elif not isinstance(module, ELEMENTWISE_ACTIVATIONS):
            examples = ", ".join(c.__name__ for c in ELEMENTWISE_ACTIVATIONS[1:7])
            raise TypeError(f"net[{i}] is a {type(module).__name__}; net must be a torch.nn.Sequential of Linear "
                            f"layers and elementwise activations ({examples}, ...)")
    if not linear:
        raise TypeError("net must contain at least one torch.nn.Linear layer; got none")
    return linear


def make_layerwise_jacobian_function(net: nn.Sequential, params: Tensor) -> Callable[[Tensor], list[Tensor]]:
    """Per-example Jacobians between consecutive pre-activations of an MLP at the parameters ``params``.

    For ``net = Sequential(...)`` with Linear layers ``1..L`` and pre-activations ``z_l = W_l a_{l-1} + b_l``
    (``a_{l-1}`` the output of the elementwise activations between Linear ``l-1`` and Linear ``l``; ``z_0 = x``,
    the input), the returned function maps an input batch ``x`` of shape ``(B, in_features)`` to the list
    ``[J_1, ..., J_L]`` with ``J_l = d z_l / d z_{l-1}`` per example, of shape ``(B, out_l, out_{l-1})``. For
    elementwise activations ``sigma`` this is ``W_l diag(sigma'(z_{l-1}))``, with ``sigma'(z_{l-1})`` (the
    activations' combined derivative, entry by entry) taken by forward-mode AD as the JVP with a vector of ones:
    exact for any activation in :data:`ELEMENTWISE_ACTIVATIONS`. ``J_1 = W_1`` (times the derivative of any
    activation placed before the first Linear layer). Activations after the last Linear layer do not enter.

    Args:
        net: a :class:`torch.nn.Sequential` of :class:`torch.nn.Linear` layers and elementwise activations. It is
            not modified: ``params`` are substituted with :func:`torch.func.functional_call`.
        params: flat parameter vector in ``net.named_parameters()`` order (the layout of
            :class:`~exponential_euler_solver.LossFunction`).

    Returns:
        ``jacobians(x) -> list[Tensor]`` (no autograd graph attached); it raises ValueError unless ``x`` is a
        ``(batch, in_features)`` tensor.

    Raises:
        TypeError: ``net`` is not such an MLP (the message names the first offending module), or ``params`` is not
            a tensor.
        ValueError: ``params`` is not 1-D of the network's size.
    """
    linear = _check_mlp(net)
    if not isinstance(params, Tensor):
        raise TypeError(f"params must be a torch.Tensor; got {type(params).__name__}")
    named = list(net.named_parameters())
    n_params = sum(p.numel() for _, p in named)
    if params.ndim != 1 or params.numel() != n_params:
        raise ValueError(f"params must be a 1-D tensor of the network's {n_params} parameters; got shape "
                         f"{tuple(params.shape)}")
    flat, offset = {}, 0
    params = params.detach()
    for name, p in named:
        flat[name] = params[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()

    # Segment l: the activations after Linear l-1, then Linear l with its weight and bias (None without bias).
    children = list(net.named_children())  # names are "0", "1", ... or those of an OrderedDict
    segments, start = [], 0
    for end in linear:
        acts = []
        for name, module in children[start:end]:
            prefix = f"{name}."
            acts.append((module, {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}))
        name = children[end][0]
        segments.append((acts, flat[f"{name}.weight"], flat.get(f"{name}.bias")))
        start = end + 1

    def chain(acts):
        def f(z: Tensor) -> Tensor:
            for module, own in acts:
                z = functional_call(module, own, (z,))
            return z
        return f

    def jacobians(x: Tensor) -> list[Tensor]:
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(f"x must be a (batch, in_features) tensor; got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        out, z = [], x.detach()
        for acts, weight, bias in segments:
            if acts:
                # Elementwise activations have a diagonal Jacobian: its diagonal is the JVP with a vector of ones.
                a, slope = jvp(chain(acts), (z,), (torch.ones_like(z),))
                out.append(weight.unsqueeze(0) * slope.unsqueeze(1))
            else:
                a = z
                out.append(weight.expand(z.shape[0], -1, -1).clone())
            z = F.linear(a, weight, bias)
        return out

    return jacobians


# ----------------------------------------------------------------------------------------------------------------
# spectra along a trajectory
def top_eigenvalues_along(trajectory_params: Union[Trajectory, Sequence[Tensor], Tensor], loss, k: int,
                          which: str = "LM", operator: str = "hessian", *, tol: Optional[float] = None,
                          max_iters: int = 200, seed: int = 0) -> Tensor:
    """The top ``k`` eigenvalues of the Hessian, G or H at each of a sequence of parameter vectors.

    At each point the operator (``'hessian'``: the loss Hessian; ``'gn'``: the Gauss-Newton matrix ``G``;
    ``'residual'``: ``H = Hessian - G``) is handed to :func:`~exponential_euler_solver.linalg.top_eigenpairs`,
    warm-started from the previous point's eigenvectors, with ``_GUARD`` extra random search vectors (drawn from
    a generator seeded with ``seed``; torch's global RNG is not touched) so a change in the ordering along the
    trajectory is followed.

    Args:
        trajectory_params: a :class:`~exponential_euler_solver.trajectory.Trajectory` (its kept
            :attr:`~exponential_euler_solver.trajectory.Trajectory.params`), a sequence of flat parameter vectors,
            or a tensor ``(n_points, P)``. Vectors are moved to the loss's data device when it has one.
        loss: the :class:`~exponential_euler_solver.LossFunction`.
        k: number of eigenvalues per point, ``1 <= k < P``.
        which: ``'LM'`` largest magnitude, ``'LA'`` largest algebraic, ``'SA'`` smallest algebraic.
        operator: a name in :data:`~exponential_euler_solver.curvature.OPERATORS` (``'hessian'``, ``'gn'``,
            ``'residual'``).
        tol: relative residual tolerance (default from the parameters' dtype, see
            :func:`~exponential_euler_solver.linalg.default_tol`).
        max_iters: LOBPCG iterations at most per point.
        seed: seed of the random search vectors.

    Returns:
        ``(n_points, k)`` float64 eigenvalues, each row ordered as ``which`` asks. A point whose eigensolve did
        not reach ``tol`` within ``max_iters`` gives a :class:`RuntimeWarning` naming it.

    Raises:
        ValueError: ``operator`` or ``which`` unknown, no parameter vectors, or ``k`` out of range.
    """
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {tuple(OPERATORS)}; got {operator!r}")
    if isinstance(trajectory_params, Trajectory):
        points = trajectory_params.params
    elif isinstance(trajectory_params, Tensor):
        if trajectory_params.ndim != 2:
            raise ValueError(f"trajectory_params as a tensor must be (n_points, P); got shape "
                             f"{tuple(trajectory_params.shape)}")
        points = list(trajectory_params)
    else:
        points = list(trajectory_params)
    if not points:
        raise ValueError("trajectory_params holds no parameter vectors (keep them with integrate(..., "
                         "SaveAt(every_n=...)) or SaveAt(ts=...))")
    device = getattr(loss, "data_device", None)
    generator = torch.Generator().manual_seed(seed)
    rows, vectors, unconverged = [], None, []
    for i, theta in enumerate(points):
        theta = theta.detach() if device is None else theta.detach().to(device)
        op = OPERATORS[operator](loss, theta)
        init = None if vectors is None else vectors.to(dtype=theta.dtype, device=theta.device)
        result = top_eigenpairs(op, k, which=which, init=init, tol=tol, max_iters=max_iters, generator=generator,
                                block_size=k + _GUARD)
        rows.append(result.eigenvalues.detach().to("cpu", torch.float64))
        vectors = result.eigenvectors
        if not result.converged:
            unconverged.append(i)
    if unconverged:
        warnings.warn(f"top_eigenvalues_along: the eigensolve did not converge within max_iters={max_iters} at "
                      f"points {unconverged[:10]}{' ...' if len(unconverged) > 10 else ''}", RuntimeWarning,
                      stacklevel=2)
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# the seed library's eigenvector helpers
def _seed_helper(operator_cls, loss, params: Tensor, n: int, max_iters: int, tol: Optional[float],
                 init_eigvecs: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    result = top_eigenpairs(operator_cls(loss, params), n, which="LM", init=init_eigvecs, tol=tol,
                            max_iters=max_iters)
    return result.eigenvalues, result.eigenvectors


def loss_hessian_eigenvector(loss, params: Tensor, n: int = 1, max_iters: int = 100, tol: Optional[float] = None,
                             init_eigvecs: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The ``n`` eigenpairs of largest magnitude of the loss Hessian at ``params``.

    Args:
        loss: a :class:`~exponential_euler_solver.LossFunction`.
        params: flat parameters.
        n: number of eigenpairs.
        max_iters: LOBPCG iterations at most.
        tol: relative residual tolerance (default from the dtype, see
            :func:`~exponential_euler_solver.linalg.default_tol`).
        init_eigvecs: ``(P, j)`` starting vectors, e.g. a previous answer.

    Returns:
        ``(eigvals, eigvecs)``: ``(n,)`` float64 values ordered by decreasing magnitude, ``(P, n)`` vectors.
    """
    return _seed_helper(HessianOperator, loss, params, n, max_iters, tol, init_eigvecs)


def g_eigenvector(loss, params: Tensor, n: int = 1, max_iters: int = 100, tol: Optional[float] = None,
                  init_eigvecs: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """As :func:`loss_hessian_eigenvector`, for the Gauss-Newton matrix G."""
    return _seed_helper(GaussNewtonOperator, loss, params, n, max_iters, tol, init_eigvecs)


def h_eigenvector(loss, params: Tensor, n: int = 1, max_iters: int = 100, tol: Optional[float] = None,
                  init_eigvecs: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """As :func:`loss_hessian_eigenvector`, for the residual H = Hessian - G."""
    return _seed_helper(ResidualOperator, loss, params, n, max_iters, tol, init_eigvecs)


# ----------------------------------------------------------------------------------------------------------------
# plots
def _figure(width: float = 6.4, height: float = 4.2):
    """A matplotlib Figure on an Agg canvas (pyplot and its global backend are not used)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib, which is not installed; install the plot extra: "
                          "pip install 'exponential-euler-solver[plot]'") from exc
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _write_png(fig, path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=PNG_DPI))


def _check_trajectory(trajectory) -> None:
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"trajectory must be a Trajectory; got {type(trajectory).__name__}")
    if len(trajectory) == 0:
        raise ValueError("trajectory must hold at least one step; got an empty one")


def plot_loss(trajectory: Trajectory, path: Union[str, "os.PathLike[str]"], *, title: Optional[str] = None) -> None:
    """Plot the loss against flow time (log y) to a PNG file, written atomically.

    The curve runs through the start of the first step, ``(t_0 - dt_0, loss_0)``, and the end of every step,
    ``(t_i, new_loss_i)``; a marker on each step shows where the solver evaluated it.

    Args:
        trajectory: a :class:`~exponential_euler_solver.trajectory.Trajectory` with at least one step.
        path: the PNG file.
        title: the figure's title (default: none).

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
        TypeError, ValueError: not a Trajectory, or an empty one.
    """
    _check_trajectory(trajectory)
    t = torch.cat([trajectory.t[:1] - trajectory.dt[:1], trajectory.t]).tolist()
    loss = torch.cat([trajectory.loss[:1], trajectory.new_loss]).tolist()
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t, loss, marker="." if len(t) <= 200 else None, markersize=3, linewidth=1.2, color="C0")
    if min(loss) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("flow time t")
    ax.set_ylabel("training loss")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title)
    _write_png(fig, path)


def plot_eigenvalues(trajectory: Trajectory, path: Union[str, "os.PathLike[str]"], step_size: Optional[float] = None,
                     *, eigenvalues: Optional[Tensor] = None, times: Optional[Tensor] = None,
                     label: str = "Hessian", title: Optional[str] = None) -> None:
    """Plot top eigenvalue magnitudes against flow time, with the stability bound ``2/dt``, to a PNG file.

    The edge-of-stability picture: each curve is ``|lambda_j|`` of the curvature the solver used at the start of
    each step (flow time ``t - dt``), from the trajectory's ``eigenvalues`` (or its ``sharpness`` when the solver
    reported only that). The dashed line is ``2/dt`` of the step taken there (explicit Euler is stable along a
    direction iff ``dt |lambda| <= 2``); with ``step_size``, the dotted horizontal line ``2/step_size`` is the
    bound of gradient descent at that learning rate. Each step's values are drawn as a stair over
    ``[t - dt, t]``; ``eigenvalues`` given here are drawn as points joined by lines. The y axis is logarithmic
    when the values span more than ``LOG_SCALE_RATIO``, else linear from 0.

    Args:
        trajectory: a :class:`~exponential_euler_solver.trajectory.Trajectory` with at least one step.
        path: the PNG file.
        step_size: a learning rate whose bound ``2/step_size`` to draw, or None.
        eigenvalues: ``(n, k)`` eigenvalues to plot instead of the trajectory's own, e.g. from
            :func:`top_eigenvalues_along` (then ``times`` gives their flow times, default the trajectory's
            ``param_t``).
        times: ``(n,)`` flow times of ``eigenvalues``.
        label: what the eigenvalues are of, for the legend (e.g. ``'G'``).
        title: the figure's title (default: none).

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
        TypeError, ValueError: not a Trajectory, an empty one, no eigenvalues to plot, ``times`` not matching
            ``eigenvalues``, or ``step_size`` not positive.
    """
    _check_trajectory(trajectory)
    if step_size is not None and (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
                                  or not step_size > 0):
        raise ValueError(f"step_size must be a positive number or None; got {step_size!r}")
    start = trajectory.t - trajectory.dt
    steps_x = start.tolist() + [float(trajectory.t[-1])]  # each step's value holds over [t - dt, t]
    if eigenvalues is None:
        values = trajectory.eigenvalues
        if values.shape[1] == 0:
            values = trajectory.sharpness.unsqueeze(1)
        when = None
    else:
        values = torch.as_tensor(eigenvalues, dtype=torch.float64).cpu()
        values = values.unsqueeze(1) if values.ndim == 1 else values
        when = trajectory.param_t if times is None else torch.as_tensor(times, dtype=torch.float64).cpu()
        if when.shape[0] != values.shape[0]:
            raise ValueError(f"times must give one flow time per row of eigenvalues ({values.shape[0]}); got "
                             f"{when.shape[0]}")
    magnitudes = values.abs()
    if magnitudes.numel() == 0 or bool(magnitudes.isnan().all()):
        raise ValueError("no eigenvalues to plot: the trajectory's solver reported neither eigvals nor sharpness; "
                         "compute them with top_eigenvalues_along and pass eigenvalues=")
    bound = 2.0 / trajectory.dt
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for j in range(magnitudes.shape[1]):
        style = dict(linewidth=1.3, color=f"C{j % 10}", label=f"|λ{_subscript(j + 1)}| ({label})")
        if when is None:  # the curvature each step used, held over the step
            ax.plot(steps_x, magnitudes[:, j].tolist() + [float(magnitudes[-1, j])], drawstyle="steps-post",
                    **style)
        else:  # point evaluations
            ax.plot(when.tolist(), magnitudes[:, j].tolist(), marker=".", markersize=4, **style)
    ax.plot(steps_x, bound.tolist() + [float(bound[-1])], drawstyle="steps-post", linestyle="--", linewidth=1.2,
            color="black", label="2 / dt")
    if step_size is not None:
        ax.axhline(2.0 / step_size, linestyle=":", linewidth=1.2, color="grey",
                   label=f"2 / step_size = {2.0 / step_size:g}")
    shown = torch.cat([magnitudes[~magnitudes.isnan()], bound])
    if bool((shown > 0).all()) and float(shown.max()) > LOG_SCALE_RATIO * float(shown.min()):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("flow time t")
    ax.set_ylabel("eigenvalue magnitude")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title)
    _write_png(fig, path)


def _subscript(n: int) -> str:
    return str(n).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))
