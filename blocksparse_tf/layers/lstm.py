"""BlockSparseLSTM: an LSTM with block-sparse (small-world) hidden-to-hidden weights.

The four gates (input i, forget f, cell g, output o; Keras' order) share one block-sparse
product ``h . W_h`` with W_h of shape (units, 4 * units): the square recurrent layout is
repeated for each gate, so one kernel call per timestep computes all gate pre-activations.

Training cost.  Differentiating the time loop naively computes the weight gradient of the
recurrent product once per timestep (T small ``grad_w`` calls, each summing over only B rows).
:class:`BlockSparseLSTM` (``fused=True``, the default) instead wraps the whole sequence in a
``tf.custom_gradient``: the backward pass runs the time loop for the input gradients only,
then computes ``dW_h = sum_t h_{t-1}^T dz_t`` with one ``blocksparse_matmul_grad_w`` call on
the stacked (T*B, units) states and (T*B, 4*units) pre-activation gradients.  The input
projection ``x . W_x`` is likewise done for all timesteps in one product outside the loop.
"""

import copy

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from blocksparse_tf.layers import _checks, _init, _layout, _xla
from blocksparse_tf.matmul import (BlocksparseMatMul, blocksparse_matmul,
                                   blocksparse_matmul_grad_w, check_float_dtype, check_number,
                                   shape_checked_when_run)

#: Density of the default recurrent layout (Watts-Strogatz, p = 0.1; see docs/layers.md).
DEFAULT_DENSITY = 0.125
GATES = 4


def _gate_layout(spec, rows, n, default):
    """Coords-form spec for (rows, n) blocks, and the (rows, 4n) layout used by the product.

    A (rows, n) layout is repeated for the four gates; a (rows, 4n) one is taken as is.
    """
    if _layout.shape_of(spec) == (rows, GATES * n):
        coords = np.asarray(spec["coords"], dtype=np.int64).reshape(-1, 2)
        return spec, (coords, (rows, GATES * n))
    spec = _layout.resolve(spec, rows, n, default)
    coords = np.asarray(spec["coords"], dtype=np.int64).reshape(-1, 2)
    tiled = np.concatenate([coords + [0, g * n] for g in range(GATES)])
    return spec, (tiled, (rows, GATES * n))


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class BlockSparseLSTMCell(_layout.LayoutCheckedWeights, keras.layers.Layer):
    """One LSTM step with block-sparse hidden-to-hidden weights (for ``keras.layers.RNN``).

    Parameters
    ----------
    units : int
        Hidden size: a multiple of ``block_size``.
    block_size : int
        1, 8, 16, 32 (default) or 64.
    layout : array, str, dict or None
        Recurrent layout, (units/bs, units/bs) blocks, shared by the four gates, or
        (units/bs, 4*units/bs) for one layout per gate.  Same forms as for
        ``BlockSparseDense``.  None: ``watts_strogatz`` at the density closest to 1/8 it
        reaches, p = 0.1, seed 0: at least 3 blocks per row (0.375 at units/bs = 8, all
        blocks up to 3).
    sparse_input : bool
        Make the input projection block-sparse too (input size a multiple of bs).
        Default False: a dense ``kernel`` of shape (input_dim, 4*units).
    input_layout : array, str, dict or None
        Layout of a sparse input projection, (input_dim/bs, units/bs) (repeated per gate) or
        (input_dim/bs, 4*units/bs).  None: ``bipartite_small_world`` at density 1/8.
    activation, recurrent_activation : Keras activations (tanh, sigmoid).
    use_bias : bool
    kernel_initializer : default "glorot_uniform" (dense) / "block_glorot_uniform" (sparse).
    recurrent_initializer : default "block_orthogonal" (orthogonal blocks scaled by the
        fan-in), or any Keras initializer called with shape (blocks, bs, bs).
    bias_initializer : default "zeros"; ``unit_forget_bias`` adds 1 to the forget gate.
    layer_norm : bool
        Normalise each gate's pre-activations (mean 0, variance 1 over the units) before
        the bias, with a learned gain ``ln_gamma`` (4*units,).  Default False.
    layer_norm_epsilon : float
    kernel_regularizer, recurrent_regularizer, bias_regularizer : Keras regularizers.
    """

    def __init__(self, units, block_size=32, layout=None, sparse_input=False, input_layout=None,
                 activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer=None, recurrent_initializer="block_orthogonal",
                 bias_initializer="zeros", unit_forget_bias=True, layer_norm=False,
                 layer_norm_epsilon=1e-3, kernel_regularizer=None, recurrent_regularizer=None,
                 bias_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        _xla.run_without_xla(self)
        units, block_size = _checks.width_in_blocks(units, block_size)
        check_number(layer_norm_epsilon, "layer_norm_epsilon")
        if not layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon must be > 0; got {layer_norm_epsilon!r}")
        if input_layout is not None and not sparse_input:
            raise ValueError("input_layout is given but sparse_input=False; pass "
                             "sparse_input=True for a block-sparse input projection")
        self.units = int(units)
        self.block_size = int(block_size)
        n = self.units // self.block_size
        self.layout_spec = _layout.normalize_spec(layout)
        shape = _layout.shape_of(self.layout_spec)
        if shape is not None and shape not in ((n, n), (n, GATES * n)):
            raise ValueError(f"recurrent layout must have shape ({n}, {n}) or ({n}, {GATES * n}) "
                             f"blocks for units={units}, block_size={block_size}; got {shape}")
        self.sparse_input = _checks.flag(sparse_input, "sparse_input")
        self.input_layout_spec = _layout.normalize_spec(input_layout)
        self.activation = keras.activations.get(activation)
        self.recurrent_activation = keras.activations.get(recurrent_activation)
        self.use_bias = _checks.flag(use_bias, "use_bias")
        if kernel_initializer is None:
            kernel_initializer = "block_glorot_uniform" if sparse_input else "glorot_uniform"
        self.kernel_initializer = _init.check_initializer(kernel_initializer, "kernel_initializer")
        self.recurrent_initializer = _init.check_initializer(recurrent_initializer,
                                                             "recurrent_initializer")
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.unit_forget_bias = _checks.flag(unit_forget_bias, "unit_forget_bias")
        self.layer_norm = _checks.flag(layer_norm, "layer_norm")
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = keras.regularizers.get(recurrent_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.state_size = [self.units, self.units]
        self.output_size = self.units
        self.recurrent_bsmm = None
        self.input_bsmm = None

    # ---- weights -------------------------------------------------------------------------
    def build(self, input_shape):
        # Before the fused loop's ops, which would fail in TensorFlow's attribute check.
        check_float_dtype(self.compute_dtype, f"{self.name}: the compute dtype")
        D = input_shape[-1]
        if D is None:
            raise ValueError(f"the input feature size must be known; got shape {input_shape}")
        n = self.units // self.block_size
        self.layout_spec, full = _gate_layout(self.layout_spec, n, n,
                                              _layout.default_square(n, DEFAULT_DENSITY))
        self.recurrent_bsmm = BlocksparseMatMul(full, block_size=self.block_size)
        if self.sparse_input:
            if D % self.block_size:
                raise ValueError(f"sparse_input needs an input size that is a multiple of "
                                 f"block_size={self.block_size}; got {D}")
            self.input_layout_spec, full_in = _gate_layout(
                self.input_layout_spec, D // self.block_size, n,
                _layout.default_rect(DEFAULT_DENSITY))
            self.input_bsmm = BlocksparseMatMul(full_in, block_size=self.block_size)
            self.kernel = self._block_weight("kernel", self.input_bsmm, self.kernel_initializer,
                                             self.kernel_regularizer)
        else:
            self.kernel = self.add_weight(name="kernel", shape=(D, GATES * self.units),
                                          initializer=self.kernel_initializer,
                                          regularizer=self.kernel_regularizer)
        self.recurrent_kernel = self._block_weight("recurrent_kernel", self.recurrent_bsmm,
                                                   self.recurrent_initializer,
                                                   self.recurrent_regularizer)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(GATES * self.units,),
                                        initializer=self._bias_init,
                                        regularizer=self.bias_regularizer)
        self.ln_gamma = None
        if self.layer_norm:
            self.ln_gamma = self.add_weight(name="ln_gamma", shape=(GATES * self.units,),
                                            initializer="ones")

    def _block_weight(self, name, bsmm, initializer, regularizer):
        init = _init.get_initializer(initializer, bsmm.coords, bsmm.CB, bsmm.KB, self.block_size)
        return self.add_weight(name=name, shape=bsmm.w_shape, initializer=init,
                               regularizer=regularizer)

    def _bias_init(self, shape, dtype=None):
        bias = self.bias_initializer((self.units * GATES,), dtype=dtype)
        if not self.unit_forget_bias:
            return bias
        ones = ops.ones((self.units,), dtype=dtype)
        zeros = ops.zeros((self.units,), dtype=dtype)
        # Forget gate starts open: the cell state survives the first updates.
        return bias + ops.concatenate([zeros, ones, zeros, zeros])

    # ---- the step, in pieces that the fused sequence loop reuses -------------------------
    def project_inputs(self, x):
        """x (..., D) -> input part of the gate pre-activations (..., 4*units)."""
        dtype = self.compute_dtype
        x = ops.cast(x, dtype)
        if self.input_bsmm is not None:
            z = self.input_bsmm(x, ops.cast(self.kernel, dtype))
        else:
            z = ops.matmul(x, ops.cast(self.kernel, dtype))
        if self.bias is not None and not self.layer_norm:
            z = z + ops.cast(self.bias, dtype)
        return z

    def gate_params(self):
        """Tensors that ``update`` uses besides z and c (the layer-norm gain and shift)."""
        if not self.layer_norm:
            return []
        dtype = self.compute_dtype
        params = [ops.cast(self.ln_gamma, dtype)]
        if self.bias is not None:
            params.append(ops.cast(self.bias, dtype))
        return params

    def update(self, z, c_prev, params):
        """Gate pre-activations z (B, 4*units) and c_{t-1} -> (h_t, c_t)."""
        if self.layer_norm:
            z = self._normalize(z, *params)
        i, f, g, o = ops.split(z, GATES, axis=-1)
        i = self.recurrent_activation(i)
        f = self.recurrent_activation(f)
        o = self.recurrent_activation(o)
        c = f * c_prev + i * self.activation(g)
        return o * self.activation(c), c

    def _normalize(self, z, gamma, beta=None):
        """Layer norm of each gate's units, computed in float32 even under mixed precision."""
        z32 = ops.reshape(ops.cast(z, "float32"), (-1, GATES, self.units))
        mean = ops.mean(z32, axis=-1, keepdims=True)
        var = ops.mean(ops.square(z32 - mean), axis=-1, keepdims=True)
        zn = (z32 - mean) * ops.rsqrt(var + self.layer_norm_epsilon)
        zn = ops.cast(ops.reshape(zn, (-1, GATES * self.units)), z.dtype) * gamma
        return zn if beta is None else zn + beta

    def call(self, inputs, states, training=False):
        h_prev, c_prev = states[0], states[1]
        dtype = self.compute_dtype
        z = self.project_inputs(inputs) + self.recurrent_bsmm(
            ops.cast(h_prev, dtype), ops.cast(self.recurrent_kernel, dtype))
        h, c = self.update(z, ops.cast(c_prev, dtype), self.gate_params())
        return h, [h, c]

    def get_initial_state(self, batch_size=None):
        return [ops.zeros((batch_size, self.units), dtype=self.compute_dtype) for _ in range(2)]

    def _weight_layouts(self):
        return [self.recurrent_bsmm, self.input_bsmm]

    def get_config(self):
        config = super().get_config()
        config.update({
            "units": self.units,
            "block_size": self.block_size,
            "layout": copy.deepcopy(self.layout_spec),
            "sparse_input": self.sparse_input,
            "input_layout": copy.deepcopy(self.input_layout_spec),
            "activation": keras.activations.serialize(self.activation),
            "recurrent_activation": keras.activations.serialize(self.recurrent_activation),
            "use_bias": self.use_bias,
            "kernel_initializer": _init.serialize_initializer(self.kernel_initializer),
            "recurrent_initializer": _init.serialize_initializer(self.recurrent_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "unit_forget_bias": self.unit_forget_bias,
            "layer_norm": self.layer_norm,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "recurrent_regularizer": keras.regularizers.serialize(self.recurrent_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
        })
        return config


# ---- the fused sequence ------------------------------------------------------------------
def lstm_sequence(cell, zx, h0, c0, w, mask=None):
    """Runs ``cell`` over time-major gate inputs zx (T, B, 4H) with recurrent blocks w.

    Returns (hs (T, B, H), c_T (B, H)): hs are the states h_t (carried through masked
    steps), so hs[-1] is h_T.

    The backward pass is written out: a reverse time loop that recomputes each step's
    element-wise gate maths from the saved pre-activations (cheap) and propagates dh through
    W^T (one block-sparse product per step), collecting the pre-activation gradients dz_t.
    The weight gradient is then one ``blocksparse_matmul_grad_w`` call on the stacked
    (T*B, H) states h_{t-1} and (T*B, 4H) gradients dz_t.
    """
    bsmm = cell.recurrent_bsmm
    bs, H, K = bsmm.block_size, bsmm.C, bsmm.K
    coords = bsmm._layout_tensor()
    coords_t = bsmm._layout_tensor(transposed=True)
    params = cell.gate_params()
    mask = None if mask is None else tf.cast(mask, tf.bool)

    if _saving():
        # tf.saved_model cannot store a custom gradient whose backward pass reads tensors of
        # the forward pass, and serving needs none: trace a plain differentiable loop.
        return _plain_loop(cell, zx, h0, c0, w, params, mask, (coords, bs, H, K))

    def forward(zx, h0, c0, w, params):
        T = tf.shape(zx)[0]
        arrays = [tf.TensorArray(zx.dtype, size=T, element_shape=shape)
                  for shape in (h0.shape, c0.shape, zx.shape[1:])]

        def body(t, h, c, hs, cs, zs):
            z = zx[t] + blocksparse_matmul(h, w, coords, bs, H, K, constant_layout=True)
            h_new, c_new = cell.update(z, c, params)
            if mask is not None:  # masked steps carry the state unchanged
                keep = mask[t][:, None]
                h_new, c_new = tf.where(keep, h_new, h), tf.where(keep, c_new, c)
            return t + 1, h_new, c_new, hs.write(t, h_new), cs.write(t, c_new), zs.write(t, z)

        _, _, _, hs, cs, zs = tf.while_loop(lambda t, *_: t < T, body, (0, h0, c0, *arrays))
        return hs.stack(), cs.stack(), zs.stack()

    def backward(d_hs, d_c, hs, cs, zs, h0, c0, w, params):
        T = tf.shape(zs)[0]
        w_t = tf.transpose(w, [0, 2, 1])
        c_prev_all = tf.concat([c0[None], cs[:-1]], axis=0)
        dzs = tf.TensorArray(zs.dtype, size=T, element_shape=zs.shape[1:])
        d_params = [tf.zeros_like(p) for p in params]

        def body(t, dh, dc, dzs, d_params):
            dh = dh + d_hs[t]
            dh_step, dc_step = dh, dc
            if mask is not None:  # a masked step passed h and c through: no gradient into it
                keep = mask[t][:, None]
                dh_step = tf.where(keep, dh, tf.zeros_like(dh))
                dc_step = tf.where(keep, dc, tf.zeros_like(dc))
            with tf.GradientTape() as tape:  # element-wise maths of step t only
                z, c_prev = zs[t], c_prev_all[t]
                tape.watch([z, c_prev, *params])
                h_new, c_new = cell.update(z, c_prev, params)
            dz, dc_prev, *dp = tape.gradient(
                [h_new, c_new], [z, c_prev, *params], output_gradients=[dh_step, dc_step],
                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            dh_prev = blocksparse_matmul(dz, w_t, coords_t, bs, K, H, constant_layout=True)
            if mask is not None:
                dh_prev = tf.where(keep, dh_prev, dh)
                dc_prev = tf.where(keep, dc_prev, dc)
            return (t - 1, dh_prev, dc_prev, dzs.write(t, dz),
                    [a + b for a, b in zip(d_params, dp)])

        _, dh0, dc0, dzs, d_params = tf.while_loop(
            lambda t, *_: t >= 0, body, (T - 1, tf.zeros_like(h0), d_c, dzs, d_params))
        dzs = dzs.stack()
        h_prev = tf.concat([h0[None], hs[:-1]], axis=0)
        dw = blocksparse_matmul_grad_w(tf.reshape(h_prev, [-1, H]), tf.reshape(dzs, [-1, K]),
                                       coords, bs, H, K, constant_layout=True)
        # z_t = zx_t + h_{t-1} W, so dL/dzx_t is dz_t itself.
        return dzs, dh0, dc0, dw, d_params

    @tf.custom_gradient
    def run(zx, h0, c0, w, *params):
        hs, cs, zs = forward(zx, h0, c0, w, list(params))

        def grad(d_hs, d_c):
            d_hs = tf.zeros_like(hs) if d_hs is None else d_hs
            d_c = tf.zeros_like(c0) if d_c is None else d_c
            d_zx, dh0, dc0, dw, d_params = backward(d_hs, d_c, hs, cs, zs, h0, c0, w,
                                                     list(params))
            return (d_zx, dh0, dc0, dw, *d_params)

        return (hs, cs[-1]), grad

    return run(zx, h0, c0, w, *params)


def _plain_loop(cell, zx, h0, c0, w, params, mask, dims):
    """The same recurrence, differentiated by TensorFlow (no fused weight gradient)."""
    coords, bs, H, K = dims
    T = tf.shape(zx)[0]
    hs = tf.TensorArray(zx.dtype, size=T, element_shape=h0.shape)

    def body(t, h, c, hs):
        # The registered gradient: dW per step.
        zh = blocksparse_matmul(h, w, coords, bs, H, K, constant_layout=True)
        h_new, c_new = cell.update(zx[t] + zh, c, params)
        if mask is not None:
            keep = mask[t][:, None]
            h_new, c_new = tf.where(keep, h_new, h), tf.where(keep, c_new, c)
        return t + 1, h_new, c_new, hs.write(t, h_new)

    _, _, c, hs = tf.while_loop(lambda t, *_: t < T, body, (0, h0, c0, hs))
    return hs.stack(), c


def _saving():
    """True while tf.saved_model.save traces functions."""
    try:
        from tensorflow.python.saved_model import save_context
    except ImportError:  # pragma: no cover - private module moved
        return False
    return save_context.in_save_context()


def _dim(t, axis):
    """Dimension `axis` of tensor t: an int where static, else a scalar tensor."""
    size = t.shape[axis]
    return size if size is not None else tf.shape(t)[axis]


def _shape_of(value):
    """The shape of a tensor, array or nested list, as a tuple (None: rank unknown)."""
    shape = getattr(value, "shape", None)
    if shape is None:
        return np.shape(value)
    return None if getattr(shape, "rank", 0) is None else tuple(shape)


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class BlockSparseLSTM(keras.layers.RNN):
    """LSTM layer with block-sparse small-world recurrent weights (cell: BlockSparseLSTMCell).

    ``BlockSparseLSTM(units, block_size=32, layout=None, ...)`` takes the cell's arguments
    (see :class:`BlockSparseLSTMCell`) and ``keras.layers.RNN``'s: ``return_sequences``,
    ``return_state``, ``go_backwards``, ``stateful``, ``zero_output_for_mask``; masks
    (e.g. from ``Embedding(mask_zero=True)``) are honoured.

    fused : bool
        True (default): run the sequence with :func:`lstm_sequence`, whose backward pass
        computes the recurrent weight gradient in one call for the whole sequence.
        False: Keras' generic step-by-step loop over the cell (one dW product per step);
        ``unroll`` applies to this path only.
    """

    _CELL_ARGS = ("units", "block_size", "layout", "sparse_input", "input_layout", "activation",
                  "recurrent_activation", "use_bias", "kernel_initializer",
                  "recurrent_initializer", "bias_initializer", "unit_forget_bias", "layer_norm",
                  "layer_norm_epsilon", "kernel_regularizer", "recurrent_regularizer",
                  "bias_regularizer")

    def __init__(self, units, block_size=32, layout=None, fused=True, return_sequences=False,
                 return_state=False, go_backwards=False, stateful=False, unroll=False,
                 zero_output_for_mask=False, **kwargs):
        cell_kwargs = {k: kwargs.pop(k) for k in self._CELL_ARGS if k in kwargs}
        # The cell holds the variables, so it takes the layer's trainable flag (as Keras' LSTM
        # passes it): a layer made with trainable=False, or loaded frozen, stays frozen.
        cell = BlockSparseLSTMCell(units, block_size=block_size, layout=layout,
                                   dtype=kwargs.get("dtype"),
                                   trainable=kwargs.get("trainable", True),
                                   name="blocksparse_lstm_cell", **cell_kwargs)
        # Keras' RNN takes any value as these flags (the string "False" as true): refused here,
        # as the cell's own flags are.
        flags = {name: _checks.flag(value, name) for name, value in (
            ("return_sequences", return_sequences), ("return_state", return_state),
            ("go_backwards", go_backwards), ("stateful", stateful), ("unroll", unroll),
            ("zero_output_for_mask", zero_output_for_mask))}
        super().__init__(cell, **flags, **kwargs)
        _xla.run_without_xla(self)
        self.fused = _checks.flag(fused, "fused")
        # Every call checks the sequences' rank (build checks only the first), as Keras' LSTM.
        self.input_spec = keras.layers.InputSpec(ndim=3)

    def build(self, sequences_shape, initial_state_shape=None):
        # Keras' RNN would otherwise fail inside the first call with an index error.
        if len(sequences_shape) != 3:
            raise ValueError(f"{self.name}: inputs must be sequences (batch, time, features); "
                             f"got shape {tuple(sequences_shape)}")
        super().build(sequences_shape, initial_state_shape)

    def call(self, sequences, initial_state=None, mask=None, training=False):
        # Keras' RNN would fail inside the loop with TensorFlow's own shape errors instead.
        if initial_state is not None:
            initial_state = self._check_initial_state(initial_state, sequences)
        if mask is not None:
            mask = self._check_mask(mask, sequences)
        return super().call(sequences, initial_state=initial_state, mask=mask,
                            training=training)

    def _check_initial_state(self, initial_state, sequences):
        states = initial_state if isinstance(initial_state, (list, tuple)) else [initial_state]
        if len(states) != 2:
            raise ValueError(f"{self.name}: initial_state must be [h, c], two states; got "
                             f"{len(states)}")
        batch = sequences.shape[0]
        checked = []
        for which, state in zip("hc", states):
            shape = _shape_of(state)
            message = (f"{self.name}: initial state {which} must have shape (batch, units) = "
                       f"({batch}, {self.units})")
            if shape is not None and (
                    len(shape) != 2 or shape[1] not in (None, self.units) or
                    None not in (batch, shape[0]) and shape[0] != batch):
                raise ValueError(f"{message}; got {shape}")
            checked.append(
                shape_checked_when_run(state, [_dim(sequences, 0), self.units], message))
        return checked

    def _check_mask(self, mask, sequences):
        shape = given = _shape_of(mask)
        if shape is None:
            return mask
        expected = tuple(sequences.shape[:2])
        if len(shape) == 3 and shape[2] == 1:
            shape = shape[:2]
        message = f"{self.name}: mask must have shape (batch, time) = {expected}"
        if len(shape) != 2 or any(None not in (a, b) and a != b for a, b in zip(shape, expected)):
            raise ValueError(f"{message}; got {given}")
        dims = [_dim(sequences, 0), _dim(sequences, 1)] + [1] * (len(given) - 2)
        return shape_checked_when_run(mask, dims, message)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if not self.fused:
            return super().inner_loop(sequences, initial_state, mask, training=training)
        cell = self.cell
        x = sequences
        if mask is not None:
            mask = ops.convert_to_tensor(mask)
            mask = mask if len(mask.shape) == 2 else mask[..., 0]
        if self.go_backwards:
            x = ops.flip(x, axis=1)
            mask = None if mask is None else ops.flip(mask, axis=1)
        # Time-major before the projection (the inputs are narrower than the 4H gates), then
        # one product for the input projection of every timestep.
        zx = cell.project_inputs(tf.transpose(x, [1, 0, 2]))
        mask_tm = None if mask is None else tf.transpose(mask, [1, 0])
        h0, c0 = [ops.cast(s, cell.compute_dtype) for s in initial_state]
        w = ops.cast(cell.recurrent_kernel, cell.compute_dtype)
        hs, c = lstm_sequence(cell, zx, h0, c0, w, mask_tm)
        h = hs[-1]
        if mask_tm is not None:
            # A masked step's output is the previous step's output, as Keras' RNN gives it: the
            # carried state from an unmasked step on, zeros before the first one (not the
            # initial state); zeros everywhere it is masked with zero_output_for_mask.
            keep = mask_tm if self.zero_output_for_mask else tf.cumsum(
                tf.cast(mask_tm, tf.int32), axis=0) > 0
            hs = hs * tf.cast(keep[..., None], hs.dtype)
        outputs = tf.transpose(hs, [1, 0, 2])
        return outputs[:, -1], outputs, [h, c]

    @property
    def units(self):
        """The hidden state's width (the cell's units)."""
        return self.cell.units

    @property
    def block_size(self):
        """The block size of the cell's block-sparse recurrent weights."""
        return self.cell.block_size

    def get_config(self):
        config = super().get_config()
        del config["cell"]
        cell_config = self.cell.get_config()
        config.update({k: cell_config[k] for k in self._CELL_ARGS})
        config["fused"] = self.fused
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)
