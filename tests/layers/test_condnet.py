"""Condnet layers (CondDense, CondNetModel) against independent references."""

import itertools
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf.layers import condnet
from blocksparse_tf.layers.condnet import (CondDense, CondNetModel, bernoulli_log_prob,
                                           sparsity_regularizers)
from tests.example_scripts import assert_refused, example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "train_condnet.py")
RNG = np.random.default_rng(6)


def np_layer(x, w, b, in_mask, out_mask, bs, act):
    """float64 reference of one CondDense layer with fixed masks."""
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    if in_mask is not None:
        x = x * np.repeat(in_mask, bs, axis=1)
    return act(x @ w + b) * np.repeat(out_mask, bs, axis=1)


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize("act_name,act", [("relu", lambda z: np.maximum(z, 0)),
                                          ("tanh", np.tanh), ("sigmoid", lambda z: 1 / (1 + np.exp(-z)))])
@pytest.mark.parametrize("with_in_mask", [False, True])
def test_layer_matches_float64_reference(act_name, act, with_in_mask):
    bs, n, c, units = 8, 7, 24, 32
    layer = CondDense(units, block_size=bs, activation=act_name, bias_initializer="random_normal")
    x = RNG.standard_normal((n, c)).astype(np.float32)
    in_mask = (RNG.random((n, c // bs)) < 0.5).astype(np.float32) if with_in_mask else None
    out_mask = (RNG.random((n, units // bs)) < 0.5).astype(np.float32)
    y, m = layer(x, in_mask=in_mask, out_mask=out_mask)
    ref = np_layer(x, layer.kernel.numpy(), layer.bias.numpy(), in_mask, out_mask, bs, act)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m.numpy(), out_mask)
    assert np.all(y.numpy()[np.repeat(out_mask, bs, axis=1) == 0] == 0)


def test_dense_implementation_gives_the_kernels_outputs_and_gradients(monkeypatch):
    """implementation="dense" (one dense product, masks around it) reaches sparse_dot and gives
    the same outputs and gradients as the block-skipping kernels, for a first layer (input not
    a multiple of the block size, no in_mask) and a layer with both masks; CondNetModel passes
    it to its layers and keeps it in its config."""
    calls = []
    real = condnet.sparse_dot

    def spy(*args, **kw):
        calls.append(kw["implementation"])
        return real(*args, **kw)

    monkeypatch.setattr(condnet, "sparse_dot", spy)
    bs, n = 8, 9
    x0 = RNG.standard_normal((n, 20)).astype(np.float32)
    masks = [(RNG.random((n, 24 // bs)) < 0.5).astype(np.float32),
             (RNG.random((n, 16 // bs)) < 0.5).astype(np.float32)]
    results = {}
    for implementation in ("sparse", "dense"):
        keras.utils.set_random_seed(3)
        layers = [CondDense(24, block_size=bs, bias_initializer="random_normal",
                            implementation=implementation),
                  CondDense(16, block_size=bs, bias_initializer="random_normal",
                            activation="tanh", implementation=implementation)]
        with tf.GradientTape() as tape:
            h, m = layers[0](x0, out_mask=masks[0])
            y, _ = layers[1](h, in_mask=m, out_mask=masks[1])
            loss = tf.reduce_sum(y * np.arange(16, dtype=np.float32))
        variables = [v for layer in layers for v in layer.network_variables]
        results[implementation] = [y.numpy()] + [g.numpy() for g in tape.gradient(loss,
                                                                                  variables)]
        assert layers[1].get_config()["implementation"] == implementation
    assert calls == ["sparse"] * 2 + ["dense"] * 2
    for dense, sparse in zip(results["dense"], results["sparse"]):
        np.testing.assert_allclose(dense, sparse, rtol=1e-5, atol=1e-6)
    model = CondNetModel([16], 3, block_size=8, implementation="dense")
    assert model.get_config()["implementation"] == "dense"
    assert all(layer.implementation == "dense" for layer in model.cond_layers)
    clone = CondNetModel.from_config(model.get_config())
    assert [layer.implementation for layer in clone.cond_layers] == ["dense"]


def test_first_layer_input_not_a_multiple_of_block_size():
    bs, n = 8, 5
    layer = CondDense(16, block_size=bs, bias_initializer="random_normal")
    x = RNG.standard_normal((n, 13)).astype(np.float32)  # 13 inputs, padded internally
    out_mask = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], np.float32)
    y, _ = layer(x, out_mask=out_mask)
    ref = np_layer(x, layer.kernel.numpy(), layer.bias.numpy(), None, out_mask, bs,
                   lambda z: np.maximum(z, 0))
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)
    assert layer.kernel.shape == (13, 16)
    # Gradients, the padded inputs' rows of the kernel included: against the float64
    # reference's, for a loss weighting every output differently.
    x_t = tf.constant(x)
    weights = RNG.standard_normal(ref.shape)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        loss = tf.reduce_sum(layer(x_t, out_mask=out_mask)[0] * weights)
    dx, dk, db = tape.gradient(loss, [x_t, layer.kernel, layer.bias])
    w64, b64 = layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64)
    dz = weights * (x @ w64 + b64 > 0) * np.repeat(out_mask, bs, axis=1)
    np.testing.assert_allclose(dx.numpy(), dz @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk.numpy(), x.astype(np.float64).T @ dz, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db.numpy(), dz.sum(0), rtol=1e-5, atol=1e-5)


def test_first_layer_fewer_inputs_than_a_block():
    bs, n = 8, 4
    layer = CondDense(16, block_size=bs, bias_initializer="random_normal")
    x = RNG.standard_normal((n, 5)).astype(np.float32)
    out_mask = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
    y, _ = layer(x, out_mask=out_mask)
    ref = np_layer(x, layer.kernel.numpy(), layer.bias.numpy(), None, out_mask, bs,
                   lambda z: np.maximum(z, 0))
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_policy_probabilities_and_inference_modes():
    bs, n = 8, 400
    layer = CondDense(16, block_size=bs, policy_kernel_initializer="random_normal", threshold=0.3,
                      seed=3)
    x = RNG.standard_normal((n, 6)).astype(np.float32)
    _, m, logits = layer(x, return_policy=True)
    ref_logits = x.astype(np.float64) @ layer.policy_kernel.numpy() + layer.policy_bias.numpy()
    np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-5, atol=1e-5)
    probs = 1 / (1 + np.exp(-ref_logits))
    np.testing.assert_array_equal(m.numpy(), (probs > 0.3).astype(np.float32))  # threshold
    # training (and inference="sample") draw Bernoulli samples: the mean approaches probs
    draws = np.mean([layer(x, training=True)[1].numpy() for _ in range(50)], axis=0)
    assert abs(draws.mean() - probs.mean()) < 0.02
    assert np.abs(draws - probs).max() < 0.35
    sampler = CondDense(16, block_size=bs, inference="sample", seed=4)
    sampler.build((None, 6))
    sampler.set_weights(layer.get_weights())
    a, b = sampler(x)[1].numpy(), sampler(x)[1].numpy()
    assert not np.array_equal(a, b)
    # the default policy starts at probability tau
    fresh = CondDense(16, block_size=bs, tau=0.2)
    _, _, lg = fresh(x, return_policy=True)
    assert abs(tf.reduce_mean(tf.sigmoid(lg)).numpy() - 0.2) < 0.02


def test_masks_pass_from_layer_to_layer(monkeypatch):
    calls = []
    real = condnet.sparse_dot

    def spy(x, w, in_mask=None, out_mask=None, **kw):
        calls.append((in_mask, out_mask))
        return real(x, w, in_mask=in_mask, out_mask=out_mask, **kw)

    monkeypatch.setattr(condnet, "sparse_dot", spy)
    model = CondNetModel([16, 24, 8], 3, block_size=8, seed=0)
    x = RNG.standard_normal((5, 6)).astype(np.float32)
    _, _, masks = model.forward(x, training=True)
    assert len(calls) == 3 and calls[0][0] is None
    for i in range(3):
        np.testing.assert_array_equal(calls[i][1].numpy(), masks[i].numpy())
    for i in (1, 2):
        np.testing.assert_array_equal(calls[i][0].numpy(), masks[i - 1].numpy())


def test_network_matches_float64_reference_with_fixed_masks():
    bs, n = 8, 6
    model = CondNetModel([16, 24], 3, block_size=bs, seed=0)
    x = RNG.standard_normal((n, 5)).astype(np.float32)
    masks = [(RNG.random((n, 2)) < 0.6).astype(np.float32),
             (RNG.random((n, 3)) < 0.6).astype(np.float32)]
    logits, _, used = model.forward(x, masks=masks)
    h, in_m = x, None
    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    for layer, m in zip(model.cond_layers, masks):
        h = np_layer(h, layer.kernel.numpy(), layer.bias.numpy(), in_m, m, bs, relu)
        in_m = m
    wc, bc = (v.numpy().astype(np.float64) for v in model.classifier.weights)
    np.testing.assert_allclose(logits.numpy(), h @ wc + bc, rtol=1e-5, atol=1e-5)
    for a, b in zip(used, masks):
        np.testing.assert_array_equal(a.numpy(), b)


# ---------------------------------------------------------------- losses


def test_regularizers_hand_computed():
    probs = np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)
    terms = sparsity_regularizers(probs, 0.25)
    # block means (0.4, 0.6): (0.15^2 + 0.35^2); example means 0.5: 0.25^2; variances 0.04 each
    assert terms["batch"].numpy() == pytest.approx(0.145, abs=1e-6)
    assert terms["example"].numpy() == pytest.approx(0.0625, abs=1e-6)
    assert terms["variance"].numpy() == pytest.approx(0.08, abs=1e-6)
    layer = CondDense(16, block_size=8, tau=0.25, lambda_b=2.0, lambda_e=3.0, lambda_v=5.0)
    total, _ = layer.regularization(probs)
    assert total.numpy() == pytest.approx(2 * 0.145 + 3 * 0.0625 - 5 * 0.08, abs=1e-6)


def test_bernoulli_log_prob_hand_computed():
    logits = np.log(np.array([[0.2 / 0.8, 0.9 / 0.1, 0.5 / 0.5]], np.float32))
    lp = bernoulli_log_prob(np.array([[1.0, 0.0, 1.0]], np.float32), tf.constant(logits))
    assert lp.numpy()[0] == pytest.approx(np.log(0.2) + np.log(0.1) + np.log(0.5), abs=1e-5)
    # finite when saturated
    assert np.isfinite(bernoulli_log_prob(tf.ones((1, 1)), tf.constant([[-200.0]])).numpy()).all()


@pytest.mark.parametrize("baseline", [None, "batch", "moving_average"])
def test_loss_terms_against_numpy(baseline):
    model = CondNetModel([16, 16], 3, block_size=8, tau=[0.3, 0.6], lambda_b=[1.0, 2.0],
                         lambda_e=0.5, lambda_v=[0.1, 0.2], reinforce_weight=0.7,
                         baseline=baseline, seed=1)
    x = RNG.standard_normal((6, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    model(x)
    model.reward_average.assign(-1.25)
    t = model.compute_condnet_loss(x, y, training=True)
    logits = t["logits"].numpy().astype(np.float64)
    logz = np.log(np.exp(logits).sum(1))
    task = logz - logits[np.arange(6), y]
    np.testing.assert_allclose(t["task_loss"].numpy(), task, rtol=1e-5)
    r = -task
    base = {None: np.zeros(6), "batch": (r.sum() - r) / 5, "moving_average": np.full(6, -1.25)}
    adv = r - base[baseline]
    np.testing.assert_allclose(t["advantage"].numpy(), adv, rtol=1e-4, atol=1e-6)
    logp = 0.0
    reg = 0.0
    for p, m, tau, lb, lv in zip(t["probs"], t["masks"], [0.3, 0.6], [1.0, 2.0], [0.1, 0.2]):
        p, m = p.numpy().astype(np.float64), m.numpy()
        logp = logp + np.sum(m * np.log(p) + (1 - m) * np.log(1 - p), axis=1)
        reg += (lb * np.sum((p.mean(0) - tau) ** 2) + 0.5 * np.mean((p.mean(1) - tau) ** 2)
                - lv * np.sum(p.var(0)))
    np.testing.assert_allclose(t["log_prob"].numpy(), logp, rtol=1e-5)
    assert t["reinforce"].numpy() == pytest.approx(-np.mean(adv * logp), rel=1e-4, abs=1e-5)
    assert t["regularization"].numpy() == pytest.approx(reg, rel=1e-4, abs=1e-6)
    assert t["loss"].numpy() == pytest.approx(task.mean() - 0.7 * np.mean(adv * logp) + reg,
                                              rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("baseline", [None, "batch"])
def test_reinforce_gradient_is_unbiased(baseline):
    """The policy gradient of the training loss, averaged over many sampled masks, equals the
    exact gradient of the expected task loss, computed by enumerating all 16 mask settings."""
    rng = np.random.default_rng(2024)
    model = CondNetModel([16, 16], 3, block_size=8, lambda_b=0.0, baseline=baseline, seed=5)
    x = rng.standard_normal((3, 3)).astype(np.float32)
    y = np.array([0, 1, 2])
    model(x)
    for layer in model.cond_layers:  # an input-dependent policy with probabilities far from 1/2
        layer.policy_kernel.assign(rng.standard_normal(layer.policy_kernel.shape) * 1.5)
        layer.kernel.assign(rng.standard_normal(layer.kernel.shape) * 1.5)
    model.classifier.kernel.assign(rng.standard_normal(model.classifier.kernel.shape) * 2)
    policy = model.policy_variables

    with tf.GradientTape() as tape:
        expected = 0.0
        for bits in itertools.product([0.0, 1.0], repeat=4):
            masks = [np.tile(np.array(bits[:2], np.float32), (3, 1)),
                     np.tile(np.array(bits[2:], np.float32), (3, 1))]
            logits, pls, _ = model.forward(x, masks=masks)
            prob = tf.exp(tf.add_n([bernoulli_log_prob(m, pl) for m, pl in zip(masks, pls)]))
            task = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            expected += tf.reduce_mean(prob * task)
    exact = np.concatenate([g.numpy().ravel() for g in tape.gradient(expected, policy)])

    reps, chunks = 1500, 30  # 30 independent estimates: a t-test with 29 degrees of freedom
    xr, yr = np.tile(x, (reps, 1)), np.tile(y, reps)
    estimates = []
    for _ in range(chunks):
        with tf.GradientTape() as tape:
            loss = model.compute_condnet_loss(xr, yr, training=True)["loss"]
        estimates.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, policy)]))
    estimates = np.array(estimates)
    mean, se = estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(chunks)
    # per component within 4.5 standard errors; the absolute slack covers the float32 rounding of
    # nearly saturated probabilities (gradients ~1e-4 where the largest is ~1)
    slack = 5e-4 * np.abs(exact).max()
    assert np.all(np.abs(mean - exact) <= 4.5 * se + slack), (mean, exact, se)
    assert np.linalg.norm(mean - exact) < 0.15 * np.linalg.norm(exact)
    assert np.linalg.norm(exact) > 1e-2  # the check is not vacuous


# ---------------------------------------------------------------- training, saving, arguments


def _toy_data(n=256, d=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, d)) * 2
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def test_fit_learns_and_tracks_active_fraction():
    x, y = _toy_data()
    model = CondNetModel([32, 32], 4, block_size=8, tau=0.5, lambda_b=5.0, lambda_v=1.0,
                         baseline="moving_average", seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    hist = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    assert set(hist.history) >= {"loss", "task_loss", "accuracy", "active_fraction"}
    assert hist.history["accuracy"][-1] > 0.8
    assert 0.2 < hist.history["active_fraction"][-1] < 0.8
    assert model.reward_average.numpy() < 0  # rewards are minus losses
    res = model.evaluate(x, y, verbose=0, return_dict=True)
    assert res["accuracy"] > 0.7


def test_save_and_load_round_trip(tmp_path):
    x, y = _toy_data(n=64)
    model = CondNetModel([16, 24], 4, block_size=8, tau=[0.4, 0.6], lambda_v=[0.5, 1.0],
                         baseline="moving_average", threshold=0.45, seed=2)
    model.compile(optimizer="adam")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    # Policies that switch some blocks on and some off at inference, in both layers, so that the
    # predictions depend on every layer's weights.
    rng = np.random.default_rng(5)
    for layer in model.cond_layers:
        layer.policy_kernel.assign(rng.standard_normal(layer.policy_kernel.shape))
        layer.policy_bias.assign(rng.standard_normal(layer.policy_bias.shape))
    fractions = [float(f) for f in model.active_fractions(model.forward(x)[2])]
    assert all(0.1 < f < 0.9 for f in fractions), fractions
    path = str(tmp_path / "condnet.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, CondNetModel)
    assert loaded.get_config() == model.get_config()
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    for a, b in zip(model.forward(x)[2], loaded.forward(x)[2]):
        np.testing.assert_array_equal(a, b)
    layer = CondDense(16, block_size=8, tau=0.3, lambda_e=0.2, inference="sample", seed=9,
                      activation="tanh")
    clone = CondDense.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize("kwargs,match", [
    (dict(units=12, block_size=8), "multiple of block_size"),
    (dict(units=8, block_size=4), "block_size must be one of"),
    (dict(units=0), "units"),
    (dict(units=8, block_size=0), "block_size"),
    (dict(units=8, block_size=8, tau=0.0), "tau"),
    (dict(units=8, block_size=8, tau=1.5), "tau"),
    (dict(units=8, block_size=8, lambda_b=-1.0), "lambda_b"),
    (dict(units=8, block_size=8, lambda_v=float("nan")), "lambda_v"),
    (dict(units=8, block_size=8, inference="mean"), "inference"),
    (dict(units=8, block_size=8, threshold=1.0), "threshold"),
    (dict(units=8, block_size=8, seed=1.5), "seed"),
    (dict(units=8, block_size=8, seed=True), "seed"),
    (dict(units=8, block_size=8, implementation="cuda"), "implementation"),
])
def test_layer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CondDense(**kwargs)


def test_layer_bad_masks():
    layer = CondDense(16, block_size=8)
    x = np.zeros((3, 16), np.float32)
    with pytest.raises(ValueError, match="out_mask"):
        layer(x, out_mask=np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="in_mask"):
        layer(x, in_mask=np.ones((3, 4), np.float32))
    odd = CondDense(16, block_size=8)
    with pytest.raises(ValueError, match="multiple of block_size"):
        odd(np.zeros((3, 12), np.float32), in_mask=np.ones((3, 1), np.float32))


def test_layer_takes_bool_and_integer_masks_as_sparse_dot_does():
    layer = CondDense(16, block_size=8, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    out_mask = rng.random((5, 2)) < 0.5
    in_mask = rng.random((5, 2)) < 0.5
    want_y, want_mask = layer(x, in_mask=in_mask.astype(np.float32),
                              out_mask=out_mask.astype(np.float32))
    for dtype in (bool, np.int32, np.float64):
        y, mask = layer(x, in_mask=in_mask.astype(dtype), out_mask=out_mask.astype(dtype))
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(mask, want_mask)
    with pytest.raises(ValueError, match="out_mask must hold numbers or booleans"):
        layer(x, out_mask=np.full((5, 2), "1"))


def test_functional_model_keeps_the_policy_logits():
    inputs = keras.Input((16,))
    outputs = CondDense(16, block_size=8)(inputs, return_policy=True)
    assert len(outputs) == 3
    assert [tuple(o.shape) for o in outputs] == [(None, 16), (None, 2), (None, 2)]
    assert outputs[1].dtype == "float32"
    model = keras.Model(inputs, list(outputs))
    y, mask, logits = model(np.ones((3, 16), np.float32))
    assert logits.shape == (3, 2) and mask.shape == (3, 2) and y.shape == (3, 16)


def test_fit_takes_a_step_of_the_same_size_under_mixed_float16():
    """A LossScaleOptimizer divides the gradients by its loss scale: the step must be taken on
    the loss it scaled, else the weights barely move.  Both models start from the same weights
    and run every block; one SGD step each on the same batch.  The initial weights are seeded:
    drawn from whatever random state earlier tests left, some gave gradients that overflow
    float16 once scaled by the initial loss scale (2^15), and Keras then skips the step, as it
    should.  With seed 0 the largest scaled gradient is about half of float16's range."""
    keras.utils.set_random_seed(0)
    x, y = _toy_data(n=64)
    steps, start = {}, None
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = CondNetModel([32], 4, block_size=8, seed=0, lambda_b=0.0,
                                 reinforce_weight=0.0)
            model.compile(optimizer=keras.optimizers.SGD(0.1))
            model(x[:2])
            if start is None:
                # Every block on (p = 1 - 2e-9): no mask drawn near its threshold can flip
                # between the float32 and the float16 policy logits.
                model.cond_layers[0].policy_bias.assign(np.full(4, 20.0, np.float32))
                start = [w.numpy() for w in model.weights]
            else:
                model.set_weights(start)
            model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
            steps[policy] = [w.numpy() - w0 for w, w0 in zip(model.weights, start)]
        finally:
            keras.mixed_precision.set_global_policy("float32")
    full = np.concatenate([d.ravel() for d in steps["float32"]])
    half = np.concatenate([d.ravel() for d in steps["mixed_float16"]])
    assert np.abs(full).max() > 1e-3
    # The same step up to float16 rounding (unscaled, it was 1/32768 of this).
    assert np.abs(half - full).max() < 0.05 * np.abs(full).max(), (
        np.abs(half).max(), np.abs(full).max())


def test_fit_refuses_sample_weights():
    x, y = _toy_data(n=16)
    model = CondNetModel([16], 4, block_size=8)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="sample_weight"):
        model.fit(x, y, sample_weight=np.ones(16), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="class_weight"):
        model.fit(x, y, class_weight={c: 1.0 for c in range(4)}, epochs=1, verbose=0)
    weighted = tf.data.Dataset.from_tensor_slices((x, y, np.ones(16, np.float32))).batch(8)
    with pytest.raises(ValueError, match="sample_weight"):
        model.fit(weighted, epochs=1, verbose=0)
    # Refused inside the first trace of the train step, the refusal left the optimizer without
    # its variables and every later fit failed ("Creating variables on a non-first call").
    assert np.isfinite(model.fit(x, y, epochs=1, verbose=0).history["loss"][0])


def test_labels_must_be_class_indices():
    x, y = _toy_data(n=16)
    one_hot = np.eye(4, dtype=np.float32)[y]
    model = CondNetModel([16], 4, block_size=8)
    model.compile(optimizer="sgd")
    # One-hot labels were flattened into 4 labels per example: TensorFlow's shape error from
    # inside the cross-entropy.
    with pytest.raises(ValueError, match=r"shape \(n,\) or \(n, 1\), got shape \(16, 4\) "
                                         r"\(one-hot labels\?"):
        model.fit(x, one_hot, epochs=1, verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices((x, one_hot)).batch(8)
    with pytest.raises(ValueError, match="one-hot labels"):
        model.fit(dataset, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="one-hot labels"):
        model.evaluate(x, one_hot, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one class label per example"):
        model.compute_condnet_loss(x, y[:12])
    # Refused before the train step's first trace, so later fits still work; (n, 1) labels too.
    history = model.fit(x, y[:, None], epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])


def test_a_step_that_fails_to_trace_leaves_the_model_usable():
    # Built inside Keras' first traced step, the model kept variables that were never
    # initialized when that trace failed: every later call raised "In[1] ndims must be >= 2".
    x, y = _toy_data(n=16)
    model = CondNetModel([16], 4, block_size=8)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="sample_weight"):  # refused inside the test step
        model.evaluate(x, y, sample_weight=np.ones(16), verbose=0)
    assert model.built
    assert np.isfinite(model.compute_condnet_loss(x, y)["loss"].numpy())
    assert np.isfinite(model.evaluate(x, y, verbose=0)[0])
    assert model.predict(x, verbose=0).shape == (16, 4)
    fresh = CondNetModel([16], 4, block_size=8)
    fresh.predict(tf.data.Dataset.from_tensor_slices(x).batch(8), verbose=0)
    assert fresh.built


def test_cond_dense_names_a_wrong_input_size():
    layer = CondDense(32, block_size=16)
    layer(np.zeros((4, 64), np.float32))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 64"):
        layer(np.zeros((4, 48), np.float32))  # failed in the policy's matmul


def test_model_wants_one_mask_per_hidden_layer():
    model = CondNetModel([16, 16], 3, block_size=8)
    x = np.zeros((2, 8), np.float32)
    mask = np.ones((2, 2), np.float32)
    for masks in ([mask], [mask] * 3):
        with pytest.raises(ValueError, match="one .* mask per hidden layer, 2 in all; got"):
            model(x, masks=masks)
    assert model(x, masks=[mask, mask]).shape == (2, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_units=[], num_classes=3), "hidden_units"),
    (dict(hidden_units=8, num_classes=3), "hidden_units"),
    (dict(hidden_units=[8, 8], num_classes=3, tau=[0.5]), "one value per hidden layer"),
    (dict(hidden_units=[8], num_classes=0), "num_classes"),
    (dict(hidden_units=[8], num_classes=3, baseline="mean"), "baseline"),
    (dict(hidden_units=[8], num_classes=3, baseline_momentum=1.0), "baseline_momentum"),
    (dict(hidden_units=[8], num_classes=3, seed=True), "seed"),
    (dict(hidden_units=[8], num_classes=3, reinforce_weight=-1), "reinforce_weight"),
    (dict(hidden_units=[12], num_classes=3, block_size=8), "multiple of block_size"),
    (dict(hidden_units=[8], num_classes=3, implementation=None), "implementation"),
])
def test_model_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CondNetModel(**kwargs)


# ---------------------------------------------------------------- the example


def test_example_quick_mode(tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = (tmp_path / "condnet_results_quick.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| dense")
            or line.startswith("| condnet")]
    assert len(rows) >= 2 and rows[0].startswith("| dense")
    errors = [float(r.split("|")[3]) for r in rows]
    assert errors[0] < 90  # the dense net beats chance (10 classes) after 3 epochs
    assert all(0 <= e <= 100 for e in errors)
    active = [float(a) for r in rows[1:] for a in r.split("|")[4].split(",")]
    assert all(0 <= a <= 1 for a in active)
    png = (tmp_path / "condnet_accuracy_vs_active_quick.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_example_help():
    run = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "--quick" in run.stdout and "--mnist" in run.stdout




@pytest.mark.parametrize("argv, message", [
    (["--taus", "abc"], "--taus must be comma-separated numbers strictly between 0 and 1; "
                        "got 'abc'"),
    (["--taus", ""], "strictly between 0 and 1; got ''"),
    (["--taus", "0.5,0"], "strictly between 0 and 1; got '0.5,0'"),
    (["--taus", "1.5"], "strictly between 0 and 1; got '1.5'"),
    (["--taus", "1"], "strictly between 0 and 1; got '1'"),
    (["--timing-repeats", "0"], "argument --timing-repeats: must be >= 1; got 0"),
    (["--batch", "0"], "argument --batch: must be >= 1; got 0"),
    (["--batch", "x"], "argument --batch: invalid int value: 'x'"),
])
def test_example_refuses_bad_arguments(argv, message, capsys):
    assert_refused(example("train_condnet").parse_args, argv, message, capsys)


def test_example_parses_taus():
    assert example("train_condnet").parse_args(["--taus", "0.125, 0.5"]).taus == [0.125, 0.5]


def test_integer_inputs_are_cast_like_keras_dense():
    """uint8 pixels or int32 features were refused with a conversion error."""
    layer = CondDense(16, block_size=8, inference="threshold")
    x = np.arange(48).reshape(3, 16) % 7
    y_float = layer(x.astype(np.float32))[0]
    for dtype in (np.uint8, np.int32, np.int64):
        np.testing.assert_array_equal(layer(x.astype(dtype))[0].numpy(), y_float.numpy())
    with pytest.raises(ValueError, match="inputs must hold real numbers; got dtype string"):
        layer(tf.constant([["a"] * 16] * 3))
    model = CondNetModel([16], 3, block_size=8)
    model.compile(optimizer="adam")
    model.fit(np.zeros((8, 12), np.uint8), np.zeros(8, int), verbose=0)


def test_one_value_as_a_0d_array_and_missing_labels():
    assert CondNetModel([8, 8], 3, block_size=8, tau=np.array(0.3)).tau == [0.3, 0.3]
    model = CondNetModel([8], 3, block_size=8)
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match=r"needs integer class labels y .*; got None"):
        model.fit(np.zeros((8, 12), np.float32), None, verbose=0)


def test_masks_of_rank_known_only_when_run():
    """A mask of unknown rank failed on a slice of its shape, not naming it."""
    layer = CondDense(16, block_size=8)
    layer(np.ones((3, 16), np.float32))
    run = tf.function(lambda x, m: layer(x, out_mask=m)[0],
                      input_signature=[tf.TensorSpec([None, 16]), tf.TensorSpec(None)])
    for bad in (np.ones(6, np.float32), np.ones((3, 2, 1), np.float32)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"out_mask must be a matrix"):
            run(np.ones((3, 16), np.float32), bad)
    assert run(np.ones((3, 16), np.float32), np.ones((3, 2), np.float32)).shape == (3, 16)
