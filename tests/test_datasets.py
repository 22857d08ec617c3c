"""The example datasets: IDX files written here, and scikit-learn's digits."""

import gzip

import numpy as np
import pytest

from blocksparse_tf import datasets


def write_idx(path, array, compress=False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28))
    labels = rng.integers(0, 10, 5)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, compress=True)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", images[:2])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:2])
    x_train, y_train, x_test, y_test = datasets.load_mnist(str(tmp_path))
    np.testing.assert_allclose(x_train, images / 255.0, rtol=1e-6)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    np.testing.assert_array_equal(y_train, labels)
    assert x_test.shape == (2, 28, 28) and list(y_test) == list(labels[:2])
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        datasets.load_mnist(str(tmp_path))
    (tmp_path / "bad").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(str(tmp_path / "bad"))


def test_digits_split():
    pytest.importorskip("sklearn")
    x_train, y_train, x_test, y_test = datasets.load_digits(n_test=300, seed=1)
    assert x_train.shape == (1497, 8, 8) and x_test.shape == (300, 8, 8)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and set(y_test) <= set(range(10))
    again = datasets.load_digits(n_test=300, seed=1)
    np.testing.assert_array_equal(again[2], x_test)
    for bad in (None, -5, 1798, 10.0, True):
        with pytest.raises(ValueError, match="n_test"):
            datasets.load_digits(n_test=bad)
    assert datasets.load_digits(n_test=0)[2].shape == (0, 8, 8)


def test_damaged_idx_files_raise_naming_the_file(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 28, 28))
    labels = rng.integers(0, 10, 3)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 4))  # one label too many
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte .* as many .* images as labels"):
        datasets.load_mnist(str(tmp_path))
    short = tmp_path / "short"
    short.write_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes()[:-1])
    with pytest.raises(ValueError, match="short holds 10 bytes; its header .* asks for 11"):
        datasets.read_idx(str(short))
    cut = tmp_path / "cut"
    cut.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="cut is cut short"):
        datasets.read_idx(str(cut))


def test_mnist_files_that_do_not_fit_together_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 3))
    # Test images of another size loaded, and the conv example reported accuracy on them.
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (2, 8, 8)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 2))
    with pytest.raises(ValueError, match=r"\(28, 28\) images but .*t10k-images-idx3-ubyte "
                                         r"\(8, 8\): training and test images must be of one"):
        datasets.load_mnist(tmp_path)  # a path-like folder
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (2, 28, 28)))
    # A label of 200: the examples trained 201 classes.
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 200]))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte holds label 200; MNIST's are 0-9"):
        datasets.load_mnist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no MNIST folder .*missing"):
        datasets.load_mnist(str(tmp_path / "missing"))


def test_unreadable_gzip_files_are_named(tmp_path):
    plain = tmp_path / "train-images-idx3-ubyte.gz"  # not gzipped: gzip.BadGzipFile
    plain.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is not a readable gzip file"):
        datasets.read_idx(plain)  # a path-like file: its .endswith failed
    truncated = tmp_path / "labels.gz"  # cut short: EOFError
    write_idx(truncated, np.arange(100) % 10, compress=True)
    truncated.write_bytes(truncated.read_bytes()[:-12])
    with pytest.raises(ValueError, match="labels.gz is not a readable gzip file"):
        datasets.read_idx(str(truncated))
