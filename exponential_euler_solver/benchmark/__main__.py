"""The benchmark command: time exponential Euler against adaptive gradient descent over a grid of problems.

``euler-benchmark`` (or ``python -m exponential_euler_solver.benchmark``) trains the seed benchmark's network
on every (n_train, n_classes, seed) of the grid with every chosen solver until the loss reaches the target,
then prints the seed's table of wall times and a table of per-run counts. ``--json`` writes every number,
``--plot`` a figure of loss and tracked curvature against flow time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from typing import Callable, Dict, IO, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tabulate import tabulate

from .. import __version__
from .datasets import DATASETS, DEFAULT_DATASET, load_dataset
from .runner import DEFAULT_MAX_STEPS, SOLVERS, DataError, RunResult, run_grid

__all__ = ["main", "build_parser", "run_benchmark", "format_tables", "benchmark_record", "write_json",
           "write_plot"]

PROG = "euler-benchmark"
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
MIN_CLASSES, MAX_CLASSES = 2, 10
PLOT_MISSING = "--plot needs matplotlib: pip install exponential-euler-solver[plot]"
NOT_CONVERGED_MARK = "*"


# ------------------------------------------------------------------------------------------------------------
# arguments
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int; got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative int; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative int; got {text!r}")
    return value


def _n_classes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not MIN_CLASSES <= value <= MAX_CLASSES:
        raise argparse.ArgumentTypeError(f"must be an int in [{MIN_CLASSES}, {MAX_CLASSES}]; got {text!r}")
    return value


def _target(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number in (0, inf); got {text!r}")
    return value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (grid values are checked as they are parsed)."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Time exponential Euler against adaptive gradient descent: train the seed "
        "benchmark's 6-layer ELU MLP on each grid point until the full-batch loss reaches the target.")
    grid = p.add_argument_group("grid")
    grid.add_argument("--n-train", type=_positive_int, nargs="+", default=[64, 256], metavar="N",
                      help="training set sizes (default: 64 256)")
    grid.add_argument("--n-classes", type=_n_classes, nargs="+", default=[2, 4, 10], metavar="C",
                      help=f"numbers of classes, each in [{MIN_CLASSES}, {MAX_CLASSES}] (default: 2 4 10)")
    grid.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0], metavar="S",
                      help="seeds of the subset and the initial parameters (default: 0)")
    grid.add_argument("--target", type=_target, default=0.01,
                      help="stop when the loss reported by a step is at most this (default: 0.01)")
    grid.add_argument("--solvers", nargs="+", choices=list(SOLVERS), default=list(SOLVERS),
                      help="solvers to run (default: all)")
    grid.add_argument("--max-steps", type=_positive_int, default=DEFAULT_MAX_STEPS,
                      help=f"accepted steps after which a run stops, not converged (default: {DEFAULT_MAX_STEPS})")
    data = p.add_argument_group("data and device")
    data.add_argument("--dataset", choices=sorted(DATASETS), default=DEFAULT_DATASET,
                      help=f"dataset (default: {DEFAULT_DATASET}, bundled with scikit-learn)")
    data.add_argument("--data-dir", default=None,
                      help="folder with the dataset's files (cifar10: cifar-10-batches-py or its parent)")
    data.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    data.add_argument("--dtype", choices=list(DTYPES), default="float32", help="parameter dtype (default: float32)")
    data.add_argument("--threads", type=_positive_int, default=None,
                      help="torch.set_num_threads for the run (default: torch's choice)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")
    out.add_argument("--plot", metavar="PATH", default=None,
                     help="write a PNG of loss and top curvature against flow time (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _check_output_path(parser: argparse.ArgumentParser, option: str, path: Optional[str]) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"argument {option}: the folder of {path!r} does not exist ({folder!r})")
    if os.path.isdir(path):
        parser.error(f"argument {option}: must be a file path; got the directory {path!r}")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need more than one value or the environment; exits through ``parser.error``."""
    if args.device is None:
        args.device = _default_device()
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: not a torch device; got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: CUDA is not available on this machine; got {args.device!r} "
                     "(use --device cpu)")
    _check_output_path(parser, "--json", args.json)
    _check_output_path(parser, "--plot", args.plot)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(PLOT_MISSING)


# ------------------------------------------------------------------------------------------------------------
# running
def run_benchmark(args: Optional[argparse.Namespace] = None, **kwargs) -> List[RunResult]:
    """Run the grid and return one :class:`~.runner.RunResult` per (n_train, n_classes, seed, solver).

    Args:
        args: a namespace from :func:`build_parser` (e.g. ``build_parser().parse_args([...])``), or None.
        **kwargs: option values by their attribute names (``n_train=[16]``, ``target=0.3``, ``quiet=True``),
            overriding ``args``; anything not given takes the command's default. Values given this way are
            checked by the runner (ValueError), not by argparse.

    Returns:
        The results, in grid order. Nothing is printed or written besides the progress bars.

    Raises:
        DataError: the dataset could not be loaded (missing CIFAR-10 folder, corrupt file) or a grid point
            does not fit it (more examples than the classes hold).
        TypeError: an unknown option name.
    """
    ns = vars(build_parser().parse_args([]))
    if args is not None:
        ns.update(vars(args))
    unknown = sorted(set(kwargs) - set(ns))
    if unknown:
        raise TypeError(f"run_benchmark got unknown option(s) {unknown}; known: {sorted(ns)}")
    ns.update(kwargs)
    if ns["threads"] is not None:
        torch.set_num_threads(ns["threads"])
    dtype = DTYPES[ns["dtype"]] if isinstance(ns["dtype"], str) else ns["dtype"]
    try:
        X, y = load_dataset(ns["dataset"], ns["data_dir"])
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from exc
    try:
        return run_grid(X, y, n_train=ns["n_train"], n_classes=ns["n_classes"], seeds=ns["seeds"],
                        solvers=ns["solvers"], target=ns["target"], device=ns["device"] or _default_device(),
                        dtype=dtype, max_steps=ns["max_steps"], quiet=ns["quiet"])
    except DataError as exc:
        raise DataError(f"dataset {ns['dataset']!r}: {exc}") from exc


# ------------------------------------------------------------------------------------------------------------
# tables
DETAIL_HEADERS = ("# Train", "# Classes", "Seed", "Solver", "Steps", "Rejections", "Gradient evals", "HVPs",
                  "HVPs/step", "Flow time at target", "Final loss", "Monotone", "Wall time (s)")


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _time_cell(result: Optional[RunResult]) -> str:
    if result is None:
        return "-"
    return _fmt(result.wall_time, ".3f") + ("" if result.converged else NOT_CONVERGED_MARK)


def format_tables(results: Sequence[RunResult], tablefmt: str = "simple") -> str:
    """The seed's table of wall times (one row per grid point) and the per-run details table.

    The seed's table has the columns ``# Train``, ``# Classes`` and ``<label> Time`` (seconds) per solver that
    ran, in :data:`~.runner.SOLVERS` order (``Exponential Euler Time``, ``Adaptive Gradient Time``), plus
    ``Seed`` after ``# Classes`` when the grid has several seeds. A time marked ``*`` belongs to a run that did
    not reach the target. Numbers are rounded here only.
    """
    several_seeds = len({r.seed for r in results}) > 1
    solvers = [name for name in SOLVERS if any(r.solver == name for r in results)]
    by_point: Dict[Tuple[int, int, int], Dict[str, RunResult]] = {}
    for r in results:
        by_point.setdefault((r.n_train, r.n_classes, r.seed), {})[r.solver] = r
    headers = ["# Train", "# Classes"] + (["Seed"] if several_seeds else [])
    headers += [f"{SOLVERS[name].label} Time" for name in solvers]
    rows = [[n, c] + ([s] if several_seeds else []) + [_time_cell(runs.get(name)) for name in solvers]
            for (n, c, s), runs in by_point.items()]
    seed_table = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    detail_rows = [[r.n_train, r.n_classes, r.seed, r.label, r.steps, r.n_rejected, r.n_grad, r.n_hvp,
                    _fmt(r.hvp_per_step, ".1f"), _fmt(r.t_target, ".5g"), _fmt(r.final_loss, ".4g"),
                    "yes" if r.strictly_decreasing else "no", _time_cell(r)] for r in results]
    detail_table = tabulate(detail_rows, headers=DETAIL_HEADERS, tablefmt=tablefmt, disable_numparse=True)
    parts = [seed_table, "", detail_table]
    failed = [r for r in results if not r.converged]
    if failed:
        parts += ["", f"{NOT_CONVERGED_MARK} did not reach the target:"]
        parts += [f"  {r.label} n={r.n_train} C={r.n_classes} seed={r.seed}: "
                  + (r.error or f"stopped after --max-steps {r.steps} steps") for r in failed]
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


def benchmark_record(results: Sequence[RunResult], args: argparse.Namespace,
                     argv: Optional[Sequence[str]] = None) -> dict:
    """Everything the command measured, as plain JSON data: configuration, versions and every run."""
    return _jsonable({
        "configuration": {
            "argv": list(sys.argv[1:] if argv is None else argv),
            "grid": {"n_train": list(args.n_train), "n_classes": list(args.n_classes), "seeds": list(args.seeds)},
            "target": args.target,
            "solvers": list(args.solvers),
            "max_steps": args.max_steps,
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "device": str(args.device),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "exponential_euler_solver": __version__,
        },
        "runs": [r.to_dict() for r in results],
    })


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in its folder: write, flush, fsync, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it an ordinary file's mode
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str, record: dict) -> None:
    """Write ``record`` as indented JSON to ``path``, atomically."""
    text = json.dumps(record, indent=1, allow_nan=False) + "\n"
    _write_atomically(path, lambda fh: fh.write(text.encode("utf-8")))


# ------------------------------------------------------------------------------------------------------------
# plot
def write_plot(path: str, results: Sequence[RunResult]) -> None:
    """A PNG with two panels against flow time: the loss (log scale) and the tracked ``|lambda_1|``.

    One line per run: its own colour, line style and marker per solver. The loss is drawn at ``t = 0`` and at the
    end of every step; ``|lambda_1|`` (``|eigvals[0]|`` for exponential Euler, the sharpness for adaptive
    gradient descent) where it was computed: at the start of each step that refreshed the eigenpairs (steps
    that reuse older ones are skipped). Rendered with the Agg backend, written atomically.

    Raises:
        ImportError: matplotlib is missing (message: how to install it).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(PLOT_MISSING) from exc

    styles = [("-", "o"), ("--", "x"), (":", "s"), ("-.", "^")]
    solver_style = {name: styles[i % len(styles)] for i, name in enumerate(SOLVERS)}
    several_seeds = len({r.seed for r in results}) > 1
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax_loss, ax_curv = fig.subplots(1, 2)
    for i, r in enumerate(results):
        if not r.history:
            continue
        linestyle, marker = solver_style.get(r.solver, ("-", "."))
        label = f"{r.label}, n={r.n_train}, C={r.n_classes}" + (f", seed={r.seed}" if several_seeds else "")
        kw = dict(color=f"C{i % 10}", linestyle=linestyle, marker=marker, markersize=3, markerfacecolor="none",
                  linewidth=1.2, label=label)
        ax_loss.plot([0.0] + [h.t for h in r.history], [r.history[0].loss] + [h.new_loss for h in r.history],
                     **kw)
        curv = [(h.t_start, h.top_curvature) for h in r.history
                if h.eig_refreshed and h.top_curvature is not None]
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
    _write_atomically(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))


# ------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``euler-benchmark``; returns 0 (argparse and data errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        results = run_benchmark(args)
    except DataError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_tables(results))
    if args.json is not None:
        write_json(args.json, benchmark_record(results, args, argv))
    if args.plot is not None:
        write_plot(args.plot, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
