"""BlockSparseConv2D: a 2-D convolution whose channel connectivity is block-sparse.

Input-channel blocks connect to output-channel blocks through a block-sparse layout (as in
:class:`~blocksparse_tf.layers.BlockSparseDense`); spatially the layer is an ordinary
convolution (NHWC, strides, SAME/VALID padding, dilation).

Two implementations compute the same function (``implementation``):

- ``"fused"``: the block-sparse convolution ops of :mod:`blocksparse_tf.conv` (CPU), an
  implicit GEMM that reads the input pixels in place for every tap; no patch tensor is built,
  and forward pass, input gradient and kernel gradient cost time proportional to the nonzero
  blocks.
- ``"im2col"``: the input is padded the way ``tf.nn.conv2d`` pads it; the strided, dilated
  windows of the kh * kw kernel taps, each (B, Ho, Wo, C), are concatenated along channels
  (tap-major) and go through one block-sparse product whose layout is the channel layout
  repeated once per tap.  It runs wherever ``BlocksparseMatMul`` has a kernel (GPUs too).

``"auto"`` (default) picks ``"fused"`` when TensorFlow sees no GPU, else ``"im2col"``.  Both
sum in a fixed order (deterministic).

Placement: ``"auto"`` decides from the devices TensorFlow can see, not from where the layer
runs, so on a machine with a GPU a layer run under ``tf.device("/CPU:0")`` still takes the
im2col path (ask for ``"fused"`` there).  The fused ops have CPU kernels only: with
``"fused"`` in a model that runs on a GPU, soft placement runs them on the CPU without a
warning, copying the activations and gradients between the devices at every call.
"""

import copy

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from blocksparse_tf import conv as conv_ops
from blocksparse_tf.layers import _checks, _init, _layout, _xla
from blocksparse_tf.matmul import BlocksparseMatMul, checked_when_run

#: Density of the default layout (a bipartite small world, as for ``BlockSparseDense``).
DEFAULT_DENSITY = 0.125
CONV_BLOCK_INITIALIZERS = _init.BLOCK_INITIALIZERS
#: Values of BlockSparseConv2D's ``implementation`` argument.
IMPLEMENTATIONS = ("auto", "fused", "im2col")


def conv_output_size(size, kernel, stride, dilation, padding):
    """Output length of one spatial dimension (None stays None), as tf.nn.conv2d computes it
    (0 where the input is smaller than the dilated kernel); padding "same" or "valid", either
    case."""
    padding = conv_ops._padding_name(padding)
    if size is None:
        return None
    effective = (kernel - 1) * dilation + 1
    if padding == "same":
        return -(-size // stride)
    return max(-(-(size - effective + 1) // stride), 0)


def conv_block_initializer(name, coords, CB, KB, bs, taps):
    """Initializer ``f(shape, dtype)`` for a (blocks, kh, kw, bs, bs) kernel.

    The fans are those of the sparse convolution: fan_in = kh * kw * bs * (blocks in the
    block column), fan_out = kh * kw * bs * (blocks in the block row).

    - ``block_glorot_uniform``: uniform in +-sqrt(6 / (fan_in + fan_out)).
    - ``block_orthogonal``: every (tap, block) a random orthogonal bs x bs matrix, scaled by
      sqrt(bs / fan_in), so each output unit sums weight rows of total norm 1.
    """
    coords = np.asarray(coords)
    col_blocks = np.bincount(coords[:, 1], minlength=KB)[coords[:, 1]]
    row_blocks = np.bincount(coords[:, 0], minlength=CB)[coords[:, 0]]
    fan_in = taps * bs * col_blocks
    fan_out = taps * bs * row_blocks

    def glorot(shape, dtype=None):
        limit = np.sqrt(6.0 / (fan_in + fan_out)).astype(np.float32)[:, None, None, None, None]
        u = keras.random.uniform(shape, -1.0, 1.0, dtype="float32")
        return ops.cast(u * limit, dtype or "float32")

    def orthogonal(shape, dtype=None):
        q, r = ops.qr(keras.random.normal(shape, dtype="float32"))
        q = q * ops.expand_dims(ops.sign(ops.diagonal(r, axis1=-2, axis2=-1)), -2)
        scale = np.sqrt(bs / fan_in).astype(np.float32)[:, None, None, None, None]
        return ops.cast(q * scale, dtype or "float32")

    if name == "block_glorot_uniform":
        return glorot
    if name == "block_orthogonal":
        return orthogonal
    raise ValueError(f"unknown block initializer {name!r}; "
                     f"expected one of {CONV_BLOCK_INITIALIZERS}")


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class BlockSparseConv2D(_layout.LayoutCheckedWeights, keras.layers.Layer):
    """2-D convolution (NHWC) whose (C -> filters) channel mixing is block-sparse.

    ``y[b, p, q, :] = activation(sum_{i, j} x_pad[b, p*s + i*d, q*s + j*d, :] . W[i, j] + bias)``
    where every W[i, j] (C, filters) has the same block-sparse layout and only its nonzero
    bs x bs blocks are stored.

    Parameters
    ----------
    filters : int
        Output channels, a multiple of ``block_size``.
    kernel_size : int or pair of ints
        (kh, kw).
    block_size : int
        1, 8, 16, 32 (default) or 64.  The input channels C must be a multiple of it.
    layout : array, scipy.sparse matrix, str, dict or None
        Which (input-channel block, output-channel block) pairs are connected, shape
        (C/bs, filters/bs); every form that ``BlockSparseDense`` takes (0/1 array, generator
        name or dict, ``{"shape", "coords"}``).  None (default): ``bipartite_small_world`` at
        density 1/8.
    strides : int or pair of ints
        Default 1.
    padding : {"valid", "same"}
        As in ``tf.nn.conv2d`` (SAME puts the odd extra row/column after).  Default "valid".
    dilation_rate : int or pair of ints
        Default 1.  Strides > 1 together with dilation > 1 are rejected, as in Keras.
    activation : Keras activation, optional
    use_bias : bool
        Default True; a bias of shape (filters,).
    kernel_initializer : str or Keras initializer
        ``"block_glorot_uniform"`` (default) or ``"block_orthogonal"`` (fans of the sparse
        convolution, see :func:`conv_block_initializer`), or any Keras initializer, called
        with the 5-D kernel shape (Keras then miscounts the fans).
    bias_initializer, kernel_regularizer, bias_regularizer, kernel_constraint,
    bias_constraint : as in ``keras.layers.Conv2D``.
    implementation : {"auto", "fused", "im2col"}
        How the convolution is computed (module docstring); the results agree to rounding.
        Default ``"auto"``: fused when TensorFlow sees no GPU at all, whatever device the
        layer is placed on.  ``"fused"`` has CPU kernels only; on a GPU, soft placement
        silently moves those ops (and the copies of their operands) to the CPU.

    Weights: ``kernel`` of shape (blocks, kh, kw, bs, bs) (block order as in
    ``BlocksparseMatMul``, ``layer.bsmm``), ``bias`` (filters,).  Parameters:
    blocks * kh * kw * bs^2 (+ filters).
    """

    def __init__(self, filters, kernel_size, block_size=32, layout=None, strides=1,
                 padding="valid", dilation_rate=1, activation=None, use_bias=True,
                 kernel_initializer="block_glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, implementation="auto", **kwargs):
        super().__init__(**kwargs)
        _xla.run_without_xla(self)
        self.filters, self.block_size = _checks.width_in_blocks(filters, block_size, "filters")
        self.kernel_size = _checks.pair_of_positive_ints(kernel_size, "kernel_size")
        self.strides = _checks.pair_of_positive_ints(strides, "strides")
        self.dilation_rate = _checks.pair_of_positive_ints(dilation_rate, "dilation_rate")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(f"strides > 1 cannot be combined with dilation_rate > 1; got "
                             f"strides={self.strides}, dilation_rate={self.dilation_rate}")
        if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same'; got {padding!r}")
        self.padding = padding.lower()
        self.layout_spec = _layout.spec_for_outputs(layout, self.filters, self.block_size, "filters")
        self.activation = keras.activations.get(activation)
        self.use_bias = _checks.flag(use_bias, "use_bias")
        self.kernel_initializer = _init.check_initializer(kernel_initializer, "kernel_initializer")
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; "
                             f"got {implementation!r}")
        self.implementation = implementation
        self.bsmm = None
        self._taps_bsmm = None

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError("BlockSparseConv2D wants inputs (batch, height, width, channels); "
                             f"got shape {input_shape}")
        C = input_shape[-1]
        if C is None:
            raise ValueError(f"the channel dimension must be known; got shape {input_shape}")
        if C % self.block_size:
            raise ValueError(f"input channels {C} must be a multiple of "
                             f"block_size={self.block_size}")
        self.layout_spec = _layout.resolve(self.layout_spec, C // self.block_size,
                                           self.filters // self.block_size,
                                           _layout.default_rect(DEFAULT_DENSITY))
        coords = np.asarray(self.layout_spec["coords"], dtype=np.int64).reshape(-1, 2)
        self.bsmm = BlocksparseMatMul((coords, tuple(self.layout_spec["shape"])),
                                      block_size=self.block_size)
        kh, kw = self.kernel_size
        # The whole convolution as one block-sparse product over the kernel taps' windows,
        # concatenated along channels (tap-major): the layout repeated once per tap, so the
        # forward, input-gradient and weight-gradient products are one kernel call each.
        CB, taps = self.bsmm.CB, kh * kw
        tap_coords = np.concatenate([coords + [t * CB, 0] for t in range(taps)])
        self._taps_bsmm = BlocksparseMatMul((tap_coords, (taps * CB, self.bsmm.KB)),
                                            block_size=self.block_size)
        bs = self.block_size
        if isinstance(self.kernel_initializer, str) and \
                self.kernel_initializer in CONV_BLOCK_INITIALIZERS:
            init = conv_block_initializer(self.kernel_initializer, self.bsmm.coords, self.bsmm.CB,
                                          self.bsmm.KB, bs, kh * kw)
        else:
            init = keras.initializers.get(self.kernel_initializer)
        self.kernel = self.add_weight(name="kernel", shape=(self.bsmm.blocks, kh, kw, bs, bs),
                                      initializer=init, regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,),
                                        initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer,
                                        constraint=self.bias_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: C})

    def _padding(self, x):
        """Padding (before, after) per spatial dimension and the output size (Ho, Wo), each an
        int where the input size is static (stride 1 SAME pads the same for every size), else
        a scalar tensor."""
        static = x.shape
        dynamic = tf.shape(x)
        pads, out = [], []
        for d, k, s, dil in zip((1, 2), self.kernel_size, self.strides, self.dilation_rate):
            size = static[d]
            if size is None and (self.padding == "valid" or s == 1):
                pads.append(conv_ops.conv_padding(1, k, s, dil, self.padding))
            else:
                pads.append(conv_ops.conv_padding(size if size is not None else dynamic[d], k, s,
                                                  dil, self.padding))
            padded = (size if size is not None else dynamic[d]) + sum(pads[-1])
            o = (padded - ((k - 1) * dil + 1)) // s + 1
            self._refuse_static_size(static[1:3], size, o)
            if not isinstance(o, int):
                # A size known only when run: checked then, the sizes named in the error (the
                # fused op checks it itself).  The output size waits for the check, so that the
                # im2col slices, which a negative size would turn into windows of unequal
                # sizes, are not cut before it.
                o = checked_when_run(o, o > 0, [f"input {self._too_small()} or has no rows or no "
                                                 f"columns; the input's height and width:",
                                                 dynamic[1:3]])
            out.append(o)
        return pads, out

    def _too_small(self):
        return (f"is smaller than the dilated kernel {self.kernel_size} (dilation "
                f"{self.dilation_rate}) with padding '{self.padding}'")

    def _refuse_static_size(self, spatial, size, out):
        """ValueError where one spatial dimension of an input of spatial shape ``spatial``, its
        ``size`` known, has no entries or gives an output size ``out`` below 1."""
        if size == 0:  # SAME pads nothing there: an empty image is refused under either
            raise ValueError(f"input of spatial shape {tuple(spatial)} has no rows or no "
                             f"columns; BlockSparseConv2D needs at least one of each")
        if isinstance(out, int) and out < 1:
            raise ValueError(f"input of spatial shape {tuple(spatial)} {self._too_small()}")

    @staticmethod
    def _pad(x, pads):
        """x padded by the (before, after) amounts of both spatial dimensions (where nonzero)."""
        if all(isinstance(p, int) and p == 0 for pair in pads for p in pair):
            return x
        return tf.pad(x, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]])

    def uses_fused_ops(self):
        """Whether call() runs the fused block-sparse convolution ops (see ``implementation``).

        For ``"auto"`` this depends only on whether TensorFlow sees a GPU: a tensor's device is
        often not known while a function is traced, so it cannot decide reliably from that.
        """
        if self.implementation == "auto":
            return not tf.config.list_logical_devices("GPU")
        return self.implementation == "fused"

    def _call_fused(self, x, kernel):
        pads, _ = self._padding(x)
        if not all(isinstance(p, int) for pair in pads for p in pair):
            # SAME with a stride pads by amounts that depend on a size unknown until run time:
            # tf.pad applies them, the op pads nothing more.
            x, pads = self._pad(x, pads), [(0, 0), (0, 0)]
        return conv_ops.blocksparse_conv2d(
            x, kernel, self.bsmm._layout_tensor(), self.block_size, self.bsmm.C,
            self.bsmm.K, strides=self.strides, dilations=self.dilation_rate,
            padding=[*pads[0], *pads[1]])

    def _call_im2col(self, x, kernel):
        pads, (Ho, Wo) = self._padding(x)
        x = self._pad(x, pads)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.strides, self.dilation_rate
        windows = [x[:, i * dh:i * dh + (Ho - 1) * sh + 1:sh, j * dw:j * dw + (Wo - 1) * sw + 1:sw, :]
                   for i in range(kh) for j in range(kw)]
        patches = windows[0] if len(windows) == 1 else tf.concat(windows, axis=-1)
        # (blocks, kh, kw, bs, bs) -> tap-major (kh * kw * blocks, bs, bs), the order of _taps_bsmm.
        tap_kernel = tf.reshape(tf.transpose(kernel, [1, 2, 0, 3, 4]),
                                (-1, self.block_size, self.block_size))
        return self._taps_bsmm(patches, tap_kernel)

    def call(self, inputs):
        dtype = self.compute_dtype
        x = tf.cast(inputs, dtype)
        if x.shape[-1] is None:
            # Keras checks the channels where they are known when traced; else here, since the
            # im2col product would name its concatenated taps' size instead.
            channels = self.bsmm.CB * self.block_size
            x = checked_when_run(
                x, tf.equal(tf.shape(x)[-1], channels),
                [f"BlockSparseConv2D {self.name!r} takes {channels} input channels; got input "
                 "shape", tf.shape(x)], summarize=4)
        kernel = tf.cast(self.kernel, dtype)
        if self.uses_fused_ops():
            y = self._call_fused(x, kernel)
        else:
            y = self._call_im2col(x, kernel)
        if self.bias is not None:
            y = y + tf.cast(self.bias, dtype)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def compute_output_shape(self, input_shape):
        # Keras builds symbolic models from this, not from call(): sizes call() would refuse
        # are refused here too, not passed on as zero-sized outputs.
        spatial = tuple(input_shape[1:3])
        dims = []
        for size, k, s, d in zip(spatial, self.kernel_size, self.strides, self.dilation_rate):
            dims.append(conv_output_size(size, k, s, d, self.padding))
            if size is not None:
                self._refuse_static_size(spatial, size, dims[-1])
        return (input_shape[0], dims[0], dims[1], self.filters)

    def densified_kernel(self):
        """The kernel as a dense, masked (kh, kw, C, filters) numpy array (tf.nn.conv2d form)."""
        w = np.asarray(self.kernel.numpy())
        kh, kw = self.kernel_size
        dense = np.zeros((kh, kw, self.bsmm.C, self.bsmm.K), dtype=w.dtype)
        for i in range(kh):
            for j in range(kw):
                dense[i, j] = self.bsmm.to_dense(w[:, i, j])
        return dense

    @property
    def density(self):
        """Fraction of the channel blocks that exist (None before build with a generator spec)."""
        spec = self.layout_spec
        return _layout.density_of(spec) if spec and "coords" in spec else None

    def _weight_layouts(self):
        return [self.bsmm]

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "block_size": self.block_size,
            "layout": copy.deepcopy(self.layout_spec),
            "strides": list(self.strides),
            "padding": self.padding,
            "dilation_rate": list(self.dilation_rate),
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": _init.serialize_initializer(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "implementation": self.implementation,
        })
        return config
