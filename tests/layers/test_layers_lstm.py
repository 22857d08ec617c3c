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


def _states(seed):
    """Two different random initial states [h0, c0] (a swap or a mix-up of them shows)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, H)).astype(np.float32) for _ in range(2)]


def _weighted_sum(outputs, seed=7):
    """sum_k <W_k, outputs_k> in float64 with fixed random W_k: every entry of every output
    (sequence, final h, final c) reaches the gradients, each with its own weight."""
    rng = np.random.default_rng(seed)
    return sum(tf.reduce_sum(tf.cast(o, tf.float64) * rng.standard_normal(o.shape))
               for o in tf.nest.flatten(outputs))


def _assert_close(actual, expected, tol=1e-5):
    """float32 result against a float64 reference: within tol relative to the largest
    magnitude of the reference (entries near zero get no looser bound), which is not zero."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def _check_against_reference(layer, x, mask=None, state=None, **ref_kwargs):
    """The outputs of ``layer`` and the gradients of ``_weighted_sum`` of them with respect to
    x, the initial states (when given) and the weights against ``_reference(layer)``."""
    ref = _reference(layer, **ref_kwargs)
    with tf.GradientTape(persistent=True) as tape:
        xt, x64 = tf.constant(x), tf.constant(x, tf.float64)
        s32 = [] if state is None else [tf.constant(s) for s in state]
        s64 = [] if state is None else [tf.constant(s, tf.float64) for s in state]
        tape.watch([xt, x64, *s32, *s64])
        given = dict(initial_state=s32) if s32 else {}
        given_ref = dict(initial_state=s64) if s64 else {}
        out = layer(xt, mask=mask, **given)
        out_ref = ref(x64, mask=mask, **given_ref)
        loss, loss_ref = _weighted_sum(out), _weighted_sum(out_ref)
    for o, r in zip(tf.nest.flatten(out), tf.nest.flatten(out_ref)):
        _assert_close(o.numpy(), r.numpy())
    cell = layer.cell
    grads = tape.gradient(loss, [xt, *s32, cell.kernel, cell.recurrent_kernel, cell.bias])
    grads_ref = [g.numpy() for g in tape.gradient(loss_ref, [x64, *s64,
                                                             *ref.cell.trainable_weights])]
    n = 1 + len(s32)  # x and the states, then kernel, recurrent kernel, bias
    if cell.input_bsmm is not None:
        grads_ref[n] = cell.input_bsmm.from_dense(grads_ref[n])
    grads_ref[n + 1] = cell.recurrent_bsmm.from_dense(grads_ref[n + 1])
    names = ["x", "h0", "c0"][:n] + ["kernel", "recurrent_kernel", "bias"]
    for name, g, r in zip(names, grads, grads_ref):
        assert g is not None, name
        np.testing.assert_equal(g.shape, r.shape)
        try:
            _assert_close(g.numpy(), r)
        except AssertionError as e:
            raise AssertionError(f"gradient of {name}: {e}") from None


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


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("initial_state", [False, True])
def test_masking_matches_dense_lstm(initial_state, fused):
    """Masked steps carry the state and repeat the previous output: zeros before the first
    unmasked step, whatever the initial state (Keras' rule).  Outputs, final states and the
    gradients of a random weighting of all of them with respect to x, h0 and c0 (two different
    random states; the row of padding only passes them straight to the final states) and the
    three weights, against Keras' LSTM: the fused path's hand-written backward included."""
    x = _data(2)
    mask = np.ones((B, T), bool)
    mask[0, 4:] = False   # padded at the end
    mask[1, :2] = False   # padded at the start
    mask[2, :] = False    # nothing but padding
    layer = BlockSparseLSTM(H, block_size=BS, fused=fused, return_sequences=True,
                            return_state=True)
    layer(x)
    _randomize(layer)
    _check_against_reference(layer, x, mask, _states(5) if initial_state else None)


@pytest.mark.parametrize("fused", [True, False])
def test_zero_output_for_mask_as_keras_gives_it(fused):
    """zero_output_for_mask=True: zeros at every masked step (after an unmasked one too), the
    states carried through them.  Outputs and gradients (x, h0, c0, weights) against Keras'
    LSTM with the same option, from two different random initial states, with a row of
    padding only (its final states are the initial ones)."""
    x = _data(3)
    mask = np.ones((B, T), bool)
    mask[0, 4:] = False
    mask[1, :2] = False
    mask[2, :] = False
    layer = BlockSparseLSTM(H, block_size=BS, fused=fused, return_sequences=True,
                            return_state=True, zero_output_for_mask=True)
    layer(x)
    _randomize(layer)
    _check_against_reference(layer, x, mask, _states(6), zero_output_for_mask=True)


def _reference_ln_lstm(x, kernel, recurrent, bias, gamma, eps):
    """float64 reference of the layer-normalised LSTM (gates i, f, g, o) in plain TF ops on
    dense weights, differentiated by TF's autodiff (none of the library's code)."""
    h = c = tf.zeros((x.shape[0], H), tf.float64)
    outs = []
    for t in range(x.shape[1]):
        z = tf.reshape(x[:, t] @ kernel + h @ recurrent, (-1, 4, H))
        mean, var = tf.nn.moments(z, axes=[-1], keepdims=True)
        z = tf.reshape((z - mean) / tf.sqrt(var + eps), (-1, 4 * H)) * gamma + bias
        i, f, g, o = tf.split(z, 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h = tf.sigmoid(o) * tf.tanh(c)
        outs.append(h)
    return tf.stack(outs, 1)


@pytest.mark.parametrize("fused", [True, False])
def test_layer_norm_matches_float64_reference_with_gradients(fused):
    """layer_norm=True: the outputs and the gradients of a random weighting of them with
    respect to x, kernel, recurrent kernel, bias and ln_gamma against a float64 reference of
    the layer-normalised cell (``_reference_ln_lstm``), for the fused backward (whose
    per-step maths differentiates the norm) and for Keras' step loop."""
    x = _data(3)
    layer = BlockSparseLSTM(H, block_size=BS, layer_norm=True, return_sequences=True,
                            fused=fused)
    layer(x)
    _randomize(layer)
    cell = layer.cell
    dense = [tf.constant(w.astype(np.float64))
             for w in _dense_weights(layer) + [keras.ops.convert_to_numpy(cell.ln_gamma)]]
    with tf.GradientTape(persistent=True) as tape:
        xt, x64 = tf.constant(x), tf.constant(x, tf.float64)
        tape.watch([xt, x64, *dense])
        y = layer(xt)
        y_ref = _reference_ln_lstm(x64, *dense, cell.layer_norm_epsilon)
        loss, loss_ref = _weighted_sum(y), _weighted_sum(y_ref)
    _assert_close(y.numpy(), y_ref.numpy())
    grads = tape.gradient(loss, [xt, cell.kernel, cell.recurrent_kernel, cell.bias,
                                 cell.ln_gamma])
    grads_ref = [g.numpy() for g in tape.gradient(loss_ref, [x64, *dense])]
    grads_ref[2] = cell.recurrent_bsmm.from_dense(grads_ref[2])
    for name, g, r in zip(["x", "kernel", "recurrent_kernel", "bias", "ln_gamma"], grads,
                          grads_ref):
        try:
            _assert_close(g.numpy(), r)
        except AssertionError as e:
            raise AssertionError(f"gradient of {name}: {e}") from None


def test_stateful_continues_from_last_state():
    x = _data(4)
    layer = BlockSparseLSTM(H, block_size=BS, stateful=True, return_sequences=True)
    model = keras.Sequential([keras.Input(batch_shape=(B, None, D)), layer])
    _randomize(layer)
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


def test_bias_starts_with_the_forget_gate_open():
    """Gates in Keras' order (i, f, g, o): unit_forget_bias adds 1 to f's bias only."""
    H = 16
    for init, base in (("zeros", 0.0), (keras.initializers.Constant(0.25), 0.25)):
        cell = BlockSparseLSTMCell(H, block_size=8, bias_initializer=init)
        cell.build((None, 8))
        want = np.full(4 * H, base, np.float32)
        want[H:2 * H] += 1.0
        np.testing.assert_array_equal(cell.bias.numpy(), want)
    cell = BlockSparseLSTMCell(H, block_size=8, unit_forget_bias=False)
    cell.build((None, 8))
    np.testing.assert_array_equal(cell.bias.numpy(), np.zeros(4 * H, np.float32))


@pytest.mark.parametrize("fused", [True, False])
def test_float64_is_refused_by_name(fused):
    layer = BlockSparseLSTM(16, block_size=8, fused=fused, dtype="float64")
    with pytest.raises(ValueError, match="compute dtype must be float32, float16 or bfloat16; got float64"):
        layer(np.zeros((2, 3, 8)))


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


def test_frozen_layer_stays_frozen_in_fit_and_after_loading(tmp_path):
    """trainable=False reaches the cell that holds the variables, as Keras' LSTM passes it:
    fit leaves the weights alone, also for a layer frozen by the setter, saved and loaded."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 16)).astype(np.float32)
    y = rng.standard_normal((8, 1)).astype(np.float32)

    def fit_changes(model):
        before = [v.numpy().copy() for v in model.layers[0].weights]
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
        after = [v.numpy() for v in model.layers[0].weights]
        return any(not np.array_equal(a, b) for a, b in zip(before, after))

    frozen = keras.Sequential([keras.Input((3, 16)),
                               BlockSparseLSTM(H, block_size=BS, trainable=False),
                               keras.layers.Dense(1)])
    assert frozen.layers[0].cell.trainable is False
    assert not fit_changes(frozen)
    model = keras.Sequential([keras.Input((3, 16)), BlockSparseLSTM(H, block_size=BS),
                              keras.layers.Dense(1)])
    model.layers[0].trainable = False
    path = str(tmp_path / "frozen.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert not loaded.layers[0].trainable and not loaded.layers[0].cell.trainable
    assert not fit_changes(loaded)
    unfrozen = keras.Sequential([keras.Input((3, 16)), BlockSparseLSTM(H, block_size=BS),
                                 keras.layers.Dense(1)])
    assert fit_changes(unfrozen)


@pytest.mark.parametrize("kwargs,message", [
    ({"units": 60}, "multiple of block_size"),
    ({"units": 64, "layout": np.ones((3, 3))}, "recurrent layout must have shape"),
    ({"units": 64, "input_layout": "random"}, "sparse_input=True"),
    ({"units": 64, "layer_norm_epsilon": 0}, "layer_norm_epsilon"),
    ({"units": 64, "recurrent_initializer": "nope"}, "recurrent_initializer"),
    # Keras' RNN took any value as its flags (the string "False" ran backwards).
    ({"units": 64, "go_backwards": "False"}, "go_backwards must be True or False, got 'False'"),
    ({"units": 64, "return_sequences": "yes"}, "return_sequences must be True or False"),
    ({"units": 64, "stateful": 1}, "stateful must be True or False"),
    ({"units": 64, "layer_norm_epsilon": "1e-3"}, "layer_norm_epsilon must be a number"),
    ({"units": 64, "layer_norm_epsilon": float("inf")}, "layer_norm_epsilon must be a finite"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseLSTM(block_size=BS, **kwargs)


def test_inputs_must_be_sequences():
    with pytest.raises(ValueError, match=r"expected ndim=3, found ndim=2\. Full shape received: "
                                         r"\(4, 16\)"):
        BlockSparseLSTM(H, block_size=BS)(np.zeros((4, 16), np.float32))
    with pytest.raises(ValueError, match=r"sequences \(batch, time, features\); got shape \(4, 16\)"):
        BlockSparseLSTM(H, block_size=BS).build((4, 16))
    # On every call, not only the first (TensorFlow's index and transpose errors after it).
    layer = BlockSparseLSTM(H, block_size=BS)
    layer(np.zeros((2, 3, 16), np.float32))
    for shape in ((4, 16), (2, 3, 16, 1)):
        with pytest.raises(ValueError, match=f"expected ndim=3, found ndim={len(shape)}"):
            layer(np.zeros(shape, np.float32))


@pytest.mark.parametrize("fused", [True, False])
def test_states_and_masks_of_shapes_known_only_when_run(fused):
    """Eagerly a batch-1 state or mask is refused; in a graph with unknown sizes it broadcast
    over the batch (and a mask longer than the sequences was ignored): checked when run."""
    layer = BlockSparseLSTM(H, block_size=BS, fused=fused, return_sequences=True)
    seqs, pair = tf.TensorSpec([None, None, 16]), tf.TensorSpec([None, None])
    with_state = tf.function(lambda x, h, c: layer(x, initial_state=[h, c]),
                             input_signature=[seqs, pair, pair])
    with_mask = tf.function(lambda x, m: layer(x, mask=m),
                            input_signature=[seqs, tf.TensorSpec([None, None], tf.bool)])
    x = np.ones((3, 4, 16), np.float32)
    state = np.zeros((3, H), np.float32)
    assert with_state(x, state, state).shape == (3, 4, H)
    assert with_mask(x, np.ones((3, 4), bool)).shape == (3, 4, H)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"initial state h must have shape "
                                                         r"\(batch, units\)"):
        with_state(x, state[:1], state)
    for mask in (np.ones((1, 4), bool), np.ones((3, 6), bool)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"mask must have shape "
                                                             r"\(batch, time\)"):
            with_mask(x, mask)


def test_sparse_input_needs_divisible_input():
    layer = BlockSparseLSTM(H, block_size=BS, sparse_input=True)
    with pytest.raises(ValueError, match="sparse_input needs"):
        layer(np.zeros((2, 3, 12), np.float32))


@pytest.mark.parametrize("fused", [True, False])
def test_initial_states_and_masks_of_wrong_shape_are_named(fused):
    """They failed inside the loop with TensorFlow's own shape errors (MatMul, Mul, an
    unpacking), not naming the argument."""
    layer = BlockSparseLSTM(16, block_size=8, fused=fused)
    x = tf.ones((2, 3, 8))
    good = [tf.zeros((2, 16)), tf.zeros((2, 16))]
    assert layer(x, initial_state=good, mask=np.ones((2, 3), bool)).shape == (2, 16)
    assert layer(x, mask=tf.ones((2, 3, 1), bool)).shape == (2, 16)
    cases = [
        (dict(initial_state=[tf.zeros((2, 8)), tf.zeros((2, 16))]),
         r"initial state h must have shape \(batch, units\) = \(2, 16\); got \(2, 8\)"),
        (dict(initial_state=[tf.zeros((2, 16)), np.zeros((3, 16), np.float32)]),
         r"initial state c must have shape \(batch, units\) = \(2, 16\); got \(3, 16\)"),
        (dict(initial_state=[tf.zeros((2, 16))]), r"initial_state must be \[h, c\], two states; got 1"),
        (dict(mask=tf.ones((2, 4), bool)), r"mask must have shape \(batch, time\) = \(2, 3\); got \(2, 4\)"),
        (dict(mask=[[1, 1, 1]]), r"mask must have shape \(batch, time\) = \(2, 3\); got \(1, 3\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            layer(x, **kwargs)
