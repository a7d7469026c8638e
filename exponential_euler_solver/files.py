"""Files the library writes: atomically, as plain containers that load without running code.

Files are written with :func:`torch.save` and read with ``torch.load(..., weights_only=True)``: they hold only
tensors, plain containers (dict, list, tuple) and primitives, so loading one never runs code from the file. Every
file carries a ``format`` marker and a ``format_version``; a reader refuses a newer version with a
:class:`~exponential_euler_solver.CheckpointError` naming it.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .distributed import barrier_if_distributed, is_main_process
from .errors import CheckpointError

__all__ = ["atomic_write", "cache_folder", "torch_save", "torch_load", "format_problem", "check_plain", "deep_equal",
           "library_version", "FORMAT_VERSION", "PathLike"]

# Raised when the layout of the files changes. Version 1 (before the one integration driver): trajectories
# without t_start, slopes, eig_age and seconds; they still load (see Trajectory.from_dict).
FORMAT_VERSION = 2

PathLike = Union[str, "os.PathLike[str]"]


def cache_folder(name: str) -> str:
    """``~/.cache/exponential_euler_solver/<name>``: where the library keeps what it can rebuild (RK4 references,
    compiled loops). Not created here."""
    return os.path.join(os.path.expanduser("~"), ".cache", "exponential_euler_solver", name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[Any], None]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one, never a part.

    ``write(f)`` fills a temporary file in the same folder; it is flushed and fsynced, renamed over ``path`` with
    :func:`os.replace` (atomic on POSIX and Windows), and the folder is fsynced so the rename itself survives a
    power cut. On any error (or interrupt) the temporary file is removed and ``path`` is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it an ordinary file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened, and need no fsync
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems do not support fsync on a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def check_plain(obj: Any, where: str) -> None:
    """Raise TypeError unless ``obj`` is made of tensors, dicts, lists, tuples and primitives only (what
    ``torch.load(weights_only=True)`` reads back)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, Tensor, torch.dtype, torch.device)):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{where} has a key of type {type(key).__name__}; checkpoints hold only plain "
                                "keys (str, int, float, bool)")
            check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, dicts, lists, tuples, "
                    "str, int, float, bool and None (convert it to one of these)")


def torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`, by rank 0 only in a process group."""
    # Data-parallel runs: every rank holds the same state; rank 0 writes, the others wait for it.
    if is_main_process():
        atomic_write(path, lambda f: torch.save(obj, f))
    barrier_if_distributed()


def torch_load(path: PathLike, fmt: str, what: str) -> dict:
    """Load a file written by :func:`torch_save` and check its format marker.

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a torch file, holds objects other than
            tensors and plain containers, or has no (or another) format marker.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} does not exist (or is not a file)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path!r} is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the very end
            reason = "it is truncated or corrupt, or not a file written by torch.save (no complete zip archive)"
        elif isinstance(exc, pickle.UnpicklingError) and "WeightsUnpickler" in str(exc):
            reason = "it holds objects other than tensors and plain containers (refused by weights_only=True)"
        else:
            reason = "it is truncated or corrupt"
        raise CheckpointError(f"cannot read {what} {path!r}: {reason} ({type(exc).__name__}: "
                              f"{_short_reason(exc)})") from exc
    problem = format_problem(obj, fmt)
    if problem is not None:
        raise CheckpointError(f"{path!r} is not a {what} of exponential_euler_solver that this version reads: "
                              f"{problem}")
    return obj


def format_problem(obj, fmt: str) -> Optional[str]:
    """Why ``obj`` is not data of format ``fmt`` at a version this library reads, or None if it is."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict)
                 else f"a {type(obj).__name__}")
        return f"it has no 'format': {fmt!r} marker (found {found})"
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return (f"it has format version {version!r}; this library reads versions up to {FORMAT_VERSION} "
                f"(upgrade exponential_euler_solver)")
    return None


def _short_reason(exc: Exception, limit: int = 160) -> str:
    """The gist of a loading error in one line: torch's weights_only errors wrap it in paragraphs of advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = " ".join(text.strip().split("\n\n", 1)[0].split(". ", 1)[0].split())  # the first sentence
    return text if len(text) <= limit else text[:limit - 3] + "..."


def library_version() -> str:
    """This package's version (written into every checkpoint)."""
    from . import __version__  # at call time: the package imports this module
    return __version__


def deep_equal(a: Any, b: Any) -> bool:
    """Deep equality of plain containers: tensors by dtype, shape and values (NaN equal to NaN), floats with
    NaN equal to NaN."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
        return bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, type(a)) and len(a) == len(b)) and all(deep_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b
