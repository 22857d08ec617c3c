"""Conditional computation networks (condnets): per-example block dropping by a learned policy.

After Bengio, Bacon, Pineau and Precup, "Conditional Computation in Neural Networks for faster
models" (arXiv 1511.06297).  Every hidden layer ``CondDense`` has a small sigmoid *policy* that
reads the layer's input and gives, per example, the probability that each block of output units
takes part.  Masks are Bernoulli samples of these probabilities while training; the layer computes
only the active blocks (``blocksparse_tf.sparse_dot``) and hands its output mask to the next layer
as that layer's input mask, so both sides of every product are sparse.

``CondNetModel`` stacks ``CondDense`` layers under a dense softmax classifier and trains with a
custom ``train_step``: the network weights by backpropagation through the sampled masks, the
policies by REINFORCE (reward = minus the per-example task loss, optional baseline) plus the
paper's regularizers.  Formulas and usage: docs/condnet.md.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from blocksparse_tf.layers import _checks, _xla
from blocksparse_tf.conditional import check_implementation, check_mask, expand_mask, sparse_dot

#: Values accepted for ``inference``.
INFERENCE_MODES = ("threshold", "sample")
#: Values accepted for ``CondNetModel(baseline=...)``.
BASELINES = (None, "batch", "moving_average")


def _nonneg_float(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def _open_unit(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0 < value < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1; got {value!r}")
    return float(value)


def bernoulli_log_prob(mask, logits):
    """Per-example log-probability of a 0/1 ``mask`` (n, k) under Bernoulli(sigmoid(logits)).

    Summed over the k blocks; computed from the logits, so it stays finite when a probability
    saturates: log sigmoid(z) = -softplus(-z), log(1 - sigmoid(z)) = -softplus(z).
    """
    mask = tf.cast(mask, logits.dtype)
    return -tf.reduce_sum(mask * tf.nn.softplus(-logits) + (1.0 - mask) * tf.nn.softplus(logits),
                          axis=-1)


def sparsity_regularizers(probs, tau):
    """The paper's three policy regularizers of one layer, from probabilities ``probs`` (n, k).

    Returns a dict of scalars:

    - ``batch``:   L_b = sum_j (mean_i p_ij - tau)^2   (each block active on a tau fraction of
      the batch)
    - ``example``: L_e = mean_i (mean_j p_ij - tau)^2  (each example uses a tau fraction of the
      blocks)
    - ``variance``: L_v = sum_j var_i p_ij  (population variance over the batch; *subtracted*
      from the loss, so that different inputs use different blocks)
    """
    probs = tf.convert_to_tensor(probs)
    tau = tf.cast(tau, probs.dtype)
    block_mean = tf.reduce_mean(probs, axis=0)
    return {
        "batch": tf.reduce_sum(tf.square(block_mean - tau)),
        "example": tf.reduce_mean(tf.square(tf.reduce_mean(probs, axis=1) - tau)),
        "variance": tf.reduce_sum(tf.reduce_mean(tf.square(probs - block_mean), axis=0)),
    }


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class CondDense(keras.layers.Layer):
    """Dense layer whose blocks of output units are switched on per example by a learned policy.

    ``y = activation((x * expand(in_mask)) . W + b) * expand(out_mask)`` where the out_mask
    (n, units / block_size) is drawn from the policy ``p = sigmoid(stop_gradient(x) . V + c)``:
    Bernoulli samples while training (or with ``inference="sample"``), ``p > threshold`` at
    inference with ``inference="threshold"`` (default).  Inactive blocks are never computed
    (``blocksparse_tf.sparse_dot``); their outputs are exactly 0.

    Parameters
    ----------
    units : int
        Output size, a multiple of ``block_size``.
    block_size : int
        Units per policy decision: 1, 8, 16, 32 (default) or 64 (the sizes of the kernels).  The input size need not be a multiple of it
        when no ``in_mask`` is given (the first layer); it is padded with zeros internally.
    activation : Keras activation
        Default ``"relu"``.  The output is re-masked after it, so any activation keeps inactive
        blocks at 0.
    use_bias : bool
        Default True.
    tau : float in (0, 1)
        Target fraction of active blocks of this layer (the regularizers pull the policy to it;
        the policy bias starts at logit(tau)).  Default 0.5.
    lambda_b, lambda_e, lambda_v : float >= 0
        Weights of the batch-wise, example-wise and variance regularizers of this layer
        (see :func:`sparsity_regularizers`).  Defaults 1, 0, 0.
    inference : "threshold" or "sample"
        How masks are chosen when not training.  Default "threshold".
    threshold : float in (0, 1)
        Probability above which a block is on at inference with ``"threshold"``.  Default 0.5.
    kernel_initializer, bias_initializer : Keras initializers of W (C, units) and b (units,).
    policy_kernel_initializer : Keras initializer of V (C, units / block_size).
        Default ``RandomNormal(stddev=0.01)``: the policy starts nearly input-independent.
    policy_bias_initializer : Keras initializer of c, or None (default) for logit(tau).
    seed : int or None
        Seed of the mask sampler.
    implementation : "sparse" or "dense"
        How the masked product runs (``blocksparse_tf.sparse_dot``'s argument): the
        block-skipping kernels (default), or one dense product with the masks applied to its
        input and output, for GPUs where the active fractions are too high for the kernels to
        win.  The same outputs and gradients up to rounding.

    Call
    ----
    ``y, out_mask = layer(x, in_mask=None, training=None, out_mask=None)``; with
    ``return_policy=True`` it returns ``(y, out_mask, logits)``, the policy logits (n, blocks).
    Passing ``out_mask`` fixes the mask instead of drawing it.  Masks are float32 0/1 and carry
    no gradient; the policy reads ``stop_gradient(x)``, so it is trained only by its own losses:
    REINFORCE and the regularizers, which :class:`CondNetModel`'s ``train_step`` adds (the layer
    adds no loss of its own).  Outside a CondNetModel, ``tau`` and the ``lambda_*`` weights do
    nothing and the policy keeps its initial weights unless a custom training step trains it
    as ``CondNetModel.train_step`` does (with :func:`bernoulli_log_prob` and
    :func:`sparsity_regularizers` on the logits of ``return_policy=True``).
    """

    def __init__(self, units, block_size=32, activation="relu", use_bias=True, tau=0.5,
                 lambda_b=1.0, lambda_e=0.0, lambda_v=0.0, inference="threshold", threshold=0.5,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 policy_kernel_initializer=None, policy_bias_initializer=None, seed=None,
                 implementation="sparse", **kwargs):
        super().__init__(**kwargs)
        _xla.run_without_xla(self)
        self.implementation = check_implementation(implementation)
        self.units, self.block_size = _checks.width_in_blocks(units, block_size)
        self.blocks = self.units // self.block_size
        self.activation = keras.activations.get(activation)
        self.use_bias = _checks.flag(use_bias, "use_bias")
        self.tau = _open_unit(tau, "tau")
        self.lambda_b = _nonneg_float(lambda_b, "lambda_b")
        self.lambda_e = _nonneg_float(lambda_e, "lambda_e")
        self.lambda_v = _nonneg_float(lambda_v, "lambda_v")
        if inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {INFERENCE_MODES}; got {inference!r}")
        self.inference = inference
        self.threshold = _open_unit(threshold, "threshold")
        self.seed = _checks.optional_int(seed, "seed")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.policy_kernel_initializer = keras.initializers.get(
            policy_kernel_initializer if policy_kernel_initializer is not None
            else keras.initializers.RandomNormal(stddev=0.01, seed=self.seed))
        self.policy_bias_initializer = keras.initializers.get(
            policy_bias_initializer if policy_bias_initializer is not None
            else keras.initializers.Constant(math.log(self.tau / (1.0 - self.tau))))
        self.seed_generator = keras.random.SeedGenerator(self.seed, name="mask_seed")

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(f"CondDense needs a known input size; got input shape {input_shape}")
        self.input_dim = int(input_dim)
        self.kernel = self.add_weight(name="kernel", shape=(self.input_dim, self.units),
                                      initializer=self.kernel_initializer)
        self.bias = (self.add_weight(name="bias", shape=(self.units,),
                                     initializer=self.bias_initializer)
                     if self.use_bias else None)
        self.policy_kernel = self.add_weight(name="policy_kernel",
                                             shape=(self.input_dim, self.blocks),
                                             initializer=self.policy_kernel_initializer)
        self.policy_bias = self.add_weight(name="policy_bias", shape=(self.blocks,),
                                           initializer=self.policy_bias_initializer)
        # Keras then names a wrong input size (else the policy's matmul failed on it).
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: self.input_dim})

    @property
    def policy_variables(self):
        """The policy's parameters (V, c): trained by REINFORCE and the regularizers."""
        return [self.policy_kernel, self.policy_bias]

    @property
    def network_variables(self):
        """The layer's own weights (W, b): trained by backpropagation of the task loss."""
        return [self.kernel] + ([self.bias] if self.bias is not None else [])

    def policy_logits(self, x):
        """Logits (n, blocks) of each block's participation probability, from the input x."""
        x = tf.stop_gradient(_as_compute_tensor(x, self.compute_dtype))
        return tf.matmul(x, tf.cast(self.policy_kernel, x.dtype)) + tf.cast(self.policy_bias,
                                                                          x.dtype)

    def choose_mask(self, logits, training=False):
        """0/1 float32 mask (n, blocks): Bernoulli(sigmoid(logits)) when training or sampling,
        sigmoid(logits) > threshold otherwise."""
        probs = tf.sigmoid(tf.cast(logits, tf.float32))
        if training or self.inference == "sample":
            u = keras.random.uniform(tf.shape(probs), seed=self.seed_generator)
            return tf.cast(u < probs, tf.float32)
        return tf.cast(probs > self.threshold, tf.float32)

    def call(self, inputs, in_mask=None, training=None, out_mask=None, return_policy=False):
        x = _as_compute_tensor(inputs, self.compute_dtype)
        if x.shape.rank != 2:
            raise ValueError(f"{self.name}: inputs must be (n, features); got {x.shape}")
        logits = self.policy_logits(x)
        if out_mask is None:
            out_mask = self.choose_mask(logits, training=bool(training))
        else:
            out_mask = check_mask(out_mask, "out_mask", x.shape[0], self.units, self.block_size)
        out_mask = tf.stop_gradient(out_mask)
        kernel = tf.cast(self.kernel, x.dtype)
        bs = self.block_size
        if in_mask is None:
            pad = -self.input_dim % bs
            if pad:  # the first layer: pad the input to whole blocks; padded rows read zeros
                x = tf.pad(x, [[0, 0], [0, pad]])
                kernel = tf.pad(kernel, [[0, pad], [0, 0]])
        else:
            if self.input_dim % bs:
                raise ValueError(f"{self.name}: an in_mask needs an input size that is a multiple "
                                 f"of block_size={bs}; got {self.input_dim}")
            in_mask = tf.stop_gradient(check_mask(in_mask, "in_mask", x.shape[0], self.input_dim,
                                                  bs))
        bias = tf.cast(self.bias, x.dtype) if self.bias is not None else None
        z = sparse_dot(x, kernel, in_mask=in_mask, out_mask=out_mask, bias=bias, block_size=bs,
                       implementation=self.implementation)
        y = self.activation(z) * tf.cast(expand_mask(out_mask, bs), z.dtype)
        return (y, out_mask, logits) if return_policy else (y, out_mask)

    def regularization(self, probs):
        """lambda_b L_b + lambda_e L_e - lambda_v L_v of this layer, and the terms (a dict)."""
        terms = sparsity_regularizers(probs, self.tau)
        total = (self.lambda_b * terms["batch"] + self.lambda_e * terms["example"]
                 - self.lambda_v * terms["variance"])
        return total, terms

    def compute_output_shape(self, input_shape, return_policy=False):
        """Shapes of (y, out_mask) and, with return_policy, of the policy logits."""
        lead = tuple(input_shape[:-1])
        shapes = (lead + (self.units,), lead + (self.blocks,))
        return shapes + (lead + (self.blocks,),) if return_policy else shapes

    def compute_output_spec(self, inputs, in_mask=None, training=None, out_mask=None,
                            return_policy=False):
        # Keras passes compute_output_shape only the inputs' shapes, which would drop the
        # policy logits that return_policy adds; the masks are float32 whatever the policy.
        shapes = self.compute_output_shape(inputs.shape, return_policy=return_policy)
        dtypes = (self.compute_dtype, "float32", self.compute_dtype)
        return tuple(keras.KerasTensor(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes))

    def get_config(self):
        config = super().get_config()
        ser = keras.initializers.serialize
        config.update(
            units=self.units, block_size=self.block_size,
            activation=keras.activations.serialize(self.activation), use_bias=self.use_bias,
            tau=self.tau, lambda_b=self.lambda_b, lambda_e=self.lambda_e,
            lambda_v=self.lambda_v, inference=self.inference, threshold=self.threshold,
            implementation=self.implementation,
            kernel_initializer=ser(self.kernel_initializer),
            bias_initializer=ser(self.bias_initializer),
            policy_kernel_initializer=ser(self.policy_kernel_initializer),
            policy_bias_initializer=ser(self.policy_bias_initializer), seed=self.seed)
        return config


def _as_compute_tensor(inputs, dtype):
    """inputs as a tensor of the layer's compute dtype: real or integer inputs (uint8 pixels,
    say) cast, as Keras' Dense does; other dtypes refused, named."""
    x = tf.convert_to_tensor(inputs)
    if x.dtype == dtype:
        return x
    if not (x.dtype.is_floating or x.dtype.is_integer or x.dtype.is_bool):
        raise ValueError(f"inputs must hold real numbers; got dtype {x.dtype.name}")
    return tf.cast(x, dtype)


def _per_layer(value, n, name, check):
    """A scalar broadcast to n layers, or a sequence of n values, each passed through check."""
    if isinstance(value, np.ndarray) and value.ndim == 0:  # one value, as a 0-d array
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} needs one value per hidden layer ({n}); got {len(value)}")
        return [check(v, name) for v in value]
    return [check(value, name)] * n


def _check_class_labels(shape):
    """Raises ValueError unless `shape` (of a batch of labels; None: unknown) fits integer class
    labels, one per example: (n,) or (n, 1) (a scalar for a single example)."""
    if shape is None or tf.TensorShape(shape).rank is None:
        return
    dims = tf.TensorShape(shape).as_list()
    if len(dims) <= 1 or (len(dims) == 2 and dims[1] in (1, None)):
        return
    hint = " (one-hot labels? pass their argmax over the last axis)" if len(dims) == 2 else ""
    raise ValueError(f"CondNetModel takes integer class labels of shape (n,) or (n, 1), got "
                     f"shape {tuple(dims)}{hint}")


@keras.saving.register_keras_serializable(package="blocksparse_tf")
class CondNetModel(keras.Model):
    """A condnet classifier: ``CondDense`` hidden layers (masks passed layer to layer) and a
    dense output layer, trained by ``model.fit`` with REINFORCE for the policies.

    Parameters
    ----------
    hidden_units : sequence of int
        Units of each ``CondDense`` layer (multiples of ``block_size``).
    num_classes : int
        Outputs of the final ``keras.layers.Dense`` (logits).  Its input is the last hidden
        layer's output, already exactly 0 on inactive blocks.
    block_size : int
        Default 32.
    tau, lambda_b, lambda_e, lambda_v : float or one per hidden layer
        Passed to the ``CondDense`` layers (target active fraction, regularizer weights).
        Defaults 0.5, 1.0, 0.0, 0.0.
    reinforce_weight : float >= 0
        Weight of the REINFORCE surrogate in the loss.  Default 1.
    baseline : None, "batch" (default) or "moving_average"
        Subtracted from the reward.  "batch": for each example the mean reward of the *other*
        examples of the batch (leave-one-out, so the estimate stays unbiased); "moving_average":
        an exponential average of past batches' mean reward (``baseline_momentum``).
    activation, inference, threshold, seed, implementation : passed to the layers (seed +
        layer index).

    ``model(x)`` returns logits (inference masks); :meth:`forward` returns ``(logits,
    policy_logits, masks)``, the policies' logits and the masks used besides;
    :meth:`compute_condnet_loss` gives every term of the training loss.  Compile with an
    optimizer only: ``model.compile(optimizer="adam")``; the loss is built in.  Labels: integer
    class indices, shape (n,) or (n, 1); no sample or class weights.  Metrics: ``loss``,
    ``task_loss``, ``accuracy``, ``active_fraction`` (mean over hidden layers).
    """

    def __init__(self, hidden_units, num_classes, block_size=32, tau=0.5, lambda_b=1.0,
                 lambda_e=0.0, lambda_v=0.0, reinforce_weight=1.0, baseline="batch",
                 baseline_momentum=0.9, activation="relu", inference="threshold", threshold=0.5,
                 seed=None, implementation="sparse", **kwargs):
        super().__init__(**kwargs)
        if isinstance(hidden_units, (int, np.integer)) or not len(hidden_units):
            raise ValueError(f"hidden_units must be a non-empty sequence of ints; got {hidden_units!r}")
        self.hidden_units = [_checks.positive_int(u, "hidden_units") for u in hidden_units]
        n = len(self.hidden_units)
        self.num_classes = _checks.positive_int(num_classes, "num_classes")
        self.block_size = _checks.positive_int(block_size, "block_size")
        self.tau = _per_layer(tau, n, "tau", _open_unit)
        self.lambda_b = _per_layer(lambda_b, n, "lambda_b", _nonneg_float)
        self.lambda_e = _per_layer(lambda_e, n, "lambda_e", _nonneg_float)
        self.lambda_v = _per_layer(lambda_v, n, "lambda_v", _nonneg_float)
        self.reinforce_weight = _nonneg_float(reinforce_weight, "reinforce_weight")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}; got {baseline!r}")
        self.baseline = baseline
        self.baseline_momentum = _nonneg_float(baseline_momentum, "baseline_momentum")
        if self.baseline_momentum >= 1:
            raise ValueError(f"baseline_momentum must be in [0, 1); got {baseline_momentum!r}")
        self.activation = activation
        self.inference = inference
        self.threshold = threshold
        self.seed = _checks.optional_int(seed, "seed")
        self.implementation = check_implementation(implementation)
        self.cond_layers = [
            CondDense(u, self.block_size, activation=activation, tau=self.tau[i],
                      lambda_b=self.lambda_b[i], lambda_e=self.lambda_e[i],
                      lambda_v=self.lambda_v[i], inference=inference, threshold=threshold,
                      seed=None if self.seed is None else self.seed + i,
                      implementation=self.implementation, name=f"cond_dense_{i}")
            for i, u in enumerate(self.hidden_units)]
        self.classifier = keras.layers.Dense(self.num_classes, name="classifier")
        self.reward_average = self.add_weight(name="reward_average", shape=(),
                                              initializer="zeros", trainable=False)
        self._trackers = {k: keras.metrics.Mean(name=k)
                          for k in ("loss", "task_loss", "active_fraction")}
        self._accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.cond_layers:
            if not layer.built:
                layer.build(shape)
            shape = shape[:-1] + (layer.units,)
        if not self.classifier.built:
            self.classifier.build(shape)
        self.built = True

    @property
    def policy_variables(self):
        """Every hidden layer's policy parameters (see ``CondDense.policy_variables``), in
        layer order."""
        return [v for layer in self.cond_layers for v in layer.policy_variables]

    def forward(self, x, training=False, masks=None):
        """Runs the network.  Returns ``(logits, policy_logits, masks)``: the class logits and,
        per hidden layer, the policy logits and the 0/1 masks used.  ``masks`` (one per hidden
        layer) fixes the masks instead of drawing them."""
        return self(x, training=training, masks=masks, return_all=True)

    def call(self, inputs, training=False, masks=None, return_all=False):
        h = _as_compute_tensor(inputs, self.compute_dtype)
        if masks is not None:
            try:
                got = None if isinstance(masks, (str, bytes)) else len(masks)
            except TypeError:  # no length (or a tensor of unknown length)
                got = None
            if got != len(self.cond_layers):
                raise ValueError(f"masks must hold one (n, blocks) mask per hidden layer, "
                                 f"{len(self.cond_layers)} in all; got "
                                 f"{type(masks).__name__ if got is None else got}")
        in_mask, all_logits, all_masks = None, [], []
        for i, layer in enumerate(self.cond_layers):
            h, in_mask, pl = layer(h, in_mask=in_mask, training=training,
                                   out_mask=None if masks is None else masks[i],
                                   return_policy=True)
            all_logits.append(pl)
            all_masks.append(in_mask)
        logits = self.classifier(h)
        return (logits, all_logits, all_masks) if return_all else logits

    def compute_condnet_loss(self, x, y, training=True, masks=None):
        """Every term of the training loss, as a dict of tensors.

        ``task_loss`` (n,) per-example cross-entropy; ``reward`` = -task_loss; ``advantage`` =
        reward - baseline; ``log_prob`` (n,) log-probability of the sampled masks (all layers);
        ``reinforce`` = -mean(stop_gradient(advantage) * log_prob); ``regularization`` = sum over
        layers of lambda_b L_b + lambda_e L_e - lambda_v L_v; ``loss`` = mean(task_loss) +
        reinforce_weight * reinforce + regularization; plus ``logits``, ``probs``, ``masks``.
        """
        if y is None:
            raise ValueError("CondNetModel needs integer class labels y (one per example) to "
                             "compute its loss; got None")
        logits, policy_logits, used = self.forward(x, training=training, masks=masks)
        y = tf.convert_to_tensor(y)
        _check_class_labels(y.shape)
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        tf.debugging.assert_equal(tf.size(y), tf.shape(logits)[0],
                                  message="CondNetModel: one class label per example")
        task = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.cast(
            logits, tf.float32))
        reward = -task
        if self.baseline == "batch":
            n = tf.cast(tf.shape(reward)[0], reward.dtype)
            base = (tf.reduce_sum(reward) - reward) / tf.maximum(n - 1.0, 1.0)
        elif self.baseline == "moving_average":
            base = tf.fill(tf.shape(reward), self.reward_average)
        else:
            base = tf.zeros_like(reward)
        advantage = tf.stop_gradient(reward - base)
        log_prob = tf.add_n([bernoulli_log_prob(m, tf.cast(pl, tf.float32))
                             for m, pl in zip(used, policy_logits)])
        reinforce = -tf.reduce_mean(advantage * log_prob)
        probs = [tf.sigmoid(tf.cast(pl, tf.float32)) for pl in policy_logits]
        reg = tf.add_n([layer.regularization(p)[0] for layer, p in zip(self.cond_layers, probs)])
        loss = tf.reduce_mean(task) + self.reinforce_weight * reinforce + reg
        return {"loss": loss, "task_loss": task, "reward": reward, "advantage": advantage,
                "log_prob": log_prob, "reinforce": reinforce, "regularization": reg,
                "logits": logits, "probs": probs, "masks": used}

    @staticmethod
    def active_fractions(masks):
        """Fraction of active blocks of each layer (a list of scalars)."""
        return [tf.reduce_mean(m) for m in masks]

    def _update_metrics(self, terms, y):
        self._trackers["loss"].update_state(terms["loss"])
        self._trackers["task_loss"].update_state(terms["task_loss"])
        self._trackers["active_fraction"].update_state(
            tf.reduce_mean(tf.stack(self.active_fractions(terms["masks"]))))
        self._accuracy.update_state(tf.reshape(y, [-1]), terms["logits"])
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        return list(self._trackers.values()) + [self._accuracy]

    def fit(self, x=None, y=None, *args, **kwargs):
        """Keras' ``fit``, with integer class labels of shape (n,) or (n, 1) checked and the
        model built before the first step; ``sample_weight``, ``class_weight`` and datasets
        of weighted elements raise ValueError (the policy's reward is the unweighted
        per-example loss)."""
        # Refused before Keras traces its train step: refused inside it, the trace would stop
        # before the optimizer made its variables, and every later fit would fail on making
        # them in a second trace.
        weighted = kwargs.get("sample_weight") is not None or kwargs.get("class_weight")
        if weighted or self._data_parts(x, y)[2] == 3:
            self._unpack((x, y, True))
        self._check_data(x, y)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """Keras' ``evaluate``, with the labels checked as in ``fit``."""
        self._check_data(x, y)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """Keras' ``predict`` (class logits), the model built from x's size first."""
        self._build_from(self._data_parts(x, None)[0])
        return super().predict(x, *args, **kwargs)

    @staticmethod
    def _data_parts(x, y):
        """(features, labels, parts) of the data given to fit / evaluate / predict: for a dataset,
        its element specs (features, labels[, sample weights]) and how many; else x (the first
        of a tuple), y and 0."""
        if isinstance(x, tf.data.Dataset):
            spec = x.element_spec
            if not isinstance(spec, tuple):
                return spec, None, 1
            return spec[0], spec[1] if len(spec) >= 2 else None, len(spec)
        return (x[0] if isinstance(x, tuple) and x else x), y, 0

    def _check_data(self, x, y):
        """Checks the labels' shape and builds the model, before Keras traces a step."""
        features, labels, _ = self._data_parts(x, y)
        _check_class_labels(getattr(labels, "shape", None))
        self._build_from(features)

    def _build_from(self, features):
        """Builds the layers eagerly from the features' size (an array, tensor or spec).  Built
        inside Keras' first traced step instead, a step that then failed to trace (say, on
        labels of the wrong shape) left the variables uninitialized, and every later call failed
        with an unrelated MatMul error."""
        if self.built:
            return
        shape = getattr(features, "shape", None)
        if shape is None or tf.TensorShape(shape).rank is None:
            return
        dims = tf.TensorShape(shape).as_list()
        if len(dims) >= 2 and dims[-1] is not None:
            self.build((None,) + tuple(dims[1:]))

    @staticmethod
    def _unpack(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:  # rather than train on an unweighted loss without a word
            raise ValueError("CondNetModel does not take sample_weight or class_weight: its "
                             "REINFORCE reward is the unweighted per-example loss")
        return x, y

    def train_step(self, data):
        x, y = self._unpack(data)
        with tf.GradientTape() as tape:
            terms = self.compute_condnet_loss(x, y, training=True)
            # A LossScaleOptimizer (mixed_float16) divides the gradients by its scale: they
            # must come from the loss it scaled.
            scaled_loss = self.optimizer.scale_loss(terms["loss"])
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(grads, variables)
        if self.baseline == "moving_average":
            mom = self.baseline_momentum
            self.reward_average.assign(mom * self.reward_average
                                       + (1.0 - mom) * tf.reduce_mean(terms["reward"]))
        return self._update_metrics(terms, y)

    def test_step(self, data):
        x, y = self._unpack(data)
        return self._update_metrics(self.compute_condnet_loss(x, y, training=False), y)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=list(self.hidden_units), num_classes=self.num_classes,
            block_size=self.block_size, tau=list(self.tau), lambda_b=list(self.lambda_b),
            lambda_e=list(self.lambda_e), lambda_v=list(self.lambda_v),
            reinforce_weight=self.reinforce_weight, baseline=self.baseline,
            baseline_momentum=self.baseline_momentum, activation=self.activation,
            inference=self.inference, threshold=self.threshold, seed=self.seed,
            implementation=self.implementation)
        return config
