"""BlockSparseConv2D: forward and gradients against tf.nn.conv2d (float64) on the densified
kernel, parameter count, save/load, fit, argument checks."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf.layers.conv import BlockSparseConv2D

RTOL = 1e-5

# A (3, 2) block layout with an empty block row (input block 1) and an empty block column
# (output block 1).
HOLEY = np.array([[1, 0], [0, 0], [1, 0]])


def _random_weights(layer, rng):
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32)
                       for w in layer.get_weights()])


def _close(actual, reference):
    reference = np.asarray(reference)
    atol = RTOL * max(float(np.max(np.abs(reference))), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), reference, rtol=RTOL, atol=atol)


def _reference(layer, x, dy):
    """float64 tf.nn.conv2d on the densified kernel: y, dx, dW (dense), dbias.

    TensorFlow's CPU conv2d gradients reject dilation > 1, so the gradients with dilation are
    taken through the same conv2d on the explicitly dilated kernel (zeros between the taps,
    dilation 1), which is the same function; the forward output is checked both ways.
    """
    x64 = tf.constant(x, tf.float64)
    w64 = tf.constant(layer.densified_kernel(), tf.float64)
    b64 = tf.constant(layer.get_weights()[1], tf.float64) if layer.use_bias else None
    (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation_rate
    strides, padding = [1, *layer.strides, 1], layer.padding.upper()
    direct = tf.nn.conv2d(x64, w64, strides=strides, padding=padding,
                          dilations=[1, dh, dw, 1]).numpy()
    with tf.GradientTape() as tape:
        tape.watch([x64, w64] + ([b64] if b64 is not None else []))
        dilated = tf.scatter_nd([[i * dh, j * dw] for i in range(kh) for j in range(kw)],
                                tf.reshape(w64, (kh * kw,) + tuple(w64.shape[2:])),
                                ((kh - 1) * dh + 1, (kw - 1) * dw + 1) + tuple(w64.shape[2:]))
        y = tf.nn.conv2d(x64, dilated, strides=strides, padding=padding)
        np.testing.assert_allclose(y.numpy(), direct, rtol=1e-12, atol=1e-12)
        if b64 is not None:
            y = y + b64
        loss = tf.reduce_sum(y * tf.constant(dy, tf.float64))
    grads = tape.gradient(loss, [x64, w64] + ([b64] if b64 is not None else []))
    return [y.numpy()] + [g.numpy() for g in grads]


def _layer_grads(layer, x, dy):
    x32 = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x32)
        y = layer(x32)
        loss = tf.reduce_sum(y * tf.constant(dy))
    grads = tape.gradient(loss, [x32] + layer.trainable_weights)
    return [y.numpy()] + [g.numpy() for g in grads]


CASES = [
    # (block_size, C, filters, layout, kernel, strides, padding, dilation)
    (8, 24, 16, HOLEY, (3, 3), 1, "same", 1),
    (8, 24, 16, HOLEY, (3, 3), 2, "same", 1),
    (8, 24, 16, HOLEY, (3, 2), 2, "valid", 1),
    (8, 24, 16, HOLEY, (3, 3), 1, "valid", 2),
    (16, 32, 48, {"generator": "random", "density": 0.5, "seed": 1}, (3, 3), 1, "same", 2),
    (16, 32, 48, np.array([[1, 0, 1], [0, 1, 1]]), (2, 3), (2, 1), "same", 1),
    (16, 32, 32, None, (1, 1), 2, "valid", 1),
    (16, 32, 32, "dense", (5, 4), 1, "valid", 1),
]


@pytest.mark.parametrize("implementation", ["fused", "im2col"])
@pytest.mark.parametrize("bs,C,filters,layout,kernel,strides,padding,dilation", CASES)
def test_matches_conv2d_float64(bs, C, filters, layout, kernel, strides, padding, dilation,
                                implementation):
    rng = np.random.default_rng(0)
    layer = BlockSparseConv2D(filters, kernel, block_size=bs, layout=layout, strides=strides,
                              padding=padding, dilation_rate=dilation,
                              implementation=implementation)
    assert layer.uses_fused_ops() == (implementation == "fused")
    x = rng.standard_normal((2, 7, 9, C)).astype(np.float32)
    layer.build(x.shape)
    _random_weights(layer, rng)
    y_ref = _reference(layer, x, np.zeros(1))[0]
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    y_ref, dx_ref, dw_ref, db_ref = _reference(layer, x, dy)
    y, dx, dw, db = _layer_grads(layer, x, dy)
    assert y.shape == y_ref.shape == layer.compute_output_shape(x.shape)
    _close(y, y_ref)
    _close(dx, dx_ref)
    _close(db, db_ref)
    # Kernel gradient: the dense reference gradient at the stored blocks of every tap.
    kh, kw = layer.kernel_size
    dw_blocks = np.stack([np.stack([layer.bsmm.from_dense(dw_ref[i, j]) for j in range(kw)], 1)
                          for i in range(kh)], 1)
    assert dw.shape == dw_blocks.shape == tuple(layer.kernel.shape)
    _close(dw, dw_blocks)


def test_empty_block_row_and_column():
    """Unconnected output channels are the bias alone; unconnected inputs get no gradient."""
    rng = np.random.default_rng(2)
    layer = BlockSparseConv2D(16, 3, block_size=8, layout=HOLEY, padding="same")
    x = rng.standard_normal((1, 5, 5, 24)).astype(np.float32)
    layer.build(x.shape)
    _random_weights(layer, rng)
    dy = rng.standard_normal((1, 5, 5, 16)).astype(np.float32)
    y, dx = _layer_grads(layer, x, dy)[:2]
    np.testing.assert_array_equal(y[..., 8:], np.broadcast_to(layer.bias.numpy()[8:], y[..., 8:].shape))
    np.testing.assert_array_equal(dx[..., 8:16], 0.0)
    assert np.all(layer.densified_kernel()[:, :, 8:16] == 0)
    assert np.all(layer.densified_kernel()[:, :, :, 8:] == 0)


def test_parameter_count_and_weight_shape():
    layout = np.array([[1, 0, 1], [0, 1, 0]])  # 3 blocks of 16 x 16
    model = keras.Sequential([keras.Input((8, 8, 32)),
                              BlockSparseConv2D(48, (3, 5), block_size=16, layout=layout)])
    layer = model.layers[0]
    assert tuple(layer.kernel.shape) == (3, 3, 5, 16, 16)
    assert model.count_params() == 3 * 3 * 5 * 16 * 16 + 48
    assert layer.density == pytest.approx(0.5)
    no_bias = BlockSparseConv2D(48, 3, block_size=16, layout=layout, use_bias=False)
    no_bias.build((None, 8, 8, 32))
    assert no_bias.count_params() == 3 * 3 * 3 * 16 * 16


def test_dynamic_spatial_shape_and_deterministic():
    rng = np.random.default_rng(3)
    layer = BlockSparseConv2D(16, 3, block_size=8, layout=HOLEY, strides=2, padding="same")
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, 24])])
    x = rng.standard_normal((2, 11, 6, 24)).astype(np.float32)
    layer.build(x.shape)
    _random_weights(layer, rng)
    y = fn(x).numpy()
    assert y.shape == (2, 6, 3, 16)
    np.testing.assert_array_equal(y, layer(x).numpy())
    np.testing.assert_array_equal(y, fn(x).numpy())
    assert layer.compute_output_shape((None, None, 6, 24)) == (None, None, 3, 16)


def _model():
    inputs = keras.Input((9, 7, 16))
    h = BlockSparseConv2D(32, 3, block_size=8, padding="same", activation="relu",
                          layout={"generator": "random", "density": 0.5, "seed": None})(inputs)
    h = BlockSparseConv2D(16, 3, block_size=16, strides=2, layout="dense",
                          kernel_initializer="block_orthogonal")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def test_keras_file_round_trip(tmp_path):
    model = _model()
    x = np.random.default_rng(4).standard_normal((3, 9, 7, 16)).astype(np.float32)
    path = str(tmp_path / "conv.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for a, b in zip(model.layers, loaded.layers):
        if isinstance(a, BlockSparseConv2D):
            np.testing.assert_array_equal(a.bsmm.layout, b.bsmm.layout)
            np.testing.assert_array_equal(a.densified_kernel(), b.densified_kernel())


def test_config_is_json_and_keeps_layout():
    layer = BlockSparseConv2D(32, (3, 1), block_size=8, layout={"generator": "random",
                                                                 "density": 0.3, "seed": None},
                              strides=(1, 2), padding="SAME", activation="tanh")
    layer.build((None, 5, 5, 24))
    config = json.loads(json.dumps(layer.get_config()))
    clone = BlockSparseConv2D.from_config(config)
    clone.build((None, 5, 5, 24))
    np.testing.assert_array_equal(clone.bsmm.layout, layer.bsmm.layout)
    assert (clone.kernel_size, clone.strides, clone.padding) == ((3, 1), (1, 2), "same")


def test_fit_reduces_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 9, 7, 16)).astype(np.float32)
    y = np.mean(x[..., :4], axis=(1, 2, 3))[:, None].astype(np.float32)
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(filters=20), "multiple of block_size"),
    (dict(filters=0), "filters"),
    (dict(block_size=12), "block_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(strides=0), "strides"),
    (dict(strides=(1, -1)), "strides"),
    (dict(dilation_rate=0), "dilation_rate"),
    (dict(padding="causal"), "padding"),
    (dict(strides=2, dilation_rate=2), "dilation"),
    (dict(layout=np.ones((3, 3))), "block columns"),
    (dict(kernel_initializer="no_such_initializer"), "kernel_initializer"),
    (dict(implementation="direct"), "implementation"),
])
def test_bad_arguments_raise(kwargs, match):
    args = dict(filters=16, kernel_size=3, block_size=8, layout=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BlockSparseConv2D(**args)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="multiple of block_size"):
        BlockSparseConv2D(16, 3, block_size=8).build((None, 5, 5, 12))
    with pytest.raises(ValueError, match="needs"):  # layout rows do not match C / bs
        BlockSparseConv2D(16, 3, block_size=8, layout=np.ones((2, 2))).build((None, 5, 5, 24))
    with pytest.raises(ValueError, match="height, width"):
        BlockSparseConv2D(16, 3, block_size=8).build((None, 5, 24))
    layer = BlockSparseConv2D(16, 5, block_size=8, dilation_rate=2)
    with pytest.raises(ValueError, match="smaller than"):
        layer(np.zeros((1, 7, 9, 8), np.float32))


@pytest.mark.parametrize("implementation", ["fused", "im2col"])
def test_input_smaller_than_kernel_raises_when_sizes_known_only_when_run(implementation):
    layer = BlockSparseConv2D(24, 3, block_size=8, padding="valid", implementation=implementation)
    run = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, 16])])
    assert run(tf.ones((1, 5, 5, 16))).shape == (1, 3, 3, 24)
    # The layer's check or the fused op's own, whichever runs first: both name the sizes.
    message = (r"input is smaller than the dilated kernel \(3, 3\) \(dilation \(1, 1\)\).*"
               r"the input.*height and width:\] \[2 2\]"
               r"|the input height 2 padded by 0 \+ 0 is smaller than the dilated kernel height")
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        run(tf.ones((1, 2, 2, 16)))


@pytest.mark.parametrize("implementation", ["fused", "im2col"])
def test_input_two_smaller_than_kernel_names_the_kernel_when_sizes_known_only_when_run(
        implementation):
    # A 5-tap kernel over 3 rows: the output size is negative, which turned the im2col slices'
    # stops negative (counted from the end) and failed in their concat, not in the size check.
    layer = BlockSparseConv2D(16, 5, block_size=8, padding="valid", implementation=implementation)
    run = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, 16])])
    assert run(tf.ones((1, 6, 7, 16))).shape == (1, 2, 3, 16)
    message = (r"input is smaller than the dilated kernel \(5, 5\).*height and width:\] \[3 7\]"
               r"|the input height 3 padded by 0 \+ 0 is smaller than the dilated kernel height")
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        run(tf.ones((1, 3, 7, 16)))


@pytest.mark.parametrize("implementation", ["fused", "im2col"])
def test_wrong_channel_count_known_only_when_run_is_named(implementation):
    # im2col named the size of its concatenated taps (144 = 9 taps x 16) instead.
    layer = BlockSparseConv2D(16, 3, block_size=8, implementation=implementation)
    layer.build((None, None, None, 16))
    run = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, None])])
    assert run(tf.ones((1, 5, 5, 16))).shape == (1, 3, 3, 16)
    with pytest.raises(tf.errors.InvalidArgumentError, match="takes 16 input channels; got input "
                                                             r"shape\] \[1 5 5 24\]"):
        run(tf.ones((1, 5, 5, 24)))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_empty_image_raises_naming_it(padding):
    layer = BlockSparseConv2D(16, 3, block_size=8, layout="dense", padding=padding)
    with pytest.raises(ValueError, match=r"spatial shape \(0, 5\) has no rows or no columns"):
        layer(tf.zeros((2, 0, 5, 16)))


@pytest.mark.parametrize("shape,padding,message", [
    ((3, 3, 16), "valid", r"spatial shape \(3, 3\) is smaller than the dilated kernel \(5, 5\)"),
    ((0, 5, 16), "same", r"spatial shape \(0, 5\) has no rows or no columns")])
def test_symbolic_inputs_the_layer_would_refuse_are_refused_when_the_model_is_built(
        shape, padding, message):
    """Keras builds a model on symbolic inputs from compute_output_shape, not call(): sizes
    call() refuses passed on as zero-sized outputs there (a Dense layer after them then got 0
    inputs), and failed only when data first flowed."""
    with pytest.raises(ValueError, match=message):
        keras.Sequential([keras.Input(shape),
                          BlockSparseConv2D(16, 5, block_size=8, padding=padding)])
    layer = BlockSparseConv2D(16, 5, block_size=8, padding=padding)
    assert layer.compute_output_shape((None, None, 7, 16)) == (None, None, 7 if padding == "same" else 3, 16)


def test_auto_implementation_is_fused_on_cpu():
    layer = BlockSparseConv2D(16, 3, block_size=8)
    assert layer.implementation == "auto"
    assert layer.uses_fused_ops() == (not tf.config.list_logical_devices("GPU"))


@pytest.mark.parametrize("strides,padding", [(1, "same"), (2, "same"), (2, "valid")])
def test_fused_and_im2col_agree_with_dynamic_shapes(strides, padding):
    """Both paths, traced with unknown spatial sizes (SAME with a stride then pads at run time)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 11, 8, 24)).astype(np.float32)
    weights = [rng.standard_normal((2, 3, 3, 8, 8)).astype(np.float32),
               rng.standard_normal(16).astype(np.float32)]
    results = {}
    for implementation in ("fused", "im2col"):
        layer = BlockSparseConv2D(16, 3, block_size=8, layout=HOLEY, strides=strides,
                                  padding=padding, implementation=implementation)
        layer.build(x.shape)
        layer.set_weights(weights)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 24])])
        def grads(inp, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(inp)
                y = layer(inp)
                loss = tf.reduce_sum(y * tf.cos(y))
            return [y] + tape.gradient(loss, [inp] + layer.trainable_weights)

        results[implementation] = [t.numpy() for t in grads(x)]
    for a, b in zip(results["fused"], results["im2col"]):
        _close(a, b)


def test_config_keeps_implementation_and_old_configs_load():
    layer = BlockSparseConv2D(16, 3, block_size=8, layout=HOLEY, implementation="im2col")
    layer.build((None, 5, 5, 24))
    config = json.loads(json.dumps(layer.get_config()))
    assert config["implementation"] == "im2col"
    assert BlockSparseConv2D.from_config(config).implementation == "im2col"
    del config["implementation"]  # saved before the argument existed
    old = BlockSparseConv2D.from_config(config)
    assert old.implementation == "auto"
    old.build((None, 5, 5, 24))
    old.set_weights(layer.get_weights())
    x = np.random.default_rng(7).standard_normal((1, 5, 5, 24)).astype(np.float32)
    _close(old(x), layer(x))
