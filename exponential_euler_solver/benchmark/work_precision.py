"""The work-precision benchmark: every way a researcher could follow the flow, each swept over its accuracy knob,
against one converged reference (``--work-precision``).

For each grid point, in one process: the time of one full-batch gradient (``t_grad``, the cost unit), the top
Hessian eigenvalue at the start (``lambda_1(theta_0)``, which sets the fixed learning rates), a converged RK4
reference (:func:`~exponential_euler_solver.fidelity.reference_run`, cached on disk by configuration), then every
method of :func:`methods` at every knob value. Each run starts from the problem's initial parameters and runs
until the loss falls to the target (the seed's loop for the step-by-step methods; an event for torchdiffeq's), then
on, untimed, until the reference's comparison times have passed. For every point it records the crossing-time error
against the reference, the distance to the reference trajectory at its comparison times
(``||theta(t) - theta_ref(t)|| / ||theta_ref(t) - theta_0||``, the largest over the times), gradient evaluations,
HVPs, loss-only evaluations (torchdiffeq's event function), wall seconds and wall in units of ``t_grad``.

Families and knobs:

* ``ours``: the library's two solvers (multistep scheme), ``rtol`` swept, with the seed's arguments and with an
  uncapped step (``max_step_size``/``lr`` 1e3: only the stability cap and the error set the step);
* ``heun``: the same solvers with the present scheme (``scheme="heun"``) at its default and swept ``rtol``;
* ``rk4``: :class:`~exponential_euler_solver.RungeKutta4Solver`, ``alpha`` swept (the edge-of-stability papers'
  integrator), max step 0.01;
* ``gd``: fixed-step gradient descent, ``lr`` as fractions of ``1/|lambda_1(theta_0)|``;
* ``dopri5``, ``bosh3``: torchdiffeq's adaptive Runge-Kutta (``rtol`` swept, ``atol`` = ``rtol * 1e-3``), with
  the crossing found by its event handling (``odeint_event``); needs torchdiffeq (the ``test`` extra);
* ``dopri5 first step 1/lambda1``: dopri5 with its first step set to ``1/|lambda_1(theta_0)|``. Left to itself,
  torchdiffeq's initial-step heuristic starts at ``dt * lambda_1`` of 9 to 23 on the digits (dopri5 is stable to
  about 3.3), and at rtol 1e-2 and 1e-3 the first trial's gradient overflows and the run stops with
  "underflow in dt 0.0";
* ``stable-solvers``: the peer at the seed's arguments, when installed (``compare`` extra).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tabulate import tabulate

from ..curvature import HessianOperator
from ..errors import CheckpointError, SolverError
from ..fidelity import Reference, reference_run, run_with_times
from ..files import atomic_write
from ..integrate import Stop
from ..linalg import top_eigenpairs
from ..solvers import SOLVERS, GradientDescent, RungeKutta4Solver
from ..trajectory import Trajectory, relative_deviation
from .peer import PEER_SOLVERS, PeerSolver, import_peer
from .problem import Problem
from .suite import REFERENCE_MAX_STEP, gradient_seconds, warm_up

__all__ = ["WPMethod", "WPPoint", "methods", "run_work_precision", "format_work_precision", "write_plot",
           "load_or_compute_reference", "UNCAPPED_STEP", "DEFAULT_MAX_SECONDS"]

UNCAPPED_STEP = 1e3         # max_step_size / lr of the "uncapped" runs: only the stability cap and the error bind
DEFAULT_MAX_SECONDS = 900.0  # a run's time cap (seconds of stepping)
ONE_PERCENT = 0.01


@dataclass(frozen=True)
class WPMethod:
    """One point of a sweep.

    Attributes:
        family: the line it belongs to in the figure (``"ours exponential-euler"``, ``"rk4"``, ...).
        knob: the accuracy knob's name (``"rtol"``, ``"alpha"``, ``"lr*lambda1"``).
        value: its value.
        kind: ``"solver"`` (a step-protocol solver built by ``build``) or ``"torchdiffeq"``.
        build: ``build(problem, params, lambda1) -> solver`` for ``"solver"``; the torchdiffeq method name otherwise.
        first_step: torchdiffeq only: its first step in units of ``1/|lambda_1(theta_0)|``; None: torchdiffeq's
            own initial-step heuristic.
    """

    family: str
    knob: str
    value: float
    kind: str
    build: object
    first_step: Optional[float] = None


def _ours(solver: str, scheme: str, rtol, uncapped: bool) -> Callable:
    """A builder of our ``solver`` (a key of SOLVERS) with the seed's arguments, ``scheme`` and ``rtol``; with
    ``uncapped``, its step limit (``max_step_size`` or ``lr``) is :data:`UNCAPPED_STEP`."""
    entry = SOLVERS[solver]

    def build(problem: Problem, params, lambda1: float):
        args = {**entry.arguments_for(problem.n_classes, problem.loss), "scheme": scheme, "rtol": rtol}
        if uncapped:
            args["max_step_size" if "max_step_size" in args else "lr"] = UNCAPPED_STEP
        return entry.cls(params, problem.loss_func, **args)

    return build


def methods(quick: bool = False, peer: bool = True) -> List[WPMethod]:
    """The sweeps (fewer knob values with ``quick``, for long grid points)."""
    rtols = [0.05, 0.02, 0.005] if quick else [0.1, 0.05, 0.02, 0.01, 0.005, 0.002]
    heun_rtols = [0.2, 0.05] if quick else [0.2, 0.1, 0.05, 0.02]
    alphas = [1.0, 0.5] if quick else [2.0, 1.0, 0.5, 0.25]
    fractions = [0.5, 0.25] if quick else [1.0, 0.5, 0.25, 0.125]
    ode_rtols = [1e-2, 1e-3, 1e-4] if quick else [1e-2, 1e-3, 1e-4, 1e-5]
    out: List[WPMethod] = []
    for solver in ("exponential-euler", "adaptive"):
        out += [WPMethod(f"ours {solver}", "rtol", r, "solver", _ours(solver, "multistep", r, False)) for r in rtols]
        out += [WPMethod(f"ours {solver} uncapped", "rtol", r, "solver", _ours(solver, "multistep", r, True))
                for r in rtols]
        out += [WPMethod(f"heun {solver}", "rtol", r, "solver", _ours(solver, "heun", r, False)) for r in heun_rtols]
    out += [WPMethod("rk4", "alpha", a, "solver",
                     lambda pr, p, l1, a=a: RungeKutta4Solver(p, pr.loss_func, REFERENCE_MAX_STEP, alpha=a))
            for a in alphas]
    out += [WPMethod("gd", "lr*lambda1", f, "solver",
                     lambda pr, p, l1, f=f: GradientDescent(p, pr.loss_func, f / l1)) for f in fractions]
    try:
        import torchdiffeq  # noqa: F401
        out += [WPMethod(m, "rtol", r, "torchdiffeq", m) for m in ("dopri5", "bosh3") for r in ode_rtols]
        out += [WPMethod("dopri5 first step 1/lambda1", "rtol", r, "torchdiffeq", "dopri5", first_step=1.0)
                for r in ode_rtols]
    except ImportError:
        pass
    if peer:
        try:
            import_peer()
            out += [WPMethod(f"stable-solvers {s}", "seed", 0.0, "peer", s) for s in PEER_SOLVERS]
        except ImportError:
            pass
    return out


@dataclass
class WPPoint:
    """One run of the work-precision benchmark (see the module docstring)."""

    family: str
    knob: str
    value: float
    converged: bool
    stop_reason: str
    crossing_time: Optional[float]
    relative_error: Optional[float]
    max_deviation: Optional[float]
    deviations: List[float]
    steps: Optional[int]
    n_grad: int
    n_hvp: int
    n_loss: int
    wall: float
    cost: Optional[float]  # wall / t_grad
    monotone: Optional[bool]
    error: Optional[str] = None


def _key(problem: Problem, target: float, dataset: str) -> str:
    config = {"dataset": dataset, "n_train": problem.n_train, "n_classes": problem.n_classes, "seed": problem.seed,
              "net": problem.net, "loss": problem.loss, "width": problem.width,
              "dtype": str(problem.init_params.dtype), "target": target, "max_step": REFERENCE_MAX_STEP,
              "n_params": problem.loss_func.n_params}
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def load_or_compute_reference(problem: Problem, target: float, dataset: str, cache_dir: Optional[str],
                              progress: Optional[Callable[[str], None]] = None) -> Reference:
    """The converged RK4 reference of ``problem``, from ``cache_dir`` when it holds one for this configuration
    (``reference-<key>.pt`` plus a ``.json`` of its scalars), else computed and written there (atomically)."""
    path = None if cache_dir is None else os.path.join(cache_dir, f"reference-{_key(problem, target, dataset)}")
    if path is not None and os.path.isfile(path + ".pt") and os.path.isfile(path + ".json"):
        try:
            meta = json.loads(open(path + ".json").read())
            trajectory = Trajectory.load(path + ".pt")
            if progress is not None:
                progress(f"reference from {path}.pt (alpha {meta['alpha']:g})")
            return Reference(trajectory=trajectory, alpha=meta["alpha"], times=meta["times"], target=target,
                             steps=meta["steps"])
        except (CheckpointError, KeyError, ValueError):
            pass
    reference = reference_run(problem.loss_func, problem.init_params, target, REFERENCE_MAX_STEP, progress=progress)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        reference.trajectory.save(path + ".pt")
        meta = json.dumps({"alpha": reference.alpha, "times": reference.times, "steps": reference.steps,
                           "crossing_time": reference.crossing_time})
        atomic_write(path + ".json", lambda fh: fh.write(meta.encode()))
    return reference


def _metrics(method: WPMethod, crossing: Optional[float], reference: Reference, deviations: List[float], steps,
             n_grad, n_hvp, n_loss, wall, t_grad, stop_reason: str, monotone, error=None) -> WPPoint:
    t_ref = reference.crossing_time
    err = None if crossing is None else (crossing - t_ref) / t_ref
    return WPPoint(family=method.family, knob=method.knob, value=method.value, converged=stop_reason == "target",
                   stop_reason=stop_reason, crossing_time=crossing, relative_error=err,
                   max_deviation=max(deviations) if deviations else None, deviations=deviations, steps=steps,
                   n_grad=n_grad, n_hvp=n_hvp, n_loss=n_loss, wall=wall, cost=wall / t_grad if t_grad else None,
                   monotone=monotone, error=error)


def _run_solver(method: WPMethod, problem: Problem, reference: Reference, lambda1: float, target: float,
                t_grad: float, max_seconds: float) -> WPPoint:
    if method.kind == "peer":
        solver = PeerSolver(problem, method.build)
    else:
        solver = method.build(problem, problem.init_params.clone(), lambda1)
    stop = Stop(step_loss=target, seconds=max_seconds, errors="record")
    trajectory, steps = run_with_times(solver, stop, reference.times, max_steps=100_000)
    head = trajectory.head(steps)
    _, deviations = trajectory.deviations(reference.trajectory, problem.init_params)
    row = head.rows()[-1] if len(head) else {"n_grad": 0, "n_hvp": 0}
    return _metrics(method, head.crossing_time(target), reference, deviations, steps,
                    row["n_grad"], row["n_hvp"], 0, head.wall_time, t_grad, trajectory.stop_reason or "target",
                    head.strictly_decreasing, head.error)


class _TimeUp(Exception):
    pass


#: What torchdiffeq raises when its integration breaks down (its step-size underflow is an ``AssertionError``); such
#: a run is recorded with ``stop_reason`` "error" and the message, and the sweep goes on.
TORCHDIFFEQ_FAILURES = (AssertionError, RuntimeError, FloatingPointError)


def _run_torchdiffeq(method: WPMethod, problem: Problem, reference: Reference, lambda1: float, target: float,
                     t_grad: float, max_seconds: float) -> WPPoint:
    import torchdiffeq

    loss = problem.loss_func
    counts = {"grad": 0, "loss": 0}
    start = time.perf_counter()

    def rhs(t, theta):
        if time.perf_counter() - start > max_seconds:
            raise _TimeUp
        counts["grad"] += 1
        return -loss.gradient(theta)[1]

    def event(t, theta):
        counts["loss"] += 1
        return loss(theta).to(torch.float64) - target

    rtol = method.value
    options = None if method.first_step is None else {"first_step": method.first_step / lambda1}
    t0 = torch.tensor(0.0, dtype=torch.float64)
    error = None
    try:
        t_event, _ = torchdiffeq.odeint_event(rhs, problem.init_params.clone(), t0, event_fn=event,
                                              method=method.build, rtol=rtol, atol=rtol * 1e-3, options=options)
        wall, stop, crossing = time.perf_counter() - start, "target", float(t_event)
    except _TimeUp:
        wall, stop, crossing = time.perf_counter() - start, "max_seconds", None
    except TORCHDIFFEQ_FAILURES as exc:  # e.g. "underflow in dt 0.0" once a trial point's gradient is not finite
        wall, stop, crossing = time.perf_counter() - start, "error", None
        error = f"torchdiffeq {method.family}: {type(exc).__name__}: {exc}"
    n_grad, n_loss = counts["grad"], counts["loss"]
    deviations = []
    if crossing is not None:  # the parameters at the comparison times: a second, untimed integration
        times = torch.tensor([0.0] + list(reference.times), dtype=torch.float64)
        try:
            sol = torchdiffeq.odeint(lambda t, y: -loss.gradient(y)[1], problem.init_params.clone(), times,
                                     method=method.build, rtol=rtol, atol=rtol * 1e-3, options=options)
        except TORCHDIFFEQ_FAILURES:
            sol = None  # the crossing stands; the deviations are left out
        for i, tau in enumerate(reference.times if sol is not None else ()):
            deviations.append(relative_deviation(sol[i + 1], reference.trajectory.params_at(tau), problem.init_params))
    return _metrics(method, crossing, reference, deviations, None, n_grad, 0, n_loss, wall, t_grad,
                    stop, None, error)


def run_work_precision(problem: Problem, target: float, *, dataset: str, cache_dir: Optional[str] = None,
                       quick: bool = False, families: Optional[Sequence[str]] = None,
                       max_seconds: float = DEFAULT_MAX_SECONDS,
                       progress: Optional[Callable[[str], None]] = None) -> dict:
    """Every method of :func:`methods` on ``problem``; returns a plain dict: the point's ``t_grad``, ``lambda1``,
    reference (crossing time, alpha, times) and ``points`` (one :class:`WPPoint` dict per run).

    Args:
        families: run only the families whose name starts with one of these (None: all).
    """
    tell = progress or (lambda line: None)
    warm_up(problem.loss_func, problem.init_params)
    t_grad = gradient_seconds(problem.loss_func, problem.init_params)
    op = HessianOperator(problem.loss_func, problem.init_params)
    lambda1 = abs(float(top_eigenpairs(op, 1, tol=1e-3, generator=torch.Generator().manual_seed(0)).eigenvalues[0]))
    tell(f"t_grad {1e3 * t_grad:.1f} ms, lambda_1(theta_0) {lambda1:.1f}")
    reference = load_or_compute_reference(problem, target, dataset, cache_dir, tell)
    tell(f"reference crossing {reference.crossing_time:.6g} (RK4 alpha {reference.alpha:g})")
    points = []
    for method in methods(quick):
        if families is not None and not any(method.family.startswith(f) for f in families):
            continue
        try:
            if method.kind == "torchdiffeq":
                point = _run_torchdiffeq(method, problem, reference, lambda1, target, t_grad, max_seconds)
            else:
                point = _run_solver(method, problem, reference, lambda1, target, t_grad, max_seconds)
        except SolverError as exc:  # pragma: no cover - the runs record their own errors
            point = WPPoint(method.family, method.knob, method.value, False, "error", None, None, None, [], None, 0,
                            0, 0, 0.0, None, None, error=str(exc))
        tell(f"{method.family} {method.knob}={method.value:g}: error {_pct(point.relative_error)}, "
             f"deviation {_fmt(point.max_deviation, '.2e')}, {point.n_grad} gradients, {point.n_hvp} HVPs, "
             f"{point.wall:.1f} s = {_fmt(point.cost, '.0f')} t_grad ({point.stop_reason})")
        points.append(asdict(point))
    return {"n_train": problem.n_train, "n_classes": problem.n_classes, "seed": problem.seed, "t_grad": t_grad,
            "lambda1": lambda1, "reference": {"crossing_time": reference.crossing_time, "alpha": reference.alpha,
                                              "times": list(reference.times), "steps": reference.steps},
            "points": points}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:+.3f}%"


def best_at(points: Sequence[dict], tolerance: float = ONE_PERCENT) -> Dict[str, dict]:
    """Per family, its cheapest run (by wall) whose crossing error is within ``tolerance`` and that reached the
    target."""
    best: Dict[str, dict] = {}
    for p in points:
        if not p["converged"] or p["relative_error"] is None or abs(p["relative_error"]) > tolerance:
            continue
        if p["family"] not in best or p["wall"] < best[p["family"]]["wall"]:
            best[p["family"]] = p
    return best


def format_work_precision(result: dict, tablefmt: str = "simple") -> str:
    """The table of one grid point's runs, and the cheapest run within 1% per family, with its wall relative to
    the cheapest of ours."""
    rows = [[p["family"], f"{p['knob']}={p['value']:g}", _pct(p["relative_error"]), _fmt(p["max_deviation"], ".2e"),
             _fmt(p["steps"], "d"), p["n_grad"], p["n_hvp"], p["n_loss"], f"{p['wall']:.2f}", _fmt(p["cost"], ".0f"),
             "-" if p["monotone"] is None else ("yes" if p["monotone"] else "no"),
             p["stop_reason"]] for p in result["points"]]
    headers = ["Method", "Knob", "Crossing error", "Max deviation", "Steps", "Gradients", "HVPs", "Loss evals",
               "Wall (s)", "Wall / t_grad", "Monotone", "Stop"]
    head = (f"n_train {result['n_train']}, {result['n_classes']} classes, seed {result['seed']}: t_grad "
            f"{1e3 * result['t_grad']:.1f} ms, lambda_1(theta_0) {result['lambda1']:.1f}, reference crossing "
            f"{result['reference']['crossing_time']:.6g} (RK4 alpha {result['reference']['alpha']:g})")
    best = best_at(result["points"])
    ours = [p for f, p in best.items() if f.startswith("ours")]
    lines = [head, tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True), "",
             "Cheapest run within 1% crossing error, per method:"]
    fastest = min((p["wall"] for p in ours), default=None)
    for family, p in sorted(best.items(), key=lambda kv: kv[1]["wall"]):
        ratio = "" if fastest is None else f" ({p['wall'] / fastest:.2f}x our best)"
        lines.append(f"  {family} {p['knob']}={p['value']:g}: {p['wall']:.2f} s = {_fmt(p['cost'], '.0f')} t_grad, "
                     f"error {_pct(p['relative_error'])}{ratio}")
    missing = sorted({p["family"] for p in result["points"]} - set(best))
    if missing:
        lines.append("  none within 1%: " + ", ".join(missing))
    return "\n".join(lines)


# one colour and marker per method family (14 before they repeat: a full sweep has 13 families); errors below
# _FLOOR (the reference's own run has none) are drawn at it
_COLORS = [f"C{i}" for i in range(10)] + ["black", "darkgoldenrod", "navy", "magenta"]
_MARKERS = "osD^v<>ph*XP8d"
_FLOOR = 1e-6


def write_plot(path: str, results: Sequence[dict]) -> None:
    """A PNG per grid point (side by side): |crossing error| and the largest deviation from the reference against
    wall time in units of ``t_grad``, log-log, one line per method family (its knob swept along the line), the 1%
    line dashed; a family none of whose runs crossed the target is named in the legend with the most it spent."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5 * len(results), 9.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(results), squeeze=False)
    styles = {}
    for col, result in enumerate(results):
        families = list(dict.fromkeys(p["family"] for p in result["points"]))
        for family in families:
            if family not in styles:
                i = len(styles)
                styles[family] = dict(color=_COLORS[i % len(_COLORS)], marker=_MARKERS[i % len(_MARKERS)],
                                      linestyle="-" if family.startswith("ours") else "--")
            pts = [p for p in result["points"] if p["family"] == family and p["cost"] is not None]
            for row, metric in enumerate(("relative_error", "max_deviation")):
                xy = [(p["cost"], max(abs(p[metric]), _FLOOR)) for p in pts
                      if p[metric] is not None and p["converged"]]
                if xy:
                    xy.sort()
                    axes[row][col].plot(*zip(*xy), label=family, markersize=5, linewidth=1.4, **styles[family])
                elif pts and row == 0:  # never crossed: said in the legend, with what it spent
                    axes[row][col].plot([], [], label=f"{family}: no crossing (stopped at "
                                        f"{max(p['cost'] for p in pts):.0f} t_grad)", **styles[family])
        for row, (name, line) in enumerate((("|crossing-time error|", ONE_PERCENT), ("largest deviation", None))):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            if line is not None:
                ax.axhline(line, color="black", linestyle=":", linewidth=1, label="1%")
            ax.set_xlabel("wall time / t_grad (one full-batch gradient)")
            ax.set_ylabel(f"{name} (drawn at {_FLOOR:g} when below)")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"n_train {result['n_train']}, {result['n_classes']} classes: {name} against cost")
        axes[0][col].legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
