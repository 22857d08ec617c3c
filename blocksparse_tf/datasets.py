"""Small real datasets for the examples, read from disk only (nothing is downloaded).

- :func:`load_digits`: scikit-learn's bundled 8 x 8 handwritten digits (1797 images).
- :func:`load_mnist`: MNIST from the four IDX files (plain or gzipped) in a folder.
"""

import gzip
import os
import zlib

import numpy as np

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_digits(n_test, seed=0):
    """scikit-learn's digits, split at random: (x_train, y_train, x_test, y_test).

    Images are float32 of shape (n, 8, 8) in [0, 1], labels int64.  The first ``n_test``
    images of a permutation drawn with ``seed`` are the test set; ``n_test`` is an integer
    from 0 to 1797.
    """
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)):
        raise ValueError(f"n_test must be an integer number of test images; got {n_test!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn "
                          "(or give the example MNIST files with --mnist DIR)") from e
    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    if not 0 <= n_test <= len(y):
        raise ValueError(f"n_test must lie in [0, {len(y)}] (the digits there are); got {n_test}")
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def read_idx(path):
    """The array stored in one IDX file (the MNIST format), plain or gzipped (a name ending in
    .gz).  ``path``: a string or path-like."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, or cut short
        raise ValueError(f"{path} is not a readable gzip file: {e}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is cut short: its header names {ndim} dimensions")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(f"{path} holds {len(data)} bytes; its header {dims} asks for {expected}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_path(folder, stem):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no MNIST folder {folder}")
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    dotted = stem.replace("-idx", ".idx")
    raise FileNotFoundError(f"no {stem} (or {stem}.gz, {dotted}, {dotted}.gz) in {folder}")


def load_mnist(folder):
    """MNIST as (x_train, y_train, x_test, y_test): float32 images (n, 28, 28) in [0, 1], int64
    labels 0-9.  Training and test images must be of one size."""
    paths = [_mnist_path(os.path.expanduser(os.fspath(folder)), stem) for stem in MNIST_FILES]
    arrays = [read_idx(path) for path in paths]
    for images, labels, image_path, label_path in ((arrays[0], arrays[1], paths[0], paths[1]),
                                                   (arrays[2], arrays[3], paths[2], paths[3])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{image_path} ({images.shape}) and {label_path} ({labels.shape}) "
                             "must hold as many (rows, cols) images as labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{label_path} holds label {int(labels.max())}; MNIST's are 0-9")
    if arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise ValueError(f"{paths[0]} holds {arrays[0].shape[1:]} images but {paths[2]} "
                         f"{arrays[2].shape[1:]}: training and test images must be of one size")
    return (arrays[0].astype(np.float32) / 255.0, arrays[1].astype(np.int64),
            arrays[2].astype(np.float32) / 255.0, arrays[3].astype(np.int64))
