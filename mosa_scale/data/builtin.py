"""Built-in image sets that need no download: scikit-learn's digits and Debian's Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BUILTIN_SETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_PACKAGE",
    "ImageArrays",
    "MissingDatasetError",
    "fashion_mnist_available",
    "load_builtin",
    "load_digits_images",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
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
BUILTIN_SETS = ("digits", "fashion-mnist")


class MissingDatasetError(FileNotFoundError):
    """A built-in data set whose system package is not installed."""


@dataclass(frozen=True)
class ImageArrays:
    """An in-memory labelled image set.

    Attributes:
        images: uint8 (N, H, W) grayscale images.
        labels: int64 (N,) class indices.
        classes: Class names, indexed by label.
        name: Source name recorded in the shard index.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str


def load_digits_images() -> ImageArrays:
    """scikit-learn's 1797 8x8 handwritten digits, as uint8 images.

    Pixel values 0..16 are scaled to 0..255 (v * 255 / 16, rounded).

    Returns:
        Images (1797, 8, 8) and labels 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    return ImageArrays(images, digits.target.astype(np.int64), tuple(str(i) for i in range(10)), "digits")


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not.

    Args:
        path: File path.

    Returns:
        The array, uint8 for image and label files.

    Raises:
        ValueError: Not an unsigned-byte IDX file, or a size that does not match the header.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def _fashion_files(root: str, subset: str) -> tuple[str, str]:
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = os.path.join(root, f"{subset}-{kind}-ubyte")
        found = next((p for p in (stem + ".gz", stem) if os.path.isfile(p)), None)
        if found is None:
            raise MissingDatasetError(
                f"Fashion-MNIST not found: no {stem}[.gz]. It comes from the Debian package "
                f"{FASHION_MNIST_PACKAGE}: run `apt-get update && apt-get install -y "
                f"{FASHION_MNIST_PACKAGE}` (it installs to {FASHION_MNIST_DIR})"
            )
        paths.append(found)
    return paths[0], paths[1]


def fashion_mnist_available(root: str = FASHION_MNIST_DIR) -> bool:
    """Whether the Fashion-MNIST files are installed under `root`."""
    try:
        for subset in ("train", "t10k"):
            _fashion_files(root, subset)
    except MissingDatasetError:
        return False
    return True


def load_fashion_mnist(root: str = FASHION_MNIST_DIR) -> ImageArrays:
    """Fashion-MNIST, train (60000) then test (10000) images, from the Debian package.

    Args:
        root: Folder of the IDX files.

    Returns:
        Images (70000, 28, 28) and labels 0..9.

    Raises:
        MissingDatasetError: The package `dataset-fashion-mnist` is not installed (the
            message gives the apt command).
        ValueError: Corrupt IDX files.
    """
    images, labels = [], []
    for subset in ("train", "t10k"):
        image_path, label_path = _fashion_files(root, subset)
        x, y = read_idx(image_path), read_idx(label_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{image_path} / {label_path}: shapes {x.shape} and {y.shape} do not pair up")
        images.append(x)
        labels.append(y.astype(np.int64))
    return ImageArrays(np.concatenate(images), np.concatenate(labels), FASHION_MNIST_CLASSES, "fashion-mnist")


def load_builtin(name: str) -> ImageArrays:
    """Load a built-in set by name.

    Args:
        name: "digits" or "fashion-mnist".

    Returns:
        The images and labels.

    Raises:
        ValueError: Unknown name.
        MissingDatasetError: Fashion-MNIST is not installed.
    """
    if name == "digits":
        return load_digits_images()
    if name == "fashion-mnist":
        return load_fashion_mnist()
    raise ValueError(f"unknown built-in set {name!r}; choose one of {', '.join(BUILTIN_SETS)}")
