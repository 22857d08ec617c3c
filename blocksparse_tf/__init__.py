"""blocksparse_tf: block-sparse matrix products and layers for TensorFlow 2.

The public names are imported lazily, so ``import blocksparse_tf.layouts`` does not pay for
importing TensorFlow.
"""

__version__ = "0.1.0"

_LAZY = {
    "BlocksparseMatMul": "blocksparse_tf.matmul",
    "blocksparse_matmul": "blocksparse_tf.matmul",
    "sparse_dot": "blocksparse_tf.conditional",
    "cpu_isa": "blocksparse_tf._ops",
}

_SUBMODULES = ("layouts", "layers", "convert", "datasets")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"blocksparse_tf.{name}")
    raise AttributeError(f"module 'blocksparse_tf' has no attribute {name!r}")
