"""Keras layers built on the block-sparse product (Keras 3, TensorFlow backend).

- :class:`BlockSparseDense`: a Dense layer with a block-sparse kernel.
- :class:`BlockSparseLSTM` and its cell :class:`BlockSparseLSTMCell`: an LSTM whose
  hidden-to-hidden weights (and optionally its input projection) are block-sparse, with a
  fused sequence-level weight gradient.
- :class:`BlockSparseConv2D`: a 2-D convolution whose channel connectivity is block-sparse
  (docs/conv.md).
- :class:`CondDense` and :class:`CondNetModel`: conditional computation, a learned per-example
  policy switches blocks of units on and off, and the products skip the rest (docs/condnet.md).
- :class:`SparseVDDense` and :class:`SparseVDConv2D`: Sparse Variational Dropout, which learns
  which weights to prune (see docs/sparse_vd.md; ``blocksparse_tf.convert`` turns the result
  into block-sparse layers).

Importing this module registers the layers with Keras' serialisation (package
``blocksparse_tf``), so ``keras.models.load_model`` finds them without ``custom_objects``.
See docs/layers.md.
"""

from blocksparse_tf.layers.condnet import (CondDense, CondNetModel, bernoulli_log_prob,
                                           sparsity_regularizers)
from blocksparse_tf.layers.conv import BlockSparseConv2D
from blocksparse_tf.layers.dense import BlockSparseDense
from blocksparse_tf.layers.lstm import BlockSparseLSTM, BlockSparseLSTMCell
from blocksparse_tf.layers.sparse_vd import (KLWarmup, SparseVDConv2D, SparseVDDense,
                                             format_report, kl_scale, kl_warmup, set_kl_weight,
                                             sparsity_report, total_kl)

# The padding layers that blocksparse_tf.convert puts around converted layers register with
# these, so that a converted model loads after this import alone.
from blocksparse_tf import convert as _convert  # noqa: E402,F401  (after the layers it uses)

__all__ = ["BlockSparseDense", "BlockSparseConv2D", "BlockSparseLSTM", "BlockSparseLSTMCell",
           "CondDense", "CondNetModel", "bernoulli_log_prob", "sparsity_regularizers",
           "SparseVDDense", "SparseVDConv2D", "KLWarmup", "kl_scale", "kl_warmup",
           "set_kl_weight", "total_kl", "sparsity_report", "format_report"]

# Register the C++ ops now, not at first use: a SavedModel that contains them can then be
# loaded (tf.saved_model.load) in any process that has imported this module.
from blocksparse_tf._ops import ops as _load_op_library

_load_op_library()
