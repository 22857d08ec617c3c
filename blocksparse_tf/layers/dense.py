"""BlockSparseDense: a Keras Dense layer whose kernel is block-sparse."""

import copy

import keras
import numpy as np
from keras import ops

from blocksparse_tf.layers import _checks, _init, _layout, _xla
from blocksparse_tf.matmul import BlocksparseMatMul

#: Density of the default layout (a bipartite small world, see ``BlockSparseDense``).
DEFAULT_DENSITY = 0.125


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class BlockSparseDense(_layout.LayoutCheckedWeights, keras.layers.Layer):
    """``y = activation(x . W + b)`` with W (C, K) stored as its nonzero bs x bs blocks only.

    Parameters
    ----------
    units : int
        K, the output size: a multiple of ``block_size``.
    block_size : int
        1, 8, 16, 32 (default) or 64.  The input size C must be a multiple of it.
    layout : array, scipy.sparse matrix, str, dict or None
        Which blocks of W exist, as a (C/bs, K/bs) 0/1 array, or a generator of
        :mod:`blocksparse_tf.layouts` by name (``"watts_strogatz"``, ``"barabasi_albert"``,
        ``"random"`` ...) or as a dict with its parameters, e.g.
        ``{"generator": "random", "density": 0.1, "seed": 3}`` or
        ``{"generator": "watts_strogatz", "k": 4, "p": 0.2}``.  The layer fills in the size;
        ``density`` picks ``k``/``m``/...; ``p`` defaults to 0.1, ``seed`` to 0.
        None (default): ``bipartite_small_world`` at density 1/8 (``DEFAULT_DENSITY``): every
        output block reads the same number of input blocks, most of them near its own
        position and a tenth rewired at random.  See docs/layers.md.
    activation : Keras activation, optional
    use_bias : bool
        Add a bias of shape (units,).  Default True.
    kernel_initializer : str or Keras initializer
        ``"block_glorot_uniform"`` (default; Glorot with the fans of the sparse matrix),
        ``"block_orthogonal"`` or any Keras initializer, called with shape (blocks, bs, bs).
    bias_initializer, kernel_regularizer, bias_regularizer, kernel_constraint,
    bias_constraint : as in ``keras.layers.Dense``, but the kernel's act on its variable of
        shape (blocks, bs, bs): element-wise ones (``NonNeg``, L1/L2 penalties) as for the
        dense kernel; norm constraints (``MaxNorm``, ``UnitNorm``, ``MinMaxNorm``) take their
        ``axis`` in that shape (``axis=0`` runs across blocks, not over an output unit's
        inputs).
    gate : bool
        Learn one multiplier per block (initialised to 1), applied as the ``gate`` of
        ``BlocksparseMatMul``.  Default False.

    Inputs of shape (..., C) give outputs (..., units); the layout is fixed at build time and
    ``get_config`` records it, so a saved model reloads with the same blocks.
    Trainable parameters: blocks * bs^2 (+ units for the bias, + blocks for the gate).
    """

    def __init__(self, units, block_size=32, layout=None, activation=None, use_bias=True,
                 kernel_initializer="block_glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, gate=False, **kwargs):
        super().__init__(**kwargs)
        _xla.run_without_xla(self)
        self.units, self.block_size = _checks.width_in_blocks(units, block_size)
        self.layout_spec = _layout.spec_for_outputs(layout, self.units, self.block_size, "units")
        self.activation = keras.activations.get(activation)
        self.use_bias = _checks.flag(use_bias, "use_bias")
        self.gate = _checks.flag(gate, "gate")
        self.kernel_initializer = _init.check_initializer(kernel_initializer, "kernel_initializer")
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.bsmm = None
        self.supports_masking = True

    def build(self, input_shape):
        C = input_shape[-1]
        if C is None:
            raise ValueError(f"the last input dimension must be known; got shape {input_shape}")
        if C < 1 or C % self.block_size:
            raise ValueError(f"input size {C} must be a positive multiple of block_size="
                             f"{self.block_size}")
        self.layout_spec = _layout.resolve(self.layout_spec, C // self.block_size,
                                           self.units // self.block_size,
                                           _layout.default_rect(DEFAULT_DENSITY))
        coords = np.asarray(self.layout_spec["coords"], dtype=np.int64).reshape(-1, 2)
        self.bsmm = BlocksparseMatMul((coords, tuple(self.layout_spec["shape"])),
                                      block_size=self.block_size)
        init = _init.get_initializer(self.kernel_initializer, self.bsmm.coords, self.bsmm.CB,
                                     self.bsmm.KB, self.block_size)
        self.kernel = self.add_weight(name="kernel", shape=self.bsmm.w_shape, initializer=init,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint)
        self.block_gate = None
        if self.gate:
            self.block_gate = self.add_weight(name="gate", shape=(self.bsmm.blocks,),
                                              initializer="ones")
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,),
                                        initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer,
                                        constraint=self.bias_constraint)
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: C})

    def call(self, inputs):
        dtype = self.compute_dtype
        x = ops.cast(inputs, dtype)
        # Cast explicitly: under a mixed policy the variables are float32, and the op wants
        # operands of one dtype (it accumulates in float32 itself).
        gate = None if self.block_gate is None else ops.cast(self.block_gate, dtype)
        y = self.bsmm(x, ops.cast(self.kernel, dtype), gate=gate)
        if self.bias is not None:
            y = y + ops.cast(self.bias, dtype)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def _weight_layouts(self):
        return [self.bsmm]

    def dense_kernel(self):
        """The kernel as a dense (C, K) numpy array (block gates folded in), for inspection."""
        w = ops.convert_to_numpy(self.kernel)
        if self.block_gate is not None:
            w = w * ops.convert_to_numpy(self.block_gate)[:, None, None]
        return self.bsmm.to_dense(w)

    @property
    def density(self):
        """Fraction of the blocks of W that exist (None before build with a generator spec)."""
        spec = self.layout_spec
        return _layout.density_of(spec) if spec and "coords" in spec else None

    def get_config(self):
        config = super().get_config()
        config.update({
            "units": self.units,
            "block_size": self.block_size,
            "layout": copy.deepcopy(self.layout_spec),
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": _init.serialize_initializer(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "gate": self.gate,
        })
        return config
