"""Layout-aware initial weights for block-sparse kernels of shape (blocks, bs, bs).

Keras' own initializers see only the 3-D shape (blocks, bs, bs); they would take ``blocks``
for a convolution's receptive field and get the fan-in wrong by the number of block columns.
The two defaults here count the fans of the block-sparse matrix itself.
"""

import keras
import numpy as np
from keras import ops

from blocksparse_tf.matmul import BlocksparseMatMul

BLOCK_INITIALIZERS = ("block_glorot_uniform", "block_orthogonal")


def _fans(coords, CB, KB, bs):
    """Per-block (fan_in, fan_out) in units: bs times the blocks in its column / row."""
    col_blocks = np.bincount(coords[:, 1], minlength=KB)[coords[:, 1]]
    row_blocks = np.bincount(coords[:, 0], minlength=CB)[coords[:, 0]]
    return bs * col_blocks, bs * row_blocks


def block_initializer(name, coords, CB, KB, bs, seed=None):
    """A Keras-style initializer ``f(shape, dtype)`` for one of BLOCK_INITIALIZERS.

    - ``block_glorot_uniform``: uniform in +-sqrt(6 / (fan_in + fan_out)) with the fans of the
      sparse matrix (what ``glorot_uniform`` gives a dense layer).
    - ``block_orthogonal``: every block a random orthogonal matrix, scaled by
      1/sqrt(blocks in its column), so that each output unit sums unit-norm weight rows.
    """
    coords = np.asarray(coords)
    fan_in, fan_out = _fans(coords, CB, KB, bs)

    def glorot(shape, dtype=None):
        limit = np.sqrt(6.0 / (fan_in + fan_out)).astype(np.float32)[:, None, None]
        u = keras.random.uniform(shape, -1.0, 1.0, dtype="float32", seed=seed)
        return ops.cast(u * limit, dtype or "float32")

    def orthogonal(shape, dtype=None):
        q, r = ops.qr(keras.random.normal(shape, dtype="float32", seed=seed))
        # Sign fix of R's diagonal makes the distribution uniform (Haar) over rotations.
        q = q * ops.sign(ops.diagonal(r, axis1=1, axis2=2))[:, None, :]
        scale = np.sqrt(bs / fan_in).astype(np.float32)[:, None, None]
        return ops.cast(q * scale, dtype or "float32")

    if name == "block_glorot_uniform":
        return glorot
    if name == "block_orthogonal":
        return orthogonal
    raise ValueError(f"unknown block initializer {name!r}; expected one of {BLOCK_INITIALIZERS}")


def get_initializer(value, coords, CB, KB, bs):
    """A block initializer for a name in BLOCK_INITIALIZERS, else ``keras.initializers.get``.
    Weights made by ``identity_init`` / ``ortho_init`` for another layout are refused: their
    block count may match while their blocks belong elsewhere."""
    if isinstance(value, str) and value in BLOCK_INITIALIZERS:
        return block_initializer(value, coords, CB, KB, bs)
    if isinstance(value, dict):  # a config (from_config): its recipe is checked below too
        value = keras.initializers.get(value)
    recipe = getattr(value, "recipe", None)
    if isinstance(recipe, dict) and "matmul" in recipe:
        made_for = BlocksparseMatMul.from_config(recipe["matmul"])
        theirs = (made_for.CB, made_for.KB, made_for.block_size)
        if theirs != (CB, KB, bs) or not np.array_equal(made_for.coords, coords):
            if theirs == (CB, KB, bs):
                how = f"blocks at other positions of the same {CB} x {KB} grid"
            else:
                how = (f"a {theirs[0]} x {theirs[1]} grid of blocks of {theirs[2]}, not "
                       f"{CB} x {KB} of {bs}")
            raise ValueError(f"the initial weights were made by {recipe.get('method')} for "
                             f"another layout than this layer's ({how}); make them with the "
                             "layer's BlocksparseMatMul")
    return keras.initializers.get(value)


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class BlocksparseInitialWeights(keras.initializers.Initializer):
    """The weights of a ``BlocksparseMatMul.identity_init`` / ``ortho_init`` result, rebuilt
    from its recipe (the layout, the method and its arguments): what a layer given such an
    array as its initializer saves in its config."""

    def __init__(self, recipe):
        self.recipe = recipe

    def __call__(self, shape, dtype=None):
        return BlocksparseMatMul.initial_weights_from_recipe(self.recipe)(shape, dtype)

    def get_config(self):
        return {"recipe": self.recipe}


def serialize_initializer(value):
    """Config form: block initializer names stay strings; the arrays of identity_init /
    ortho_init become their recipes; others go through Keras."""
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        if getattr(value, "recipe", None) is None:
            raise ValueError("an array of initial weights can be saved in a layer's config only "
                             "as returned by BlocksparseMatMul.identity_init or ortho_init "
                             "(seed None or an integer; not derived from one); pass an "
                             "initializer instead")
        value = BlocksparseInitialWeights(value.recipe)
    return keras.initializers.serialize(value)


def check_initializer(value, what):
    """Fails early (at construction) on initializer arguments Keras cannot resolve."""
    if isinstance(value, str) and value in BLOCK_INITIALIZERS:
        return value
    try:
        keras.initializers.get(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{what} must be one of {BLOCK_INITIALIZERS} or a Keras initializer; "
                         f"got {value!r} ({err})") from None
    return value
