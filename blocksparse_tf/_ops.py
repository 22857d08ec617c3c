"""Loads the compiled op library once, from the package folder or from Bazel's output tree."""

import os

import tensorflow as tf

_LIBRARY_NAME = "_blocksparse_ops.so"
_ops = None


def _candidate_paths():
    package_dir = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(package_dir, _LIBRARY_NAME)
    yield os.path.join(os.path.dirname(package_dir), "bazel-bin", "ops", _LIBRARY_NAME)


def ops():
    """Returns the loaded op module (raw ops ``blocksparse_matmul`` and ``blocksparse_matmul_grad_w``)."""
    global _ops
    if _ops is None:
        # The newest build wins, so a fresh `bazel build` is used without reinstalling.
        found = sorted((p for p in _candidate_paths() if os.path.exists(p)), key=os.path.getmtime)
        if found:
            _ops = tf.load_op_library(found[-1])
        else:
            raise ImportError(
                f"{_LIBRARY_NAME} was not found next to the blocksparse_tf package or in "
                "bazel-bin/ops/; build it first with `bash tools/setup.sh` (see README.md)")
    return _ops
