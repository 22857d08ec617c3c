"""sparse_dot (conditional computation) against float64 numpy references."""

import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf import sparse_dot
from blocksparse_tf._ops import ops

RNG = np.random.default_rng(99)


def reference(x, w, in_mask, out_mask, bias, bs):
    """Independent float64 reference of the condnet product."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, m = x.shape
    p = w.shape[1]
    in_e = np.ones((n, m)) if in_mask is None else np.repeat(in_mask != 0, bs, axis=1)
    out_e = np.ones((n, p)) if out_mask is None else np.repeat(out_mask != 0, bs, axis=1)
    z = (x * in_e) @ w
    if bias is not None:
        z = z + bias
    return z * out_e, in_e, out_e


def rel_err(a, ref):
    return np.abs(np.asarray(a, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)


@pytest.mark.parametrize("bs", [1, 8, 16, 32])
@pytest.mark.parametrize("masks", ["none", "in", "out", "both"])
@pytest.mark.parametrize("n", [1, 13])
def test_forward_and_gradients(bs, masks, n):
    m, p = 5 * bs, 3 * bs
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    bias = RNG.standard_normal(p).astype(np.float32)
    in_mask = (RNG.random((n, m // bs)) < 0.5).astype(np.float32) if masks in ("in", "both") else None
    out_mask = (RNG.random((n, p // bs)) < 0.5).astype(np.float32) if masks in ("out", "both") else None
    dy = RNG.standard_normal((n, p)).astype(np.float32)
    xt, wt, bt = tf.constant(x), tf.constant(w), tf.constant(bias)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt, bt])
        y = sparse_dot(xt, wt, in_mask, out_mask, bias=bt, block_size=bs)
    dx, dw, db = tape.gradient(y, [xt, wt, bt], output_gradients=tf.constant(dy))
    y_ref, in_e, out_e = reference(x, w, in_mask, out_mask, bias, bs)
    dyo = dy.astype(np.float64) * out_e
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(dx, (dyo @ w.astype(np.float64).T) * in_e) < 1e-5
    assert rel_err(dw, (x.astype(np.float64) * in_e).T @ dyo) < 1e-5
    assert rel_err(db, dyo.sum(axis=0)) < 1e-5
    if out_mask is not None:  # inactive outputs are exactly zero, bias included
        assert np.all(y.numpy()[out_e == 0] == 0)


def test_inactive_inputs_are_never_read():
    bs, n = 8, 6
    x = RNG.standard_normal((n, 4 * bs)).astype(np.float32)
    in_mask = (RNG.random((n, 4)) < 0.5).astype(np.float32)
    poisoned = x.copy()
    poisoned[np.repeat(in_mask == 0, bs, axis=1)] = np.nan
    w = RNG.standard_normal((4 * bs, 2 * bs)).astype(np.float32)
    y = sparse_dot(poisoned, w, in_mask=in_mask, block_size=bs).numpy()
    np.testing.assert_allclose(y, reference(x, w, in_mask, None, None, bs)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(tf.float16, 2e-3), (tf.bfloat16, 1e-2)])
def test_half_precision(dtype, tol):
    bs, n = 16, 9
    x = tf.cast(RNG.standard_normal((n, 4 * bs)), dtype)
    w = tf.cast(RNG.standard_normal((4 * bs, 3 * bs)), dtype)
    in_mask = (RNG.random((n, 4)) < 0.6).astype(np.float32)
    out_mask = (RNG.random((n, 3)) < 0.6).astype(np.float32)
    y = sparse_dot(x, w, in_mask, out_mask, block_size=bs)
    assert y.dtype == dtype
    ref = reference(tf.cast(x, tf.float64).numpy(), tf.cast(w, tf.float64).numpy(), in_mask, out_mask, None, bs)[0]
    assert rel_err(tf.cast(y, tf.float64).numpy(), ref) < tol


def test_finite_differences():
    bs, n = 8, 3
    x = tf.constant(RNG.standard_normal((n, 3 * bs)).astype(np.float32))
    w = tf.constant(RNG.standard_normal((3 * bs, 2 * bs)).astype(np.float32))
    b = tf.constant(RNG.standard_normal(2 * bs).astype(np.float32))
    in_mask = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 0]], np.float32)
    out_mask = np.array([[1, 1], [0, 1], [1, 0]], np.float32)
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, c, d: sparse_dot(a, c, in_mask, out_mask, bias=d, block_size=bs), [x, w, b], delta=1e-2)
    for t, num in zip(theoretical, numerical):
        np.testing.assert_allclose(t, num, rtol=2e-2, atol=2e-2)
        assert np.abs(t).max() > 0.1


def test_deterministic():
    bs = 32
    x = tf.constant(RNG.standard_normal((257, 8 * bs)).astype(np.float32))
    w = tf.constant(RNG.standard_normal((8 * bs, 6 * bs)).astype(np.float32))
    in_mask = (RNG.random((257, 8)) < 0.4).astype(np.float32)
    out_mask = (RNG.random((257, 6)) < 0.4).astype(np.float32)
    first = sparse_dot(x, w, in_mask, out_mask, block_size=bs).numpy()
    for _ in range(3):
        assert np.array_equal(first, sparse_dot(x, w, in_mask, out_mask, block_size=bs).numpy())


def test_bad_arguments_raise():
    x, w = tf.ones((4, 32)), tf.ones((32, 16))
    with pytest.raises(ValueError, match=r"in_mask must have shape \(n, m / block_size\) = \(4, 4\)"):
        sparse_dot(x, w, in_mask=np.ones((4, 3)), block_size=8)
    with pytest.raises(ValueError, match=r"out_mask must have shape \(n, p / block_size\) = \(4, 2\)"):
        sparse_dot(x, w, out_mask=np.ones((5, 2)), block_size=8)
    with pytest.raises(ValueError, match="block_size 16 must divide p = 24"):
        sparse_dot(x, tf.ones((32, 24)), block_size=16)
    for bad in (4, 12, 0, 2.5):
        with pytest.raises(ValueError, match="block_size must be one of"):
            sparse_dot(x, w, block_size=bad)
    with pytest.raises(ValueError, match="must agree on m"):
        sparse_dot(x, tf.ones((16, 16)), block_size=8)
    with pytest.raises(ValueError, match="does not match"):
        sparse_dot(x, tf.ones((32, 16), tf.float16), block_size=8)
    for masks in ({}, {"out_mask": np.ones((4, 2))}):
        with pytest.raises(ValueError, match=r"bias must have shape \(p,\)"):
            sparse_dot(x, w, bias=tf.ones(8), block_size=8, **masks)
    # The kernel checks too, when called directly.
    for in_m, out_m, message in [(tf.ones((4, 3)), tf.ones((4, 2)), "in_mask must have shape"),
                                 (tf.ones((4, 4)), tf.ones((3, 2)), "out_mask must have shape")]:
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
            ops().blocksparse_sparse_dot(x, w, in_m, out_m, block_size=8)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="block_size must be one of"):
        ops().blocksparse_sparse_dot(x, w, tf.ones((4, 8)), tf.ones((4, 4)), block_size=4)
