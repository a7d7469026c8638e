"""The benchmark command's interface: arguments, checks, and what it prints and writes.

``euler-benchmark`` (or ``python -m exponential_euler_solver.benchmark``) trains the seed benchmark's network
on every (n_train, n_classes, seed) of the grid with every chosen solver until the loss reaches the target,
then prints the seed's table of wall times and a table of per-run counts. ``--json`` writes every number,
``--plot`` a figure of loss and tracked curvature against flow time. ``--net cnn`` trains the small convolutional
network of :mod:`.networks` instead, ``--loss mse`` the squared error against one-hot targets of :mod:`.criteria`.

``--compare`` also runs the existing implementation, ``stable-solvers`` 0.1 (:mod:`.peer`), on every grid point
and solver from the same initial parameters, and prints a table of both side by side with a floor of one
gradient per accepted step. ``--fidelity`` integrates the flow with a converged RK4 reference per grid point and
prints every run's crossing-time error and distance to it (:mod:`.suite`).

``--checkpoint PATH`` keeps one checkpoint file for the whole grid (:class:`~.grid_checkpoint.GridCheckpoint`): the
run in progress (its solver state and steps so far, at most every ``--checkpoint-every`` seconds and when it ends) and
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
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..distributed import is_distributed, is_main_process, main_process_decides
from ..errors import CheckpointError
from ..files import cache_folder
from ..solvers import SOLVERS
from . import work_precision
from .datasets import DATASETS, DEFAULT_DATASET, load_dataset
from .grid_checkpoint import DEFAULT_CHECKPOINT_SECONDS, GridCheckpoint
from .peer import DEFAULT_MAX_SECONDS, PEER_MISSING, PeerMissingError, import_peer
from .problem import LOSS_KINDS, NETWORKS, DataError, build_problem
from .report import (
    PLOT_MISSING,
    benchmark_record,
    format_comparison,
    format_fidelity,
    format_tables,
    write_json,
    write_plot,
)
from .results import PointResult, RunResult
from .suite import DEFAULT_MAX_STEPS, check_options, run_points

__all__ = ["main", "build_parser", "run_benchmark", "run_suite", "grid_config", "PROG"]

PROG = "euler-benchmark"
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
MIN_CLASSES, MAX_CLASSES = 2, 10


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


def _default_cache() -> str:
    return cache_folder("references")


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (grid values are checked as they are parsed)."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Time exponential Euler against adaptive gradient descent: train the seed "
        "benchmark's 6-layer ELU MLP (or --net cnn) on each grid point until the full-batch loss reaches the target.")
    grid = p.add_argument_group("grid")
    grid.add_argument("--n-train", type=_positive_int, nargs="+", default=[64, 256], metavar="N",
                      help="training set sizes (default: 64 256)")
    grid.add_argument("--n-classes", type=_n_classes, nargs="+", default=[2, 4, 10], metavar="C",
                      help=f"numbers of classes, each in [{MIN_CLASSES}, {MAX_CLASSES}] (default: 2 4 10)")
    grid.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0], metavar="S",
                      help="seeds of the subset and the initial parameters (default: 0)")
    grid.add_argument("--target", type=_target, default=0.01,
                      help="stop when the loss reported by a step is at most this (default: 0.01)")
    default_solvers = [name for name, entry in SOLVERS.items() if entry.in_default_grid]
    grid.add_argument("--solvers", nargs="+", choices=list(SOLVERS), default=default_solvers,
                      help=f"solvers to run (default: {' '.join(default_solvers)})")
    grid.add_argument("--max-steps", type=_positive_int, default=DEFAULT_MAX_STEPS,
                      help=f"accepted steps after which a run stops, not converged (default: {DEFAULT_MAX_STEPS})")
    grid.add_argument("--max-seconds", type=_positive_seconds, default=None, metavar="S",
                      help="seconds of stepping after which one of our runs stops, not converged (checked between "
                      "steps; default: none)")
    grid.add_argument("--net", choices=NETWORKS, default="mlp",
                      help="network: mlp, the seed's 6-layer ELU MLP (3072 -> 512 x5 -> C); cnn, 2 x [3x3 conv of 32 "
                      "channels, ELU, 2x2 average pooling], then linear to C (Cohen et al. 2021's cnn-avgpool-elu) "
                      "(default: mlp)")
    grid.add_argument("--loss", choices=LOSS_KINDS, default="ce",
                      help="loss: ce, mean cross-entropy; mse, mean over examples of 0.5 * ||f(x) - onehot(y)||^2 "
                      "(exponential Euler's stiff_dim is C - 1 for ce, C for mse) (default: ce)")
    data = p.add_argument_group("data and device")
    data.add_argument("--dataset", choices=sorted(DATASETS), default=DEFAULT_DATASET,
                      help=f"dataset (default: {DEFAULT_DATASET}, bundled with scikit-learn)")
    data.add_argument("--data-dir", default=None,
                      help="folder with the dataset's files (cifar10: cifar-10-batches-py or its parent)")
    add_device_arguments(data)
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
    wp = p.add_argument_group("work-precision")
    wp.add_argument("--work-precision", action="store_true",
                    help="instead of the grid's runs: every method (ours over rtol, with the seed's arguments and "
                    "uncapped; the heun scheme; RK4 over alpha; fixed-lr gradient descent; torchdiffeq dopri5 and "
                    "bosh3 over rtol; stable-solvers) against one converged reference per grid point, with its "
                    "crossing-time error, distance to the reference, counts and wall in units of one gradient; "
                    "--plot draws error against cost")
    wp.add_argument("--wp-quick", action="store_true", help="fewer knob values per method (for long grid points)")
    wp.add_argument("--wp-methods", nargs="+", default=None, metavar="NAME",
                    help="only the methods whose name starts with one of these (ours, heun, rk4, gd, dopri5, bosh3, "
                    "stable-solvers)")
    wp.add_argument("--wp-max-seconds", type=_positive_seconds, default=900.0, metavar="S",
                    help="seconds of stepping after which a run stops (default: 900)")
    wp.add_argument("--reference-cache", metavar="DIR", default=_default_cache(),
                    help="folder where converged references are kept and found again, keyed by configuration "
                    f"('none': no cache; default: {_default_cache()})")
    p.add_argument_group("cost growth").add_argument(
        "--scaling", action="store_true",
        help="instead of the grid: how a run's cost grows with n_train and width (python -m "
        "exponential_euler_solver.benchmark.scaling, also euler-scaling); every other option is that command's "
        "(--scaling --help lists them)")
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


def add_device_arguments(group) -> None:
    """``--device``, ``--dtype`` and ``--threads``, as every benchmark command takes them."""
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", choices=list(DTYPES), default="float32", help="parameter dtype (default: float32)")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help="torch.set_num_threads for the run (default: torch's choice)")


def _check_output_path(parser: argparse.ArgumentParser, option: str, path: Optional[str]) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"argument {option}: the folder of {path!r} does not exist ({folder!r})")
    if os.path.isdir(path):
        parser.error(f"argument {option}: must be a file path; got the directory {path!r}")


def _check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fills in ``args.device`` (its default) and checks that it is a torch device this machine has."""
    if args.device is None:
        args.device = _default_device()
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: not a torch device; got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: CUDA is not available on this machine; got {args.device!r} "
                     "(use --device cpu)")


def _check_device_and_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--device`` (filled in), ``--json`` and ``--plot`` (and matplotlib for it); exits through ``parser.error``."""
    _check_device(parser, args)
    _check_output_path(parser, "--json", args.json)
    _check_output_path(parser, "--plot", args.plot)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(PLOT_MISSING)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need more than one value or the environment; exits through ``parser.error``."""
    _check_device_and_outputs(parser, args)
    if args.compare:
        try:
            import_peer()
        except PeerMissingError:
            parser.error(PEER_MISSING)
        if args.loss != "ce":
            parser.error(f"argument --compare: needs --loss ce (stable-solvers is run with CrossEntropyLoss); got "
                         f"--loss {args.loss}")
    if args.resume and args.checkpoint is None:
        parser.error("argument --resume: needs --checkpoint PATH, the checkpoint to continue")
    if args.checkpoint is not None:
        _check_output_path(parser, "--checkpoint", args.checkpoint)
    try:
        check_options(compare=args.compare, fidelity=args.fidelity, checkpoint=args.checkpoint,
                      compare_max_seconds=args.compare_max_seconds)
    except ValueError as exc:
        parser.error(f"argument --checkpoint: {exc}")  # the message names the options


# ------------------------------------------------------------------------------------------------------------
# running
def run_suite(args: Optional[argparse.Namespace] = None, **kwargs) -> List[PointResult]:
    """Run the grid, with the comparison and the reference when asked for, and return one
    :class:`~.results.PointResult` per (n_train, n_classes, seed).

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
                          max_steps=ns["max_steps"], max_seconds=ns["max_seconds"], quiet=quiet, compare=ns["compare"],
                          compare_max_seconds=ns["compare_max_seconds"], fidelity=ns["fidelity"],
                          progress=progress, checkpoint=checkpoint, net=ns["net"], loss=ns["loss"])
    except DataError as exc:
        raise DataError(f"dataset {ns['dataset']!r}: {exc}") from exc


def grid_config(ns: dict) -> dict:
    """The configuration a grid checkpoint is written for, and that ``--resume`` must match: everything that
    changes a run's numbers (grid values, target, solvers, ``max_steps``, network, loss, dataset, dtype and device
    type).

    Args:
        ns: option values by attribute name (``vars(args)``).
    """
    dtype = ns["dtype"] if isinstance(ns["dtype"], str) else str(ns["dtype"]).replace("torch.", "")
    return {"n_train": [int(v) for v in ns["n_train"]], "n_classes": [int(v) for v in ns["n_classes"]],
            "seeds": [int(v) for v in ns["seeds"]], "target": float(ns["target"]), "solvers": list(ns["solvers"]),
            "max_steps": int(ns["max_steps"]), "max_seconds": ns["max_seconds"], "net": str(ns["net"]),
            "loss": str(ns["loss"]),
            "dataset": str(ns["dataset"]), "dtype": dtype,
            "device": torch.device(ns["device"] or _default_device()).type}


#: Configuration keys added after grid checkpoints were first written, with the value those checkpoints ran with.
_CONFIG_DEFAULTS = {"net": "mlp", "loss": "ce", "max_seconds": None}


def _grid_checkpoint(ns: dict) -> Optional[GridCheckpoint]:
    """The grid checkpoint the options ask for: None, a fresh one, or the loaded one after checking that it was
    written for this configuration (see :func:`run_suite` for what it raises)."""
    path = ns["checkpoint"]
    if path is None:
        if ns["resume"]:
            raise ValueError("resume needs a checkpoint path (--checkpoint PATH); got none")
        return None
    check_options(compare=ns["compare"], fidelity=ns["fidelity"], checkpoint=path,
                  compare_max_seconds=ns["compare_max_seconds"])
    config = grid_config(ns)
    if ns["resume"]:
        try:
            checkpoint = GridCheckpoint.load(path, ns["checkpoint_every"])
        except CheckpointError as exc:
            raise CheckpointError(f"--resume: {exc}") from exc
        if isinstance(checkpoint.config, dict):  # written before these options existed: their defaults then
            for key, value in _CONFIG_DEFAULTS.items():
                checkpoint.config.setdefault(key, value)
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

    In a process group only rank 0 prints the tables and writes ``--json`` and ``--plot``. With ``--scaling`` the
    other arguments go to :func:`.scaling.main`."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if "--scaling" in arguments:
        from . import scaling  # it builds on this module
        return scaling.main([a for a in arguments if a != "--scaling"])
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    initialised = _init_distributed(args)
    try:
        return _main(args, argv)
    finally:
        if initialised:
            dist.destroy_process_group()


def _work_precision(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    """``--work-precision``: the sweep of :mod:`.work_precision` on every grid point, its tables, JSON and plot."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        X, y = load_dataset(args.dataset, args.data_dir)
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: dataset {args.dataset!r}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    progress = None if args.quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    cache = None if args.reference_cache in (None, "none") else args.reference_cache
    results = []
    for n, c, s in dict.fromkeys((n, c, s) for n in args.n_train for c in args.n_classes for s in args.seeds):
        try:
            problem = build_problem(X, y, n, c, s, device=args.device, dtype=DTYPES[args.dtype], net=args.net,
                                    loss=args.loss)
        except ValueError as exc:
            print(f"{PROG}: error: dataset {args.dataset!r}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        where = f"work-precision n={n} C={c} seed={s}"
        tell = None if progress is None else (lambda line, where=where: progress(f"{where}: {line}"))
        result = work_precision.run_work_precision(problem, args.target, dataset=args.dataset, cache_dir=cache,
                                                   quick=args.wp_quick, families=args.wp_methods,
                                                   max_seconds=args.wp_max_seconds, progress=tell)
        results.append(result)
        print(work_precision.format_work_precision(result))
        print()
        if args.json is not None:  # rewritten after each point, so a long sweep keeps what it finished
            record = {"configuration": {"argv": list(sys.argv[1:] if argv is None else argv),
                                        "dataset": args.dataset, "target": args.target, "net": args.net,
                                        "loss": args.loss, "threads": torch.get_num_threads(),
                                        "quick": args.wp_quick, "max_seconds": args.wp_max_seconds},
                      "points": results}
            write_json(args.json, record)
    if args.plot is not None:
        work_precision.write_plot(args.plot, results)
    return 0


def _main(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    if args.work_precision:
        return _work_precision(args, argv)
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
        record = benchmark_record(results, vars(args), argv, points)
        record["configuration"].update(net=args.net, loss=args.loss)
        write_json(args.json, record)
    if args.plot is not None:
        write_plot(args.plot, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
