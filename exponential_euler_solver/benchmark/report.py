"""The benchmark's output: tables, JSON and the plot.

Tables are declared, not assembled: each is a list of :class:`Column` s, a header with the function that formats a
cell from a row object, so adding a column is one line. The seed's own table (one time column per solver) is the
one pivot.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from tabulate import tabulate

from .. import __version__
from ..distributed import get_world_size
from ..files import atomic_write
from ..linalg import fused
from ..solvers import SOLVERS
from .peer import DEFAULT_MAX_SECONDS, HVP_COUNTING, PEER_PACKAGE, peer_version
from .results import IMPLEMENTATION, PointResult, RunResult

__all__ = ["Column", "render", "format_tables", "format_comparison", "format_fidelity", "geometric_mean_ratio",
           "benchmark_record", "write_json", "write_plot", "NOT_CONVERGED_MARK", "PLOT_MISSING",
           "DETAIL_COLUMNS", "COMPARE_COLUMNS"]

NOT_CONVERGED_MARK = "*"
PLOT_MISSING = "--plot needs matplotlib: pip install exponential-euler-solver[plot]"


@dataclass(frozen=True)
class Column:
    """One table column: its header and the function that formats its cell from a row object."""

    header: str
    cell: Callable[[object], object]


def render(columns: Sequence[Column], rows: Sequence[object], tablefmt: str = "simple") -> str:
    """A tabulate table of ``rows`` with the declared ``columns``."""
    return tabulate([[c.cell(r) for c in columns] for r in rows], headers=[c.header for c in columns],
                    tablefmt=tablefmt, disable_numparse=True)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def _time_cell(result: Optional[RunResult]) -> str:
    if result is None:
        return "-"
    return _fmt(result.wall_time, ".3f") + ("" if result.converged else NOT_CONVERGED_MARK)


def _stopped(r: RunResult) -> str:
    if r.error:
        return r.error
    if r.stop_reason == "max_seconds":
        return "stopped by --max-seconds" if r.implementation == IMPLEMENTATION else "stopped by --compare-max-seconds"
    return f"stopped after --max-steps {r.steps} steps"


# ------------------------------------------------------------------------------------------------------------
# the runs
#: The grid point and solver of a row that has ``n_train``, ``n_classes``, ``seed`` and ``label``.
RUN_COLUMNS = [
    Column("# Train", lambda r: r.n_train),
    Column("# Classes", lambda r: r.n_classes),
    Column("Seed", lambda r: r.seed),
    Column("Solver", lambda r: r.label),
]

DETAIL_COLUMNS = RUN_COLUMNS + [
    Column("Steps", lambda r: r.steps),
    Column("Rejections", lambda r: r.n_rejected),
    Column("Gradient evals", lambda r: r.n_grad),
    Column("HVPs", lambda r: r.n_hvp),
    Column("Grads/step", lambda r: _fmt(r.grad_per_step, ".2f")),
    Column("HVPs/step", lambda r: _fmt(r.hvp_per_step, ".1f")),
    Column("Flow time at target", lambda r: _fmt(r.t_target, ".5g")),
    Column("|l1/l(k+1)| first, last", lambda r: "-" if r.stiffness is None else "%.1f, %.1f" % r.stiffness),
    Column("Final loss", lambda r: _fmt(r.final_loss, ".4g")),
    Column("Monotone", lambda r: "yes" if r.strictly_decreasing else "no"),
    Column("Wall time (s)", _time_cell),
    Column("Wall/(grads+HVPs)", lambda r: _fmt(_over_products(r), ".2f")),
    Column("Wall/floor", lambda r: _fmt(_over_floor(r), ".2f")),
    Column("In grads (s)", lambda r: _split(r, "grad")),
    Column("In HVPs (s)", lambda r: _split(r, "hvp")),
    Column("Eigensolver (s)", lambda r: _split(r, "eig")),
    Column("Other (s)", lambda r: _split(r, "other")),
]


def _over_products(r: RunResult) -> Optional[float]:
    """Wall over the time of the run's gradients and HVPs, both timed in the run itself."""
    split = r.time_split
    return None if split is None else _ratio(r.wall_time, split["grad"] + split["hvp"])


def _over_floor(r: RunResult) -> Optional[float]:
    """Wall over the floor: accepted steps x one gradient, the gradient's time being the run's mean."""
    split = r.time_split
    if split is None or not r.n_grad:
        return None
    return _ratio(r.wall_time, r.steps * split["grad"] / r.n_grad)


def _split(r: RunResult, part: str) -> str:
    split = r.time_split
    return "-" if split is None else f"{split[part]:.2f}"


def _scheme_lines(results: Sequence[RunResult]) -> list:
    """When a grid ran a solver with both schemes (``X`` and ``X-heun``), the wall time of the present (heun)
    scheme over the multistep one per grid point and its geometric mean."""
    by_key = {(r.n_train, r.n_classes, r.seed, r.solver): r for r in results}
    lines = []
    for name in dict.fromkeys(r.solver for r in results):
        ratios = []
        for (n, c, s, solver), r in by_key.items():
            heun = by_key.get((n, c, s, f"{name}-heun"))
            if solver == name and heun is not None and r.wall_time > 0:
                ratios.append((n, c, s, heun.wall_time / r.wall_time))
        if ratios:
            mean = math.exp(sum(math.log(x[3]) for x in ratios) / len(ratios))
            lines.append(f"{name}: heun / multistep wall " + ", ".join(f"n={n} C={c}: {x:.2f}" for n, c, s, x in ratios)
                         + f"; geometric mean {mean:.2f}")
    return lines


def format_tables(results: Sequence[RunResult], tablefmt: str = "simple") -> str:
    """The seed's table of wall times (one row per grid point) and the per-run details table.

    The seed's table has the columns ``# Train``, ``# Classes`` and ``<label> Time`` (seconds) per solver that
    ran, in :data:`~exponential_euler_solver.SOLVERS` order (``Exponential Euler Time``,
    ``Adaptive Gradient Time``), plus ``Seed`` after ``# Classes`` when the grid has several seeds. A time marked
    ``*`` belongs to a run that did not reach the target. Numbers are rounded here only.
    """
    several_seeds = len({r.seed for r in results}) > 1
    solvers = list(dict.fromkeys([name for name in SOLVERS if any(r.solver == name for r in results)]
                                 + [r.solver for r in results]))
    labels = {r.solver: r.label for r in results}
    by_point: Dict[Tuple[int, int, int], Dict[str, RunResult]] = {}
    for r in results:
        by_point.setdefault((r.n_train, r.n_classes, r.seed), {})[r.solver] = r
    columns = [Column("# Train", lambda p: p[0][0]), Column("# Classes", lambda p: p[0][1])]
    if several_seeds:
        columns.append(Column("Seed", lambda p: p[0][2]))
    columns += [Column(f"{labels[name]} Time", lambda p, name=name: _time_cell(p[1].get(name))) for name in solvers]
    parts = [render(columns, list(by_point.items()), tablefmt), "", render(DETAIL_COLUMNS, results, tablefmt)]
    schemes = _scheme_lines(results)
    if schemes:
        parts += ["", "The present scheme against the multistep one, in this run:"] + [f"  {line}" for line in schemes]
    failed = [r for r in results if not r.converged]
    if failed:
        parts += ["", f"{NOT_CONVERGED_MARK} did not reach the target:"]
        parts += [f"  {r.label} n={r.n_train} C={r.n_classes} seed={r.seed}: {_stopped(r)}" for r in failed]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------
# the comparison with the peer
@dataclass
class _Pair:
    """A row of the comparison table: one run, with its grid point and the other implementation's run."""

    point: PointResult
    run: RunResult
    ours: RunResult
    peer: RunResult

    @property
    def is_ours(self) -> bool:
        return self.run is self.ours


def _pairs(points: Sequence[PointResult]):
    """(point, our run, the peer's run) for every run of ours that has a peer run."""
    for point in points:
        for run in point.runs:
            peer = point.peer_of(run)
            if peer is not None:
                yield point, run, peer


COMPARE_COLUMNS = [Column(c.header, lambda p, cell=c.cell: cell(p.run)) for c in RUN_COLUMNS] + [
    Column("Implementation", lambda p: p.run.implementation),
    Column("Steps", lambda p: p.run.steps),
    Column("Gradient evals", lambda p: p.run.n_grad),
    Column("HVPs", lambda p: p.run.n_hvp),
    Column("HVPs/step", lambda p: _fmt(p.run.hvp_per_step, ".1f")),
    Column("HVPs step 0", lambda p: _fmt(p.run.first_step_hvp, "d")),
    Column("Wall time (s)", lambda p: _time_cell(p.run)),
    Column("Peer/ours wall", lambda p: "-" if p.is_ours else _fmt(_ratio(p.peer.wall_time, p.ours.wall_time), ".2f")),
    Column("Floor (s)", lambda p: _fmt(p.point.floor(p.ours), ".3f") if p.is_ours else "-"),
    Column("Wall/floor", lambda p: _fmt(_ratio(p.ours.wall_time, p.point.floor(p.ours)), ".2f") if p.is_ours
           else "-"),
    Column("Flow time at target", lambda p: _fmt(p.run.t_target, ".5g")),
    Column("Monotone", lambda p: "yes" if p.run.strictly_decreasing else "no"),
]


def geometric_mean_ratio(points: Sequence[PointResult], solver: str) -> tuple[Optional[float], int, int]:
    """Geometric mean over the grid points of the peer's wall time over ours for ``solver``; returns
    ``(mean, n_runs, n_peer_stopped)``, the last counting peer runs that did not reach the target (their ratio is
    a lower bound, and so is the mean when there are any). ``(None, 0, 0)`` without pairs."""
    ratios, stopped = [], 0
    for _, ours, peer in _pairs(points):
        ratio = _ratio(peer.wall_time, ours.wall_time)
        if ours.solver == solver and ratio is not None and ratio > 0:
            ratios.append(math.log(ratio))
            stopped += not peer.converged
    if not ratios:
        return None, 0, 0
    return math.exp(sum(ratios) / len(ratios)), len(ratios), stopped


def _geometric_mean_line(points: Sequence[PointResult], solver: str) -> Optional[str]:
    mean, n, stopped = geometric_mean_ratio(points, solver)
    if mean is None:
        return None
    bound = f"; at least, since {stopped} peer run(s) stopped before the target" if stopped else ""
    return f"Peer/ours wall, geometric mean over {n} grid point(s), {solver}: {mean:.2f}{bound}."


def format_comparison(points: Sequence[PointResult], tablefmt: str = "simple") -> str:
    """The table of this library against the peer: two rows per grid point and solver (``ours``, then the peer).

    ``Peer/ours wall`` (peer row) is the peer's wall time over ours; ``Floor (s)`` (our row) is our accepted
    steps times the median time of one full-batch gradient, and ``Wall/floor`` our wall time over it. A wall
    time marked ``*`` belongs to a run that did not reach the target. Notes below say how the peer's counts were
    taken and the gradient time of each grid point.
    """
    rows = [_Pair(point, r, ours, peer) for point, ours, peer in _pairs(points) for r in (ours, peer)]
    failed = [p.run for p in rows if not p.run.converged]
    parts = [render(COMPARE_COLUMNS, rows, tablefmt), ""]
    solvers = dict.fromkeys(p.ours.solver for p in rows)
    parts += [line for line in (_geometric_mean_line(points, solver) for solver in solvers) if line]
    parts += ["Floor: our accepted steps x one full-batch gradient of our LossFunction (median of 5 after a "
              "warm-up): " + ", ".join(f"n={p.n_train} C={p.n_classes} seed={p.seed}: "
                                        f"{_fmt(None if p.gradient_time is None else 1e3 * p.gradient_time, '.1f')} ms"
                                        for p in points)]
    parts += [f"Counted: {HVP_COUNTING}."]
    if failed:
        parts += [f"{NOT_CONVERGED_MARK} did not reach the target:"]
        parts += [f"  {r.implementation} {r.label} n={r.n_train} C={r.n_classes} seed={r.seed}: {_stopped(r)}"
                  for r in failed]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------
# fidelity
REFERENCE_COLUMNS = [
    Column("# Train", lambda p: p.n_train),
    Column("# Classes", lambda p: p.n_classes),
    Column("Seed", lambda p: p.seed),
    Column("RK4 alpha", lambda p: "-" if p.reference.error else f"{p.reference.alpha:g}"),
    Column("Crossing time", lambda p: _fmt(p.reference.crossing_time, ".5g")),
    Column("Compared at t", lambda p: "-" if p.reference.error else ", ".join(f"{t:.5g}" for t in p.reference.times)),
    Column("Steps", lambda p: "-" if p.reference.error else p.reference.steps),
    Column("Gradient evals", lambda p: "-" if p.reference.error else p.reference.n_grad),
    Column("HVPs", lambda p: "-" if p.reference.error else p.reference.n_hvp),
    Column("Wall time (s)", lambda p: _fmt(p.reference.wall_time, ".3f")),
]


def format_fidelity(points: Sequence[PointResult], tablefmt: str = "simple") -> str:
    """The RK4 references (one row per grid point) and every run against its reference.

    ``Relative error`` is ``(t_target - T_ref) / T_ref`` in percent; ``Deviation at t<i>`` is
    ``||theta(t_i) - theta_ref(t_i)|| / ||theta_ref(t_i) - theta_0||`` at the reference's ``i``-th comparison
    time (listed in the first table); ``-`` where the run did not reach that time.
    """
    with_reference = [p for p in points if p.reference is not None]
    notes = [f"  n={p.n_train} C={p.n_classes} seed={p.seed}: no reference: {p.reference.error}"
             for p in with_reference if p.reference.error is not None]
    n_times = max((len(p.reference.times) for p in with_reference), default=0)
    columns = RUN_COLUMNS + [Column("Implementation", lambda r: r.implementation),
               Column("Flow time at target", lambda r: _fmt(r.t_target, ".5g")),
               Column("Reference", lambda r: _fmt(r.fidelity.reference_crossing_time, ".5g")),
               Column("Relative error", lambda r: _pct(r.fidelity.relative_error))]
    columns += [Column(f"Deviation at t{i + 1}",
                       lambda r, i=i: _fmt(r.fidelity.deviations[i], ".3g") if i < len(r.fidelity.deviations) else "-")
                for i in range(n_times)]
    runs = [r for p in points for run in p.runs for r in (run, p.peer_of(run)) if r is not None and r.fidelity]
    parts = ["RK4 reference (max step 0.01; alpha halved until the crossing time moved < 1e-3):",
             render(REFERENCE_COLUMNS, with_reference, tablefmt)]
    if notes:
        parts += [""] + notes
    parts += ["", render(columns, runs, tablefmt)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------
# JSON
def _jsonable(value):
    """Replace non-finite floats by None (JSON has no inf or NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _summary(r: RunResult) -> dict:
    return {"implementation": r.implementation, "converged": r.converged, "stop_reason": r.stop_reason,
            "steps": r.steps, "n_grad": r.n_grad, "n_hvp": r.n_hvp, "hvp_per_step": r.hvp_per_step,
            "wall_time": r.wall_time, "t_target": r.t_target, "strictly_decreasing": r.strictly_decreasing,
            "relative_error": None if r.fidelity is None else r.fidelity.relative_error}


def _comparison_record(point: PointResult, ours: RunResult, peer: RunResult) -> dict:
    floor = point.floor(ours)
    return {"n_train": ours.n_train, "n_classes": ours.n_classes, "seed": ours.seed, "solver": ours.solver,
            "gradient_time": point.gradient_time, "floor": floor, "ours": _summary(ours), "peer": _summary(peer),
            "peer_over_ours_wall": _ratio(peer.wall_time, ours.wall_time),
            "first_step_hvp": {"ours": ours.first_step_hvp, "peer": peer.first_step_hvp},
            "ours_wall_over_floor": _ratio(ours.wall_time, floor)}


def benchmark_record(results: Sequence[RunResult], options: dict, argv: Optional[Sequence[str]] = None,
                     points: Optional[Sequence[PointResult]] = None) -> dict:
    """Everything the command measured, as plain JSON data: configuration, versions and every run.

    Args:
        results: this library's runs.
        options: the command's option values by attribute name (``vars(args)``).
        argv: the command line (default ``sys.argv[1:]``).
        points: from :func:`~.suite.run_points`; with ``compare``/``fidelity`` they add ``points`` (gradient
            time and RK4 reference per grid point), ``peer`` (package, version, what was counted),
            ``peer_runs`` (shaped like ``runs``) and ``comparisons`` (the numbers of :func:`format_comparison`).
    """
    compare, fidelity = bool(options.get("compare")), bool(options.get("fidelity"))
    record = {
        "configuration": {
            "argv": list(sys.argv[1:] if argv is None else argv),
            "grid": {"n_train": list(options["n_train"]), "n_classes": list(options["n_classes"]),
                     "seeds": list(options["seeds"])},
            "target": options["target"],
            "solvers": list(options["solvers"]),
            "max_steps": options["max_steps"],
            "dataset": options["dataset"],
            "data_dir": options.get("data_dir"),
            "device": str(options["device"]),
            "dtype": str(options["dtype"]).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            # the multistep step's compiled passes (linalg.fused), used on the CPU only
            "fused_cpu_loops": str(options["device"]).startswith("cpu") and fused.compiled(),
            "compare": compare,
            "compare_max_seconds": options.get("compare_max_seconds", DEFAULT_MAX_SECONDS),
            "fidelity": fidelity,
            "world_size": get_world_size(),
            "checkpoint": options.get("checkpoint"),
            "resumed": bool(options.get("resume", False)),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "exponential_euler_solver": __version__,
        },
        "runs": [r.to_dict() for r in results],
    }
    if compare:
        record["versions"]["stable_solvers"] = peer_version()
    if points is not None and (compare or fidelity):
        record["points"] = [{"n_train": p.n_train, "n_classes": p.n_classes, "seed": p.seed,
                             "gradient_time": p.gradient_time,
                             "reference": None if p.reference is None else p.reference.to_dict()} for p in points]
    if points is not None and compare:
        record["peer"] = {"package": PEER_PACKAGE, "version": peer_version(), "counted": HVP_COUNTING,
                          "max_seconds": options.get("compare_max_seconds", DEFAULT_MAX_SECONDS)}
        record["peer_runs"] = [r.to_dict() for p in points for r in p.peer_runs]
        record["comparisons"] = [_comparison_record(*pair) for pair in _pairs(points)]
    return _jsonable(record)


def write_json(path: str, record: dict) -> None:
    """Write ``record`` as indented JSON to ``path``, atomically."""
    text = json.dumps(record, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


# ------------------------------------------------------------------------------------------------------------
# plot
def write_plot(path: str, results: Sequence[RunResult]) -> None:
    """A PNG with two panels against flow time: the loss (log scale) and the tracked ``|lambda_1|``.

    One line per run: its own colour, line style and marker per solver. The loss is drawn at ``t = 0`` and at the
    end of every step; ``|lambda_1|`` (``|eigvals[0]|`` for exponential Euler, the sharpness for adaptive
    gradient descent) where it was computed: at the start of each step that made Hessian-vector products (steps
    that reuse older eigenpairs are skipped). Rendered with the Agg backend, written atomically.

    Raises:
        ImportError: matplotlib is missing (message: how to install it).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(PLOT_MISSING) from exc

    styles = [("-", "o"), ("--", "x"), (":", "s"), ("-.", "^")]
    solver_style = {name: styles[i % len(styles)] for i, name in enumerate(dict.fromkeys(r.solver for r in results))}
    several_seeds = len({r.seed for r in results}) > 1
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax_loss, ax_curv = fig.subplots(1, 2)
    for i, r in enumerate(results):
        h = r.history
        if not len(h):
            continue
        linestyle, marker = solver_style.get(r.solver, ("-", "."))
        label = f"{r.label}, n={r.n_train}, C={r.n_classes}" + (f", seed={r.seed}" if several_seeds else "")
        kw = dict(color=f"C{i % 10}", linestyle=linestyle, marker=marker, markersize=3, markerfacecolor="none",
                  linewidth=1.2, label=label)
        ax_loss.plot([0.0] + h.t.tolist(), [float(h.loss[0])] + h.new_loss.tolist(), **kw)
        n_hvp = h.n_hvp.tolist()
        refreshed = [j for j in range(len(h)) if n_hvp[j] > (n_hvp[j - 1] if j else 0)]
        sharp = h.sharpness.tolist()
        curv = [(float(h.t_start[j]), sharp[j]) for j in refreshed if math.isfinite(sharp[j])]
        if curv:
            ax_curv.plot(*zip(*curv), **kw)
    if results:
        ax_loss.axhline(results[0].target, color="0.5", linewidth=0.8, linestyle=":", label="target")
    ax_loss.set(yscale="log", xlabel="flow time t", ylabel="training loss", title="Loss")
    ax_curv.set(yscale="log", xlabel="flow time t", ylabel=r"$|\lambda_1|$",
                title="Top Hessian eigenvalue magnitude, at each refresh")
    for ax in (ax_loss, ax_curv):
        ax.grid(True, which="major", alpha=0.3)
    ax_loss.legend(fontsize="small")
    ax_curv.legend(fontsize="small")
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
