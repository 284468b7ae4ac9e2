"""Tests for the offline dataset loaders (tokenmerge.eval.data), on the real installed data."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from tokenmerge.eval import data
from tokenmerge.eval.zoo import AssetError, ChecksumError, MissingPackageError

_real_find_spec = importlib.util.find_spec


# --------------------------------------------------------------------------------------------
# Stratified subsampling
# --------------------------------------------------------------------------------------------


def test_stratified_balanced_counts_and_seed() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 20, 15])
    idx = data.stratified_indices(labels, 40, seed=3)
    assert len(idx) == len(set(idx.tolist())) == 40
    assert np.bincount(labels[idx], minlength=4).tolist() == [10, 10, 10, 10]
    np.testing.assert_array_equal(idx, data.stratified_indices(labels, 40, seed=3))
    assert not np.array_equal(np.sort(idx), np.sort(data.stratified_indices(labels, 40, seed=4)))
    # classes too small for their share (10, 5 < 15) give the rest to the others
    labels = np.repeat(np.arange(4), [50, 30, 10, 5])
    idx = data.stratified_indices(labels, 60, seed=0)
    counts = np.bincount(labels[idx], minlength=4).tolist()
    assert (
        counts[3] == 5 and counts[2] == 10 and sum(counts) == 60 and abs(counts[0] - counts[1]) <= 1
    )
    # an uneven split differs by at most one between classes that have room
    counts = np.bincount(labels[data.stratified_indices(labels, 7, seed=1)], minlength=4)
    assert counts.sum() == 7 and counts.max() - counts.min() <= 1


def test_stratified_proportional_and_edges() -> None:
    labels = np.repeat(np.arange(3), [1000, 500, 500])
    idx = data.stratified_indices(labels, 30, seed=0, balanced=False)
    assert np.bincount(labels[idx]).tolist() == [15, 8, 7] or np.bincount(labels[idx]).tolist() == [
        15,
        7,
        8,
    ]
    np.testing.assert_array_equal(data.stratified_indices(labels, None), np.arange(2000))
    assert len(data.stratified_indices(labels, 2000, seed=0)) == 2000
    assert len(data.stratified_indices(labels, 0)) == 0
    with pytest.raises(ValueError):
        data.stratified_indices(labels, 2001)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


def test_fashion_mnist_real_files() -> None:
    x, y = data.fashion_mnist("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10_000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1000] * 10
    # the published first test labels: ankle boot, pullover, trouser, trouser, shirt
    assert y[:5].tolist() == [9, 2, 1, 1, 6]
    assert 70 < x.mean() < 76  # Fashion-MNIST's pixel mean is 0.286 * 255 = 72.9
    assert len(data.FASHION_MNIST_CLASSES) == 10


def test_fashion_mnist_subsample() -> None:
    x, y = data.fashion_mnist("train", n=105, seed=0)
    assert x.shape == (105, 28, 28) and np.bincount(y).min() == 10 and np.bincount(y).max() == 11
    x2, y2 = data.fashion_mnist("train", n=105, seed=0)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = data.fashion_mnist("train", n=105, seed=1)
    assert not np.array_equal(x, x3)
    # subsampling keeps image/label pairs together
    full_x, full_y = data.fashion_mnist("train")
    idx = data.stratified_indices(full_y, 105, seed=0)
    np.testing.assert_array_equal(full_x[idx], x)
    with pytest.raises(ValueError):
        data.fashion_mnist("val")


def _copy_fmnist(dest: Path, decompress: bool = False, source: Path | None = None) -> Path:
    """Copy the test split's IDX files (from the installed package) to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted((source or data.fashion_mnist_dir()).glob("t10k-*.gz")):
        if decompress:
            (dest / src.stem).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            shutil.copyfile(src, dest / src.name)
    return dest


def test_fashion_mnist_raw_idx_files(tmp_path: Path) -> None:
    root = _copy_fmnist(tmp_path / "raw", decompress=True)
    x, y = data.fashion_mnist("test", n=50, seed=2, root=root)
    x_gz, y_gz = data.fashion_mnist("test", n=50, seed=2)
    np.testing.assert_array_equal(x, x_gz)
    np.testing.assert_array_equal(y, y_gz)


def test_fashion_mnist_corrupted_copy_is_rejected(tmp_path: Path) -> None:
    root = _copy_fmnist(tmp_path / "bad")
    labels = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # a single relabelled item
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ChecksumError) as err:
        data.fashion_mnist("test", root=root)
    assert str(labels) in str(err.value) and data._FMNIST_SHA256[labels.name] in str(err.value)


def test_fashion_mnist_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    installed = data.fashion_mnist_dir()
    monkeypatch.delenv("TOKENMERGE_FASHION_MNIST", raising=False)
    monkeypatch.setattr(data, "_FMNIST_DEFAULT_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(data.shutil, "which", lambda name: None)  # no dpkg to ask either
    with pytest.raises(MissingPackageError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("test", n=10)
    monkeypatch.setenv("TOKENMERGE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(AssetError, match="TOKENMERGE_FASHION_MNIST"):
        data.fashion_mnist_dir()
    monkeypatch.setenv(
        "TOKENMERGE_FASHION_MNIST", str(_copy_fmnist(tmp_path / "env", source=installed))
    )
    assert data.fashion_mnist_dir() == tmp_path / "env"


def test_fashion_mnist_found_through_dpkg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if shutil.which("dpkg") is None:
        pytest.skip("no dpkg on this system")
    monkeypatch.delenv("TOKENMERGE_FASHION_MNIST", raising=False)
    monkeypatch.setattr(data, "_FMNIST_DEFAULT_DIR", tmp_path / "nowhere")
    assert data.fashion_mnist_dir() == Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# Textiles
# --------------------------------------------------------------------------------------------


def test_textiles_subsample() -> None:
    images, labels, names = data.textiles(n=30, seed=0)
    assert names == ("nominal", "local", "global")
    assert len(images) == 30 and labels.shape == (30,)
    assert sorted(np.bincount(labels).tolist()) == [7, 8, 15]  # class shares kept
    assert all(im.mode == "RGB" and im.size == (250, 250) for im in images)
    _, balanced, _ = data.textiles(n=30, seed=0, balanced=True)
    assert np.bincount(balanced).tolist() == [10, 10, 10]
    again, labels2, _ = data.textiles(n=30, seed=0)
    np.testing.assert_array_equal(labels, labels2)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    paths, all_labels = data._textile_files(str(data._textile_root()))
    assert len(paths) == 2000 and np.bincount(all_labels).tolist() == [1000, 500, 500]


def test_textiles_checksum_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    data._textile_files.cache_clear()
    monkeypatch.setattr(data, "_TEXTILE_MANIFEST_SHA256", "0" * 64)
    try:
        with pytest.raises(ChecksumError, match="0" * 64):
            data.textiles(n=3)
    finally:
        data._textile_files.cache_clear()

    def fake(name: str, *args, **kwargs):
        return None if name == "conformal_clip_data" else _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(MissingPackageError, match=r"pip install conformal-clip-data==0\.1\.4"):
        data.textiles(n=3)


# --------------------------------------------------------------------------------------------
# Photos and helpers
# --------------------------------------------------------------------------------------------


def test_photos() -> None:
    pics = data.photos()
    assert [n for n, _ in pics] == list(data.NATURAL_PHOTOS)
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(data.NATURAL_PHOTOS)
    for _, im in pics:
        assert im.mode == "RGB" and min(im.size) >= 300
        arr = np.asarray(im, dtype=np.float32)
        # real colour photos: the channels differ
        assert np.abs(arr[..., 0] - arr[..., 2]).mean() > 5
    sizes = dict((n, im.size) for n, im in pics)
    assert sizes["astronaut"] == (512, 512) and sizes["coffee"] == (600, 400)
    extra = data.photos(include_scientific=True)
    assert len(extra) == len(data.NATURAL_PHOTOS) + len(data.SCIENTIFIC_PHOTOS)
    assert [n for n, _ in data.photos(["rocket"])] == ["rocket"]
    with pytest.raises(KeyError):
        data.photos(["camera"])  # grey, not a colour photo


def test_natural_crops_are_seeded_balanced_square_crops() -> None:
    images, labels, names = data.natural_crops(23, seed=5)
    assert names == data.NATURAL_CLASSES and len(names) == 5 and "motorcycle" in names
    assert len(images) == 23 and labels.shape == (23,) and labels.dtype == np.int64
    counts = np.bincount(labels, minlength=5)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1
    assert all(im.mode == "RGB" and im.size == (224, 224) for im in images)
    assert data.natural_crops(3, size=96)[0][0].size == (96, 96)
    again, labels2, _ = data.natural_crops(23, seed=5)
    np.testing.assert_array_equal(labels, labels2)
    for a, b in zip(images, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = data.natural_crops(23, seed=6)[0]
    assert not all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, other, strict=True)
    )
    assert len(data.natural_crops(0)[0]) == 0


def test_natural_crops_geometry_and_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    # synthetic 100x150 photos: red encodes the photo, green the column, so each crop shows
    # where it came from, how wide it was and whether it was mirrored
    cols = np.broadcast_to(np.arange(150, dtype=np.uint8), (100, 150))
    fake = {}
    for i, name in enumerate(data.NATURAL_PHOTOS):
        arr = np.zeros((100, 150, 3), dtype=np.uint8)
        arr[..., 0], arr[..., 1] = 40 * i, cols
        fake[name] = arr
    monkeypatch.setattr(data, "_natural_arrays", lambda: fake)
    images, labels, names = data.natural_crops(200, seed=2, size=64)
    photo_of = {40 * i: n for i, n in enumerate(data.NATURAL_PHOTOS)}
    spans, flips = [], []
    for im, label in zip(images, labels, strict=True):
        x = np.asarray(im).astype(np.int64)
        red = np.unique(x[..., 0])
        assert len(red) == 1  # one photo per crop
        source = photo_of[int(red[0])]
        assert names[label] == source.removesuffix("_left").removesuffix("_right")
        green = x[32, :, 1]
        spans.append(abs(green[-1] - green[0]))
        flips.append(green[-1] < green[0])
        assert green.min() >= 0 and green.max() <= 149
    spans = np.array(spans)
    # crop side uniform in [0.3, 1] of the short side (100 px): span = side - 1, up to resampling
    assert spans.min() >= 28 and spans.max() <= 100
    assert spans.min() < 40 and spans.max() > 90  # the whole range is used
    assert 0.35 < np.mean(flips) < 0.65  # mirrored half of the time
    # both motorcycle views are used, for the one class
    used = {photo_of[int(np.asarray(im)[0, 0, 0])] for im in images}
    assert {"motorcycle_left", "motorcycle_right"} <= used


def test_to_rgb_pil() -> None:
    x, _ = data.fashion_mnist("test", n=3)
    ims = data.to_rgb_pil(x)
    assert len(ims) == 3 and ims[0].mode == "RGB" and ims[0].size == (28, 28)
    arr = np.asarray(ims[1])
    np.testing.assert_array_equal(arr[..., 0], x[1])
    np.testing.assert_array_equal(arr[..., 2], x[1])
    big = data.to_rgb_pil(x, size=224)
    assert big[0].size == (224, 224)
    assert data.to_rgb_pil(x[0])[0].size == (28, 28)
    with pytest.raises(ValueError):
        data.to_rgb_pil(x.astype(np.float32))
