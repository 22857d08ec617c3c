"""Sparse Variational Dropout layers (Molchanov, Ashukha and Vetrov, ICML 2017).

Every weight w has a Gaussian posterior N(theta, sigma^2) with its own dropout rate
``alpha = sigma^2 / theta^2``; the log-uniform prior makes large alphas cheap, so training
drives most of them up and those weights can be removed.  Parametrisation (per weight):
``theta`` and ``log_sigma2`` (initialised to -10); ``log_alpha = log_sigma2 - log(theta^2)``
clipped to [-8, 8].

- Training (``training=True``): local reparameterisation: the pre-activations are sampled,
  mean ``x . theta``, variance ``x^2 . (alpha theta^2)``, one noise draw per example and unit.
- Inference: deterministic, with the pruned weights ``theta * (log_alpha < threshold)``.
- Each call adds ``kl_weight * KL`` to the layer's losses (``add_loss``).  ``kl_weight`` is a
  non-trainable variable, so it can be changed between steps without retracing: use
  :class:`KLWarmup` (linear warm-up, scaled by the dataset size) or :func:`set_kl_weight`.

The objective of the paper, ``N/B sum_batch log p(y|x) - rw KL``, divided by N, is the
mean cross-entropy plus ``rw KL / N``: that is ``kl_weight = rw / N`` (:func:`kl_scale`).

See docs/sparse_vd.md.
"""

import math

import keras
from keras import ops

from blocksparse_tf.layers import _checks
from blocksparse_tf.matmul import check_number

#: Constants of the KL approximation (Molchanov et al. 2017, eq. 14).
K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: log_alpha is clipped to this range.
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -8.0, 8.0
#: Weights with log_alpha >= this are pruned at inference.
DEFAULT_THRESHOLD = 3.0
DEFAULT_LOG_SIGMA2_INIT = -10.0


def kl_approx(log_alpha):
    """Per-weight KL(q || log-uniform prior), the paper's approximation (up to a constant).

    ``KL ~ k1 - k1 sigmoid(k2 + k3 log_alpha) + 0.5 log1p(exp(-log_alpha))``: 0 as alpha goes
    to infinity, ``-0.5 log_alpha + k1`` as it goes to 0.  Works on tensors and numpy arrays.
    """
    la = ops.convert_to_tensor(log_alpha)
    return K1 - K1 * ops.sigmoid(K2 + K3 * la) + 0.5 * ops.softplus(-la)


def kl_scale(dataset_size, rw=1.0):
    """``kl_weight`` that makes ``mean loss + kl_weight KL`` the paper's objective over N.

    ``rw`` is the warm-up factor in [0, 1]; ``dataset_size`` N the number of training
    examples.  Returns ``rw / N``.
    """
    _checks.positive_int(dataset_size, "dataset_size")
    check_number(rw, "rw", low=0.0)
    return float(rw) / int(dataset_size)


def kl_warmup(epoch, start=5, end=20):
    """Warm-up factor rw at ``epoch`` (0-based): 0 before ``start``, linear to 1 at ``end``."""
    check_number(start, "start", low=0.0)
    check_number(end, "end", low=0.0)
    if end < start:
        raise ValueError(f"end ({end}) must be >= start ({start})")
    if epoch < start:
        return 0.0
    if epoch >= end:
        return 1.0
    return float(epoch - start) / float(end - start)


def sparse_vd_layers(model):
    """The SparseVD layers of a model (searched recursively), in order."""
    if isinstance(model, _SparseVDMixin):
        return [model]
    found = []
    for layer in _sublayers(model):
        found += [l for l in sparse_vd_layers(layer) if l not in found]
    return found


def _sublayers(obj):
    """A model's layers, or the layers a custom layer holds (which has no ``layers``: without
    this its SparseVD layers would be missed, and with them their KL weights and reports)."""
    if hasattr(obj, "layers"):
        return obj.layers
    if isinstance(obj, keras.layers.Layer):
        return obj._flatten_layers(include_self=False, recursive=False)
    return []


def set_kl_weight(model, weight):
    """Sets ``kl_weight`` of every SparseVD layer of ``model`` (e.g. ``kl_scale(N, rw)``)."""
    check_number(weight, "weight", low=0.0)
    for layer in sparse_vd_layers(model):
        if layer.built:
            layer.kl_weight.assign(float(weight))
        else:  # a model built by its first batch (KLWarmup's first epoch begins before it)
            layer._kl_weight_when_built = float(weight)


def total_kl(model):
    """Sum of the (unweighted) KL terms of every SparseVD layer of ``model``, a float."""
    return float(sum(float(ops.convert_to_numpy(l.kl())) for l in sparse_vd_layers(model)))


def sparsity_report(model_or_layers):
    """Per-layer report of a model (or a list of SparseVD layers) and the total.

    Returns a list of dicts, one per SparseVD layer (see ``layer.sparsity_report()``), and a
    last one named ``"total"`` over all of them.
    """
    layers = (list(model_or_layers) if isinstance(model_or_layers, (list, tuple))
              else sparse_vd_layers(model_or_layers))
    rows = [layer.sparsity_report() for layer in layers]
    n = sum(r["weights"] for r in rows)
    kept = sum(r["kept"] for r in rows)
    rows.append(_report_row("total", n, kept))
    return rows


def format_report(rows):
    """The rows of :func:`sparsity_report` as a Markdown table."""
    lines = ["| layer | weights | kept | kept fraction | sparsity | compression |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['weights']} | {r['kept']} | {r['kept_fraction']:.4f} "
                     f"| {100 * r['sparsity']:.1f}% | {r['compression']:.1f}x |")
    return "\n".join(lines)


class KLWarmup(keras.callbacks.Callback):
    """Sets ``kl_weight = kl_warmup(epoch, start, end) * scale / dataset_size`` each epoch.

    Parameters
    ----------
    dataset_size : int
        N, the number of training examples (the KL is divided by it, see :func:`kl_scale`).
    start, end : int
        Epochs (0-based) where the ramp from 0 to 1 starts and ends (paper: 5 and 20).
    scale : float
        Final multiplier rw of the KL (default 1).
    """

    def __init__(self, dataset_size, start=5, end=20, scale=1.0):
        super().__init__()
        _checks.positive_int(dataset_size, "dataset_size")
        check_number(scale, "scale", low=0.0)
        kl_warmup(0, start, end)  # checks start/end
        self.dataset_size, self.start, self.end, self.scale = int(dataset_size), start, end, scale
        self.history = []

    def on_epoch_begin(self, epoch, logs=None):
        weight = self.scale * kl_scale(self.dataset_size, kl_warmup(epoch, self.start, self.end))
        set_kl_weight(self.model, weight)
        self.history.append(weight)


def _report_row(name, n, kept):
    return {"name": name, "weights": int(n), "kept": int(kept),
            "kept_fraction": kept / n if n else 0.0,
            "sparsity": 1.0 - kept / n if n else 0.0,
            "compression": n / kept if kept else math.inf}


class _SparseVDMixin:
    """What SparseVDDense and SparseVDConv2D share: log_alpha, KL, masks, report, config."""

    def _init_vd(self, threshold, kl_weight, log_sigma2_init, activation, use_bias,
                 kernel_initializer, bias_initializer, seed):
        check_number(threshold, "threshold")
        check_number(kl_weight, "kl_weight", low=0.0)
        check_number(log_sigma2_init, "log_sigma2_init")
        self.threshold = float(threshold)
        self.initial_kl_weight = float(kl_weight)
        self._kl_weight_when_built = self.initial_kl_weight  # set_kl_weight's before build
        self.log_sigma2_init = float(log_sigma2_init)
        self.activation = keras.activations.get(activation)
        self.use_bias = _checks.flag(use_bias, "use_bias")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = _checks.optional_int(seed, "seed")
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def _add_vd_weights(self, shape):
        # Read as they are stored even under a mixed-precision policy: log_alpha and the KL
        # term are computed in float32 whatever the variables' type (in float16 the 1e-8 of
        # log_alpha rounds to 0, the KL summed over every weight overflows, and a small
        # kl_weight rounds to zero), and _kernels casts the product's kernels to the compute
        # type.
        self.theta = self.add_weight(name="theta", shape=shape,
                                     initializer=self.kernel_initializer, autocast=False)
        self.log_sigma2 = self.add_weight(
            name="log_sigma2", shape=shape,
            initializer=keras.initializers.Constant(self.log_sigma2_init), autocast=False)
        self.kl_weight = self.add_weight(
            name="kl_weight", shape=(), trainable=False, dtype="float32",
            initializer=keras.initializers.Constant(self._kl_weight_when_built), autocast=False)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(shape[-1],),
                                        initializer=self.bias_initializer)

    def _require_built(self):
        if not self.built:
            raise ValueError(f"{self.name} is not built yet: its weights exist once it has been "
                             f"called on data (or built with an input shape)")

    def log_alpha(self):
        """``log(sigma^2 / theta^2)`` per weight, clipped to [-8, 8] (a tensor)."""
        self._require_built()
        theta = ops.cast(self.theta, "float32")
        la = ops.cast(self.log_sigma2, "float32") - ops.log(ops.square(theta) + 1e-8)
        return ops.clip(la, LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def kl(self):
        """The layer's KL term (unweighted), summed over its weights: a scalar tensor."""
        return ops.sum(kl_approx(self.log_alpha()))

    def kept_mask(self):
        """numpy bool array, the shape of the kernel: True where log_alpha < threshold."""
        return ops.convert_to_numpy(self.log_alpha()) < self.threshold

    def pruned_kernel(self):
        """The inference kernel ``theta * kept_mask()`` as a numpy array."""
        self._require_built()
        return ops.convert_to_numpy(self.theta) * self.kept_mask()

    def sparsity_report(self):
        """dict: name, weights, kept, kept_fraction, sparsity and compression (weights / kept)."""
        mask = self.kept_mask()
        return _report_row(self.name, mask.size, int(mask.sum()))

    def _kernels(self, training):
        """(mean kernel, variance kernel or None, log_alpha) for this call."""
        la = self.log_alpha()  # once per call, for the kernels and the KL term

        def compute(kernel):
            return ops.cast(kernel, self.compute_dtype)

        if training:
            variance = ops.exp(la) * ops.square(ops.cast(self.theta, "float32"))
            return compute(self.theta), compute(variance), la
        mask = ops.cast(la < self.threshold, self.theta.dtype)
        return compute(self.theta * mask), None, la

    def _finish(self, mean, var, log_alpha):
        """Adds the KL loss, samples (when var is given), adds bias and activation."""
        kl_weight = ops.cast(self.kl_weight, "float32")
        self.add_loss(kl_weight * ops.sum(kl_approx(log_alpha)))  # self.kl()'s value
        y = mean
        if var is not None:
            # Drawn in float32 and cast: a half-precision compute type (mixed precision) gets
            # the draws float32 gets, in its own type.
            noise = keras.random.normal(ops.shape(mean), seed=self.seed_generator)
            # The standard deviation in float32: in float16 the 1e-8 rounds to 0, and a zero
            # variance (an all-zero input row) made sqrt's gradient infinite and the kernels' NaN.
            std = ops.cast(ops.sqrt(ops.cast(var, "float32") + 1e-8), mean.dtype)
            y = mean + std * ops.cast(noise, mean.dtype)
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y) if self.activation is not None else y

    def _vd_config(self):
        return {
            "threshold": self.threshold,
            "kl_weight": self.initial_kl_weight,
            "log_sigma2_init": self.log_sigma2_init,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class SparseVDDense(_SparseVDMixin, keras.layers.Layer):
    """Dense layer with Sparse Variational Dropout: ``y = activation(x . W + b)``.

    Parameters
    ----------
    units : int
        Output size K.
    activation : Keras activation, optional
    use_bias : bool
        Default True.
    threshold : float
        Weights with ``log_alpha >= threshold`` are zero at inference (default 3).  A Python
        number, read when a function is traced: after changing ``layer.threshold`` on a model
        that has already run ``predict``, ``evaluate`` or ``fit``, call ``model.compile`` again
        so that they use it (eager calls, the reports, ``pruned_kernel`` and ``convert_model``
        use it at once).
    kl_weight : float
        Initial multiplier of the KL loss (a non-trainable variable; see :class:`KLWarmup`).
        Default 1: give ``kl_scale(N)`` for the paper's objective.
    log_sigma2_init : float
        Initial log sigma^2 of every weight (default -10).
    kernel_initializer, bias_initializer :
        For ``theta`` and the bias (default ``"glorot_uniform"``, ``"zeros"``).
    seed : int, optional
        Seed of the reparameterisation noise.

    Weights: ``theta`` and ``log_sigma2`` (C, K), ``bias`` (K,), ``kl_weight`` ().
    """

    def __init__(self, units, activation=None, use_bias=True, threshold=DEFAULT_THRESHOLD,
                 kl_weight=1.0, log_sigma2_init=DEFAULT_LOG_SIGMA2_INIT,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        _checks.positive_int(units, "units")
        self._init_vd(threshold, kl_weight, log_sigma2_init, activation, use_bias,
                      kernel_initializer, bias_initializer, seed)
        self.units = int(units)

    def build(self, input_shape):
        C = input_shape[-1]
        if C is None:
            raise ValueError(f"the last input dimension must be known; got shape {input_shape}")
        self._add_vd_weights((int(C), self.units))
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: C})

    def call(self, inputs, training=None):
        x = ops.cast(inputs, self.compute_dtype)
        w_mean, w_var, log_alpha = self._kernels(bool(training))
        mean = ops.matmul(x, w_mean)
        var = None if w_var is None else ops.matmul(ops.square(x), w_var)
        return self._finish(mean, var, log_alpha)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units, "seed": self.seed, **self._vd_config()})
        return config


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class SparseVDConv2D(_SparseVDMixin, keras.layers.Layer):
    """2-D convolution (channels last) with Sparse Variational Dropout.

    Parameters
    ----------
    filters : int
    kernel_size : int or pair of ints
    strides : int or pair of ints
        Default 1.
    padding : {"valid", "same"}
    activation, use_bias, threshold, kl_weight, log_sigma2_init, kernel_initializer,
    bias_initializer, seed :
        As for :class:`SparseVDDense`.

    Weights: ``theta`` and ``log_sigma2`` (kh, kw, C, filters), ``bias`` (filters,).
    Training samples the output feature maps: mean ``conv(x, theta)``, variance
    ``conv(x^2, alpha theta^2)``.
    """

    def __init__(self, filters, kernel_size, strides=1, padding="valid", activation=None,
                 use_bias=True, threshold=DEFAULT_THRESHOLD, kl_weight=1.0,
                 log_sigma2_init=DEFAULT_LOG_SIGMA2_INIT, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", seed=None, **kwargs):
        super().__init__(**kwargs)
        _checks.positive_int(filters, "filters")
        self.kernel_size = _checks.pair_of_positive_ints(kernel_size, "kernel_size")
        self.strides = _checks.pair_of_positive_ints(strides, "strides")
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same'; got {padding!r}")
        self._init_vd(threshold, kl_weight, log_sigma2_init, activation, use_bias,
                      kernel_initializer, bias_initializer, seed)
        self.filters = int(filters)
        self.padding = padding

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError("SparseVDConv2D wants inputs (batch, height, width, channels) with "
                             f"known channels; got shape {input_shape}")
        C = int(input_shape[-1])
        self._add_vd_weights(self.kernel_size + (C, self.filters))
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: C})

    def _conv(self, x, kernel):
        y = ops.conv(x, kernel, strides=self.strides, padding=self.padding,
                     data_format="channels_last")
        # TensorFlow's CPU convolution gives a batch of no images the input's shape, not the
        # output's (keras.layers.Conv2D fails on it too); an empty tensor takes any shape with
        # no elements, and any other already has this one.
        shape = ops.shape(x)
        size = [self._output_size(shape[1 + i], i) for i in range(2)]
        return ops.reshape(y, (shape[0], size[0], size[1], self.filters))

    def _output_size(self, size, axis):
        """Output size along spatial axis `axis` (0: height, 1: width) for an input `size`."""
        k, s = self.kernel_size[axis], self.strides[axis]
        return (size + s - 1) // s if self.padding == "same" else (size - k) // s + 1

    def call(self, inputs, training=None):
        self.compute_output_shape(tuple(inputs.shape))  # checks sizes known when traced
        x = ops.cast(inputs, self.compute_dtype)
        w_mean, w_var, log_alpha = self._kernels(bool(training))
        mean = self._conv(x, w_mean)
        var = None if w_var is None else self._conv(ops.square(x), w_var)
        return self._finish(mean, var, log_alpha)

    def compute_output_shape(self, input_shape):
        dims = []
        for axis, size in enumerate(input_shape[1:3]):
            if size is None:
                dims.append(None)
            else:
                dims.append(self._output_size(size, axis))
                if dims[-1] < 1:
                    raise ValueError(f"{self.name}: input of spatial shape "
                                     f"{tuple(input_shape[1:3])} is smaller than the kernel "
                                     f"{self.kernel_size} with padding 'valid'")
        return (input_shape[0], *dims, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "kernel_size": list(self.kernel_size),
                       "strides": list(self.strides), "padding": self.padding,
                       "seed": self.seed, **self._vd_config()})
        return config
