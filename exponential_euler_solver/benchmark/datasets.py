"""Datasets for the MLP benchmark (CIFAR-10 style, flattened to 3072 values).

Every dataset is exposed through one small interface:

* ``DATASETS`` maps a name to a loader ``loader(data_dir) -> (X, y)``;
* ``load_dataset(name, data_dir)`` looks the name up and calls the loader;
* ``select_subset(X, y, n_train, n_classes, seed)`` draws the training subset
  the way the original benchmark notebook did (random permutation of the
  examples whose label is below ``n_classes``, first ``n_train`` of it), but
  with a local generator so the global torch RNG is left untouched.

``X`` is always a float32 tensor of shape ``(N, 3072)`` with values in
``[0, 1]`` laid out channel-major ``(C=3, H=32, W=32)`` like CIFAR-10, and
``y`` an int64 tensor of shape ``(N,)``.

Available datasets:

* ``"digits"`` (default, offline): scikit-learn's bundled 8x8 digits,
  upsampled bilinearly to 32x32 and replicated to 3 channels.
* ``"cifar10"``: the standard CIFAR-10 python batches (training set only)
  read from a local ``cifar-10-batches-py`` folder.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "CIFAR10_DIRNAME",
    "CIFAR10_BATCHES",
    "IMAGE_SHAPE",
    "N_FEATURES",
    "load_dataset",
    "load_digits",
    "load_cifar10",
    "select_subset",
]

PathLike = Union[str, "os.PathLike[str]"]
Loader = Callable[[Optional[PathLike]], Tuple[torch.Tensor, torch.Tensor]]

#: Image layout shared by every dataset: (channels, height, width).
IMAGE_SHAPE: Tuple[int, int, int] = (3, 32, 32)
#: Number of input features per example (3 * 32 * 32).
N_FEATURES: int = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
#: Dataset used when none is requested; works offline.
DEFAULT_DATASET: str = "digits"
#: Name of the folder the CIFAR-10 python archive extracts to.
CIFAR10_DIRNAME: str = "cifar-10-batches-py"
#: Training batch files inside that folder, in the order they are concatenated.
CIFAR10_BATCHES: Tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------
def load_digits(data_dir: Optional[PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's bundled digits as CIFAR-shaped 3x32x32 images.

    The 1797 8x8 images (values 0..16) are scaled to ``[0, 1]``, upsampled to
    32x32 with bilinear interpolation (``align_corners=False``), replicated to
    3 identical channels, flattened channel-major ``(C, H, W)`` and clamped to
    ``[0, 1]``. No download is needed.

    Args:
        data_dir: Ignored; accepted so every loader has the same signature.

    Returns:
        ``(X, y)``: ``X`` float32 of shape ``(1797, 3072)`` in ``[0, 1]``,
        ``y`` int64 of shape ``(1797,)`` with labels ``0..9``.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    del data_dir  # unused
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    images = images.unsqueeze(1)  # (N, 1, 8, 8)
    _, height, width = IMAGE_SHAPE
    up = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    up = up.clamp_(0.0, 1.0).expand(-1, IMAGE_SHAPE[0], -1, -1)  # (N, 3, 32, 32)
    X = up.reshape(up.shape[0], N_FEATURES).contiguous()
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return X, y


# --------------------------------------------------------------------------
# cifar10
# --------------------------------------------------------------------------
# Globals a CIFAR-10 python batch may legitimately reference: the pickled
# numpy uint8 array (plus, for files re-pickled by Python 3 / newer numpy,
# bytes re-encoding and numpy's in-band buffer reconstruction). Anything
# else is refused, so a crafted file in data_dir cannot run arbitrary code
# while being unpickled.
_ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy globals a CIFAR batch needs."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        canonical = module
        if module == "numpy.core" or module.startswith("numpy.core."):
            canonical = "numpy._core" + module[len("numpy.core"):]
        if (canonical, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (not part of a CIFAR-10 batch)"
            )
        if canonical.startswith("numpy._core") and not hasattr(np, "_core"):
            canonical = "numpy.core" + canonical[len("numpy._core"):]  # numpy < 2
        return super().find_class(canonical, name)


def _resolve_cifar10_dir(data_dir: PathLike) -> Path:
    """Return the ``cifar-10-batches-py`` folder for ``data_dir`` (itself or child)."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"CIFAR-10 data_dir does not exist: {str(root)!r} (expected the "
            f"{CIFAR10_DIRNAME!r} folder or its parent)"
        )
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 data_dir is not a directory: {str(root)!r} (expected the "
            f"{CIFAR10_DIRNAME!r} folder or its parent)"
        )
    child = root / CIFAR10_DIRNAME
    if child.is_dir():
        return child
    if root.name == CIFAR10_DIRNAME or any((root / b).exists() for b in CIFAR10_BATCHES):
        return root
    raise FileNotFoundError(
        f"CIFAR-10 batches not found: expected folder {str(child)!r} (or data_dir "
        f"{str(root)!r} itself to contain {', '.join(CIFAR10_BATCHES)})"
    )


def _read_cifar10_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read and validate one CIFAR-10 python batch file."""
    try:
        with open(path, "rb") as fh:
            batch = _RestrictedUnpickler(fh, encoding="bytes").load()
    except OSError as exc:
        raise ValueError(
            f"could not read CIFAR-10 batch file {str(path)!r}: {exc.strerror or exc}"
        ) from exc
    except Exception as exc:  # unpickling can fail with many exception types
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: not a valid python pickle "
            f"({type(exc).__name__})"
        ) from exc

    if not isinstance(batch, dict):
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: expected a dict, "
            f"got {type(batch).__name__}"
        )
    missing = [k for k in (b"data", b"labels") if k not in batch]
    if missing:
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: missing key(s) "
            f"{', '.join(repr(k) for k in missing)}; found {sorted(map(repr, batch))}"
        )

    data = batch[b"data"]
    if not isinstance(data, np.ndarray):
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: b'data' must be a numpy array, "
            f"got {type(data).__name__}"
        )
    if data.dtype != np.uint8:
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: b'data' must have dtype uint8, "
            f"got {data.dtype}"
        )
    if data.ndim != 2 or data.shape[1] != N_FEATURES:
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: b'data' must have shape "
            f"(N, {N_FEATURES}), got {tuple(data.shape)}"
        )

    raw_labels = batch[b"labels"]
    try:
        labels = np.asarray(raw_labels)
    except Exception as exc:
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: b'labels' is not a sequence "
            f"of integers"
        ) from exc
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.dtype == np.bool_:
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: b'labels' must be a 1-D sequence "
            f"of integers, got dtype {labels.dtype} with shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: {labels.shape[0]} labels for "
            f"{data.shape[0]} images"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(
            f"corrupt CIFAR-10 batch file {str(path)!r}: labels must be in 0..9, got "
            f"range {int(labels.min())}..{int(labels.max())}"
        )
    return data, labels.astype(np.int64)


def load_cifar10(data_dir: Optional[PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load the CIFAR-10 training set from the standard python batches.

    Reads ``data_batch_1`` .. ``data_batch_5`` (pickles with keys ``b'data'``,
    a uint8 ``N x 3072`` array in ``(C, H, W)`` order, and ``b'labels'``) and
    concatenates them in that order. Files are unpickled with
    ``encoding='bytes'`` and only the numpy globals a CIFAR batch needs are
    allowed. Nothing is downloaded.

    Args:
        data_dir: The ``cifar-10-batches-py`` folder itself, or its parent.

    Returns:
        ``(X, y)``: ``X`` float32 of shape ``(N, 3072)`` with values
        ``pixel / 255`` in ``[0, 1]``, ``y`` int64 of shape ``(N,)``
        (``N = 50000`` for the real dataset).

    Raises:
        ValueError: If ``data_dir`` is None, or a batch file is corrupt (cannot
            be unpickled, lacks ``b'data'``/``b'labels'``, or has the wrong
            type, dtype or shape); the message names the file.
        FileNotFoundError: If the folder or any batch file is missing; the
            message names the expected path(s).
    """
    if data_dir is None:
        raise ValueError(
            "dataset 'cifar10' requires a data directory: pass --data-dir / data_dir "
            f"pointing at the {CIFAR10_DIRNAME!r} folder or its parent"
        )
    folder = _resolve_cifar10_dir(data_dir)
    paths = [folder / name for name in CIFAR10_BATCHES]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            "CIFAR-10 batch file(s) not found: " + ", ".join(repr(str(p)) for p in missing)
        )

    datas: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    for path in paths:
        data, lab = _read_cifar10_batch(path)
        datas.append(data)
        labels.append(lab)

    X = torch.from_numpy(np.concatenate(datas, axis=0)).to(torch.float32).div_(255.0)
    y = torch.from_numpy(np.concatenate(labels, axis=0))
    return X, y


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------
#: Dataset name -> loader ``loader(data_dir) -> (X, y)``. Add new datasets here.
DATASETS: Dict[str, Loader] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
}


def load_dataset(
    name: str = DEFAULT_DATASET, data_dir: Optional[PathLike] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load a registered dataset by name.

    Args:
        name: A key of ``DATASETS`` (``"digits"`` or ``"cifar10"``).
        data_dir: Folder with the dataset files, for datasets that need one
            (``"cifar10"``); ignored by ``"digits"``.

    Returns:
        ``(X, y)``: ``X`` float32 ``(N, 3072)`` in ``[0, 1]``, ``y`` int64 ``(N,)``.

    Raises:
        ValueError: If ``name`` is not a registered dataset, or the loader
            rejects ``data_dir`` / the data (see the loader).
        FileNotFoundError: If the loader cannot find its files.
    """
    loader = DATASETS.get(name) if isinstance(name, str) else None
    if loader is None:
        raise ValueError(
            f"dataset must be one of {sorted(DATASETS)}; got {name!r}"
        )
    return loader(data_dir)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def select_subset(
    X: torch.Tensor, y: torch.Tensor, n_train: int, n_classes: int, seed: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw the training subset as the original benchmark notebook did.

    Keeps the examples with ``y < n_classes`` (in their original order), draws
    a random permutation of them with ``torch.randperm`` driven by a local
    ``torch.Generator().manual_seed(seed)`` and takes its first ``n_train``
    entries. The global torch RNG state is not touched.

    Args:
        X: Inputs, shape ``(N, ...)``.
        y: Integer labels, shape ``(N,)``.
        n_train: Number of examples to draw; a positive int at most the number
            of examples with label ``< n_classes``.
        n_classes: Keep labels ``0 .. n_classes - 1``; an int in
            ``[2, number of distinct labels in y]``.
        seed: Seed for the local generator.

    Returns:
        ``(X_sub, y_sub)`` with ``n_train`` rows each, in permutation order.

    Raises:
        ValueError: If ``X``/``y`` shapes disagree, or ``n_classes``,
            ``n_train`` or ``seed`` break the rules above; the message names
            the argument, the rule and the received value.
    """
    if y.ndim != 1 or X.ndim < 1 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"X and y must have the same number of rows and y must be 1-D; got "
            f"X shape {tuple(X.shape)}, y shape {tuple(y.shape)}"
        )
    if not _is_int(seed):
        raise ValueError(f"seed must be an int; got {seed!r}")

    n_present = int(torch.unique(y).numel())
    if not _is_int(n_classes) or not 2 <= n_classes <= n_present:
        raise ValueError(
            f"n_classes must be an int in [2, {n_present}] (classes present); got {n_classes!r}"
        )
    n_classes = int(n_classes)

    kept = torch.nonzero(y < n_classes, as_tuple=False).flatten()
    n_kept = int(kept.numel())
    if not _is_int(n_train) or not 1 <= n_train <= n_kept:
        raise ValueError(
            f"n_train must be a positive int at most {n_kept} (examples with label "
            f"< {n_classes}); got {n_train!r}"
        )

    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_kept, generator=gen)
    idx = kept[perm[: int(n_train)]]
    return X[idx], y[idx]
