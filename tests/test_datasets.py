"""Tests for exponential_euler_solver.benchmark.datasets."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    ds = importlib.import_module("exponential_euler_solver.benchmark.datasets")
except ImportError:  # package __init__ not importable yet: load the file directly
    _path = Path(__file__).resolve().parents[1] / "exponential_euler_solver" / "benchmark" / "datasets.py"
    _spec = importlib.util.spec_from_file_location("_datasets_under_test", _path)
    ds = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(ds)


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return ds.load_dataset("digits")


def test_digits_shape_dtype_range(digits):
    X, y = digits
    assert X.shape == (1797, 3072)
    assert X.dtype == torch.float32
    assert y.shape == (1797,)
    assert y.dtype == torch.int64
    assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0
    assert float(X.min()) < 1e-6
    assert float(X.max()) > 1 - 1e-6
    assert sorted(torch.unique(y).tolist()) == list(range(10))


def test_digits_is_default_and_ignores_data_dir(digits):
    assert ds.DEFAULT_DATASET == "digits"
    X, y = ds.load_dataset(data_dir="/does/not/matter")
    assert torch.equal(X, digits[0]) and torch.equal(y, digits[1])


def test_digits_channels_identical(digits):
    X, _ = digits
    img = X.view(-1, 3, 32, 32)
    assert torch.equal(img[:, 0], img[:, 1])
    assert torch.equal(img[:, 0], img[:, 2])


def test_digits_upsampled_mean_matches_original(digits):
    from sklearn.datasets import load_digits

    X, y = digits
    bunch = load_digits()
    orig_mean = torch.from_numpy(bunch.images.reshape(len(bunch.images), -1).mean(axis=1) / 16.0)
    up_mean = X.double().mean(dim=1)
    assert torch.equal(y, torch.from_numpy(bunch.target.astype(np.int64)))
    rel = (up_mean - orig_mean).abs() / orig_mean
    assert float(rel.max()) < 0.02


# --------------------------------------------------------------------------
# cifar10 (fake batches)
# --------------------------------------------------------------------------
N_PER_BATCH = 4


def _fake_batch(b: int):
    idx = np.arange(N_PER_BATCH) + N_PER_BATCH * b  # global image index
    data = ((np.arange(3072)[None, :] + 7 * idx[:, None]) % 256).astype(np.uint8)
    labels = [int(i) % 10 for i in idx]
    return data, labels


def _write_batch(path: Path, b: int, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    data, labels = _fake_batch(b)
    obj = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": []}
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.fixture
def cifar_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(5):
        _write_batch(folder / f"data_batch_{b + 1}", b, protocol=2 if b % 2 else 5)
    (folder / "test_batch").write_bytes(b"not used")
    return tmp_path


def _expected():
    datas, labels = zip(*(_fake_batch(b) for b in range(5)))
    X = torch.from_numpy(np.concatenate(datas).astype(np.float32) / np.float32(255))
    y = torch.tensor([lab for batch in labels for lab in batch], dtype=torch.int64)
    return X, y


@pytest.mark.parametrize("use_parent", [True, False])
def test_cifar10_reads_both_dir_forms(cifar_root, use_parent):
    data_dir = cifar_root if use_parent else cifar_root / "cifar-10-batches-py"
    X, y = ds.load_dataset("cifar10", str(data_dir))
    X_exp, y_exp = _expected()
    assert X.shape == (5 * N_PER_BATCH, 3072) and X.dtype == torch.float32
    assert y.dtype == torch.int64
    torch.testing.assert_close(X, X_exp, rtol=0, atol=1e-7)
    assert torch.equal(y, y_exp)
    # spot-check a value: image 6 (batch 2, row 2), pixel 10 -> (10 + 42) / 255
    assert X[6, 10].item() == pytest.approx(52 / 255)


def test_cifar10_accepts_legacy_numpy_core_globals(cifar_root):
    folder = cifar_root / "cifar-10-batches-py"
    data, labels = _fake_batch(0)
    raw = pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
    assert b"numpy._core.multiarray\n" in raw
    (folder / "data_batch_1").write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    X, _ = ds.load_cifar10(folder)
    torch.testing.assert_close(X, _expected()[0], rtol=0, atol=1e-7)


def test_cifar10_requires_data_dir():
    with pytest.raises(ValueError, match="data-dir|data_dir"):
        ds.load_dataset("cifar10")


def test_cifar10_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as exc:
        ds.load_dataset("cifar10", missing)
    assert str(missing) in str(exc.value)


def test_cifar10_parent_without_batches_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        ds.load_dataset("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(exc.value)


def test_cifar10_missing_batch_file(cifar_root):
    path = cifar_root / "cifar-10-batches-py" / "data_batch_5"
    path.unlink()
    with pytest.raises(FileNotFoundError) as exc:
        ds.load_dataset("cifar10", cifar_root)
    assert str(path) in str(exc.value)
    assert "data_batch_4" not in str(exc.value)


def test_cifar10_truncated_file(cifar_root):
    path = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="data_batch_3") as exc:
        ds.load_dataset("cifar10", cifar_root)
    assert exc.value.__cause__ is not None
    assert "Traceback" not in str(exc.value)


def test_cifar10_random_bytes_file(cifar_root):
    path = cifar_root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="data_batch_2"):
        ds.load_dataset("cifar10", cifar_root)


@pytest.mark.parametrize(
    "obj, what",
    [
        ([1, 2, 3], "dict"),
        ({b"data": np.zeros((4, 3072), np.uint8)}, "labels"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8"),
        ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, "shape"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "labels"),
    ],
)
def test_cifar10_wrong_content(cifar_root, obj, what):
    path = cifar_root / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match="data_batch_4") as exc:
        ds.load_dataset("cifar10", cifar_root)
    assert what in str(exc.value)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar10_refuses_arbitrary_globals(cifar_root, tmp_path):
    marker = tmp_path / "pwned"
    path = cifar_root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(str(marker)), b"labels": []}))
    with pytest.raises(ValueError, match="data_batch_1"):
        ds.load_dataset("cifar10", cifar_root)
    assert not marker.exists()


# --------------------------------------------------------------------------
# photos (patches of scikit-image's bundled photographs)
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage")
    return ds.load_dataset("photos")


def _photo_mean_colour(name):
    """Mean RGB of a source photograph straight from skimage.data (retina: central 70% square)."""
    from skimage import data as skdata

    img = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
    if name == "retina":
        lo = int(round(0.15 * img.shape[0]))
        img = img[lo:-lo, lo:-lo]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img.reshape(-1, 3).mean(axis=0) / 255.0


def test_photos_shape_dtype_range_and_counts(photos):
    X, y = photos
    n_classes = len(ds.PHOTOS_CLASSES)
    assert n_classes == 10 and len(set(ds.PHOTOS_CLASSES)) == 10
    assert ds.PHOTOS_PER_CLASS >= 2048
    assert X.shape == (n_classes * ds.PHOTOS_PER_CLASS, 3072) and X.dtype == torch.float32
    assert y.shape == (X.shape[0],) and y.dtype == torch.int64
    assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0
    assert float(X.min()) < 0.01 and float(X.max()) > 0.99
    assert torch.bincount(y).tolist() == [ds.PHOTOS_PER_CLASS] * n_classes
    assert torch.equal(y, torch.arange(n_classes).repeat_interleave(ds.PHOTOS_PER_CLASS))
    assert int((y < 2).sum()) >= 4096


def test_photos_deterministic_and_offline(photos, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the photos dataset must not use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    X, y = photos
    X2, y2 = ds.load_photos(data_dir="/does/not/matter")  # cached
    assert torch.equal(X2, X) and torch.equal(y2, y)
    state = torch.get_rng_state()
    ds._build_photos.cache_clear()
    X3, y3 = ds.load_photos()  # built again from the files
    assert torch.equal(torch.get_rng_state(), state)
    assert X3 is not X and torch.equal(X3, X) and torch.equal(y3, y)


def test_photos_classes_are_distinct_photographs(photos):
    X, y = photos
    n_classes = len(ds.PHOTOS_CLASSES)
    img = X.view(n_classes, ds.PHOTOS_PER_CLASS, 3, 32 * 32)
    # label k comes from photograph PHOTOS_CLASSES[k]: its mean colour is the nearest one
    class_colour = (img.sum(dim=3).double().mean(dim=1) / (32 * 32)).numpy()
    photo_colour = np.stack([_photo_mean_colour(name) for name in ds.PHOTOS_CLASSES])
    dist = np.abs(class_colour[:, None, :] - photo_colour[None, :, :]).max(axis=-1)
    assert dist.argmin(axis=1).tolist() == list(range(n_classes))
    assert float(dist.diagonal().max()) < 0.05
    # the two grayscale photographs have identical channels, the colour ones do not
    gray = [k for k in range(n_classes)
            if torch.equal(img[k, :, 0], img[k, :, 1]) and torch.equal(img[k, :, 0], img[k, :, 2])]
    assert gray == [ds.PHOTOS_CLASSES.index("camera"), ds.PHOTOS_CLASSES.index("coins")]
    # class-mean images are far apart, and no patch occurs twice (within or across classes)
    means = X.view(n_classes, ds.PHOTOS_PER_CLASS, -1).mean(dim=1)
    gaps = torch.cdist(means, means)[~torch.eye(n_classes, dtype=torch.bool)]
    assert float(gaps.min()) > 1.0
    w = torch.randn(3072, 2, generator=torch.Generator().manual_seed(0))
    fingerprints = X @ w  # two random projections: equal patches have equal rows
    assert torch.unique(fingerprints, dim=0).shape[0] == X.shape[0]


def test_photos_patch_grid_matches_photograph(photos):
    import torch.nn.functional as F
    from skimage import data as skdata

    X, _ = photos
    # class 1 (chelsea, 300x451): its first patch is the top-left corner of the copy with shorter side 256
    assert ds.PHOTOS_CLASSES[1] == "chelsea"
    photo = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1)[None].float() / 255
    copy = F.interpolate(photo, size=(256, 385), mode="bilinear", align_corners=False, antialias=True)
    first = X[ds.PHOTOS_PER_CLASS].view(3, 32, 32)
    torch.testing.assert_close(first, copy[0, :, :32, :32].clamp(0, 1), rtol=0, atol=1e-6)


def test_photos_normalize_option(photos):
    X, y = photos
    Xn, yn = ds.load_photos(normalize=True)
    assert Xn.shape == X.shape and Xn.dtype == torch.float32 and torch.equal(yn, y)
    per_channel = Xn.view(X.shape[0], 3, -1)
    count = X.shape[0] * 32 * 32
    mean = per_channel.sum(dim=2).double().sum(dim=0) / count
    mean_sq = torch.linalg.vector_norm(per_channel, dim=2).double().square().sum(dim=0) / count
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(mean_sq, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-3)
    # an increasing affine map of each channel: it keeps the order of the values
    k = ds.PHOTOS_PER_CLASS * 3 + 17
    for c in range(3):
        order = torch.argsort(X[k, 1024 * c : 1024 * (c + 1)])
        assert bool((Xn[k, 1024 * c : 1024 * (c + 1)][order].diff() >= 0).all())
    assert float(ds.load_photos()[0].max()) <= 1.0  # the cached [0, 1] tensors are untouched


def test_photos_select_subset_4096_two_classes(photos):
    X, y = photos
    Xs, ys = ds.select_subset(X, y, n_train=4096, n_classes=2, seed=0)
    assert Xs.shape == (4096, 3072) and Xs.dtype == torch.float32
    assert set(ys.tolist()) == {0, 1}
    Xa, ya = ds.select_subset(X, y, n_train=4096, n_classes=10, seed=0)
    assert Xa.shape == (4096, 3072) and set(ya.tolist()) == set(range(10))


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------
def test_registry_and_unknown_name():
    assert {"digits", "cifar10", "photos"} <= set(ds.DATASETS)
    assert ds.DATASETS["photos"] is ds.load_photos
    with pytest.raises(ValueError) as exc:
        ds.load_dataset("mnist")
    msg = str(exc.value)
    assert "dataset" in msg and "'mnist'" in msg
    assert "digits" in msg and "cifar10" in msg and "photos" in msg


# --------------------------------------------------------------------------
# select_subset
# --------------------------------------------------------------------------
def test_select_subset_reproducible_and_valid(digits):
    X, y = digits
    state = torch.get_rng_state()
    a = ds.select_subset(X, y, n_train=100, n_classes=3, seed=0)
    b = ds.select_subset(X, y, n_train=100, n_classes=3, seed=0)
    c = ds.select_subset(X, y, n_train=100, n_classes=3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1]) or not torch.equal(a[0], c[0])
    assert a[0].shape == (100, 3072) and a[1].shape == (100,)
    assert int(a[1].max()) < 3
    assert a[0].dtype == torch.float32 and a[1].dtype == torch.int64


def test_select_subset_matches_notebook_recipe():
    X = torch.arange(20, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(20) % 4
    Xs, ys = ds.select_subset(X, y, n_train=5, n_classes=2, seed=3)
    kept = torch.nonzero(y < 2).flatten()
    perm = torch.randperm(len(kept), generator=torch.Generator().manual_seed(3))
    assert torch.equal(Xs[:, 0].long(), kept[perm[:5]])
    assert torch.equal(ys, y[kept[perm[:5]]])
    # all kept examples, as a permutation
    Xa, _ = ds.select_subset(X, y, n_train=10, n_classes=2, seed=3)
    assert sorted(Xa[:, 0].long().tolist()) == kept.tolist()


@pytest.mark.parametrize("n_train", [0, -1, 361, 5000, 2.5, "10", True])
def test_select_subset_bad_n_train(digits, n_train):
    X, y = digits
    with pytest.raises(ValueError, match="n_train") as exc:
        ds.select_subset(X, y, n_train=n_train, n_classes=2, seed=0)
    assert repr(n_train) in str(exc.value)


@pytest.mark.parametrize("n_classes", [1, 0, 11, 2.0, None])
def test_select_subset_bad_n_classes(digits, n_classes):
    X, y = digits
    with pytest.raises(ValueError, match="n_classes") as exc:
        ds.select_subset(X, y, n_train=10, n_classes=n_classes, seed=0)
    assert repr(n_classes) in str(exc.value)
