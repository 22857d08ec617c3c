"""From a trained (sparse) model to fast block-sparse inference.

- :func:`to_block_sparse`: one Dense-like layer (a trained ``SparseVDDense``, a Keras
  ``Dense``, or a bare (C, K) kernel) -> a ``BlockSparseDense`` holding the blocks that contain
  surviving (nonzero) weights, or the blocks with the largest norms at a target density.
- :func:`convert_model`: the same for every Dense-like layer of a Sequential or functional
  model; SparseVD convolutions become plain ``Conv2D`` layers with their pruned kernels.
- :func:`to_dense_model`: the pruned model with plain Keras ``Dense``/``Conv2D`` layers, the
  dense baseline for the speed comparison.

Sizes that are not multiples of the block size (``pad=True``, the default of
:func:`convert_model`): the kernel is padded with zero rows (inputs) and zero columns
(outputs) up to the next multiple.  In a converted model, a ``PadFeatures`` layer appends
zero features to the layer's input and a ``SliceFeatures`` layer keeps the first K outputs,
before the activation, so the model computes exactly what the pruned dense model computes.
:func:`to_block_sparse` alone returns the padded layer: feed it inputs with ``C' - C``
zero features appended on the last axis (:func:`pad_features`) and keep ``[..., :K]`` of its
outputs.  With ``pad=False`` such sizes raise ``ValueError``.

See docs/sparse_vd.md.
"""

import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from blocksparse_tf import layouts
from blocksparse_tf.layers.dense import BlockSparseDense
from blocksparse_tf.layers.sparse_vd import SparseVDConv2D, SparseVDDense
from blocksparse_tf.matmul import check_block_size

#: Keras' activations that act on each unit alone, so may run on zero-padded outputs (the
#: others, softmax, log_softmax, sparsemax and glu, mix units or change the width).
_ELEMENTWISE = frozenset((
    "celu", "elu", "exponential", "gelu", "hard_shrink", "hard_sigmoid", "hard_silu",
    "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "mish", "relu", "relu6",
    "selu", "sigmoid", "silu", "soft_shrink", "softplus", "softsign", "sparse_plus",
    "sparse_sigmoid", "squareplus", "swish", "tanh", "tanh_shrink", "threshold"))


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class PadFeatures(keras.layers.Layer):
    """Appends ``pad`` zero features on the last axis."""

    def __init__(self, pad, **kwargs):
        super().__init__(**kwargs)
        if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
            raise ValueError(f"pad must be an integer >= 0; got {pad!r}")
        self.pad = int(pad)

    def call(self, inputs):
        return pad_features(inputs, self.pad)

    def compute_output_shape(self, input_shape):
        last = None if input_shape[-1] is None else input_shape[-1] + self.pad
        return tuple(input_shape[:-1]) + (last,)

    def get_config(self):
        return {**super().get_config(), "pad": self.pad}


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class SliceFeatures(keras.layers.Layer):
    """Keeps the first ``units`` features of the last axis."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(f"units must be a positive integer; got {units!r}")
        self.units = int(units)

    def call(self, inputs):
        return inputs[..., :self.units]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def pad_features(x, pad):
    """``x`` with ``pad`` zero features appended on its last axis (tensor or numpy)."""
    if not pad:
        return x
    widths = [[0, 0]] * (len(x.shape) - 1) + [[0, pad]]
    if isinstance(x, np.ndarray):
        return np.pad(x, widths)
    return tf.pad(x, widths)


def pruned_weights(layer_or_weights, bias=None, activation=None):
    """(kernel (C, K) numpy, bias (K,) or None, activation) of a Dense-like layer or kernel.

    A ``SparseVDDense`` gives its pruned kernel ``theta * (log_alpha < threshold)``; a Keras
    ``Dense`` its kernel; a 2-D array is the kernel itself, with ``bias`` and ``activation``.
    """
    obj = layer_or_weights
    if isinstance(obj, keras.layers.Layer) and (bias is not None or activation is not None):
        raise ValueError("bias and activation are for a bare kernel: a layer gives its own")
    if _is_dense_like(obj):
        if not obj.built:
            raise ValueError(f"layer {obj.name!r} is not built: call it on data first")
        if getattr(obj, "quantization_mode", None) is not None:
            # Its kernel holds the quantized codes, not the weights (they need its scales).
            raise ValueError(f"layer {obj.name!r} is quantized ({obj.quantization_mode}): "
                             "convert the float model, then quantize")
        if isinstance(obj, SparseVDDense):
            W = obj.pruned_kernel()
        else:
            W = keras.ops.convert_to_numpy(obj.kernel)
        b = None if obj.bias is None else keras.ops.convert_to_numpy(obj.bias)
        return W.astype(np.float32), b, obj.activation
    if isinstance(obj, keras.layers.Layer):
        raise ValueError("to_block_sparse converts SparseVDDense or keras.layers.Dense layers "
                         f"(or a (C, K) kernel); got a {type(obj).__name__} (a subclass of "
                         "Dense may compute something else in its call)")
    W = np.asarray(obj)
    if (W.ndim != 2 or not np.issubdtype(W.dtype, np.number) or np.iscomplexobj(W)
            or min(W.shape) < 1):
        raise ValueError(f"weights must be a non-empty 2-D real array (C, K); got shape "
                         f"{W.shape} and dtype {W.dtype}")
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32)
        if bias.shape != (W.shape[1],):
            raise ValueError(f"bias must have shape ({W.shape[1]},); got {bias.shape}")
    return W.astype(np.float32), bias, keras.activations.get(activation)


def _is_dense_like(layer):
    """A SparseVDDense or a keras.layers.Dense itself: a subclass of Dense may compute
    something else in its call, which the converted layer would not."""
    return isinstance(layer, SparseVDDense) or type(layer) is keras.layers.Dense


def choose_layout(W, block_size, density=None, norm="l2"):
    """Layout (CB, KB) bool of a dense kernel whose sizes are multiples of ``block_size``.

    ``density=None``: every block holding a nonzero weight (one block if all are zero);
    otherwise the ``round(density * blocks)`` blocks with the largest norms
    (:func:`blocksparse_tf.layouts.from_dense_weights`).
    """
    if density is None:
        if not np.any(W):
            layout = np.zeros((W.shape[0] // block_size, W.shape[1] // block_size), bool)
            layout[0, 0] = True
            return layout
        return layouts.from_dense_weights(W, block_size, threshold=0.0, norm=norm)
    return layouts.from_dense_weights(W, block_size, density=density, norm=norm)


def to_block_sparse(layer_or_weights, block_size, density=None, *, bias=None, activation=None,
                    norm="l2", pad=False, inputs=None, repeats=20, name=None):
    """Turns a trained Dense-like layer into a ``BlockSparseDense`` for inference.

    Parameters
    ----------
    layer_or_weights : SparseVDDense, keras.layers.Dense (built) or array (C, K)
        The layer (a SparseVD layer gives its pruned kernel) or a dense kernel.
    block_size : int
        1, 8, 16, 32 or 64.
    density : float in (0, 1], optional
        None (default): keep every block that holds a surviving (nonzero) weight, so the
        layer computes exactly what the pruned dense layer computes.  A number: keep that
        fraction of blocks, those with the largest ``norm`` ("l2" or "max").
    bias, activation :
        Only with a bare kernel: its bias (K,) and activation.
    pad : bool
        Pad C and K with zeros up to multiples of ``block_size`` (see the module docstring);
        False (default): such sizes raise ``ValueError``.
    inputs : array (N, C), optional
        If given, the report also holds the output difference against the original and the
        measured speedup of the block-sparse layer over the dense product (median of
        ``repeats`` calls each).
    name : str, optional
        Name of the new layer (default: the old layer's name plus ``"_bs"``).

    Returns
    -------
    (BlockSparseDense, dict)
        The built layer with its weights set, and a report: ``shape`` (C, K),
        ``padded_shape``, ``block_size``, ``blocks``, ``blocks_total``, ``density`` (fraction
        of blocks kept), ``nonzero_weights`` (of the pruned dense kernel), ``kept_weights``
        (nonzero weights inside kept blocks), ``kept_fraction`` (their ratio; 1.0 when every
        surviving weight is kept), ``stored_weights`` (blocks * bs^2) and, with ``inputs``,
        ``max_abs_diff``, ``rel_error``, ``dense_ms``, ``sparse_ms`` and ``speedup``.
    """
    check_block_size(block_size)
    _check_density(density)
    _check_norm(norm)
    layouts._check_bool("pad", pad)
    W, b, act = pruned_weights(layer_or_weights, bias, activation)
    if name is None:
        base = getattr(layer_or_weights, "name", None)
        name = f"{base}_bs" if isinstance(base, str) else None
    layer, report = _block_sparse_dense(W, b, act, block_size, density, norm, pad, name,
                                        _policy_of(layer_or_weights))
    if inputs is not None:
        report.update(_measure_layer(W, b, act, layer, inputs, repeats))
    return layer, report


def _block_sparse_dense(W, b, act, block_size, density, norm, pad, name, policy):
    """(BlockSparseDense holding kernel W (C, K) and bias b, report): see to_block_sparse;
    ``policy``: keyword arguments of the new layer (its dtype policy, trainable flag)."""
    C, K = W.shape
    Cp, Kp = _round_up(C, block_size), _round_up(K, block_size)
    if (Cp, Kp) != (C, K):
        if not pad:
            raise ValueError(f"kernel shape {(C, K)} is not a multiple of block_size="
                             f"{block_size}: pass pad=True to pad it with zeros to {(Cp, Kp)}")
        if Kp != K and _activation_name(act) not in _ELEMENTWISE:
            # A custom callable may mix units too: only Keras' element-wise ones are trusted.
            raise ValueError(f"cannot pad the outputs of a layer with activation "
                             f"{_activation_name(act) or act!r} (not one of Keras' element-wise "
                             "activations, so the padded units could change the others): use "
                             "convert_model, which slices before the activation, or a block "
                             "size dividing the output size")
    Wp = np.zeros((Cp, Kp), np.float32)
    Wp[:C, :K] = W
    layout = choose_layout(Wp, block_size, density, norm)
    layer = BlockSparseDense(Kp, block_size=block_size, layout=np.asarray(layout).astype(np.int8),
                             activation=act, use_bias=b is not None, name=name, **policy)
    layer.build((None, Cp))
    layer.kernel.assign(layer.bsmm.from_dense(Wp))
    if b is not None:
        bp = np.zeros(Kp, np.float32)
        bp[:K] = b
        layer.bias.assign(bp)
    return layer, _layer_report(W, Wp, layer, block_size)


def _policy_of(old):
    """Keyword arguments giving a replacement layer the dtype policy and trainable flag of
    the layer it replaces (nothing for a bare kernel: the global policy, trainable)."""
    if not isinstance(old, keras.layers.Layer):
        return {}
    return {"dtype": old.dtype_policy, "trainable": old.trainable}


def to_dense_model(model):
    """The pruned model with plain Keras layers: ``SparseVDDense`` -> ``Dense`` and
    ``SparseVDConv2D`` -> ``Conv2D`` holding the pruned kernels; other layers copied."""
    _check_model(model)

    def replace(layer):
        if isinstance(layer, SparseVDDense):
            new = keras.layers.Dense(layer.units, activation=layer.activation,
                                     use_bias=layer.use_bias, name=layer.name,
                                     **_policy_of(layer))
            return _built(new, layer, [layer.pruned_kernel()] + _bias_list(layer))
        if isinstance(layer, SparseVDConv2D):
            return _plain_conv(layer)
        return None

    return _clone(model, replace)


def convert_model(model, block_size, density=None, *, norm="l2", pad=True, x=None, y=None,
                  repeats=10):
    """Converts every Dense-like layer of a Sequential or functional model to block-sparse
    (inside models nested in it too).

    ``SparseVDDense`` and ``keras.layers.Dense`` layers become ``BlockSparseDense`` (kept
    blocks as in :func:`to_block_sparse`; with padding, wrapped in a small Sequential
    ``PadFeatures -> BlockSparseDense -> SliceFeatures -> Activation`` of the same name);
    ``SparseVDConv2D`` layers become ``Conv2D`` with their pruned kernels; every other layer
    is copied with its weights.  Dense layers must have a 2-D input (batch, features).

    Parameters
    ----------
    model : keras.Model (Sequential or functional)
    block_size, density, norm, pad :
        As for :func:`to_block_sparse` (``pad`` defaults to True here).
    x, y : arrays, optional
        Evaluation data: with ``x`` the report holds the output difference against the
        pruned dense model (:func:`to_dense_model`) and the measured speedup over it (median
        of ``repeats`` full-batch inference calls); with ``y`` (integer labels) also the
        classification error of both.

    Returns
    -------
    (keras.Model, dict)
        The converted model and a report: ``layers`` (the per-layer reports of
        :func:`to_block_sparse`, plus ``name``), and with ``x``: ``max_abs_diff``,
        ``dense_ms``, ``sparse_ms``, ``speedup``; with ``y``: ``error_before``,
        ``error_after``, ``error_change``.
    """
    check_block_size(block_size)
    _check_density(density)
    _check_norm(norm)
    layouts._check_bool("pad", pad)
    _check_model(model)
    reports = []

    def replace(layer):
        if _is_dense_like(layer):
            new, rep = _convert_dense(layer, block_size, density, norm, pad)
            reports.append({"name": layer.name, **rep})
            return new
        if isinstance(layer, SparseVDConv2D):
            return _plain_conv(layer)
        return None

    if x is not None and (len(model.inputs) != 1 or len(model.outputs) != 1):
        raise ValueError(f"x (and y) measure models of one input and one output; this one has "
                         f"{len(model.inputs)} and {len(model.outputs)}: convert without them")
    new_model = _clone(model, replace)
    report = {"layers": reports}
    if x is not None:
        report.update(_measure_models(to_dense_model(model), new_model, x, y, repeats))
    return new_model, report


def _convert_dense(layer, block_size, density, norm, pad):
    """(replacement layer, report) of one Dense-like layer inside a model."""
    in_shape = _input_shape(layer)
    if len(in_shape) != 2:
        raise ValueError(f"layer {layer.name!r}: convert_model handles Dense layers on 2-D "
                         f"inputs (batch, features); got input shape {in_shape}")
    C, K = int(in_shape[-1]), layer.units
    if C % block_size == 0 and K % block_size == 0:
        new, rep = to_block_sparse(layer, block_size, density, norm=norm, name=layer.name)
        return new, rep
    if not pad:
        raise ValueError(f"layer {layer.name!r}: kernel shape {(C, K)} is not a multiple of "
                         f"block_size={block_size}; pass pad=True")
    W, b, act = pruned_weights(layer)
    policy = _policy_of(layer)
    bsd, rep = _block_sparse_dense(W, b, None, block_size, density, norm, True,
                                   f"{layer.name}_bs", policy)
    parts = [keras.Input((C,))]
    if bsd.bsmm.C != C:
        parts.append(PadFeatures(bsd.bsmm.C - C, name=f"{layer.name}_pad", **policy))
    parts.append(bsd)
    if bsd.units != K:
        parts.append(SliceFeatures(K, name=f"{layer.name}_slice", **policy))
    parts.append(keras.layers.Activation(act, name=f"{layer.name}_act", **policy))
    return keras.Sequential(parts, name=layer.name, trainable=layer.trainable), rep


def _clone(model, replace, made=None):
    """clone_model where ``replace(layer)`` gives a built replacement (or None: copy).
    Models nested inside (a Sequential used as a layer) are cloned the same way, so their
    layers are replaced too; ``made`` maps each layer already cloned (by id) to its clone,
    across the nested models, so that a layer shared by several of them stays one layer."""
    made = {} if made is None else made
    copied = []

    def clone_fn(layer):
        if id(layer) in made:
            return made[id(layer)]
        new = replace(layer)
        if new is None and isinstance(layer, keras.Model):
            new = _clone(layer, replace, made)
        if new is None:
            new = layer.__class__.from_config(layer.get_config())
            copied.append((layer, new))
        made[id(layer)] = new
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_fn)
    for old, new in copied:
        if old.weights:
            new.set_weights(old.get_weights())
    return new_model


def _plain_conv(layer):
    new = keras.layers.Conv2D(layer.filters, layer.kernel_size, strides=layer.strides,
                              padding=layer.padding, activation=layer.activation,
                              use_bias=layer.use_bias, name=layer.name, **_policy_of(layer))
    return _built(new, layer, [layer.pruned_kernel()] + _bias_list(layer))


def _built(new, old, weights):
    new.build(_input_shape(old))
    new.set_weights(weights)
    return new


def _bias_list(layer):
    return [] if layer.bias is None else [keras.ops.convert_to_numpy(layer.bias)]


def _input_shape(layer):
    """The layer's input shape, the same at every call of it in the model (a layer shared by
    inputs of other ranks, e.g. 2-D and 3-D, has none)."""
    try:
        shape = tuple(layer.input.shape)
    except (AttributeError, ValueError) as err:
        raise ValueError(f"layer {layer.name!r} has no single input shape (is the model "
                         f"built, and is the layer used once?): {err}") from None
    for node in getattr(layer, "_inbound_nodes", []):  # where the layer is called again
        for tensor in getattr(node, "input_tensors", []):
            if len(tensor.shape) != len(shape) or tensor.shape[-1] != shape[-1]:
                raise ValueError(f"layer {layer.name!r} is called on inputs of shapes {shape} "
                                 f"and {tuple(tensor.shape)}; convert_model needs one")
    return shape


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model; got {type(model).__name__}")
    if not model.built:
        raise ValueError("the model must be built (give it an Input or call it on data)")


def _check_density(density):
    if density is None:
        return
    if (isinstance(density, bool) or not isinstance(density, (int, float, np.floating))
            or not 0.0 < density <= 1.0):
        raise ValueError(f"density must be None or a number in (0, 1]; got {density!r}")


def _check_norm(norm):
    if norm not in ("l2", "max"):
        raise ValueError(f"norm must be 'l2' or 'max'; got {norm!r}")


def _round_up(n, m):
    return -(-n // m) * m


def _activation_name(act):
    if act is None:
        return "linear"
    name = keras.activations.serialize(act)
    return name if isinstance(name, str) else getattr(act, "__name__", "")


def _layer_report(W, Wp, layer, block_size):
    bsmm = layer.bsmm
    kept = bsmm.to_dense(keras.ops.convert_to_numpy(layer.kernel))
    nonzero = int(np.count_nonzero(W))
    kept_nz = int(np.count_nonzero(kept))
    return {"shape": tuple(W.shape), "padded_shape": tuple(Wp.shape), "block_size": block_size,
            "blocks": int(bsmm.blocks), "blocks_total": int(bsmm.CB * bsmm.KB),
            "density": float(bsmm.density), "nonzero_weights": nonzero,
            "kept_weights": kept_nz, "kept_fraction": kept_nz / nonzero if nonzero else 1.0,
            "stored_weights": int(bsmm.blocks) * block_size ** 2}


def _median_ms(fn, x, repeats):
    fn(x)  # trace and warm up
    fn(x)
    times = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        out = fn(x)
        np.asarray(out)  # wait for the result
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _measure_layer(W, b, act, layer, inputs, repeats):
    x = np.asarray(inputs, np.float32)
    if x.ndim != 2 or x.shape[1] != W.shape[0]:
        raise ValueError(f"inputs must have shape (N, {W.shape[0]}); got {x.shape}")
    Wt = tf.constant(W)
    bt = None if b is None else tf.constant(b)

    @tf.function
    def dense(v):
        y = tf.matmul(v, Wt)
        y = y if bt is None else y + bt
        return y if act is None else act(y)

    pad = layer.bsmm.C - W.shape[0]
    sparse = tf.function(lambda v: layer(pad_features(v, pad))[:, :W.shape[1]])
    ref, got = dense(x).numpy(), sparse(x).numpy()
    dense_ms, sparse_ms = _median_ms(dense, x, repeats), _median_ms(sparse, x, repeats)
    return {"max_abs_diff": float(np.max(np.abs(ref - got))),
            "rel_error": float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-30)),
            "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms}


def _measure_models(dense_model, sparse_model, x, y, repeats):
    x = np.asarray(x, np.float32)
    f_dense = tf.function(lambda v: dense_model(v, training=False))
    f_sparse = tf.function(lambda v: sparse_model(v, training=False))
    ref, got = f_dense(x).numpy(), f_sparse(x).numpy()
    out = {"max_abs_diff": float(np.max(np.abs(ref - got)))}
    out["dense_ms"] = _median_ms(f_dense, x, repeats)
    out["sparse_ms"] = _median_ms(f_sparse, x, repeats)
    out["speedup"] = out["dense_ms"] / out["sparse_ms"]
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} labels for {x.shape[0]} examples")
        before = float(np.mean(np.argmax(ref, -1) != y))
        after = float(np.mean(np.argmax(got, -1) != y))
        out.update({"error_before": before, "error_after": after,
                    "error_change": after - before})
    return out


__all__ = ["to_block_sparse", "convert_model", "to_dense_model", "pruned_weights",
           "choose_layout", "pad_features", "PadFeatures", "SliceFeatures"]
