"""Keras layers built on the block-sparse product (Keras 3, TensorFlow backend).

- :class:`BlockSparseDense`: a Dense layer with a block-sparse kernel.
- :class:`BlockSparseLSTM` and its cell :class:`BlockSparseLSTMCell`: an LSTM whose
  hidden-to-hidden weights (and optionally its input projection) are block-sparse, with a
  fused sequence-level weight gradient.

Importing this module registers the layers with Keras' serialisation (package
``blocksparse_tf``), so ``keras.models.load_model`` finds them without ``custom_objects``.
See docs/layers.md.
"""

from blocksparse_tf.layers.dense import BlockSparseDense
from blocksparse_tf.layers.lstm import BlockSparseLSTM, BlockSparseLSTMCell

__all__ = ["BlockSparseDense", "BlockSparseLSTM", "BlockSparseLSTMCell"]

# Register the C++ ops now, not at first use: a SavedModel that contains them can then be
# loaded (tf.saved_model.load) in any process that has imported this module.
from blocksparse_tf._ops import ops as _load_op_library

_load_op_library()
