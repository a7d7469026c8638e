"""Peak memory of one block Hessian-vector product against the number of examples (Linux).

``python -m exponential_euler_solver.benchmark.memory --n-train 256 4096 --batch-size 256 --block 10`` measures,
for each ``n_train`` in a fresh Python process, the seed's network (``--n-classes`` outputs) on random inputs of
the benchmark's shape: the resident set size just before ``LossFunction.hvp`` on a ``(P, block)`` block, and its
peak during the call (``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs`` first). The
increase is what the product itself needed; with batches it should not grow with ``n_train``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch
from tabulate import tabulate

from ..curvature import HessianOperator
from ..loss import LossFunction
from .datasets import N_FEATURES
from .problem import build_network

__all__ = ["status_mib", "reset_peak_rss", "measure", "main"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def status_mib(key: str) -> Optional[float]:
    """The value of ``key`` (``"VmRSS:"``, ``"VmHWM:"``) in ``/proc/self/status`` in MiB; None where there is
    no such file or line (not Linux)."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def reset_peak_rss() -> Optional[float]:
    """Hand freed memory back to the OS, reset the peak RSS (``VmHWM``) to the current one and return it (MiB);
    None where this cannot be done (not Linux). Without the trim glibc keeps freed memory resident, and a
    measured call can reuse it without raising the RSS at all (seen: an increase of 0 MiB for a product holding
    20 MiB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return None
    return status_mib("VmRSS:")


def measure(n_train: int, batch_size: int, block: int, n_classes: int = 10, seed: int = 0) -> Dict[str, float]:
    """Memory of one block HVP in this process (see the module docstring); MiB."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n_train, N_FEATURES, generator=gen)
    y = torch.randint(0, n_classes, (n_train,), generator=gen)
    loss = LossFunction(torch.utils.data.TensorDataset(X, y), torch.nn.CrossEntropyLoss(),
                        build_network(n_classes), batch_size=batch_size)
    torch.manual_seed(seed)
    params = loss.initialize_parameters()
    V = torch.randn(loss.n_params, block, generator=gen)
    hessian = HessianOperator(loss, params)
    hessian @ V[:, :1]  # one-time allocations (autograd, kernels) out of the way
    before = reset_peak_rss()
    if before is None:
        raise RuntimeError(f"measuring memory needs Linux's {_STATUS} and {_CLEAR_REFS}")
    result = hessian @ V
    peak = status_mib("VmHWM:")
    return {"n_train": n_train, "batch_size": batch_size, "block": block, "rss_before_mib": before,
            "peak_mib": peak, "increase_mib": peak - before,
            "result_mib": result.numel() * result.element_size() / 2 ** 20}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m exponential_euler_solver.benchmark.memory",
                                     description="Peak memory of one block HVP against n_train (Linux).")
    parser.add_argument("--n-train", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--block", type=int, default=10, help="vectors in the block (default 10)")
    parser.add_argument("--n-classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one measurement, JSON out
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "block", "n_classes", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int; got {getattr(args, name)}")
    if any(n < 1 for n in args.n_train):
        parser.error(f"--n-train values must be positive ints; got {args.n_train}")
    torch.set_num_threads(args.threads)
    if args.single:
        print(json.dumps(measure(args.n_train[0], args.batch_size, args.block, args.n_classes)))
        return 0
    rows: List[Dict[str, float]] = []
    for n in args.n_train:  # a fresh process each, so one measurement's peak cannot hide in another's
        cmd = [sys.executable, "-m", "exponential_euler_solver.benchmark.memory", "--single", "--n-train", str(n),
               "--batch-size", str(args.batch_size), "--block", str(args.block), "--n-classes", str(args.n_classes),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["increase_mib"]
    print(tabulate([[r["n_train"], r["batch_size"], r["block"], f"{r['rss_before_mib']:.0f}", f"{r['peak_mib']:.0f}",
                     f"{r['increase_mib']:.0f}", f"{r['increase_mib'] / base:.2f}", f"{r['result_mib']:.0f}"]
                    for r in rows],
                   headers=("# Train", "Batch size", "Block", "RSS before (MiB)", "Peak (MiB)", "Increase (MiB)",
                            f"Increase / n={rows[0]['n_train']}", "Result alone (MiB)"),
                   disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
