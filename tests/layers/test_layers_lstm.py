"""BlockSparseLSTM against keras.layers.LSTM (float64) holding the densified weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf import layouts
from blocksparse_tf.layers import BlockSparseLSTM, BlockSparseLSTMCell

B, T, D, H, BS = 3, 7, 16, 64, 8


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T, D)).astype(np.float32)


def _dense_weights(layer):
    cell = layer.cell
    kernel = keras.ops.convert_to_numpy(cell.kernel)
    if cell.input_bsmm is not None:
        kernel = cell.input_bsmm.to_dense(kernel)
    recurrent = cell.recurrent_bsmm.to_dense(keras.ops.convert_to_numpy(cell.recurrent_kernel))
    return [kernel, recurrent, keras.ops.convert_to_numpy(cell.bias)]


def _reference(layer, **kwargs):
    """float64 keras LSTM with the same options and the densified weights."""
    ref = keras.layers.LSTM(layer.units, dtype="float64", return_sequences=layer.return_sequences,
                            return_state=layer.return_state, go_backwards=layer.go_backwards,
                            **kwargs)
    ref.build((None, None, D))
    ref.set_weights([w.astype(np.float64) for w in _dense_weights(layer)])
    return ref


def _randomize(layer, seed=1):
    """Non-trivial weights (the default forget bias and small init hide mistakes)."""
    rng = np.random.default_rng(seed)
    layer.set_weights([0.3 * rng.standard_normal(w.shape).astype(np.float32)
                       for w in layer.get_weights()])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("options", [{"return_sequences": True},
                                     {"return_state": True, "go_backwards": True},
                                     {"sparse_input": True, "return_sequences": True}])
def test_matches_dense_lstm_with_gradients(fused, options):
    x = _data()
    layer = BlockSparseLSTM(H, block_size=BS, fused=fused, **options)
    layer(x)
    _randomize(layer)
    ref = _reference(layer)
    with tf.GradientTape(persistent=True) as tape:
        xt, x64 = tf.constant(x), tf.constant(x, tf.float64)
        tape.watch([xt, x64])
        out = tf.nest.flatten(layer(xt))
        out_ref = tf.nest.flatten(ref(x64))
        weights = [tf.constant(np.random.default_rng(i).standard_normal(o.shape))
                   for i, o in enumerate(out_ref)]
        loss = sum(tf.reduce_sum(tf.cast(o, tf.float64) * w) for o, w in zip(out, weights))
        loss_ref = sum(tf.reduce_sum(o * w) for o, w in zip(out_ref, weights))
    for o, r in zip(out, out_ref):
        np.testing.assert_allclose(o.numpy(), r.numpy(), rtol=1e-5, atol=1e-5)
    cell = layer.cell
    grads = tape.gradient(loss, [xt, cell.kernel, cell.recurrent_kernel, cell.bias])
    grads_ref = tape.gradient(loss_ref, [x64, *ref.cell.trainable_weights])
    grads_ref = [g.numpy() for g in grads_ref]
    if cell.input_bsmm is not None:
        grads_ref[1] = cell.input_bsmm.from_dense(grads_ref[1])
    grads_ref[2] = cell.recurrent_bsmm.from_dense(grads_ref[2])
    for g, r in zip(grads, grads_ref):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("initial_state", [False, True])
def test_masking_matches_dense_lstm(initial_state):
    """Masked steps carry the state and repeat the previous output: zeros before the first
    unmasked step, whatever the initial state (Keras' rule)."""
    x = _data(2)
    mask = np.ones((B, T), bool)
    mask[0, 4:] = False   # padded at the end
    mask[1, :2] = False   # padded at the start
    mask[2, :] = False    # nothing but padding
    layer = BlockSparseLSTM(H, block_size=BS, return_sequences=True, return_state=True)
    layer(x)
    _randomize(layer)
    ref = _reference(layer)
    rng = np.random.default_rng(5)
    state = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(2)]
    given = dict(initial_state=state) if initial_state else {}
    given_ref = dict(initial_state=[s.astype(np.float64) for s in state]) if initial_state else {}
    with tf.GradientTape(persistent=True) as tape:
        out = layer(x, mask=mask, **given)
        out_ref = ref(x.astype(np.float64), mask=mask, **given_ref)
        loss = tf.reduce_sum(tf.cast(out[0], tf.float64) ** 2)
        loss_ref = tf.reduce_sum(out_ref[0] ** 2)
    for o, r in zip(out, out_ref):
        np.testing.assert_allclose(o.numpy(), r.numpy(), rtol=1e-5, atol=1e-5)
    dw = tape.gradient(loss, layer.cell.recurrent_kernel).numpy()
    dW = tape.gradient(loss_ref, ref.cell.recurrent_kernel).numpy()
    np.testing.assert_allclose(dw, layer.cell.recurrent_bsmm.from_dense(dW), rtol=1e-4, atol=1e-4)


def test_zero_output_for_mask_as_keras_gives_it():
    x = _data(3)
    mask = np.ones((B, T), bool)
    mask[0, 4:] = False
    mask[1, :2] = False
    state = [np.full((B, H), 0.5, np.float32)] * 2
    outs = []
    for fused in (True, False):  # fused=False runs Keras' own RNN loop over the same cell
        layer = BlockSparseLSTM(H, block_size=BS, fused=fused, return_sequences=True,
                                return_state=True, zero_output_for_mask=True)
        layer(x)
        _randomize(layer)
        outs.append([o.numpy() for o in layer(x, mask=mask, initial_state=state)])
    for o, r in zip(*outs):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-6)


def _numpy_ln_lstm(x, kernel, recurrent, bias, gamma, eps):
    """float64 numpy reference of the layer-normalised LSTM (gates i, f, g, o)."""
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h = np.zeros((x.shape[0], H))
    c = np.zeros((x.shape[0], H))
    outs = []
    for t in range(x.shape[1]):
        z = (x[:, t] @ kernel + h @ recurrent).reshape(-1, 4, H)
        z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + eps)
        z = z.reshape(-1, 4 * H) * gamma + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        outs.append(h)
    return np.stack(outs, 1)


def test_layer_norm_matches_numpy_and_fused_gradients_match_stepwise():
    x = _data(3)
    layers = [BlockSparseLSTM(H, block_size=BS, layer_norm=True, return_sequences=True,
                              fused=fused) for fused in (True, False)]
    for layer in layers:
        layer(x)
        _randomize(layer)
    cell = layers[0].cell
    kernel, recurrent, bias = _dense_weights(layers[0])
    gamma = keras.ops.convert_to_numpy(cell.ln_gamma)
    expected = _numpy_ln_lstm(x.astype(np.float64), kernel, recurrent, bias, gamma,
                              cell.layer_norm_epsilon)
    grads = []
    for layer in layers:
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(y * tf.range(H, dtype=tf.float32) / H)
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-5)
        grads.append(tape.gradient(loss, layer.trainable_weights))
    for g_fused, g_step in zip(*grads):
        assert np.abs(g_step.numpy()).max() > 0
        np.testing.assert_allclose(g_fused.numpy(), g_step.numpy(), rtol=1e-4, atol=1e-5)


def test_stateful_continues_from_last_state():
    x = _data(4)
    layer = BlockSparseLSTM(H, block_size=BS, stateful=True, return_sequences=True)
    model = keras.Sequential([keras.Input(batch_shape=(B, None, D)), layer])
    whole = BlockSparseLSTM(H, block_size=BS, return_sequences=True)
    whole(x)
    whole.set_weights(layer.get_weights())
    first, second = model(x[:, :3]), model(x[:, 3:])
    expected = whole(x).numpy()
    np.testing.assert_allclose(np.concatenate([first, second], 1), expected, rtol=1e-5,
                               atol=1e-6)
    layer.reset_state()
    np.testing.assert_allclose(model(x[:, :3]), expected[:, :3], rtol=1e-5, atol=1e-6)


def test_default_layout_is_watts_strogatz_per_gate():
    cell = BlockSparseLSTMCell(512, block_size=32)
    cell.build((None, 10))
    square = layouts.watts_strogatz(16, 2, p=0.1, seed=0)
    np.testing.assert_array_equal(cell.recurrent_bsmm.layout, np.tile(square, (1, 4)))
    assert cell.recurrent_kernel.shape == (4 * square.sum(), 32, 32)
    tiny = BlockSparseLSTMCell(32, block_size=16)  # 2 blocks: too few for a small world
    tiny.build((None, 10))
    assert tiny.recurrent_bsmm.layout.all()


def test_fit_and_mixed_precision():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, T, D)).astype(np.float32)
    y = x[:, -1, :1]
    for policy in ("float32", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        model = keras.Sequential([keras.Input((T, D)), BlockSparseLSTM(H, block_size=BS),
                                  keras.layers.Dense(1, dtype="float32")])
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        before = model.evaluate(x, y, verbose=0)
        model.fit(x, y, epochs=5, batch_size=8, verbose=0)
        assert model.evaluate(x, y, verbose=0) < before


@pytest.mark.parametrize("kwargs,message", [
    ({"units": 60}, "multiple of block_size"),
    ({"units": 64, "layout": np.ones((3, 3))}, "recurrent layout must have shape"),
    ({"units": 64, "input_layout": "random"}, "sparse_input=True"),
    ({"units": 64, "layer_norm_epsilon": 0}, "layer_norm_epsilon"),
    ({"units": 64, "recurrent_initializer": "nope"}, "recurrent_initializer"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseLSTM(block_size=BS, **kwargs)


def test_inputs_must_be_sequences():
    with pytest.raises(ValueError, match=r"sequences \(batch, time, features\); got shape \(4, 16\)"):
        BlockSparseLSTM(H, block_size=BS)(np.zeros((4, 16), np.float32))


def test_sparse_input_needs_divisible_input():
    layer = BlockSparseLSTM(H, block_size=BS, sparse_input=True)
    with pytest.raises(ValueError, match="sparse_input needs"):
        layer(np.zeros((2, 3, 12), np.float32))
