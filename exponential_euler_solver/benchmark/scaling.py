"""How the cost of a run grows with the number of examples and with the network's width.

``python -m exponential_euler_solver.benchmark.scaling`` runs, for one solver at a time (``--solvers``; default:
both solvers of the benchmark's default grid, one after the other), on the ``photos`` dataset (``--dataset``),
the seed's loop to the target (``--target``, default 0.01) on two series of sizes:

* **n_train**: ``--n-train`` 64 256 1024 4096 examples at each of ``--n-classes`` 2 10, the network at its
  default width (the MLP's 512);
* **width**: ``--widths`` 256 512 1024 2048 hidden units of the MLP (channels of ``--net cnn``) at
  ``--width-n-train`` 256 examples and ``--width-classes`` 2 classes.

For each solver the n_train series runs first, class count by class count, each in increasing ``n_train``, then
the width series in increasing width; a size that belongs to both series (256 examples, 2 classes, width 512) is
run once and reported in both. Give ``--n-train`` or ``--widths`` with no values to leave that series out.

Every size is a fresh problem (:func:`~.problem.build_problem`: a fresh :class:`~exponential_euler_solver.LossFunction`
and initial parameters drawn after ``torch.manual_seed(--seed)``) evaluated in batches of
``min(n_train, --batch-size)`` examples (default 256), so that memory is bounded by the batch, not the data.
A run is :func:`~exponential_euler_solver.integrate` with ``Stop(step_loss=target, seconds=--max-seconds,
steps=--max-steps, errors="record")``: it stops at the seed's target, or when its steps have taken
``--max-seconds`` (default 900; checked between steps, so the step in progress finishes), or after
``--max-steps``, or at a solver error; a run stopped by a cap is reported as such with how far it got (steps,
flow time, loss).

Reported per run:

* steps, rejections, gradient evaluations and Hessian-vector products (the solver's counts);
* wall seconds: the run's steps' own time (``Trajectory.wall_time``, each step timing itself), and per step;
* ``t_grad``: the median of 5 timed full-batch gradients (``LossFunction.gradient`` over all batches) after one
  warm-up, at the initial parameters, in the same process just before the run
  (:func:`~.suite.gradient_seconds`);
* the time split that every :class:`~exponential_euler_solver.StepReport` carries cumulatively: ``time_grad``
  (gradient evaluations), ``time_hvp`` (curvature products), ``time_eig`` (the eigensolver's own block work);
  ``other`` is the wall time less those three (the step's vector updates, error estimate and bookkeeping);
* memory (Linux): the increase of the process's peak resident set size over the run. The peak (``VmHWM`` of
  ``/proc/self/status``) is reset to the current RSS through ``/proc/self/clear_refs`` right before the run,
  after the problem is built, ``t_grad`` is timed and freed memory is handed back to the OS (``malloc_trim``),
  and read right after it: what the run itself added (solver state, eigenvectors, gradient graphs of a batch,
  allocator caches) above the data, network and initial parameters. All sizes run in one process, so memory an
  earlier run left in torch's or the allocator's caches may lower a later increase. On CUDA also the peak of
  ``torch.cuda.max_memory_allocated`` over the allocated memory before the run.

Two tables (tabulate) with one row per run each (counts and memory; times) are printed; their notes give the
fitted exponents: the least-squares slope of log(wall per step) on log(n_train) per solver and class count, and on
log(width) per solver (and the same for ``t_grad``), over the runs with at least one step, stopped ones included.
Wall per step includes the first step's cold-start eigen-solve, which weighs more in a short run.
``--json PATH`` writes the configuration, versions, every run and the fits (atomically, after every run, so an
interrupted measurement keeps its finished runs); ``--plot PATH`` a log-log PNG of wall per step (solid) and
``t_grad`` (dashed) against n_train (one line per class count and solver) and against width, the fitted exponents
in the legend. A tqdm bar per run unless ``--quiet``.

How long: with the defaults there are 11 sizes per solver (4 x 2 n_train, 4 widths, one shared), so at most
about 11 x 900 s = 2.75 hours of stepping per solver, 5.5 hours for both, plus building each problem and timing
its gradients. ``--threads`` sets torch's threads (the benchmark's advice for a shared machine: 1).

Exit status: 0 (also when runs were stopped by a cap), 2 for a bad option or data that do not hold a size, 130 on
an interrupt (after printing and writing the finished runs).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tabulate import tabulate

from .. import __version__
from ..files import atomic_write
from ..integrate import Stop, integrate
from ..solvers import SOLVERS
from .cli import (
    DTYPES,
    _check_device_and_outputs,
    _float_in,
    _n_classes,
    _non_negative_int,
    _positive_int,
    add_device_arguments,
)
from .datasets import DATASETS, load_dataset, select_subset
from .memory import reset_peak_rss, status_mib
from .problem import DEFAULT_WIDTHS, LOSS_KINDS, NETWORKS, build_problem
from .report import PLOT_MISSING, write_json
from .suite import DEFAULT_MAX_STEPS, GRADIENT_REPEATS, gradient_seconds, warm_up

__all__ = ["PROG", "DEFAULT_N_TRAIN", "DEFAULT_N_CLASSES", "DEFAULT_WIDTHS_SERIES", "DEFAULT_WIDTH_N_TRAIN",
           "DEFAULT_WIDTH_CLASSES", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_SECONDS", "DEFAULT_DATASET", "MEMORY_MEASURED",
           "Size", "plan_sizes", "fit_exponent", "measure_run", "failed_run", "fits", "format_table", "scaling_record",
           "write_plot", "build_parser", "main"]

PROG = "python -m exponential_euler_solver.benchmark.scaling"
DEFAULT_N_TRAIN = (64, 256, 1024, 4096)
DEFAULT_N_CLASSES = (2, 10)
DEFAULT_WIDTHS_SERIES = (256, 512, 1024, 2048)
DEFAULT_WIDTH_N_TRAIN = 256
DEFAULT_WIDTH_CLASSES = 2
DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_SECONDS = 900.0
DEFAULT_DATASET = "photos"
MEMORY_MEASURED = ("peak RSS increase: VmHWM of /proc/self/status read after the run, minus VmRSS just before it "
                   "(VmHWM reset to the current RSS through /proc/self/clear_refs, after malloc_trim, once the "
                   "problem was built and t_grad timed); one process for all sizes")
SERIES = ("n_train", "width")



# ------------------------------------------------------------------------------------------------------------
# the sizes
@dataclass(frozen=True)
class Size:
    """One problem size; ``series`` names the series it is reported in (``"n_train"``, ``"width"`` or both)."""

    n_train: int
    n_classes: int
    width: int
    series: Tuple[str, ...]


def plan_sizes(n_train: Sequence[int], n_classes: Sequence[int], widths: Sequence[int], *, width_n_train: int,
               width_classes: int, default_width: int) -> List[Size]:
    """The sizes in the order they run (see the module docstring): the n_train series (each class count in the
    given order, n_train increasing), then the width series (width increasing); a size in both is listed once, at
    its first place, with both series."""
    order: Dict[Tuple[int, int, int], List[str]] = {}
    for c in dict.fromkeys(n_classes):
        for n in sorted(set(n_train)):
            order.setdefault((n, c, default_width), []).append("n_train")
    for w in sorted(set(widths)):
        order.setdefault((width_n_train, width_classes, w), []).append("width")
    return [Size(n, c, w, tuple(series)) for (n, c, w), series in order.items()]


# ------------------------------------------------------------------------------------------------------------
# one run
def _last(rows: List[dict], key: str) -> float:
    value = rows[-1].get(key) if rows else None
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _per_step(value: Optional[float], steps: int) -> Optional[float]:
    return None if value is None or steps == 0 else value / steps


def measure_run(X, y, size: Size, solver: str, *, target: float, max_seconds: float,
                max_steps: int = DEFAULT_MAX_STEPS, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                device="cpu", dtype: torch.dtype = torch.float32, net: str = "mlp", loss: str = "ce",
                quiet: bool = False, gradient_repeats: int = GRADIENT_REPEATS) -> dict:
    """Build the problem of ``size``, time its gradient, run ``solver`` on it with the seed's loop and return the
    run's numbers (plain JSON data; the keys are those of the module docstring's list).

    Raises:
        ValueError: the size does not fit the data (:func:`~.datasets.select_subset`).
        KeyError: an unknown solver.
    """
    entry = SOLVERS[solver]
    batch = min(size.n_train, batch_size)
    problem = build_problem(X, y, size.n_train, size.n_classes, seed, device=device, dtype=dtype, net=net,
                            loss=loss, width=size.width, batch_size=batch)
    warm_up(problem.loss_func, problem.init_params)
    t_grad = gradient_seconds(problem.loss_func, problem.init_params, gradient_repeats)
    arguments = entry.arguments_for(size.n_classes, loss)
    instance = entry.build(problem.init_params.clone(), problem.loss_func, size.n_classes, loss)
    stop = Stop(step_loss=target, seconds=max_seconds, steps=max_steps, errors="record")
    desc = False if quiet else f"{entry.label} n={size.n_train} C={size.n_classes} width={size.width}"
    cuda = torch.device(device).type == "cuda"
    rss_before = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    trajectory = integrate(instance, stop, progress=desc)
    elapsed = time.perf_counter() - start
    rss_peak = status_mib("VmHWM:") if rss_before is not None else None
    cuda_increase = None
    if cuda:
        torch.cuda.synchronize(device)
        cuda_increase = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2 ** 20
    rows = trajectory.rows()
    steps = len(rows)
    wall = trajectory.wall_time
    split = {key: _last(rows, key) for key in ("time_grad", "time_hvp", "time_eig")}
    other = wall - sum(split.values())
    reason = trajectory.stop_reason
    return {
        "solver": solver, "label": entry.label, "solver_args": arguments, "series": list(size.series),
        "n_train": size.n_train, "n_classes": size.n_classes, "width": size.width, "net": net, "loss": loss,
        "batch_size": batch, "n_params": problem.loss_func.n_params, "target": target,
        "stop_reason": reason, "converged": reason == "target", "stopped": reason in ("max_seconds", "max_steps"),
        "error": trajectory.error,
        "steps": steps, "n_rejected": int(instance.n_rejected), "n_grad": int(instance.n_grad),
        "n_hvp": int(instance.n_hvp),
        "initial_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["new_loss"] if rows else None,
        "flow_time": rows[-1]["t"] if rows else 0.0,
        "t_target": trajectory.crossing_time(target) if reason == "target" else None,
        "wall_seconds": wall, "elapsed_seconds": elapsed, "wall_per_step": _per_step(wall, steps),
        "t_grad": t_grad, "gradient_repeats": gradient_repeats,
        "time_grad": split["time_grad"], "time_hvp": split["time_hvp"], "time_eig": split["time_eig"],
        "time_other": other,
        "grad_per_step": _per_step(split["time_grad"], steps), "hvp_per_step": _per_step(split["time_hvp"], steps),
        "eig_per_step": _per_step(split["time_eig"], steps), "other_per_step": _per_step(other, steps),
        "rss_before_mib": rss_before, "rss_peak_mib": rss_peak,
        "peak_rss_increase_mib": None if rss_peak is None else rss_peak - rss_before,
        "cuda_peak_increase_mib": cuda_increase,
    }


def failed_run(size: Size, solver: str, error: str, *, net: str, loss: str, batch_size: int, target: float) -> dict:
    """The record of a run that could not be made (out of memory): :func:`measure_run`'s keys, no steps, the
    numbers it did not get None, ``stop_reason`` ``"error"`` with ``error``."""
    entry = SOLVERS[solver]
    run = dict.fromkeys(("solver_args", "n_params", "initial_loss", "final_loss", "t_target", "wall_seconds",
                         "elapsed_seconds", "wall_per_step", "t_grad", "time_grad", "time_hvp", "time_eig",
                         "time_other", "grad_per_step", "hvp_per_step", "eig_per_step", "other_per_step",
                         "rss_before_mib", "rss_peak_mib", "peak_rss_increase_mib", "cuda_peak_increase_mib"))
    run.update(solver=solver, label=entry.label, series=list(size.series), n_train=size.n_train,
               n_classes=size.n_classes, width=size.width, net=net, loss=loss,
               batch_size=min(size.n_train, batch_size), target=target, stop_reason="error", converged=False,
               stopped=False, error=error, steps=0, n_rejected=0, n_grad=0, n_hvp=0, flow_time=0.0,
               gradient_repeats=GRADIENT_REPEATS)
    return run


# ------------------------------------------------------------------------------------------------------------
# fits
def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """The least-squares slope of ``log(y)`` on ``log(x)`` (the exponent ``a`` of ``y ~ x^a``); None unless there
    are at least two distinct positive ``x`` with positive finite ``y``."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
             if x is not None and y is not None and x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
    if len({lx for lx, _ in pairs}) < 2:
        return None
    mx = sum(lx for lx, _ in pairs) / len(pairs)
    my = sum(ly for _, ly in pairs) / len(pairs)
    sxx = sum((lx - mx) ** 2 for lx, _ in pairs)
    sxy = sum((lx - mx) * (ly - my) for lx, ly in pairs)
    return sxy / sxx


def _groups(runs: Sequence[dict]):
    """(series, solver, label, n_classes, x key, runs in x order) per line of the figure and fit."""
    out = []
    for series, xkey in (("n_train", "n_train"), ("width", "width")):
        keys = dict.fromkeys((r["solver"], r["n_classes"]) for r in runs if series in r["series"])
        for solver, c in keys:
            group = sorted((r for r in runs if series in r["series"] and r["solver"] == solver
                            and r["n_classes"] == c), key=lambda r: r[xkey])
            out.append((series, solver, group[0]["label"], c, xkey, group))
    return out


def fits(runs: Sequence[dict]) -> List[dict]:
    """The fitted exponents of wall per step and of ``t_grad`` per series, solver and class count (runs with at
    least one step)."""
    out = []
    for series, solver, label, c, xkey, group in _groups(runs):
        stepped = [r for r in group if r["steps"] > 0]
        out.append({"series": series, "solver": solver, "label": label, "n_classes": c, "x": xkey,
                    "sizes": [r[xkey] for r in stepped],
                    "wall_per_step_exponent": fit_exponent([r[xkey] for r in stepped],
                                                           [r["wall_per_step"] for r in stepped]),
                    "t_grad_exponent": fit_exponent([r[xkey] for r in group], [r["t_grad"] for r in group])})
    return out


# ------------------------------------------------------------------------------------------------------------
# output
def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _status(run: dict) -> str:
    reason = run["stop_reason"]
    if reason == "target":
        return "target"
    if reason == "max_seconds":
        return "stopped: time cap"
    if reason == "max_steps":
        return "stopped: max steps"
    if reason == "error":
        error = str(run["error"])
        return f"error: {error if len(error) <= 60 else error[:57] + '...'}"
    return str(reason)


COUNT_HEADERS = ("Solver", "# Train", "# Classes", "Width", "Params", "Batch", "Status", "Steps", "Rejections",
                 "Gradient evals", "HVPs", "Flow time", "Final loss", "Peak RSS + (MiB)")
TIME_HEADERS = ("Solver", "# Train", "# Classes", "Width", "Wall (s)", "Wall/step (s)", "t_grad (s)",
                "Wall/step / t_grad", "Grad/step (s)", "HVP/step (s)", "Eig/step (s)", "Other/step (s)")


def _count_row(r: dict) -> list:
    return [r["label"], str(r["n_train"]), str(r["n_classes"]), str(r["width"]), _num(r["n_params"], "d"),
            str(r["batch_size"]), _status(r), str(r["steps"]), str(r["n_rejected"]), str(r["n_grad"]),
            str(r["n_hvp"]), _num(r["flow_time"], ".5g"), _num(r["final_loss"], ".4g"),
            _num(r["peak_rss_increase_mib"], ".0f")]


def _time_row(r: dict) -> list:
    ratio = None if r["wall_per_step"] is None or not r["t_grad"] else r["wall_per_step"] / r["t_grad"]
    return [r["label"], str(r["n_train"]), str(r["n_classes"]), str(r["width"]), _num(r["wall_seconds"], ".3f"),
            _num(r["wall_per_step"], ".4g"), _num(r["t_grad"], ".4g"), _num(ratio, ".2f"),
            _num(r["grad_per_step"], ".4g"), _num(r["hvp_per_step"], ".4g"), _num(r["eig_per_step"], ".4g"),
            _num(r["other_per_step"], ".4g")]


def _exponent(value: Optional[float]) -> str:
    return "not fitted (fewer than 2 sizes)" if value is None else f"{value:.2f}"


def _fit_note(fit: dict) -> str:
    what = "n_train" if fit["series"] == "n_train" else "width"
    return (f"{fit['label']}, C={fit['n_classes']}, sizes {fit['sizes']}: exponent of wall/step in {what} "
            f"{_exponent(fit['wall_per_step_exponent'])}, of t_grad {_exponent(fit['t_grad_exponent'])}")


def format_table(runs: Sequence[dict], tablefmt: str = "simple") -> str:
    """Two tables of the runs (counts and memory; times) with their notes: which runs a cap stopped, the fitted
    exponents, what the columns and the memory are."""
    counts = tabulate([_count_row(r) for r in runs], headers=COUNT_HEADERS, tablefmt=tablefmt,
                      disable_numparse=True)
    times = tabulate([_time_row(r) for r in runs], headers=TIME_HEADERS, tablefmt=tablefmt, disable_numparse=True)
    notes = []
    capped = [r for r in runs if r["stopped"]]
    if capped:
        notes.append(f"{len(capped)} run(s) stopped by a cap before the target (Status 'stopped'): steps, flow time "
                     "and final loss say how far they got (--max-seconds, --max-steps).")
    for fit in fits(runs):
        notes.append(f"Fitted ({fit['series']} series, least squares in log-log): {_fit_note(fit)}.")
    notes.append("Wall: the run's steps' own time; t_grad: median of timed full-batch gradients at the initial "
                 "parameters; Grad/HVP/Eig/Other per step: the steps' cumulative time_grad, time_hvp, time_eig "
                 "and the rest of the wall time, over the steps.")
    notes.append(f"Memory: {MEMORY_MEASURED}.")
    return counts + "\n\n" + times + "\n\n" + "\n".join(notes)


def scaling_record(runs: Sequence[dict], options: dict, argv: Optional[Sequence[str]]) -> dict:
    """Everything measured, as plain JSON data."""
    config = {key: (list(value) if isinstance(value, (list, tuple)) else value) for key, value in options.items()}
    config["dtype"] = str(config["dtype"]).replace("torch.", "")
    config["argv"] = list(sys.argv[1:] if argv is None else argv)
    return {"configuration": config,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "exponential_euler_solver": __version__},
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "threads": torch.get_num_threads()},
            "memory_measured": MEMORY_MEASURED, "runs": list(runs), "fits": fits(runs)}


def write_plot(path: str, runs: Sequence[dict]) -> None:
    """A log-log PNG of wall per step (solid) and ``t_grad`` (dashed) against n_train and against width, one line
    per solver and class count, the fitted exponents in the legend; runs stopped by a cap are circled. Written
    atomically.

    Raises:
        ImportError: matplotlib is missing (message: how to install it).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(PLOT_MISSING) from exc
    fig = Figure(figsize=(13, 5.2))
    FigureCanvasAgg(fig)
    axes = dict(zip(SERIES, fig.subplots(1, 2)))
    fitted = {(f["series"], f["solver"], f["n_classes"]): f for f in fits(runs)}
    for i, (series, solver, label, c, xkey, group) in enumerate(_groups(runs)):
        ax, fit = axes[series], fitted[(series, solver, c)]
        color = f"C{i % 10}"
        stepped = [r for r in group if r["wall_per_step"] is not None]
        ax.plot([r[xkey] for r in stepped], [r["wall_per_step"] for r in stepped], color=color, marker="o",
                label=f"{label}, C={c}: wall/step, slope {_num(fit['wall_per_step_exponent'], '.2f', 'n/a')}")
        timed = [r for r in group if r["t_grad"] is not None]
        ax.plot([r[xkey] for r in timed], [r["t_grad"] for r in timed], color=color, marker="x", linestyle="--",
                label=f"{label}, C={c}: t_grad, slope {_num(fit['t_grad_exponent'], '.2f', 'n/a')}")
        capped = [r for r in stepped if r["stopped"]]
        if capped:
            once = "stopped by a cap" not in ax.get_legend_handles_labels()[1]  # one legend entry per panel
            ax.scatter([r[xkey] for r in capped], [r["wall_per_step"] for r in capped], s=120, facecolors="none",
                       edgecolors="k", zorder=3, label="stopped by a cap" if once else None)
    for series, ax in axes.items():
        xlabel = "n_train (examples)" if series == "n_train" else "width (hidden units / channels)"
        ax.set(xlabel=xlabel, ylabel="seconds", title=f"Cost against {series}: wall per step (solid), "
               "one gradient (dashed)")
        if ax.get_legend_handles_labels()[0]:
            ax.set(xscale="log", yscale="log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="x-small")
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center")
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))


# ------------------------------------------------------------------------------------------------------------
# the command
def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    default_solvers = [name for name, entry in SOLVERS.items() if entry.in_default_grid]
    p = argparse.ArgumentParser(
        prog=PROG, description="Measure how the cost of a run grows with n_train (at each class count) and with "
        "the network's width: every size in a fresh problem, batches of min(n_train, --batch-size), the seed's "
        "loop to the target, each run capped at --max-seconds. Prints a table with the fitted exponents of wall "
        "per step; --json and --plot write every number and a log-log figure.")
    sizes = p.add_argument_group("sizes")
    sizes.add_argument("--n-train", type=_positive_int, nargs="*", default=list(DEFAULT_N_TRAIN), metavar="N",
                       help="n_train series: training set sizes, at each --n-classes and the default width; no "
                       f"value leaves the series out (default: {' '.join(map(str, DEFAULT_N_TRAIN))})")
    sizes.add_argument("--n-classes", type=_n_classes, nargs="+", default=list(DEFAULT_N_CLASSES), metavar="C",
                       help="class counts of the n_train series (default: "
                       f"{' '.join(map(str, DEFAULT_N_CLASSES))})")
    sizes.add_argument("--widths", type=_positive_int, nargs="*", default=list(DEFAULT_WIDTHS_SERIES), metavar="W",
                       help="width series: hidden units of the MLP (channels of the CNN); no value leaves the "
                       f"series out (default: {' '.join(map(str, DEFAULT_WIDTHS_SERIES))})")
    sizes.add_argument("--width-n-train", type=_positive_int, default=DEFAULT_WIDTH_N_TRAIN, metavar="N",
                       help=f"n_train of the width series (default: {DEFAULT_WIDTH_N_TRAIN})")
    sizes.add_argument("--width-classes", type=_n_classes, default=DEFAULT_WIDTH_CLASSES, metavar="C",
                       help=f"class count of the width series (default: {DEFAULT_WIDTH_CLASSES})")
    run = p.add_argument_group("runs")
    run.add_argument("--solvers", nargs="+", choices=list(SOLVERS), default=default_solvers,
                     help=f"solvers, run one after the other (default: {' '.join(default_solvers)})")
    run.add_argument("--target", type=_float_in(0, closed=False, what="a number"), default=0.01,
                     help="stop when the loss reported by a step is at most this (default: 0.01)")
    run.add_argument("--max-seconds", type=_float_in(0, closed=False, what="a number of seconds"),
                     default=DEFAULT_MAX_SECONDS, metavar="S",
                     help="seconds of stepping after which a run stops, reported as stopped (checked between "
                     f"steps; default: {DEFAULT_MAX_SECONDS:g})")
    run.add_argument("--max-steps", type=_positive_int, default=DEFAULT_MAX_STEPS,
                     help=f"accepted steps after which a run stops (default: {DEFAULT_MAX_STEPS})")
    run.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                     help="examples per batch of the loss, its gradient and its curvature products: "
                     f"min(n_train, this) (default: {DEFAULT_BATCH_SIZE})")
    run.add_argument("--seed", type=_non_negative_int, default=0,
                     help="seed of the subsets and initial parameters (default: 0)")
    run.add_argument("--net", choices=NETWORKS, default="mlp", help="network, as the benchmark's --net "
                     "(default: mlp)")
    run.add_argument("--loss", choices=LOSS_KINDS, default="ce", help="loss, as the benchmark's --loss "
                     "(default: ce)")
    data = p.add_argument_group("data and device")
    data.add_argument("--dataset", choices=sorted(DATASETS), default=DEFAULT_DATASET,
                      help=f"dataset (default: {DEFAULT_DATASET})")
    data.add_argument("--data-dir", default=None, help="folder with the dataset's files (cifar10)")
    add_device_arguments(data)
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", default=None,
                     help="write every number to this JSON file (rewritten after every run)")
    out.add_argument("--plot", metavar="PATH", default=None, help="write a log-log PNG (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.n_train and not args.widths:
        parser.error("arguments --n-train/--widths: both series are empty; nothing to measure")
    _check_device_and_outputs(parser, args)


def _check_sizes(parser: argparse.ArgumentParser, X, y, sizes: Sequence[Size], seed: int) -> None:
    """Every size's subset can be drawn; otherwise exit 2 naming the option it came from."""
    for size in sizes:
        try:
            select_subset(X, y, size.n_train, size.n_classes, seed)
        except ValueError as exc:
            option = "--n-train" if "n_train" in size.series else "--width-n-train"
            parser.error(f"argument {option}: {exc}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 0 (bad options and data exit with status 2, an interrupt with 130)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        X, y = load_dataset(args.dataset, args.data_dir)
    except (OSError, ValueError) as exc:
        parser.error(f"argument --dataset: {args.dataset!r}: {exc}")
    sizes = plan_sizes(args.n_train, args.n_classes, args.widths, width_n_train=args.width_n_train,
                       width_classes=args.width_classes, default_width=DEFAULT_WIDTHS[args.net])
    _check_sizes(parser, X, y, sizes, args.seed)
    dtype = DTYPES[args.dtype]
    options = dict(vars(args), sizes=[{"n_train": s.n_train, "n_classes": s.n_classes, "width": s.width,
                                       "series": list(s.series)} for s in sizes])
    runs: List[dict] = []
    interrupted = False
    try:
        for solver in dict.fromkeys(args.solvers):
            for size in sizes:
                try:
                    run = measure_run(X, y, size, solver, target=args.target, max_seconds=args.max_seconds,
                                      max_steps=args.max_steps, batch_size=args.batch_size, seed=args.seed,
                                      device=args.device, dtype=dtype, net=args.net, loss=args.loss,
                                      quiet=args.quiet)
                except (MemoryError, torch.OutOfMemoryError) as exc:  # this size is too large; try the next
                    run = failed_run(size, solver, f"{type(exc).__name__}: {exc}", net=args.net, loss=args.loss,
                                     batch_size=args.batch_size, target=args.target)
                runs.append(run)
                if args.json is not None:
                    write_json(args.json, scaling_record(runs, options, argv))
    except KeyboardInterrupt:
        interrupted = True
    if runs:
        print(format_table(runs))
        if args.json is not None:
            write_json(args.json, scaling_record(runs, options, argv))
        if args.plot is not None:
            write_plot(args.plot, runs)
    if interrupted:
        print(f"{PROG}: interrupted after {len(runs)} run(s)", file=sys.stderr)
        raise SystemExit(130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
