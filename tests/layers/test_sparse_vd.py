"""Sparse Variational Dropout layers: KL, local reparameterisation, pruning, saving."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from scipy import integrate, stats

from blocksparse_tf.layers.sparse_vd import (KLWarmup, SparseVDConv2D, SparseVDDense,
                                             format_report, kl_approx, kl_scale, kl_warmup,
                                             set_kl_weight, sparsity_report, total_kl)
from tests.example_scripts import assert_refused, example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _neg_kl_numerical(log_alpha):
    """-KL(N(theta, alpha theta^2) || log-uniform) by quadrature, normalised to 0 at alpha=inf.

    -KL = 0.5 log alpha - E_{e ~ N(1, alpha)} log|e| + C, and for large alpha
    E log|e| -> 0.5 log alpha + E_{z ~ N(0,1)} log|z|, so C = E log|z| = -(gamma + log 2) / 2.
    """
    s = np.sqrt(np.exp(log_alpha))
    f = lambda z: np.log(np.abs(1.0 + s * z)) * stats.norm.pdf(z)  # noqa: E731
    # Split at the logarithmic singularity z = -1/s.
    e_log = (integrate.quad(f, -np.inf, -1.0 / s, limit=200)[0]
             + integrate.quad(f, -1.0 / s, np.inf, limit=200)[0])
    c = -(np.euler_gamma + np.log(2.0)) / 2.0
    return 0.5 * log_alpha - e_log + c


@pytest.mark.parametrize("log_alpha", [-6.0, -3.0, -1.0, 0.0, 1.5, 3.0, 6.0])
def test_kl_approximation_matches_numerical_integration(log_alpha):
    approx = float(np.asarray(kl_approx(np.float32(log_alpha))))
    assert approx == pytest.approx(-_neg_kl_numerical(log_alpha), abs=0.01)


def _set_log_alpha(layer, log_alpha):
    """Sets log_sigma2 so that the (unclipped) log_alpha of every weight is ``log_alpha``."""
    theta = keras.ops.convert_to_numpy(layer.theta)
    layer.log_sigma2.assign(log_alpha + np.log(theta ** 2 + 1e-8))


def test_local_reparameterisation_mean_and_variance_match_monte_carlo():
    rng = np.random.default_rng(0)
    layer = SparseVDDense(5, seed=1)
    x1 = rng.normal(size=(1, 7)).astype(np.float32)
    layer.build((None, 7))
    log_alpha = rng.uniform(-3, 1, size=(7, 5)).astype(np.float32)
    _set_log_alpha(layer, log_alpha)
    layer.bias.assign(rng.normal(size=5).astype(np.float32))
    theta = keras.ops.convert_to_numpy(layer.theta)
    b = keras.ops.convert_to_numpy(layer.bias)
    sigma = np.sqrt(np.exp(log_alpha) * theta ** 2)
    # Independent reference: sample whole weight matrices and push x through them.
    n = 20000
    w = theta[None] + sigma[None] * rng.normal(size=(n, 7, 5))
    y_ref = np.einsum("c,nck->nk", x1[0], w) + b
    y = keras.ops.convert_to_numpy(layer(np.repeat(x1, n, axis=0), training=True))
    assert np.allclose(y.mean(0), y_ref.mean(0), atol=4 * y_ref.std(0).max() / np.sqrt(n) * 2)
    assert np.allclose(y.var(0), y_ref.var(0), rtol=0.06)
    # and the closed forms of the trick
    assert np.allclose(y.mean(0), x1[0] @ theta + b, atol=0.05 * np.abs(sigma).max() + 0.02)
    assert np.allclose(y.var(0), (x1[0] ** 2) @ sigma ** 2, rtol=0.06)


def _conv_ref(x, w, b):
    """Naive 'valid' stride-1 correlation, (N, H, W, C) x (kh, kw, C, F)."""
    kh, kw = w.shape[:2]
    H, W = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], H, W, w.shape[3]))
    for i in range(H):
        for j in range(W):
            out[:, i, j] = np.einsum("nabc,abcf->nf", x[:, i:i + kh, j:j + kw], w)
    return out + b


def test_conv_moments_and_inference():
    rng = np.random.default_rng(1)
    layer = SparseVDConv2D(3, 2, seed=2)
    layer.build((None, 4, 4, 2))
    log_alpha = rng.uniform(-2, 5, size=(2, 2, 2, 3)).astype(np.float32)
    _set_log_alpha(layer, log_alpha)
    theta = keras.ops.convert_to_numpy(layer.theta)
    x = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
    # inference: pruned kernel
    mask = log_alpha < 3.0
    got = keras.ops.convert_to_numpy(layer(x))
    assert np.allclose(got, _conv_ref(x, theta * mask, 0.0), atol=1e-5)
    # training: moments of the sampled feature maps
    n = 6000
    y = keras.ops.convert_to_numpy(layer(np.repeat(x, n, 0), training=True))
    var = _conv_ref(x ** 2, np.exp(np.clip(log_alpha, -8, 8)) * theta ** 2, 0.0)[0]
    assert np.allclose(y.mean(0), _conv_ref(x, theta, 0.0)[0], atol=5 * np.sqrt(var.max() / n))
    assert np.allclose(y.var(0), var, rtol=0.1)


def test_pruning_threshold_semantics():
    layer = SparseVDDense(4, threshold=3.0)
    layer.build((None, 3))
    layer.theta.assign(np.ones((3, 4), np.float32))
    la = np.array([[-9.0, 2.99, 3.0, 3.01], [8.5, 0.0, -1.0, 2.0], [5.0, 5.0, 5.0, -5.0]],
                  np.float32)
    layer.log_sigma2.assign(la)  # theta = 1, so log_alpha = log_sigma2 (up to 1e-8)
    kept = la < 3.0
    assert np.array_equal(layer.kept_mask(), kept)
    got_la = keras.ops.convert_to_numpy(layer.log_alpha())
    assert got_la.min() == -8.0 and got_la.max() == 8.0  # clipped
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.allclose(keras.ops.convert_to_numpy(layer(x)), x @ kept.astype(np.float32))
    rep = layer.sparsity_report()
    assert rep["weights"] == 12 and rep["kept"] == int(kept.sum())
    assert rep["compression"] == pytest.approx(12 / kept.sum())
    assert rep["sparsity"] == pytest.approx(1 - kept.sum() / 12)
    # a higher threshold keeps more
    layer.threshold = 6.0
    assert np.array_equal(layer.kept_mask(), la < 6.0)


def test_kl_loss_weight_and_schedule():
    model = keras.Sequential([keras.Input((6,)), SparseVDDense(4, activation="relu",
                                                               kl_weight=0.5),
                              SparseVDDense(3)])
    x = np.ones((2, 6), np.float32)
    model(x)
    kl0 = float(keras.ops.convert_to_numpy(model.layers[0].kl()))
    la = keras.ops.convert_to_numpy(model.layers[0].log_alpha())
    assert kl0 == pytest.approx(float(np.sum(np.asarray(kl_approx(la)))), rel=1e-5)
    losses = [float(keras.ops.convert_to_numpy(v)) for v in model.losses]
    assert losses[0] == pytest.approx(0.5 * kl0, rel=1e-5)
    assert total_kl(model) == pytest.approx(kl0 + float(
        keras.ops.convert_to_numpy(model.layers[1].kl())), rel=1e-5)
    set_kl_weight(model, 0.0)
    model(x)
    assert all(float(keras.ops.convert_to_numpy(v)) == 0.0 for v in model.losses)
    assert [kl_warmup(e, 5, 20) for e in (0, 4, 5, 10, 20, 30)] == [0, 0, 0, 1 / 3, 1, 1]
    assert kl_scale(60000) == pytest.approx(1 / 60000)
    assert kl_scale(100, rw=0.5) == pytest.approx(0.005)
    # the callback drives the weight during fit
    cb = KLWarmup(dataset_size=8, start=1, end=3)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xs = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    model.fit(xs, np.arange(8) % 3, epochs=4, batch_size=4, verbose=0, callbacks=[cb])
    assert cb.history == pytest.approx([0.0, 0.0, 0.5 / 8, 1 / 8])
    assert float(keras.ops.convert_to_numpy(model.layers[1].kl_weight)) == pytest.approx(1 / 8)


def test_model_report():
    model = keras.Sequential([keras.Input((5,)), SparseVDDense(4), SparseVDDense(2)])
    la = np.full((5, 4), 5.0, np.float32)
    la[0] = -1.0  # 4 of 20 kept
    _set_log_alpha(model.layers[0], la)
    rows = sparsity_report(model)
    assert [r["name"] for r in rows] == [model.layers[0].name, model.layers[1].name, "total"]
    assert rows[0]["kept"] == 4 and rows[1]["kept"] == 8
    assert rows[2]["weights"] == 28 and rows[2]["compression"] == pytest.approx(28 / 12)
    assert "| total | 28 | 12 |" in format_report(rows)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    inp = keras.Input((6, 6, 1))
    h = SparseVDConv2D(2, 3, activation="relu", threshold=2.5)(inp)
    h = keras.layers.Flatten()(h)
    out = SparseVDDense(3, kl_weight=0.25)(h)
    model = keras.Model(inp, out)
    for layer in (model.layers[1], model.layers[3]):
        _set_log_alpha(layer, rng.uniform(-4, 6, size=layer.theta.shape).astype(np.float32))
    path = str(tmp_path / "svd.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = rng.normal(size=(4, 6, 6, 1)).astype(np.float32)
    assert np.allclose(keras.ops.convert_to_numpy(loaded(x)),
                       keras.ops.convert_to_numpy(model(x)), atol=1e-6)
    for a, b in zip(model.layers, loaded.layers):
        assert a.get_config() == b.get_config()
    assert loaded.layers[1].threshold == 2.5
    assert float(keras.ops.convert_to_numpy(loaded.layers[3].kl_weight)) == 0.25


@pytest.mark.parametrize("make,message", [
    (lambda: SparseVDDense(0), r"units must be a positive integer; got 0"),
    (lambda: SparseVDDense(3.5), r"units must be a positive integer; got 3\.5"),
    (lambda: SparseVDDense(3, threshold="high"), r"threshold must be a number; got 'high'"),
    (lambda: SparseVDDense(3, kl_weight=-1.0), r"kl_weight must be a finite number >= 0"),
    (lambda: SparseVDDense(3, log_sigma2_init=float("nan")),
     r"log_sigma2_init must be a finite number; got nan"),
    (lambda: SparseVDConv2D(0, 3), r"filters must be a positive integer; got 0"),
    (lambda: SparseVDConv2D(4, (3, 0)), r"kernel_size must be a positive integer or a pair"),
    (lambda: SparseVDConv2D(4, 3, strides=0),  # the value as given (it said "got (0, 0)")
     r"strides must be a positive integer or a pair of them; got 0$"),
    (lambda: SparseVDConv2D(4, 3, padding="causal"), r"padding must be 'valid' or 'same'"),
    (lambda: SparseVDConv2D(4, 3, strides=(1, 2, 3)),
     r"strides must be a positive integer or a pair of them; got \(1, 2, 3\)"),
    (lambda: kl_scale(0), r"dataset_size must be a positive integer; got 0"),
    (lambda: kl_warmup(3, start=10, end=5), r"end \(5\) must be >= start \(10\)"),
    (lambda: KLWarmup(dataset_size=-5), r"dataset_size must be a positive integer; got -5"),
])
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kl_weight_set_before_the_model_is_built():
    """A model without keras.Input is built by its first batch, after KLWarmup's first epoch
    began (set_kl_weight failed on the layers' missing kl_weight); reports on unbuilt layers
    name the problem."""
    rng = np.random.default_rng(3)
    x, y = rng.random((32, 6)).astype("float32"), rng.integers(0, 3, 32)
    model = keras.Sequential([SparseVDDense(8, activation="relu"), SparseVDDense(3)])
    with pytest.raises(ValueError, match="is not built yet"):
        sparsity_report(model)
    with pytest.raises(ValueError, match="is not built yet"):
        model.layers[0].pruned_kernel()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=16, verbose=0,
              callbacks=[KLWarmup(len(x), start=0, end=4)])
    # Epoch 1 (the second) set kl_warmup(1, 0, 4) / 32 = 0.25 / 32 on the built layers.
    assert [float(l.kl_weight.numpy()) for l in model.layers] == [0.25 / 32] * 2
    unbuilt = keras.Sequential([SparseVDDense(4)])
    set_kl_weight(unbuilt, 0.5)
    unbuilt.build((None, 6))
    assert float(unbuilt.layers[0].kl_weight.numpy()) == 0.5
    assert unbuilt.layers[0].get_config()["kl_weight"] == 1.0  # the constructor's, as before


def test_conv_wants_4d_input():
    with pytest.raises(ValueError, match="channels"):
        SparseVDConv2D(2, 3).build((None, 5, 5))


def test_example_quick_runs():
    pytest.importorskip("sklearn")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_sparse_vd.py"),
                          "--quick"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SparseVD" in res.stdout and "speedup" in res.stdout


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("conv", [False, True])
def test_training_under_mixed_precision(policy, conv):
    """Under a mixed policy the sampled training output is in the half type, its mean over
    many draws is the mean output x . theta + bias, and a fit step runs."""
    keras.config.set_dtype_policy(policy)
    rng = np.random.default_rng(5)
    shape = (4, 4, 2) if conv else (6,)
    layer = SparseVDConv2D(3, 2, seed=3) if conv else SparseVDDense(3, seed=3)
    x = rng.normal(size=(1,) + shape).astype(np.float32)
    n = 4000
    y = layer(np.repeat(x, n, axis=0), training=True)
    compute = policy.split("_")[1]
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert keras.backend.standardize_dtype(layer.theta.dtype) == "float32"
    theta = keras.ops.convert_to_numpy(layer.theta)
    bias = keras.ops.convert_to_numpy(layer.bias)
    expected = _conv_ref(x, theta, bias)[0] if conv else x[0] @ theta + bias
    got = keras.ops.convert_to_numpy(keras.ops.cast(y, "float32")).mean(0)
    spread = keras.ops.convert_to_numpy(keras.ops.cast(y, "float32")).std(0).max()
    assert np.allclose(got, expected, atol=5 * spread / np.sqrt(n) + 0.03 * np.abs(expected).max())
    keras.config.set_dtype_policy(policy)
    model = keras.Sequential([keras.Input(shape),
                              SparseVDConv2D(3, 2, seed=4) if conv else SparseVDDense(3, seed=4),
                              keras.layers.Flatten()])
    model.compile(optimizer="sgd", loss="mse")
    out = model(np.zeros((2,) + shape, np.float32)).shape[1]
    history = model.fit(rng.normal(size=(8,) + shape).astype(np.float32),
                        rng.normal(size=(8, out)).astype(np.float32), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_variables_keep_the_kl_in_float32(dtype):
    """A layer whose variables are themselves 16-bit (dtype="float16", not a mixed policy):
    log_alpha and the KL are computed in float32, where in float16 the 1e-8 under the log
    rounds to 0 and the KL summed over many weights overflows to inf."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 784)).astype(np.float32)
    half = SparseVDDense(300, dtype=dtype, seed=1)
    ref = SparseVDDense(300, seed=1)
    half(x), ref(x)
    theta = rng.normal(scale=0.05, size=(784, 300)).astype(np.float32)
    theta[0, :10] = 1e-5  # |theta| whose square underflows float16
    half.theta.assign(theta.astype(dtype))
    ref.theta.assign(keras.ops.convert_to_numpy(keras.ops.cast(half.theta, "float32")))
    want = float(ref.kl())
    assert np.isfinite(float(half.kl()))
    np.testing.assert_allclose(float(half.kl()), want, rtol=1e-3)
    with tf.GradientTape() as tape:
        loss = half.kl() + tf.reduce_sum(tf.cast(half(x, training=True), tf.float32))
    for grad in tape.gradient(loss, [half.theta, half.log_sigma2]):
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(grad, "float32"))))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("conv", [False, True])
def test_zero_inputs_keep_training_gradients_finite(policy, conv):
    """An all-zero example (a ReLU row, a blank image patch) has zero variance: its sampled
    output's standard deviation is taken in float32, where in float16 sqrt(0 + 1e-8) was
    sqrt(0), whose infinite gradient made the kernels' gradients NaN (and fit skip every step)."""
    import tensorflow as tf

    keras.config.set_dtype_policy(policy)
    rng = np.random.default_rng(0)
    if conv:
        layer, x = SparseVDConv2D(2, 3, padding="same", seed=0), rng.normal(size=(2, 6, 6, 1))
        x[:, :3, :3] = 0.0
    else:
        layer, x = SparseVDDense(3, seed=0), rng.normal(size=(4, 8))
        x[0] = 0.0
    x = x.astype(np.float32)
    layer(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(layer(x, training=True), tf.float32))
    for grad in tape.gradient(loss, [layer.theta, layer.log_sigma2]):
        assert np.all(np.isfinite(grad.numpy()))


def test_layers_nested_in_a_custom_layer_are_found():
    """SparseVD layers held by a custom layer (which has no ``layers``) get the KL weight and
    appear in the reports, as those of a Sequential do."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.first, self.second = SparseVDDense(8, seed=0), SparseVDDense(4, seed=1)

        def call(self, x, training=None):
            return self.second(self.first(x, training=training), training=training)

    model = keras.Sequential([keras.Input((6,)), Block()])
    model(np.zeros((1, 6), np.float32))
    set_kl_weight(model, 0.25)
    inner = model.layers[0]
    assert [float(l.kl_weight.numpy()) for l in (inner.first, inner.second)] == [0.25, 0.25]
    names = [row["name"] for row in sparsity_report(model)]
    assert names == [inner.first.name, inner.second.name, "total"]
    expected = float(inner.first.kl().numpy()) + float(inner.second.kl().numpy())
    assert total_kl(model) == pytest.approx(expected)


def test_conv_kernel_larger_than_input_and_bool_seed_are_named():
    # TensorFlow's conv op error (eagerly) and "Cannot convert (None, -1, -1, 2)" (symbolically)
    # before; a bool seed reached Keras' seed generator.
    for make in (lambda: SparseVDConv2D(2, 7)(np.ones((1, 5, 5, 2), np.float32)),
                 lambda: keras.Sequential([keras.Input((5, 5, 2)), SparseVDConv2D(2, 7)])):
        with pytest.raises(ValueError, match=r"input of spatial shape \(5, 5\) is smaller than "
                                             r"the kernel \(7, 7\) with padding 'valid'"):
            make()
    assert SparseVDConv2D(2, 7, padding="same")(np.ones((1, 5, 5, 2), np.float32)).shape == (1, 5, 5, 2)
    with pytest.raises(ValueError, match="seed must be an integer or None; got True"):
        SparseVDDense(2, seed=True)


def test_conv_on_a_batch_of_no_images():
    # TensorFlow's CPU convolution gave an empty batch the input's shape, and the bias add then
    # failed ("Incompatible shapes: [0,8,8,2] vs. [4]").
    import tensorflow as tf
    for padding, strides, want in (("valid", 1, (0, 6, 6, 4)), ("same", 2, (0, 4, 4, 4))):
        layer = SparseVDConv2D(4, 3, padding=padding, strides=strides)
        x = np.zeros((0, 8, 8, 2), np.float32)
        for training in (True, False):
            assert tuple(layer(x, training=training).shape) == want
        run = tf.function(lambda t: layer(t, training=True),
                          input_signature=[tf.TensorSpec((None, None, None, 2))])
        assert tuple(run(x).shape) == want
        x1 = np.random.default_rng(0).standard_normal((1, 8, 8, 2)).astype(np.float32)
        assert tuple(run(x1).shape) == (1,) + want[1:]


def test_kl_weight_is_float32_with_float16_variables():
    # A float16 kl_weight stored 1e-8 as 0 (and 1e-6 1.3% off).
    layer = SparseVDDense(2, dtype="float16", kl_weight=1e-8)
    layer.build((None, 3))
    assert layer.kl_weight.dtype == "float32" and float(layer.kl_weight.numpy()) == np.float32(1e-8)




@pytest.mark.parametrize("argv, message", [
    (["--warmup", "a,b"], "--warmup must be two integers A,B with 0 <= A <= B; got 'a,b'"),
    (["--warmup", "20,5"], "--warmup must be two integers A,B with 0 <= A <= B; got '20,5'"),
    (["--warmup", "5"], "--warmup must be two integers A,B with 0 <= A <= B; got '5'"),
    (["--warmup=-1,5"], "--warmup must be two integers A,B with 0 <= A <= B; got '-1,5'"),
    (["--density", "2"], "argument --density: must be in (0, 1]; got 2"),
    (["--density", "0"], "argument --density: must be in (0, 1]; got 0"),
    (["--density", "x"], "argument --density: invalid float value: 'x'"),
    (["--timing-batch", "0"], "argument --timing-batch: must be >= 1; got 0"),
    (["--repeats", "0"], "argument --repeats: must be >= 1; got 0"),
    (["--batch", "0"], "argument --batch: must be >= 1; got 0"),
    (["--batch", "-5"], "argument --batch: must be >= 1; got -5"),
    (["--nets", ""], "--nets must name lenet300 and/or lenet5, comma-separated; got ''"),
    (["--nets", " , "], "--nets must name lenet300 and/or lenet5, comma-separated; got ' , '"),
    (["--nets", "lenet300,vgg"], "got 'lenet300,vgg'"),
])
def test_example_refuses_bad_arguments(argv, message, capsys):
    assert_refused(example("train_sparse_vd").parse_args, argv, message, capsys)


def test_example_parses_its_lists():
    args = example("train_sparse_vd").parse_args(["--warmup", "3,3", "--nets", "lenet5", "--density", "0.5"])
    assert args.warmup == (3, 3) and args.nets == ["lenet5"] and args.density == 0.5
