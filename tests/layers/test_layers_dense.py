"""BlockSparseDense against keras.layers.Dense (float64) holding the densified kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf import layouts
from blocksparse_tf.layers import BlockSparseDense


def _reference(layer, dtype="float64"):
    """A float64 keras Dense whose kernel is the layer's blocks scattered into (C, K)."""
    C = layer.bsmm.C
    ref = keras.layers.Dense(layer.units, activation=layer.activation, dtype=dtype)
    ref.build((None, C))
    ref.set_weights([layer.dense_kernel().astype(dtype),
                     keras.ops.convert_to_numpy(layer.bias).astype(dtype)])
    return ref


@pytest.mark.parametrize("layout", [None, "watts_strogatz", "barabasi_albert",
                                    {"generator": "random", "density": 0.3, "seed": 4}])
def test_outputs_and_gradients_match_dense(layout):
    rng = np.random.default_rng(0)
    layer = BlockSparseDense(128, block_size=16, layout=layout, activation="tanh",
                             bias_initializer="random_normal")
    x = rng.standard_normal((4, 3, 128)).astype(np.float32)  # leading batch and time dims
    layer.build(x.shape)
    assert layer.kernel.shape == (layer.bsmm.blocks, 16, 16)
    assert 0 < layer.density < 1
    ref = _reference(layer)
    dy = rng.standard_normal((4, 3, 128))
    with tf.GradientTape(persistent=True) as tape:
        xt = tf.constant(x)
        x64 = tf.constant(x, tf.float64)
        tape.watch([xt, x64])
        y = layer(xt)
        y_ref = ref(x64)
        loss = tf.reduce_sum(tf.cast(y, tf.float64) * dy)
        loss_ref = tf.reduce_sum(y_ref * dy)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-5, atol=1e-5)
    dx, dw, db = tape.gradient(loss, [xt, layer.kernel, layer.bias])
    dx_ref, dW_ref, db_ref = tape.gradient(loss_ref, [x64, ref.kernel, ref.bias])
    np.testing.assert_allclose(dx.numpy(), dx_ref.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw.numpy(), layer.bsmm.from_dense(dW_ref.numpy()), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(db.numpy(), db_ref.numpy(), rtol=1e-4, atol=1e-4)


def test_explicit_layout_and_generator_params():
    L = np.zeros((4, 2), dtype=int)
    L[[0, 3, 1], [0, 0, 1]] = 1
    layer = BlockSparseDense(16, block_size=8, layout=L)
    layer.build((None, 32))
    np.testing.assert_array_equal(layer.bsmm.layout, L.astype(bool))
    ws = BlockSparseDense(64, block_size=8, layout={"generator": "watts_strogatz", "k": 2,
                                                    "p": 0.0})
    ws.build((None, 64))
    np.testing.assert_array_equal(ws.bsmm.layout, layouts.watts_strogatz(8, 2, 0.0))


def test_default_layout_is_documented_small_world():
    layer = BlockSparseDense(256, block_size=32)
    layer.build((None, 512))
    expected = layouts.bipartite_small_world(16, 8, 2, p=0.1, seed=0)  # density 1/8 of 16 rows
    np.testing.assert_array_equal(layer.bsmm.layout, expected)


def test_parameter_count_in_summary():
    model = keras.Sequential([keras.Input((256,)),
                              BlockSparseDense(128, block_size=32, layout="random"),
                              BlockSparseDense(64, block_size=32, use_bias=False, gate=True)])
    first, second = model.layers
    assert first.count_params() == first.bsmm.blocks * 32 * 32 + 128
    assert second.count_params() == second.bsmm.blocks * (32 * 32 + 1)
    lines = []
    model.summary(print_fn=lambda s, **kw: lines.append(s))
    total = first.count_params() + second.count_params()
    assert f"{total:,}" in "\n".join(lines)


def _blocks_scattered(layer, blocks):
    """(C, K) float64 matrix with `blocks` (one bs x bs block per layout coordinate) in place,
    built from the layout's coordinates without the layer's own conversions."""
    bs = layer.block_size
    dense = np.zeros((layer.bsmm.C, layer.bsmm.K))
    for (c, k), block in zip(layer.bsmm.coords, blocks):
        dense[c * bs:(c + 1) * bs, k * bs:(k + 1) * bs] = block
    return dense


def test_gate_scales_each_block_and_gets_its_gradient():
    """A different gate per block scales that block alone; the gate's gradient is the sum over
    its block of the weight times the weight gradient."""
    rng = np.random.default_rng(1)
    layer = BlockSparseDense(32, block_size=8, gate=True, use_bias=False, layout="random")
    x = rng.standard_normal((5, 32)).astype(np.float32)
    layer.build(x.shape)
    gate = rng.uniform(0.5, 1.5, layer.bsmm.blocks).astype(np.float32)
    layer.block_gate.assign(gate)
    dy = rng.standard_normal((5, 32))
    with tf.GradientTape() as tape:
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float64) * dy)
    dgate = tape.gradient(loss, layer.block_gate).numpy()
    w = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    W_gated = _blocks_scattered(layer, w * gate[:, None, None])
    y_ref = x.astype(np.float64) @ W_gated
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
    dW = x.astype(np.float64).T @ dy  # the gradient of the whole dense matrix
    bs = layer.block_size
    dgate_ref = [np.sum(w[b] * dW[c * bs:(c + 1) * bs, k * bs:(k + 1) * bs])
                 for b, (c, k) in enumerate(layer.bsmm.coords)]
    np.testing.assert_allclose(dgate, dgate_ref, rtol=1e-5, atol=1e-5 * np.abs(dgate_ref).max())
    np.testing.assert_allclose(layer.dense_kernel(), W_gated, rtol=1e-6)


def test_fit_tf_function_and_strategy_scope():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    y = (x[:, :32] * 0.5).astype(np.float32)  # learnable

    def train(scope):
        keras.utils.set_random_seed(7)
        with scope:
            model = keras.Sequential([keras.Input((64,)),
                                      BlockSparseDense(64, block_size=16, activation="relu"),
                                      BlockSparseDense(32, block_size=16)])
            model.compile(keras.optimizers.SGD(0.05), "mse")
        before = model.evaluate(x, y, verbose=0)
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        return model, before

    base, before = train(tf.name_scope("plain"))
    mirrored, _ = train(tf.distribute.MirroredStrategy(["/cpu:0"]).scope())
    for a, b in zip(base.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert base.evaluate(x, y, verbose=0) < 0.9 * before  # it learned something
    fn = tf.function(lambda t: base(t))
    np.testing.assert_allclose(fn(x).numpy(), base(x).numpy(), rtol=1e-6)


@pytest.mark.parametrize("policy,compute,tol", [("mixed_float16", "float16", 2e-3),
                                                ("mixed_bfloat16", "bfloat16", 1e-2)])
def test_mixed_precision(policy, compute, tol):
    """Under a mixed policy the layer computes in the half type from its float32 variables:
    y, dx and the kernel and bias gradients match float64 products of the inputs and
    variables rounded to the half type, to within a few roundings (relative to the largest)."""
    keras.config.set_dtype_policy(policy)
    rng = np.random.default_rng(3)
    layer = BlockSparseDense(64, block_size=16, bias_initializer="random_normal")
    x = rng.standard_normal((8, 64)).astype(np.float32)
    dy = rng.standard_normal((8, 64))
    layer.build(x.shape)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
        loss = tf.reduce_sum(tf.cast(y, tf.float64) * dy)
    dx, dkernel, dbias = tape.gradient(loss, [xt, layer.kernel, layer.bias])
    assert layer.kernel.dtype == "float32" and y.dtype == compute
    assert dkernel.dtype == tf.float32 and dbias.dtype == tf.float32
    half = lambda a: np.asarray(tf.cast(tf.cast(a, compute), tf.float64))  # noqa: E731
    kernel = half(keras.ops.convert_to_numpy(layer.kernel))
    W = _blocks_scattered(layer, kernel)
    dy_half = half(dy)
    bias = half(keras.ops.convert_to_numpy(layer.bias))
    present = W != 0

    def rel(a, ref):
        return np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max()

    assert rel(tf.cast(y, tf.float64), half(x) @ W + bias) < tol
    assert rel(dx, dy_half @ W.T) < tol
    assert rel(layer.bsmm.to_dense(dkernel.numpy())[present], (half(x).T @ dy_half)[present]) < tol
    assert rel(dbias, dy_half.sum(axis=0)) < tol
    model = keras.Sequential([keras.Input((64,)), layer, keras.layers.Dense(1, dtype="float32")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    history = model.fit(x, x[:, :1], epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize("kwargs,message", [
    ({"units": 30}, "multiple of block_size"),
    ({"units": 0}, "positive integer"),
    ({"units": 32, "block_size": 12}, "block_size must be one of"),
    ({"units": 32, "layout": "small_world"}, "unknown layout generator"),
    ({"units": 32, "layout": {"generator": "random", "density": 1.5}}, "density"),
    ({"units": 32, "layout": {"generator": "random", "k": 3}}, "does not take"),
    ({"units": 32, "layout": np.ones((2, 3))}, "block columns"),
    ({"units": 32, "layout": np.full((2, 2), 2)}, "0 or 1"),
    ({"units": 32, "kernel_initializer": "no_such_init"}, "kernel_initializer"),
    # Block coordinates are not truncated to other blocks, nor flags taken for truthy strings.
    ({"units": 32, "layout": {"shape": [2, 2], "coords": [[0.5, 1.9]]}}, "must be integers"),
    ({"units": 32, "layout": {"shape": [2, 2], "coords": [[True, False]]}}, "must be integers"),
    ({"units": 32, "use_bias": "False"}, "use_bias must be True or False"),
    ({"units": 32, "gate": "no"}, "gate must be True or False"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseDense(block_size=kwargs.pop("block_size", 16), **kwargs)


@pytest.mark.parametrize("layout,shape,message", [
    (None, (None, 40), "multiple of block_size"),
    (None, (None, 0), "input size 0 must be a positive multiple"),  # named the generator's n
    (np.ones((3, 2)), (None, 64), r"\(4, 2\)"),
    ("watts_strogatz", (None, 64), "square layouts"),
    # A density beside the parameter it sets would be ignored (k=1 won over density=0.9).
    ({"generator": "bipartite_small_world", "density": 0.9, "k": 1}, (None, 64),
     r"give 'density' or \['k'\], not both"),
    ({"generator": "dense", "density": 0.25}, (None, 64), "'dense' has density 1"),
])
def test_bad_build(layout, shape, message):
    layer = BlockSparseDense(32, block_size=16, layout=layout)
    with pytest.raises(ValueError, match=message):
        layer.build(shape)
