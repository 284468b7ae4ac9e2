"""Real labelled data that installs from Debian or PyPI, for offline evaluation.

- `fashion_mnist`: Fashion-MNIST IDX files from the Debian package ``dataset-fashion-mnist``.
- `textiles`: 2,000 simulated textile photos in 3 classes from ``conformal-clip-data==0.1.4``.
- `photos`: scikit-image's real colour photographs.
- `natural_crops`: seeded random crops of those photos, labelled by photo (5 classes).
- `to_rgb_pil`: grey ``[N, H, W]`` arrays -> 3-channel PIL images for a ViT.

Source files are checked against pinned sha256 values before they are read.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tokenmerge.eval.zoo import AssetError, ChecksumError, MissingPackageError, verify_sha256
from tokenmerge.eval.zoo.sources import _package_dir, sha256_file

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "FASHION_MNIST_CLASSES",
    "NATURAL_CLASSES",
    "NATURAL_PHOTOS",
    "SCIENTIFIC_PHOTOS",
    "TEXTILE_CLASSES",
    "fashion_mnist",
    "fashion_mnist_dir",
    "natural_crops",
    "photos",
    "stratified_indices",
    "textiles",
    "to_rgb_pil",
]

# --------------------------------------------------------------------------------------------
# Subsampling
# --------------------------------------------------------------------------------------------


def _balanced_quotas(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Equal shares per class; a class too small to fill its share gives the rest to others."""
    quotas = np.zeros_like(counts)
    remaining = n
    while remaining > 0:
        open_ = np.flatnonzero(quotas < counts)
        share = remaining // len(open_)
        if share == 0:
            # Fewer items left than open classes: a seeded random subset gets one more.
            quotas[rng.choice(open_, remaining, replace=False)] += 1
            break
        add = np.minimum(share, counts[open_] - quotas[open_])
        quotas[open_] += add
        remaining -= int(add.sum())
    return quotas


def _proportional_quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Shares proportional to class sizes (largest-remainder rounding)."""
    exact = counts * n / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: n - int(quotas.sum())]] += 1
    return quotas


def stratified_indices(
    labels: np.ndarray, n: int | None, seed: int = 0, balanced: bool = True
) -> np.ndarray:
    """Indices of a seeded, stratified subsample of size `n` (all indices, in order, if None).

    `balanced`: as many items per class as possible (equal up to one); otherwise each class keeps
    its share of the full set. The result is shuffled with the same seed.
    """
    labels = np.asarray(labels)
    if n is None:
        return np.arange(len(labels))
    if not 0 <= n <= len(labels):
        raise ValueError(f"n must be in [0, {len(labels)}], got {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = _balanced_quotas(counts, n, rng) if balanced else _proportional_quotas(counts, n)
    picks = [
        rng.choice(np.flatnonzero(labels == c), int(q), replace=False)
        for c, q in zip(classes, quotas, strict=True)
    ]
    idx = np.concatenate(picks).astype(np.int64)
    rng.shuffle(idx)
    return idx


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FMNIST_INSTALL = (
    "apt-get install dataset-fashion-mnist "
    "(without root: apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb "
    "DIR, then set TOKENMERGE_FASHION_MNIST=DIR/usr/share/datasets/fashion-mnist)"
)
_FMNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_PREFIX = {"train": "train", "test": "t10k"}
# sha256 of the Debian files (.gz) and of their decompressed contents (for unpacked copies).
_FMNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    ),
    "train-labels-idx1-ubyte.gz": (
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
    ),
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def _has_fmnist(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _FMNIST_SHA256)


def fashion_mnist_dir() -> Path:
    """The folder holding the Fashion-MNIST IDX files.

    Looks at ``$TOKENMERGE_FASHION_MNIST``, then ``/usr/share/datasets/fashion-mnist``, then asks
    ``dpkg -L dataset-fashion-mnist``.
    """
    if env := os.environ.get("TOKENMERGE_FASHION_MNIST"):
        folder = Path(env).expanduser()
        if _has_fmnist(folder):
            return folder
        raise AssetError(f"TOKENMERGE_FASHION_MNIST={env} holds no Fashion-MNIST IDX files")
    if _has_fmnist(_FMNIST_DEFAULT_DIR):
        return _FMNIST_DEFAULT_DIR
    dpkg = shutil.which("dpkg")
    if dpkg is not None:
        listing = subprocess.run(
            [dpkg, "-L", "dataset-fashion-mnist"], capture_output=True, text=True, check=False
        )
        for line in listing.stdout.splitlines():
            if line.endswith("-idx3-ubyte.gz") or line.endswith("-idx3-ubyte"):
                return Path(line).parent
    raise MissingPackageError(f"Fashion-MNIST is not installed. Install it with: {_FMNIST_INSTALL}")


def _idx_file(folder: Path, stem: str) -> Path:
    """The verified IDX file `stem` in `folder`, gzipped or not."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return verify_sha256(folder / name, _FMNIST_SHA256[name])
    raise AssetError(f"{folder} lacks {stem}(.gz); reinstall it with: {_FMNIST_INSTALL}")


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, then one uint32 per dimension)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise AssetError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise AssetError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion_mnist_full(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _FMNIST_PREFIX[split]
    images = _read_idx(_idx_file(Path(folder), f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_idx_file(Path(folder), f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise AssetError(f"Fashion-MNIST {split}: images {images.shape}, labels {labels.shape}")
    return images, labels


def fashion_mnist(
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``uint8 [n, 28, 28]`` and labels ``int64 [n]`` (see
    `FASHION_MNIST_CLASSES`).

    `n`: a seeded class-balanced subsample (all 60,000 / 10,000 in file order if None).
    `root`: a folder with the IDX files, instead of `fashion_mnist_dir`.
    """
    if split not in _FMNIST_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else fashion_mnist_dir()
    images, labels = _fashion_mnist_full(str(folder.resolve()), split)
    idx = stratified_indices(labels, n, seed=seed, balanced=True)
    return images[idx], labels[idx].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Textiles (conformal-clip-data)
# --------------------------------------------------------------------------------------------

TEXTILE_CLASSES: tuple[str, ...] = ("nominal", "local", "global")
_TEXTILE_INSTALL = "pip install conformal-clip-data==0.1.4"
_TEXTILE_COUNTS = {"nominal": 1000, "local": 500, "global": 500}
# sha256 of the manifest "<class>/<file> <sha256>\n" over all 2,000 JPEGs, sorted by path.
_TEXTILE_MANIFEST_SHA256 = "6b0a8b848d14e27b3f5e35a2db239f07ac28efbb1c244c0b34db9945a513e75f"


def _textile_root() -> Path:
    root = _package_dir("conformal_clip_data", _TEXTILE_INSTALL)
    return root / "data" / "textile_images" / "simulated"


def _textile_manifest(root: Path) -> tuple[str, dict[str, list[Path]]]:
    """The manifest digest of the textile folders and their files per class."""
    files = {c: sorted((root / c).glob("*.jpg")) for c in TEXTILE_CLASSES}
    h = hashlib.sha256()
    for c in TEXTILE_CLASSES:
        for p in files[c]:
            h.update(f"{c}/{p.name} {sha256_file(p)}\n".encode())
    return h.hexdigest(), files


@functools.lru_cache(maxsize=2)
def _textile_files(root: str) -> tuple[tuple[Path, ...], np.ndarray]:
    digest, files = _textile_manifest(Path(root))
    if digest != _TEXTILE_MANIFEST_SHA256:
        counts = {c: len(v) for c, v in files.items()}
        raise ChecksumError(
            f"sha256 mismatch for the textile images under {root} (counts {counts}, expected "
            f"{_TEXTILE_COUNTS}): manifest expected {_TEXTILE_MANIFEST_SHA256}, got {digest}. "
            f"Reinstall with: {_TEXTILE_INSTALL} --force-reinstall"
        )
    paths = tuple(p for c in TEXTILE_CLASSES for p in files[c])
    labels = np.concatenate([np.full(len(files[c]), i) for i, c in enumerate(TEXTILE_CLASSES)])
    return paths, labels.astype(np.int64)


def textiles(
    n: int | None = None, seed: int = 0, balanced: bool = False
) -> tuple[list[Image.Image], np.ndarray, tuple[str, ...]]:
    """Simulated textile photos (250x250 RGB): images, labels ``int64 [n]``, class names
    (``nominal`` 1000, ``local`` defect 500, ``global`` defect 500).

    `n`: a seeded stratified subsample (class shares kept, or equal if `balanced`); all
    2,000 in class order if None.
    """
    from PIL import Image

    paths, labels = _textile_files(str(_textile_root()))
    idx = stratified_indices(labels, n, seed=seed, balanced=balanced)
    images = []
    for i in idx:
        with Image.open(paths[i]) as im:
            images.append(im.convert("RGB"))  # convert() loads the pixels, so the file can close
    return images, labels[idx], TEXTILE_CLASSES


# --------------------------------------------------------------------------------------------
# Natural photos (scikit-image)
# --------------------------------------------------------------------------------------------

# Real colour photographs of everyday scenes bundled with scikit-image (no download needed).
NATURAL_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
)
# Real colour photographs, but of scientific subjects (telescope, microscope, fundus camera).
SCIENTIFIC_PHOTOS: tuple[str, ...] = ("hubble_deep_field", "immunohistochemistry", "retina")


def _skimage_photo(name: str) -> np.ndarray:
    try:
        from skimage import data as skdata
    except ImportError as err:
        raise MissingPackageError(
            "scikit-image is not installed. Install it with: pip install scikit-image"
        ) from err
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = skdata.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    if name not in NATURAL_PHOTOS + SCIENTIFIC_PHOTOS:
        raise KeyError(f"Unknown photo {name!r}; known: {NATURAL_PHOTOS + SCIENTIFIC_PHOTOS}")
    return getattr(skdata, name)()


def photos(
    names: Sequence[str] | None = None, include_scientific: bool = False
) -> list[tuple[str, Image.Image]]:
    """scikit-image's real colour photos as ``(name, RGB PIL image)`` pairs, at their own size.

    Default: `NATURAL_PHOTOS` (astronaut, chelsea, coffee, rocket, the stereo motorcycle pair),
    plus `SCIENTIFIC_PHOTOS` if `include_scientific`.
    """
    from PIL import Image

    if names is None:
        names = NATURAL_PHOTOS + (SCIENTIFIC_PHOTOS if include_scientific else ())
    return [(n, Image.fromarray(_skimage_photo(n)).convert("RGB")) for n in names]


#: The classes of `natural_crops`: one per photo, the stereo motorcycle pair counted once
#: (its left and right views are nearly the same scene).
NATURAL_CLASSES: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")
_NATURAL_SOURCES: dict[str, tuple[str, ...]] = {c: (c,) for c in NATURAL_CLASSES[:-1]}
_NATURAL_SOURCES["motorcycle"] = ("motorcycle_left", "motorcycle_right")


@functools.lru_cache(maxsize=1)
def _natural_arrays() -> dict[str, np.ndarray]:
    return {name: _skimage_photo(name) for name in NATURAL_PHOTOS}


def natural_crops(
    n: int, seed: int = 0, size: int = 224, min_scale: float = 0.3
) -> tuple[list[Image.Image], np.ndarray, tuple[str, ...]]:
    """Seeded random square crops of `NATURAL_PHOTOS`: RGB images of ``size x size``, labels
    ``int64 [n]`` (the photo a crop comes from) and the class names `NATURAL_CLASSES`.

    Each crop's side is uniform in [`min_scale`, 1] of its photo's short side, at a uniform
    random position, mirrored with probability 1/2, then resized (bicubic) to `size`. A
    motorcycle crop comes from the left or the right view at random. The labels are round
    robin over the classes, shuffled with the seed: the classes are balanced up to one.
    """
    from PIL import Image

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    k = len(NATURAL_CLASSES)
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)
    arrays = _natural_arrays()
    images = []
    for label in labels:
        sources = _NATURAL_SOURCES[NATURAL_CLASSES[label]]
        arr = arrays[sources[rng.integers(len(sources))]]
        h, w = arr.shape[:2]
        side = max(1, round(rng.uniform(min_scale, 1.0) * min(h, w)))
        top, left = rng.integers(h - side + 1), rng.integers(w - side + 1)
        crop = arr[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        im = Image.fromarray(np.ascontiguousarray(crop)).convert("RGB")
        images.append(im.resize((size, size), Image.Resampling.BICUBIC))
    return images, labels, NATURAL_CLASSES


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def to_rgb_pil(images: np.ndarray, size: int | None = None) -> list[Image.Image]:
    """Grey images ``uint8 [N, H, W]`` -> RGB PIL images (grey repeated), optionally resized
    (bicubic) to ``size x size``. `VisionModel.preprocess` also takes the arrays directly."""
    from PIL import Image

    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N, H, W], got {arr.dtype} {arr.shape}")
    out = []
    for a in arr:
        im = Image.fromarray(a, mode="L").convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        out.append(im)
    return out
