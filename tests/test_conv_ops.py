"""The block-sparse convolution ops (blocksparse_tf.conv) against float64 numpy references:
forward, input and kernel gradients, their own gradients, determinism, and bad inputs."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf._ops import ops
from blocksparse_tf.conv import (blocksparse_conv2d, blocksparse_conv2d_grad_input,
                                 blocksparse_conv2d_grad_kernel, conv_padding)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layout(rng, CB, KB, density=0.5, empty_row=None, empty_col=None):
    mask = rng.random((CB, KB)) < density
    if empty_row is not None:
        mask[empty_row] = False
    if empty_col is not None:
        mask[:, empty_col] = False
    if not mask.any():
        mask[CB - 1, KB - 1] = True
    return np.argwhere(mask).astype(np.int32)


def _dense_kernel(w, coords, CB, KB):
    """(kh, kw, C, K) float64 from w (blocks, kh, kw, bs, bs)."""
    blocks, kh, kw, bs, _ = w.shape
    dense = np.zeros((kh, kw, CB * bs, KB * bs))
    for b, (c, k) in enumerate(coords):
        dense[:, :, c * bs:(c + 1) * bs, k * bs:(k + 1) * bs] = w[b]
    return dense


def _reference(x, dense, strides, dilations, padding, dy):
    """float64 numpy y, dx and dense dW of the convolution, by explicit loops over the taps."""
    (N, H, W, C), (kh, kw, _, K) = x.shape, dense.shape
    (sh, sw), (dh, dw), (pt, pb, pl, pr) = strides, dilations, padding
    xp = np.zeros((N, H + pt + pb, W + pl + pr, C))
    xp[:, pt:pt + H, pl:pl + W] = x
    Ho = (H + pt + pb - (kh - 1) * dh - 1) // sh + 1
    Wo = (W + pl + pr - (kw - 1) * dw - 1) // sw + 1
    y = np.zeros((N, Ho, Wo, K))
    dxp = np.zeros_like(xp)
    dW = np.zeros_like(dense)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + (Ho - 1) * sh + 1, sh)
            cols = slice(j * dw, j * dw + (Wo - 1) * sw + 1, sw)
            window = xp[:, rows, cols]
            y += window @ dense[i, j]
            if dy is not None:
                dxp[:, rows, cols] += dy @ dense[i, j].T
                dW[i, j] = np.einsum("nhwc,nhwk->ck", window, dy)
    return y, dxp[:, pt:pt + H, pl:pl + W], dW


def _blocks_of(dW, coords, bs):
    return np.stack([dW[:, :, c * bs:(c + 1) * bs, k * bs:(k + 1) * bs] for c, k in coords])


def _close(actual, reference, rtol=2e-6):
    atol = rtol * max(float(np.max(np.abs(reference))), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), reference, rtol=rtol, atol=atol)


CASES = [
    # (bs, CB, KB, N, H, W, kernel, strides, dilations, padding mode)
    (8, 3, 2, 2, 7, 9, (3, 3), (1, 1), (1, 1), "same"),
    (8, 3, 2, 2, 7, 9, (3, 3), (2, 2), (1, 1), "same"),
    (8, 2, 3, 1, 9, 11, (5, 4), (3, 2), (1, 1), "same"),
    (16, 2, 3, 2, 9, 7, (3, 2), (2, 1), (1, 1), "valid"),
    (16, 3, 2, 1, 11, 13, (3, 3), (1, 1), (2, 3), "same"),
    (16, 2, 2, 3, 5, 5, (1, 1), (2, 2), (1, 1), "valid"),
    (32, 2, 2, 1, 11, 5, (3, 3), (1, 1), (2, 2), "valid"),
    (32, 2, 3, 2, 13, 15, (3, 3), (2, 2), (1, 1), "same"),
]


def _case(rng, bs, CB, KB, N, H, W, kernel, strides, dilations, mode):
    coords = _layout(rng, CB, KB, empty_row=1, empty_col=KB - 2)
    kh, kw = kernel
    padding = [*conv_padding(H, kh, strides[0], dilations[0], mode),
               *conv_padding(W, kw, strides[1], dilations[1], mode)]
    w = rng.standard_normal((len(coords), kh, kw, bs, bs)).astype(np.float32)
    x = rng.standard_normal((N, H, W, CB * bs)).astype(np.float32)
    attrs = dict(block_size=bs, C=CB * bs, K=KB * bs, strides=strides, dilations=dilations,
                 padding=padding)
    return coords, w, x, attrs


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_float64(case):
    rng = np.random.default_rng(0)
    coords, w, x, attrs = _case(rng, *case)
    bs, CB, KB = case[:3]
    dense = _dense_kernel(w.astype(np.float64), coords, CB, KB)
    y_ref = _reference(x, dense, attrs["strides"], attrs["dilations"], attrs["padding"], None)[0]
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    _, dx_ref, dW_ref = _reference(x, dense, attrs["strides"], attrs["dilations"],
                                   attrs["padding"], dy)
    y = blocksparse_conv2d(x, w, coords, **attrs)
    assert y.shape == y_ref.shape
    _close(y, y_ref)
    # Also against TensorFlow's own convolution, so the numpy reference is checked too.
    xp = tf.pad(tf.constant(x, tf.float64), [[0, 0], attrs["padding"][:2], attrs["padding"][2:],
                                             [0, 0]])
    _close(tf.nn.conv2d(xp, dense, strides=attrs["strides"], padding="VALID",
                        dilations=attrs["dilations"]), y_ref, rtol=1e-12)
    dx = blocksparse_conv2d_grad_input(x.shape, w, dy, coords, **attrs)
    _close(dx, dx_ref)
    dw = blocksparse_conv2d_grad_kernel(x, dy, coords, w.shape[1:3], **attrs)
    assert dw.shape == w.shape
    _close(dw, _blocks_of(dW_ref, coords, bs))
    # The gradients registered for the op are the same ops.
    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        loss = tf.reduce_sum(blocksparse_conv2d(xt, wt, coords, **attrs) * dy)
    g_x, g_w = tape.gradient(loss, [xt, wt])
    np.testing.assert_array_equal(g_x, dx)
    np.testing.assert_array_equal(g_w, dw)


def test_empty_block_row_gets_zero_input_gradient():
    rng = np.random.default_rng(1)
    coords = np.array([[0, 0], [2, 0]], np.int32)  # input block 1 and output block 1 unused
    attrs = dict(block_size=8, C=24, K=16, padding=(1, 1, 1, 1))
    x = rng.standard_normal((1, 5, 6, 24)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 8, 8)).astype(np.float32)
    y = blocksparse_conv2d(x, w, coords, **attrs).numpy()
    np.testing.assert_array_equal(y[..., 8:], 0.0)
    dx = blocksparse_conv2d_grad_input(x.shape, w, np.ones_like(y), coords, **attrs).numpy()
    np.testing.assert_array_equal(dx[..., 8:16], 0.0)
    assert np.all(dx[..., :8] != 0)


SMALL = (8, 2, 2, 1, 5, 4, (3, 2), (2, 1), (1, 2), "same")


def _jacobians(f, args):
    # Every op is linear in each operand, so central differences with a unit step are exact
    # but for float32 rounding.
    return tf.test.compute_gradient(f, args, delta=1.0)


def test_gradients_by_finite_differences():
    rng = np.random.default_rng(2)
    coords, w, x, attrs = _case(rng, *SMALL)
    dy = rng.standard_normal(blocksparse_conv2d(x, w, coords, **attrs).shape).astype(np.float32)
    checks = [
        (lambda a, b: blocksparse_conv2d(a, b, coords, **attrs), [x, w]),
        (lambda a, b: blocksparse_conv2d_grad_input(x.shape, a, b, coords, **attrs), [w, dy]),
        (lambda a, b: blocksparse_conv2d_grad_kernel(a, b, coords, w.shape[1:3], **attrs),
         [x, dy]),
    ]
    for f, args in checks:
        theoretical, numerical = _jacobians(f, args)
        for t, n in zip(theoretical, numerical):
            assert np.abs(n).max() > 0
            np.testing.assert_allclose(t, n, rtol=1e-4, atol=1e-4 * np.abs(n).max())


def test_half_precision_accumulates_in_float32():
    rng = np.random.default_rng(3)
    coords, w, x, attrs = _case(rng, *CASES[1])
    y_ref = _reference(x, _dense_kernel(w.astype(np.float64), coords, 3, 2), attrs["strides"],
                       attrs["dilations"], attrs["padding"], None)[0]
    for dtype in (tf.float16, tf.bfloat16):
        y = blocksparse_conv2d(tf.cast(x, dtype), tf.cast(w, dtype), coords, **attrs)
        assert y.dtype == dtype
        tol = 1e-2 if dtype == tf.float16 else 4e-2
        _close(tf.cast(y, tf.float64), y_ref, rtol=tol)


def _results(x, w, dy, coords, attrs):
    return [blocksparse_conv2d(x, w, coords, **attrs).numpy(),
            blocksparse_conv2d_grad_input(x.shape, w, dy, coords, **attrs).numpy(),
            blocksparse_conv2d_grad_kernel(x, dy, coords, w.shape[1:3], **attrs).numpy()]


def test_bitwise_deterministic_whatever_the_thread_count(tmp_path):
    rng = np.random.default_rng(4)
    coords, w, x, attrs = _case(rng, 16, 4, 4, 2, 23, 21, (3, 3), (1, 1), (1, 1), "same")
    dy = rng.standard_normal((2, 23, 21, 64)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x, w=w, dy=dy, coords=coords)
    here = _results(x, w, dy, coords, attrs)
    for a, b in zip(here, _results(x, w, dy, coords, attrs)):
        np.testing.assert_array_equal(a, b)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from tests.test_conv_ops import _results
        d = np.load({str(tmp_path / "inputs.npz")!r})
        out = _results(d["x"], d["w"], d["dy"], d["coords"], {attrs!r})
        np.savez({str(tmp_path / "one_thread.npz")!r}, *out)
    """)
    subprocess.run([sys.executable, "-c", script], check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    single = np.load(tmp_path / "one_thread.npz")
    for i, a in enumerate(here):
        np.testing.assert_array_equal(single[f"arr_{i}"], a)


def _raw_attrs(**overrides):
    attrs = dict(block_size=8, C=16, K=16, strides=[1, 1], dilations=[1, 1],
                 padding=[1, 1, 1, 1])
    attrs.update(overrides)
    return attrs


X = np.ones((1, 5, 5, 16), np.float32)
W = np.ones((2, 3, 3, 8, 8), np.float32)
LAYOUT = np.array([[0, 0], [1, 1]], np.int32)
DY = np.ones((1, 5, 5, 16), np.float32)


@pytest.mark.parametrize("call,match", [
    (lambda: ops().blocksparse_conv2d(X, W, [[0, 0], [2, 1]], **_raw_attrs()), "outside"),
    (lambda: ops().blocksparse_conv2d(X, W, [[0, 0], [0, 0]], **_raw_attrs()), "twice"),
    (lambda: ops().blocksparse_conv2d(X, W[:1], LAYOUT, **_raw_attrs()), "w must have shape"),
    (lambda: ops().blocksparse_conv2d(X[..., :8], W, LAYOUT, **_raw_attrs()), "input must have"),
    (lambda: ops().blocksparse_conv2d(X[:, :1, :1], W, LAYOUT, **_raw_attrs(padding=[0] * 4)),
     "smaller than the dilated kernel"),
    (lambda: ops().blocksparse_conv2d(X, W, LAYOUT, **_raw_attrs(strides=[0, 1])), "strides"),
    (lambda: ops().blocksparse_conv2d(X, W, LAYOUT, **_raw_attrs(dilations=[1])), "dilations"),
    (lambda: ops().blocksparse_conv2d(X, W, LAYOUT, **_raw_attrs(padding=[1, -1, 0, 0])),
     "padding"),
    (lambda: ops().blocksparse_conv2d(X, W, LAYOUT, **_raw_attrs(block_size=12)), "block_size"),
    (lambda: ops().blocksparse_conv2d_grad_input([1, 5, 5, 16], W, DY[:, :4], LAYOUT,
                                                 **_raw_attrs()), "dy must have"),
    (lambda: ops().blocksparse_conv2d_grad_input([1, 5, -5, 16], W, DY, LAYOUT, **_raw_attrs()),
     "input_sizes"),
    (lambda: ops().blocksparse_conv2d_grad_input([1, 5, 5], W, DY, LAYOUT, **_raw_attrs()),
     "input_sizes|rank"),
    (lambda: ops().blocksparse_conv2d_grad_kernel(X, DY[..., :8], LAYOUT, kernel_size=[3, 3],
                                                  **_raw_attrs()), "dy must have|16"),
    (lambda: ops().blocksparse_conv2d_grad_kernel(X, DY, LAYOUT, kernel_size=[0, 3],
                                                  **_raw_attrs()), "kernel_size"),
])
def test_kernel_rejects_bad_inputs(call, match):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=match):
        call()


def test_kernel_checks_run_time_shapes():
    """Checks that the shape functions cannot make (unknown shapes) run in the kernels."""
    fn = tf.function(lambda x, w, layout: ops().blocksparse_conv2d(x, w, layout, **_raw_attrs()),
                     input_signature=[tf.TensorSpec(None, tf.float32)] * 2 +
                     [tf.TensorSpec(None, tf.int32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="w must have shape"):
        fn(X, W[:, :, :, :4], LAYOUT)
    with pytest.raises(tf.errors.InvalidArgumentError, match="layout must have shape"):
        fn(X, W, LAYOUT[:, :1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="input must have"):
        fn(X[0], W, LAYOUT)


@pytest.mark.parametrize("call,match", [
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 16, 16, strides=(1, 0)), "strides"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 16, 16, padding=(1, 1)), "padding"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 20, 16), "multiple of block_size"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 12, 24, 24), "block_size"),
    (lambda: blocksparse_conv2d(X.astype(np.float64), W, LAYOUT, 8, 16, 16), "float32"),
    (lambda: blocksparse_conv2d(X, W.astype(np.float16), LAYOUT, 8, 16, 16), "dtype"),
    (lambda: blocksparse_conv2d(X[0], W, LAYOUT, 8, 16, 16), r"shape \(batch"),
    (lambda: blocksparse_conv2d(X, W[0], LAYOUT, 8, 16, 16), "w must have shape"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT[:, :1], 8, 16, 16), "layout must have shape"),
    (lambda: blocksparse_conv2d_grad_kernel(X, DY, LAYOUT, (3,), 8, 16, 16), "kernel_size"),
    (lambda: blocksparse_conv2d_grad_kernel(X, DY.astype(np.float16), LAYOUT, (3, 3), 8, 16, 16),
     "dtype"),
    (lambda: conv_padding(5, 3, 1, 1, "causal"), "padding"),
])
def test_python_wrappers_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
