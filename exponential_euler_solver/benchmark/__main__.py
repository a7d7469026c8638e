"""The benchmark command: time exponential Euler against adaptive gradient descent over a grid of problems.

``euler-benchmark`` (or ``python -m exponential_euler_solver.benchmark``) trains the seed benchmark's network
on every (n_train, n_classes, seed) of the grid with every chosen solver until the loss reaches the target,
then prints the seed's table of wall times and a table of per-run counts. ``--json`` writes every number,
``--plot`` a figure of loss and tracked curvature against flow time.

``--compare`` also runs the existing implementation, ``stable-solvers`` 0.1 (:mod:`.peer`), on every grid point
and solver from the same initial parameters, and prints a table of both side by side with a floor of one
gradient per accepted step. ``--fidelity`` integrates the flow with a converged RK4 reference per grid point and
prints every run's crossing-time error and distance to it (:mod:`.compare`).

``--checkpoint PATH`` keeps one checkpoint file for the whole grid (:class:`~.runner.GridCheckpoint`): the run in
progress (its solver state and steps so far, at most every ``--checkpoint-every`` seconds and when it ends) and
the results of every run that has ended. ``--resume`` continues an interrupted grid from it: finished runs are
reported from the file, the interrupted one continues from its last saved step to the numbers an uninterrupted
run would have reached.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the command initialises the default process group
(NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU) unless one exists, so that every run is data
parallel; only rank 0 (:func:`~exponential_euler_solver.distributed.is_main_process`) shows progress, prints the
tables and writes ``--json`` and ``--plot`` (checkpoints are written by rank 0 only anyway).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from tabulate import tabulate
from tqdm import tqdm

from .. import __version__
from ..distributed import get_world_size, is_distributed, is_main_process, main_process_decides
from ..errors import CheckpointError
from ..trajectory import atomic_write
from .compare import PointResult, run_points
from .datasets import DATASETS, DEFAULT_DATASET, load_dataset
from .peer import (DEFAULT_MAX_SECONDS, HVP_COUNTING, PEER_MISSING, PEER_PACKAGE, PeerMissingError, import_peer,
                   peer_version)
from .runner import DEFAULT_CHECKPOINT_SECONDS, DEFAULT_MAX_STEPS, SOLVERS, DataError, GridCheckpoint, RunResult

__all__ = ["main", "build_parser", "run_benchmark", "run_suite", "format_tables", "format_comparison",
           "format_fidelity", "benchmark_record", "write_json", "write_plot", "grid_config"]

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


def _float_in(low: float, *, closed: bool, what: str) -> Callable[[str], float]:
    """An argparse type: a finite float above ``low`` (or at it, when ``closed``)."""
    interval = f"{'[' if closed else '('}{low:g}, inf)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ((low <= value if closed else low < value) and value < math.inf):
            raise argparse.ArgumentTypeError(f"must be {what} in {interval}; got {text!r}")
        return value

    return parse


_target = _float_in(0, closed=False, what="a number")
_positive_seconds = _float_in(0, closed=False, what="a number of seconds")
_non_negative_seconds = _float_in(0, closed=True, what="a number of seconds")


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
    cmp = p.add_argument_group("comparison")
    cmp.add_argument("--compare", action="store_true",
                     help="also run stable-solvers 0.1 (the existing implementation) with the seed's arguments "
                     "from the same initial parameters, and time one full-batch gradient to define a floor "
                     "(needs the [compare] extra)")
    cmp.add_argument("--compare-max-seconds", type=_positive_seconds, default=DEFAULT_MAX_SECONDS, metavar="S",
                     help="seconds of stepping after which a stable-solvers run stops, not converged "
                     f"(default: {DEFAULT_MAX_SECONDS:g})")
    cmp.add_argument("--fidelity", action="store_true",
                     help="integrate the flow with a converged RK4 reference (max step 0.01) per grid point and "
                     "report each run's crossing-time error and parameter deviations from it")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")
    out.add_argument("--plot", metavar="PATH", default=None,
                     help="write a PNG of loss and top curvature against flow time (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint", metavar="PATH", default=None,
                      help="keep one checkpoint of the whole grid in this file: the run in progress (solver state "
                      "and steps so far) and every finished run's results; must not exist unless --resume")
    ckpt.add_argument("--checkpoint-every", type=_non_negative_seconds, default=DEFAULT_CHECKPOINT_SECONDS,
                      metavar="SECONDS", help="least wall-clock seconds between two checkpoints within a run; "
                      "runs are also saved when they end; 0 saves after every step "
                      f"(default: {DEFAULT_CHECKPOINT_SECONDS:g})")
    ckpt.add_argument("--resume", action="store_true",
                      help="continue the grid of --checkpoint PATH: finished runs are reported from the file, the "
                      "interrupted one continues from its last saved step (the grid options must be the file's)")
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
    if args.compare:
        try:
            import_peer()
        except PeerMissingError:
            parser.error(PEER_MISSING)
    if args.resume and args.checkpoint is None:
        parser.error("argument --resume: needs --checkpoint PATH, the checkpoint to continue")
    if args.checkpoint is not None:
        _check_output_path(parser, "--checkpoint", args.checkpoint)
        if args.compare or args.fidelity:
            parser.error("argument --checkpoint: cannot be combined with --compare or --fidelity (the peer's runs "
                         "and the RK4 references cannot be resumed)")


# ------------------------------------------------------------------------------------------------------------
# running
def run_suite(args: Optional[argparse.Namespace] = None, **kwargs) -> List[PointResult]:
    """Run the grid, with the comparison and the reference when asked for, and return one
    :class:`~.compare.PointResult` per (n_train, n_classes, seed).

    Args:
        args: a namespace from :func:`build_parser` (e.g. ``build_parser().parse_args([...])``), or None.
        **kwargs: option values by their attribute names (``n_train=[16]``, ``target=0.3``, ``compare=True``),
            overriding ``args``; anything not given takes the command's default. Values given this way are
            checked by the runner (ValueError), not by argparse.

    Returns:
        The grid points in grid order, each with this library's runs (``runs``), and with ``compare`` the
        peer's runs and the gradient time, with ``fidelity`` the reference and each run's ``fidelity``. Nothing
        is printed or written besides the progress bars (and the reference's refinements, unless ``quiet``; on
        rank 0 only in a process group) and the checkpoint (``checkpoint``).

    Raises:
        DataError: the dataset could not be loaded (missing CIFAR-10 folder, corrupt file) or a grid point
            does not fit it (more examples than the classes hold).
        PeerMissingError: ``compare`` without ``stable-solvers`` installed.
        CheckpointError: ``resume`` with a checkpoint that is missing, damaged or not a grid checkpoint; or
            (:class:`~.runner.CheckpointMismatchError`) written for another configuration (:func:`grid_config`).
        FileExistsError: ``checkpoint`` names an existing file without ``resume``.
        ValueError: ``resume`` without ``checkpoint``; ``checkpoint`` with ``compare`` or ``fidelity``.
        TypeError: an unknown option name.
    """
    ns = vars(build_parser().parse_args([]))
    if args is not None:
        ns.update(vars(args))
    unknown = sorted(set(kwargs) - set(ns))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; known: {sorted(ns)}")
    ns.update(kwargs)
    ns["device"] = ns["device"] or _default_device()
    checkpoint = _grid_checkpoint(ns)
    if ns["threads"] is not None:
        torch.set_num_threads(ns["threads"])
    dtype = DTYPES[ns["dtype"]] if isinstance(ns["dtype"], str) else ns["dtype"]
    try:
        X, y = load_dataset(ns["dataset"], ns["data_dir"])
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from exc
    quiet = ns["quiet"] or not is_main_process()
    progress = None if quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    try:
        return run_points(X, y, n_train=ns["n_train"], n_classes=ns["n_classes"], seeds=ns["seeds"],
                          solvers=ns["solvers"], target=ns["target"], device=ns["device"], dtype=dtype,
                          max_steps=ns["max_steps"], quiet=quiet, compare=ns["compare"],
                          compare_max_seconds=ns["compare_max_seconds"], fidelity=ns["fidelity"],
                          progress=progress, checkpoint=checkpoint)
    except DataError as exc:
        raise DataError(f"dataset {ns['dataset']!r}: {exc}") from exc


def grid_config(ns: dict) -> dict:
    """The configuration a grid checkpoint is written for, and that ``--resume`` must match: everything that
    changes a run's numbers (grid values, target, solvers, ``max_steps``, dataset, dtype and device type).

    Args:
        ns: option values by attribute name (``vars(args)``).
    """
    dtype = ns["dtype"] if isinstance(ns["dtype"], str) else str(ns["dtype"]).replace("torch.", "")
    return {"n_train": [int(v) for v in ns["n_train"]], "n_classes": [int(v) for v in ns["n_classes"]],
            "seeds": [int(v) for v in ns["seeds"]], "target": float(ns["target"]), "solvers": list(ns["solvers"]),
            "max_steps": int(ns["max_steps"]), "dataset": str(ns["dataset"]), "dtype": dtype,
            "device": torch.device(ns["device"] or _default_device()).type}


def _grid_checkpoint(ns: dict) -> Optional[GridCheckpoint]:
    """The grid checkpoint the options ask for: None, a fresh one, or the loaded one after checking that it was
    written for this configuration (see :func:`run_suite` for what it raises)."""
    path = ns["checkpoint"]
    if path is None:
        if ns["resume"]:
            raise ValueError("resume needs a checkpoint path (--checkpoint PATH); got none")
        return None
    if ns["compare"] or ns["fidelity"]:
        raise ValueError("checkpoint cannot be combined with compare or fidelity: the peer's runs and the RK4 "
                         "references cannot be resumed")
    config = grid_config(ns)
    if ns["resume"]:
        try:
            checkpoint = GridCheckpoint.load(path, ns["checkpoint_every"])
        except CheckpointError as exc:
            raise CheckpointError(f"--resume: {exc}") from exc
        checkpoint.check_config(config)
        return checkpoint
    # Rank 0's view decides, so that every rank takes the same branch.
    if main_process_decides(os.path.exists(path)):
        raise FileExistsError(f"--checkpoint: {path!r} already exists; pass --resume to continue its grid, or "
                              "remove it (or choose another path) to start afresh")
    return GridCheckpoint(path, config, ns["checkpoint_every"])


def run_benchmark(args: Optional[argparse.Namespace] = None, **kwargs) -> List[RunResult]:
    """Run the grid and return one :class:`~.runner.RunResult` per (n_train, n_classes, seed, solver) of this
    library: :func:`run_suite`'s ``runs``, flattened (the peer's runs and the references are left out; use
    :func:`run_suite` for them).

    Args, Raises: as :func:`run_suite`.
    """
    return [run for point in run_suite(args, **kwargs) for run in point.runs]


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


COMPARE_HEADERS = ("# Train", "# Classes", "Seed", "Solver", "Implementation", "Steps", "Gradient evals", "HVPs",
                   "HVPs/step", "HVPs step 0", "Wall time (s)", "Peer/ours wall", "Floor (s)", "Wall/floor",
                   "Flow time at target", "Monotone")


def _pairs(points: Sequence[PointResult]):
    """(point, our run, the peer's run) for every run of ours that has a peer run."""
    for point in points:
        for run in point.runs:
            peer = point.peer_of(run)
            if peer is not None:
                yield point, run, peer


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _stopped(r: RunResult) -> str:
    if r.error:
        return r.error
    if r.stop_reason == "max_seconds":
        return "stopped by --compare-max-seconds"
    return f"stopped after --max-steps {r.steps} steps"


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
    rows, failed = [], []
    for point, ours, peer in _pairs(points):
        floor = point.floor(ours)
        for r in (ours, peer):
            is_ours = r is ours
            rows.append([r.n_train, r.n_classes, r.seed, r.label, r.implementation, r.steps,
                         r.n_grad, r.n_hvp, _fmt(r.hvp_per_step, ".1f"), _fmt(r.first_step_hvp, "d"),
                         _time_cell(r),
                         "-" if is_ours else _fmt(_ratio(peer.wall_time, ours.wall_time), ".2f"),
                         _fmt(floor, ".3f") if is_ours else "-",
                         _fmt(_ratio(ours.wall_time, floor), ".2f") if is_ours else "-",
                         _fmt(r.t_target, ".5g"), "yes" if r.strictly_decreasing else "no"])
            if not r.converged:
                failed.append(r)
    parts = [tabulate(rows, headers=COMPARE_HEADERS, tablefmt=tablefmt, disable_numparse=True), ""]
    parts += [line for line in (_geometric_mean_line(points, solver) for solver in SOLVERS) if line]
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


REFERENCE_HEADERS = ("# Train", "# Classes", "Seed", "RK4 alpha", "Crossing time", "Compared at t", "Steps",
                     "Gradient evals", "HVPs", "Wall time (s)")


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def format_fidelity(points: Sequence[PointResult], tablefmt: str = "simple") -> str:
    """The RK4 references (one row per grid point) and every run against its reference.

    ``Relative error`` is ``(t_target - T_ref) / T_ref`` in percent; ``Deviation at t<i>`` is
    ``||theta(t_i) - theta_ref(t_i)|| / ||theta_ref(t_i) - theta_0||`` at the reference's ``i``-th comparison
    time (listed in the first table); ``-`` where the run did not reach that time.
    """
    ref_rows, notes = [], []
    for p in points:
        ref = p.reference
        if ref is None:
            continue
        if ref.error is not None:
            notes.append(f"  n={p.n_train} C={p.n_classes} seed={p.seed}: no reference: {ref.error}")
            ref_rows.append([p.n_train, p.n_classes, p.seed] + ["-"] * 6 + [_fmt(ref.wall_time, ".3f")])
            continue
        ref_rows.append([p.n_train, p.n_classes, p.seed, f"{ref.alpha:g}", _fmt(ref.crossing_time, ".5g"),
                         ", ".join(f"{t:.5g}" for t in ref.times), ref.steps, ref.n_grad, ref.n_hvp,
                         _fmt(ref.wall_time, ".3f")])
    n_times = max((len(p.reference.times) for p in points if p.reference is not None), default=0)
    headers = ["# Train", "# Classes", "Seed", "Solver", "Implementation", "Flow time at target", "Reference",
               "Relative error"] + [f"Deviation at t{i + 1}" for i in range(n_times)]
    rows = []
    for p in points:
        runs = [r for run in p.runs for r in (run, p.peer_of(run)) if r is not None]
        for r in runs:
            fid = r.fidelity
            if fid is None:
                continue
            devs = [_fmt(d, ".3g") for d in fid.deviations] + ["-"] * (n_times - len(fid.deviations))
            rows.append([r.n_train, r.n_classes, r.seed, r.label, r.implementation, _fmt(r.t_target, ".5g"),
                         _fmt(fid.reference_crossing_time, ".5g"), _pct(fid.relative_error)] + devs)
    parts = ["RK4 reference (max step 0.01; alpha halved until the crossing time moved < 1e-3):",
             tabulate(ref_rows, headers=REFERENCE_HEADERS, tablefmt=tablefmt, disable_numparse=True)]
    if notes:
        parts += [""] + notes
    parts += ["", tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)]
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


def benchmark_record(results: Sequence[RunResult], args: argparse.Namespace,
                     argv: Optional[Sequence[str]] = None, points: Optional[Sequence[PointResult]] = None) -> dict:
    """Everything the command measured, as plain JSON data: configuration, versions and every run.

    With ``points`` (from :func:`run_suite`) and ``--compare``/``--fidelity``, also: ``points`` (gradient time
    and RK4 reference per grid point), ``peer`` (package, version, what was counted), ``peer_runs`` (shaped like
    ``runs``) and ``comparisons`` (the numbers of :func:`format_comparison`, one entry per grid point and solver).
    """
    compare = bool(getattr(args, "compare", False))
    fidelity = bool(getattr(args, "fidelity", False))
    record = {
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
            "compare": compare,
            "compare_max_seconds": getattr(args, "compare_max_seconds", DEFAULT_MAX_SECONDS),
            "fidelity": fidelity,
            "world_size": get_world_size(),
            "checkpoint": getattr(args, "checkpoint", None),
            "resumed": bool(getattr(args, "resume", False)),
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
                          "max_seconds": getattr(args, "compare_max_seconds", DEFAULT_MAX_SECONDS)}
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
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))


# ------------------------------------------------------------------------------------------------------------
def _init_distributed(args: argparse.Namespace) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) without a default process group, initialise
    one: NCCL for a CUDA device (this rank's ``cuda:LOCAL_RANK`` when ``--device`` names no index), gloo for
    the CPU. Returns whether it did (the caller then destroys it)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world_size = 1
    if world_size <= 1 or is_distributed() or not dist.is_available():
        return False
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            args.device = str(device)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``euler-benchmark``; returns 0 (argparse, data and checkpoint errors exit with status 2,
    an interrupt with 130).

    In a process group only rank 0 prints the tables and writes ``--json`` and ``--plot``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    initialised = _init_distributed(args)
    try:
        return _main(args, argv)
    finally:
        if initialised:
            dist.destroy_process_group()


def _main(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    try:
        points = run_suite(args)
    except (DataError, PeerMissingError, CheckpointError, FileExistsError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        hint = ""
        if not is_main_process():
            raise SystemExit(130) from None
        if args.checkpoint is not None and os.path.isfile(args.checkpoint):
            hint = f"; continue from the checkpoint {args.checkpoint!r} with the same options and --resume"
        print(f"{PROG}: interrupted{hint}", file=sys.stderr)
        raise SystemExit(130) from None
    if not is_main_process():
        return 0
    results = [run for point in points for run in point.runs]
    print(format_tables(results))
    if args.compare:
        print()
        print(format_comparison(points))
    if args.fidelity:
        print()
        print(format_fidelity(points))
    if args.json is not None:
        write_json(args.json, benchmark_record(results, args, argv, points))
    if args.plot is not None:
        write_plot(args.plot, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
