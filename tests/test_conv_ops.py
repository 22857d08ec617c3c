"""The block-sparse convolution ops (blocksparse_tf.conv) against float64 numpy references:
forward, input and kernel gradients, their own gradients, determinism, and bad inputs."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf._ops import ops
from blocksparse_tf.conv import (blocksparse_conv2d, blocksparse_conv2d_grad_input,
                                 blocksparse_conv2d_grad_kernel, conv_padding)
from blocksparse_tf.layers.conv import conv_output_size

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
    atol = rtol * max(float(np.max(np.abs(reference), initial=0.0)), 1e-30)
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


def _case(rng, bs, CB, KB, N, H, W, kernel, strides, dilations, mode, density=0.5):
    """A layout with an empty block row and column, w, x and the op attributes; ``mode`` is
    "same", "valid" or explicit padding (top, bottom, left, right)."""
    coords = _layout(rng, CB, KB, density, empty_row=1, empty_col=KB - 2)
    kh, kw = kernel
    if isinstance(mode, str):
        padding = [*conv_padding(H, kh, strides[0], dilations[0], mode),
                   *conv_padding(W, kw, strides[1], dilations[1], mode)]
    else:
        padding = list(mode)
    w = rng.standard_normal((len(coords), kh, kw, bs, bs)).astype(np.float32)
    x = rng.standard_normal((N, H, W, CB * bs)).astype(np.float32)
    attrs = dict(block_size=bs, C=CB * bs, K=KB * bs, strides=strides, dilations=dilations,
                 padding=padding)
    return coords, w, x, attrs


def _check_against_reference(rng, coords, w, x, attrs):
    """The three ops and the registered gradients against the float64 reference."""
    bs = attrs["block_size"]
    CB, KB = attrs["C"] // bs, attrs["K"] // bs
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
    # A tensor's static shape as kernel_size (refused before as not two integers).
    dw_shape = blocksparse_conv2d_grad_kernel(x, dy, coords, tf.constant(w).shape[1:3], **attrs)
    assert np.array_equal(dw_shape.numpy(), dw.numpy())
    # The gradients registered for the op are the same ops.
    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        loss = tf.reduce_sum(blocksparse_conv2d(xt, wt, coords, **attrs) * dy)
    g_x, g_w = tape.gradient(loss, [xt, wt])
    np.testing.assert_array_equal(g_x, dx)
    np.testing.assert_array_equal(g_w, dw)


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_float64(case):
    rng = np.random.default_rng(0)
    _check_against_reference(rng, *_case(rng, *case))


# Enough stored blocks (>= 16) that the kernel gradient gives each task all the taps of a block
# rather than one tap; and the block sizes with micro-kernels of their own (1 and 64).
MANY_BLOCK_CASES = [
    # (bs, CB, KB, N, H, W, kernel, strides, dilations, padding mode, density)
    (8, 6, 5, 2, 9, 8, (3, 3), (1, 2), (1, 1), "same", 1.0),
    (16, 6, 6, 1, 7, 10, (2, 3), (2, 1), (2, 1), "same", 0.9),
    (1, 12, 10, 2, 7, 6, (3, 3), (1, 1), (1, 1), "same", 0.5),
    (1, 5, 7, 1, 8, 9, (3, 2), (2, 3), (1, 1), "valid", 0.9),
    (64, 3, 3, 1, 6, 5, (3, 3), (2, 1), (1, 1), "same", 1.0),
    (64, 2, 4, 2, 5, 7, (1, 3), (1, 1), (1, 2), "valid", 0.6),
]


@pytest.mark.parametrize("case", MANY_BLOCK_CASES)
def test_many_blocks_and_block_sizes_1_and_64_match_float64(case):
    rng = np.random.default_rng(10)
    coords, w, x, attrs = _case(rng, *case)
    assert case[0] in (1, 64) or len(coords) >= 16
    _check_against_reference(rng, coords, w, x, attrs)


EDGE_CASES = [
    # (bs, CB, KB, N, H, W, kernel, strides, dilations, padding)
    (8, 2, 3, 0, 5, 6, (3, 3), (1, 1), (1, 1), "same"),  # empty batch
    (8, 2, 3, 2, 0, 6, (3, 3), (1, 1), (1, 1), (2, 1, 1, 1)),  # no input rows, only padding
    (8, 3, 2, 1, 0, 0, (1, 1), (1, 1), (1, 1), (1, 0, 0, 2)),  # no input pixels at all
    (8, 2, 3, 2, 4, 5, (2, 2), (1, 1), (1, 1), (4, 3, 5, 2)),  # padding beyond the kernel
    (16, 2, 3, 1, 3, 6, (3, 2), (2, 3), (1, 2), (5, 6, 4, 4)),  # taps landing in padding only
    (8, 3, 2, 2, 6, 3, (1, 2), (2, 5), (1, 1), "same"),  # stride wider than the input
    (8, 3, 2, 1, 7, 3, (3, 2), (1, 4), (1, 1), "valid"),  # likewise, VALID
]


@pytest.mark.parametrize("case", EDGE_CASES)
def test_empty_and_odd_shapes_match_float64(case):
    rng = np.random.default_rng(11)
    _check_against_reference(rng, *_case(rng, *case))


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


@pytest.mark.parametrize("width,stride", [(2**20, 2**20), (2**20 + 3, 1000), (9, 4)])
def test_input_gradient_of_long_horizontal_strides(width, stride):
    """1 x 1 taps strided far along the rows: dx holds each output pixel's sum at its input
    column and zeros between.  Its pixels are ordered by column residue mod the stride in
    time proportional to the pixels (a walk over the residues for each pixel: 8.1 s at 65,536
    columns, about half an hour estimated for the first case)."""
    rng = np.random.default_rng(11)
    bs = 8
    coords = np.array([[0, 0]], np.int32)
    w = rng.standard_normal((1, 1, 1, bs, bs)).astype(np.float32)
    out_width = (width - 1) // stride + 1
    dy = rng.standard_normal((1, 2, out_width, bs)).astype(np.float32)
    dx = blocksparse_conv2d_grad_input((1, 2, width, bs), w, dy, coords, block_size=bs, C=bs,
                                       K=bs, strides=(1, stride)).numpy()
    expected = np.zeros((1, 2, width, bs))
    expected[:, :, ::stride] = dy.astype(np.float64) @ w[0, 0, 0].astype(np.float64).T
    _close(dx, expected)
    assert not np.any(np.delete(dx, np.s_[::stride], axis=2))


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


def test_gradients_with_kernel_shape_unknown_while_tracing():
    """The gradients read the kernel size at run time, so they work when w's shape is unknown
    while tracing (the first and second derivatives alike), and keep it when it is known."""
    rng = np.random.default_rng(5)
    coords, w, x, attrs = _case(rng, *SMALL)
    dy = rng.standard_normal(blocksparse_conv2d(x, w, coords, **attrs).shape).astype(np.float32)
    expected = _results(x, w, dy, coords, attrs)

    def grads(a, b, c):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([a, b, c])
            y = blocksparse_conv2d(a, b, coords, **attrs)
            dx = blocksparse_conv2d_grad_input(tf.shape(a), b, c, coords, **attrs)
        # d/dw of <conv(x, w), dy> is dw; d/dw of <grad_input(w, dy), x> is dw again.
        return (tape.gradient(y, [a, b], output_gradients=c) +
                [tape.gradient(dx, b, output_gradients=a)])

    for spec in (tf.TensorSpec(None, tf.float32),
                 tf.TensorSpec([None, *w.shape[1:3], None, None], tf.float32),
                 tf.TensorSpec(w.shape, tf.float32)):
        traced = tf.function(grads, input_signature=[tf.TensorSpec(None, tf.float32), spec,
                                                     tf.TensorSpec(None, tf.float32)])
        g_x, g_w, g_w2 = traced.get_concrete_function().structured_outputs
        # dw's static shape has the kernel size wherever w's spec gives it.
        kernel = spec.shape[1:3].as_list() if spec.shape.rank else [None, None]
        assert g_w.shape.as_list()[1:] == g_w2.shape.as_list()[1:] == [*kernel, 8, 8]
        for actual, reference in zip(traced(x, w, dy), expected[1:] + expected[2:]):
            np.testing.assert_array_equal(actual, reference)


def _results(x, w, dy, coords, attrs):
    """y, dx and dw of the three ops, as numpy arrays."""
    kernel_size = tuple(int(d) for d in w.shape[1:3])
    return [blocksparse_conv2d(x, w, coords, **attrs).numpy(),
            blocksparse_conv2d_grad_input(tuple(x.shape), w, dy, coords, **attrs).numpy(),
            blocksparse_conv2d_grad_kernel(x, dy, coords, kernel_size, **attrs).numpy()]


def _forward_summed_in(np_dtype, x, w, coords, attrs):
    """The forward convolution summed term by term in np_dtype, each partial sum rounded to it:
    what accumulating in half precision would give.  x and w are exact in np_dtype, so their
    products are exact in float32."""
    bs = attrs["block_size"]
    dense = _dense_kernel(w.astype(np.float64), coords, attrs["C"] // bs, attrs["K"] // bs)
    (sh, sw), (dh, dw), (pt, pb, pl, pr) = attrs["strides"], attrs["dilations"], attrs["padding"]
    xp = np.pad(x.astype(np.float32), [(0, 0), (pt, pb), (pl, pr), (0, 0)])
    kh, kw, C, K = dense.shape
    Ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    Wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    total = np.zeros((x.shape[0], Ho, Wo, K), np_dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + (Ho - 1) * sh + 1, sh)
            window = xp[:, rows, j * dw:j * dw + (Wo - 1) * sw + 1:sw]
            for c in range(C):
                term = window[..., c:c + 1] * dense[i, j, c].astype(np.float32)
                total = (total.astype(np.float32) + term).astype(np_dtype)
    return total


def _within_one_ulp(actual, expected, np_dtype):
    expected = np.asarray(expected).astype(np_dtype)
    ulp = np.spacing(np.abs(expected)).astype(np.float64)
    return np.all(np.abs(np.asarray(actual, np.float64) - expected.astype(np.float64)) <= ulp)


def test_half_precision_accumulates_in_float32():
    """float16 and bfloat16 results are the float32 sums of the same (exactly converted) inputs
    rounded once: within one unit in the last place, which sums kept in half precision miss."""
    rng = np.random.default_rng(3)
    coords, w, x, attrs = _case(rng, *CASES[1])
    dy_shape = blocksparse_conv2d(x, w, coords, **attrs).shape
    dy = rng.standard_normal(dy_shape).astype(np.float32)
    for dtype in (tf.float16, tf.bfloat16):
        np_dtype = dtype.as_numpy_dtype
        # Inputs representable in the dtype, so the float32 ops see exactly the same values.
        xh, wh, dyh = (a.astype(np_dtype) for a in (x, w, dy))
        expected = _results(*(a.astype(np.float32) for a in (xh, wh, dyh)), coords, attrs)
        actual = _results(tf.constant(xh), tf.constant(wh), tf.constant(dyh), coords, attrs)
        for a, e in zip(actual, expected):
            assert a.dtype == np_dtype
            assert _within_one_ulp(a, e, np_dtype)
        # The check is tight enough to tell half-precision sums apart.
        assert not _within_one_ulp(_forward_summed_in(np_dtype, xh, wh, coords, attrs),
                                   expected[0], np_dtype)


DETERMINISM_SCRIPT = r"""
import hashlib, sys, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from blocksparse_tf.conv import blocksparse_conv2d
from tests.test_conv_ops import _case, _results
rng = np.random.default_rng(4)
# Few blocks (the kernel gradient splits by tap) and many (it does not); stride 2 orders the
# input gradient's pixels by column residue.
for case in [(16, 4, 4, 2, 23, 21, (3, 3), (1, 1), (1, 1), "same", 0.5),
             (8, 6, 6, 2, 17, 19, (3, 3), (2, 2), (1, 1), "same", 1.0)]:
    coords, w, x, attrs = _case(rng, *case)
    dy = rng.standard_normal(blocksparse_conv2d(x, w, coords, **attrs).shape)
    dy = dy.astype(np.float32)
    h = hashlib.sha256()
    for a in _results(x, w, dy, coords, attrs):
        h.update(a.tobytes())
    print(h.hexdigest())
"""


def test_bitwise_deterministic_whatever_the_thread_count(outputs_across_thread_counts):
    outputs = outputs_across_thread_counts(DETERMINISM_SCRIPT)
    assert outputs[0].count("\n") == 2
    assert len(outputs) >= 2 and all(out == outputs[0] for out in outputs)


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
     r"the input height 1 padded by 0 \+ 0 is smaller than the dilated kernel height "
     r"\(3 taps, dilation 1\)"),
    (lambda: ops().blocksparse_conv2d(X, W, LAYOUT, **_raw_attrs(strides=[0, 1])),
     r"strides must be 2 integers in \[1, 2147483647\] \(height, width\); got \[0, 1\]"),
    (lambda: ops().blocksparse_conv2d(X, W, LAYOUT, **_raw_attrs(dilations=[1])),
     r"dilations must be 2 integers in \[1, 2147483647\] \(height, width\); got \[1\]"),
    (lambda: ops().blocksparse_conv2d(X, W, LAYOUT, **_raw_attrs(padding=[1, -1, 0, 0])),
     r"padding must be 4 integers in \[0, 2147483647\] \(top, bottom, left, right\); "
     r"got \[1, -1, 0, 0\]"),
    (lambda: ops().blocksparse_conv2d(X, W, LAYOUT, **_raw_attrs(block_size=12)), "block_size"),
    (lambda: ops().blocksparse_conv2d_grad_input([1, 5, 5, 16], W, DY[:, :4], LAYOUT,
                                                 **_raw_attrs()),
     r"dy must have the output shape \[1,5,5,16\]; got \[1,4,5,16\]"),
    (lambda: ops().blocksparse_conv2d_grad_input([1, 5, -5, 16], W, DY, LAYOUT, **_raw_attrs()),
     r"input_sizes \[1, 5, -5, 16\] is not a valid shape"),
    (lambda: ops().blocksparse_conv2d_grad_input([1, 5, 5], W, DY, LAYOUT, **_raw_attrs()),
     r"input_sizes must be a vector of 4 integers \(batch, height, width, channels\); "
     r"got shape \[3\]"),
    (lambda: ops().blocksparse_conv2d_grad_kernel(X, DY[..., :8], LAYOUT, [3, 3],
                                                  **_raw_attrs()),
     # The channels are checked before the layout's tables are built.
     r"dy must have shape \(batch, height, width, 16\); got \[1,5,5,8\]"),
    (lambda: ops().blocksparse_conv2d_grad_kernel(X, DY, LAYOUT, [0, 3], **_raw_attrs()),
     r"kernel_size must be 2 positive integers; got \[0, 3\]"),
    (lambda: ops().blocksparse_conv2d_grad_kernel(X, DY, LAYOUT, [3, 3, 1], **_raw_attrs()),
     r"kernel_size must be a vector of 2 integers \(height, width\); got shape \[3\]"),
])
def test_kernel_rejects_bad_inputs(call, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        call()


X8 = np.ones((1, 5, 5, 8), np.float32)
W8 = np.ones((1, 3, 3, 8, 8), np.float32)
ATTRS8 = dict(block_size=8, C=8, K=8)
# Sizes whose products or sums overflow int64: TensorShape's constructor used to abort the
# process on some of them.  Each must raise InvalidArgumentError naming the sizes instead.
OVERSIZED = {
    "input_sizes": (
        lambda: ops().blocksparse_conv2d_grad_input([2**31 - 1] * 4, W8, X8, [[0, 0]], **ATTRS8),
        r"input_sizes \[2147483647, 2147483647, 2147483647, 2147483647\] is not a valid shape"),
    "padding_2_62": (
        lambda: ops().blocksparse_conv2d(X8, W8, [[0, 0]], padding=[2**62, 0, 0, 0], **ATTRS8),
        r"padding must be 4 integers in \[0, 2147483647\] \(top, bottom, left, right\); "
        r"got \[4611686018427387904, 0, 0, 0\]"),
    "padding_2_40": (
        lambda: ops().blocksparse_conv2d(X8, W8, [[0, 0]], padding=[2**40, 0, 2**40, 0],
                                         **ATTRS8),
        r"padding must be 4 integers in \[0, 2147483647\] .*; "
        r"got \[1099511627776, 0, 1099511627776, 0\]"),
    "strides": (
        lambda: ops().blocksparse_conv2d(X8, W8, [[0, 0]], strides=[1, 2**31], **ATTRS8),
        r"strides must be 2 integers in \[1, 2147483647\] .*; got \[1, 2147483648\]"),
    "dilations": (
        lambda: ops().blocksparse_conv2d(X8, W8, [[0, 0]], dilations=[2**62, 1], **ATTRS8),
        r"dilations must be 2 integers in \[1, 2147483647\] .*; got \[4611686018427387904, 1\]"),
    "output_shape": (
        lambda: ops().blocksparse_conv2d(X8, W8, [[0, 0]], padding=[2**31 - 1, 0, 2**31 - 1, 0],
                                         **ATTRS8),
        r"the output shape \[1, 2147483650, 2147483650, 8\] is not a valid shape"),
    "padded_height": (
        lambda: ops().blocksparse_conv2d(tf.zeros([0, 2**63 - 1, 5, 8]), W8, [[0, 0]],
                                         padding=[1, 1, 1, 1], **ATTRS8),
        r"the input height 9223372036854775807 padded by 1 \+ 1 or the dilated kernel height "
        r"\(3 taps, dilation 1\) overflows int64"),
    "grad_kernel_shape": (
        lambda: ops().blocksparse_conv2d_grad_kernel(
            tf.zeros([0, 2**31 - 1, 2**31 - 1, 64]), tf.zeros([0, 1, 1, 64]), [[0, 0]],
            [2**31 - 1, 2**31 - 1], block_size=64, C=64, K=64),
        r"dw's shape \(blocks, kh, kw, block_size, block_size\) "
        r"\[1, 2147483647, 2147483647, 64, 64\] is not a valid shape"),
}

# argv: checkout root, then the names of the OVERSIZED calls to make.
OVERSIZED_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import tensorflow as tf
from tests.test_conv_ops import OVERSIZED
for name in sys.argv[2:]:
    try:
        OVERSIZED[name][0]()
        message = "no error"
    except tf.errors.InvalidArgumentError as e:
        message = e.message.replace("\n", " ")
    print(name + "\t" + message, flush=True)
"""


@pytest.fixture(scope="module")
def oversized_errors():
    """The error message of every OVERSIZED call, made in fresh processes so that an abort
    fails these tests instead of ending pytest; a process that dies is restarted after the
    call that killed it, whose message is then the end of its standard error."""
    names, messages = list(OVERSIZED), {}
    while len(messages) < len(names):
        result = subprocess.run([sys.executable, "-c", OVERSIZED_SCRIPT, ROOT,
                                 *names[len(messages):]], capture_output=True, text=True,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        messages.update(line.split("\t", 1) for line in result.stdout.splitlines()
                        if "\t" in line)
        if result.returncode == 0:
            break
        messages[names[len(messages)]] = (f"the process ended with status {result.returncode}: "
                                          f"{result.stderr[-2000:]}")
    return messages


@pytest.mark.parametrize("name", list(OVERSIZED))
def test_oversized_sizes_raise_instead_of_aborting(oversized_errors, name):
    message = oversized_errors.get(name, "not run")
    assert re.search(OVERSIZED[name][1], message), message


def test_shape_function_rejects_overflowing_sizes():
    fn = tf.function(lambda x: ops().blocksparse_conv2d(x, W8, [[0, 0]], padding=[1, 1, 1, 1],
                                                        **ATTRS8),
                     input_signature=[tf.TensorSpec([None, 2**63 - 1, None, 8])])
    with pytest.raises(ValueError, match=r"the input height 9223372036854775807 padded by 1 \+ 1 "
                                         r"or the dilated kernel height .* overflows int64"):
        fn.get_concrete_function()


@pytest.mark.parametrize("which, x_or_sizes, dy, kernel", [
    ("input", [1, 5, 5, 16], (2, 5, 5, 16), None),  # another batch
    ("input", [1, 5, 5, 16], (1, 4, 5, 16), None),  # not the output height
    ("input", [1, 1, 1, 16], (1, 1, 1, 16), None),  # a 5x5 kernel in a padded 3x3 image
    ("kernel", (1, 5, 5, 16), (2, 5, 5, 16), (3, 3)),
    ("kernel", (1, 5, 5, 16), (1, 5, 4, 16), (3, 3)),  # not the output width
    ("kernel", (1, 5, 5, 16), (1, 5, 5, 16), (9, 9)),  # larger than the padded image
])
def test_gradient_shape_functions_check_dy_against_the_images(which, x_or_sizes, dy, kernel):
    """dy's shape must be the output shape the images, the kernel and the attributes give:
    refused when the graph is built, not only when it runs (nor given a static shape)."""
    attrs = _raw_attrs()
    if which == "input":
        w5 = np.ones((2, 5, 5, 8, 8), np.float32) if x_or_sizes[1] == 1 else W
        fn = tf.function(lambda d: ops().blocksparse_conv2d_grad_input(
            tf.constant(x_or_sizes), w5, d, LAYOUT, **attrs))
    else:
        fn = tf.function(lambda x, d: ops().blocksparse_conv2d_grad_kernel(
            x, d, LAYOUT, tf.constant(kernel), **attrs))
    with pytest.raises(ValueError, match="dy must have the output shape|smaller than"):
        if which == "input":
            fn.get_concrete_function(tf.TensorSpec(dy))
        else:
            fn.get_concrete_function(tf.TensorSpec(x_or_sizes), tf.TensorSpec(dy))


def test_gradient_shape_functions_keep_what_is_consistent():
    attrs = _raw_attrs()
    grad_input = tf.function(lambda d: ops().blocksparse_conv2d_grad_input(
        tf.constant([1, 5, 5, 16]), W, d, LAYOUT, **attrs))
    out = grad_input.get_concrete_function(tf.TensorSpec((None, 5, None, 16))).structured_outputs
    assert out.shape.as_list() == [1, 5, 5, 16]
    grad_kernel = tf.function(lambda x, d: ops().blocksparse_conv2d_grad_kernel(
        x, d, LAYOUT, tf.constant([3, 3]), **attrs))
    out = grad_kernel.get_concrete_function(tf.TensorSpec((None, 5, 5, 16)),
                                            tf.TensorSpec((2, None, 5, 16))).structured_outputs
    assert out.shape.as_list() == [2, 3, 3, 8, 8]
    with pytest.raises(ValueError, match="Dimensions must be equal|Dimension"):
        grad_kernel_bad_layout = tf.function(lambda x, d: ops().blocksparse_conv2d_grad_kernel(
            x, d, tf.zeros((2, 3), tf.int32), tf.constant([3, 3]), **attrs))
        grad_kernel_bad_layout.get_concrete_function(tf.TensorSpec(X.shape),
                                                     tf.TensorSpec(DY.shape))


def test_shape_functions_refuse_an_empty_kernel():
    """A w of kernel height or width 0 (which the kernels refuse when run) gave the shape
    functions an output larger than the image."""
    attrs = dict(block_size=8, C=16, K=16)
    layout = tf.TensorSpec([None, 2], tf.int32)
    message = r"w must have shape \(blocks, kh, kw, block_size, block_size\) with kh, kw >= 1"
    forward = tf.function(lambda x, w, l: ops().blocksparse_conv2d(x, w, l, **attrs))
    grad_input = tf.function(lambda w, d, l: ops().blocksparse_conv2d_grad_input(
        tf.constant([1, 4, 4, 16]), w, d, l, **attrs))
    for kernel in ([1, 0, 0, 8, 8], [1, 3, 0, 8, 8]):
        with pytest.raises(ValueError, match=message):
            forward.get_concrete_function(tf.TensorSpec([1, 4, 4, 16]), tf.TensorSpec(kernel),
                                          layout)
        with pytest.raises(ValueError, match=message):
            grad_input.get_concrete_function(tf.TensorSpec(kernel), tf.TensorSpec([1, 5, 5, 16]),
                                             layout)
    assert forward.get_concrete_function(tf.TensorSpec([1, 4, 4, 16]),
                                         tf.TensorSpec([1, 3, 3, 8, 8]),
                                         layout).structured_outputs.shape == (1, 2, 2, 16)


def test_conv_padding_and_output_size_check_their_arguments():
    """Either case of padding (as tf.nn.conv2d writes it); a stride of 0, a fractional or
    negative size refused (a ZeroDivisionError, a truncated size and a padding before)."""
    assert conv_padding(7, 4, 1, 1, "SAME") == conv_padding(7, 4, 1, 1, "same") == (1, 2)
    assert conv_padding(7, 4, 1, 1, "VALID") == (0, 0)
    assert conv_output_size(7, 3, 1, 1, "SAME") == 7 and conv_output_size(7, 3, 1, 1, "VALID") == 5
    for args, message in (((5, 3, 0, 1, "same"), "kernel, stride and dilation must be 3 integers"),
                          ((5, 0, 1, 1, "valid"), "kernel, stride and dilation must be 3 integers"),
                          ((5.7, 3, 2, 1, "same"), "size must be an integer >= 0"),
                          ((-5, 3, 2, 1, "same"), "size must be an integer >= 0"),
                          ((tf.constant(5.0), 3, 2, 1, "same"), "size must be an integer tensor"),
                          ((5, 3, 1, 1, "full"), "padding must be 'same' or 'valid'")):
        with pytest.raises(ValueError, match=message):
            conv_padding(*args)
    with pytest.raises(ValueError, match="padding must be 'same' or 'valid'"):
        conv_output_size(7, 3, 1, 1, "causal")


def test_conv_padding_of_numpy_and_wide_sizes():
    """Numpy integers give ints (tensors before, which the ops' padding refused), and sizes near
    2^31 do not wrap (int32 tensors are summed in int64)."""
    assert conv_padding(np.int64(5), 3, 2, 1, "same") == (1, 1)
    assert all(type(v) is int for v in conv_padding(np.int32(7), 4, 1, 2, "same"))
    assert conv_padding(np.int32(2**31 - 2), 3, 3, 1, "same") == (0, 0)
    wide = conv_padding(tf.constant(2**31 - 2), 3, 3, 1, "same")
    assert [int(v) for v in wide] == [0, 0] and wide[0].dtype == tf.int32
    for size in range(1, 12):  # against tf.nn.conv2d's SAME output size
        for kernel, stride, dilation in [(3, 1, 1), (3, 2, 1), (4, 3, 1), (3, 2, 2)]:
            before, after = conv_padding(size, kernel, stride, dilation, "same")
            effective = (kernel - 1) * dilation + 1
            assert (size + before + after - effective) // stride + 1 == -(-size // stride)
            assert after - before in (0, 1)


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
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 16, 16, strides=(2**31, 1)),
     r"strides must be 2 integers in \[1, 2147483647\]; got \[2147483648, 1\]"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 16, 16, dilations=(1, 2**40)),
     r"dilations must be 2 integers in \[1, 2147483647\]; got \[1, 1099511627776\]"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 16, 16, padding=(0, 2**62, 0, 0)),
     r"padding \(top, bottom, left, right\) must be 4 integers in \[0, 2147483647\]; "
     r"got \[0, 4611686018427387904, 0, 0\]"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 16, 16, padding=(0, -1, 0, 0)),
     r"padding \(top, bottom, left, right\) must be 4 integers in \[0, 2147483647\]"),
    (lambda: blocksparse_conv2d_grad_kernel(X, DY, LAYOUT, (3,), 8, 16, 16), "kernel_size"),
    (lambda: blocksparse_conv2d_grad_kernel(X, DY, LAYOUT, (3, 2**31), 8, 16, 16),
     r"kernel_size must be 2 integers in \[1, 2147483647\]; got \[3, 2147483648\]"),
    (lambda: blocksparse_conv2d_grad_kernel(X, DY, LAYOUT, tf.constant([3.0, 3.0]), 8, 16, 16),
     "kernel_size must be a vector of 2 integers"),
    (lambda: blocksparse_conv2d_grad_kernel(X, DY.astype(np.float16), LAYOUT, (3, 3), 8, 16, 16),
     "dtype"),
    (lambda: conv_padding(5, 3, 1, 1, "causal"), "padding"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT.astype(np.float32) + 0.5, 8, 16, 16),
     "layout coordinates must be integers"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, True, 16, 16), "block_size"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, True, 16), "C must be a positive multiple"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 16, 16.0), "K must be a positive multiple"),
    # What was passed is named, not None: an int or a string where a list belongs.
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 16, 16, strides=2),
     r"strides must be 2 integers in \[1, 2147483647\]; got 2$"),
    (lambda: blocksparse_conv2d(X, W, LAYOUT, 8, 16, 16, padding="SAME"),
     r"padding \(top, bottom, left, right\) must be 4 integers .*; got 'SAME'$"),
    (lambda: blocksparse_conv2d_grad_input(np.array([1, 2**32 + 6, 6, 16]), W, DY, LAYOUT, 8, 16,
                                           16), "input_sizes must fit in int32"),
])
def test_python_wrappers_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_tensors_past_int32_raise_when_run():
    """A height of 2**32 + 6 given as an int64 tensor is not taken for 6."""
    with pytest.raises(tf.errors.InvalidArgumentError, match="input_sizes must fit in int32"):
        blocksparse_conv2d_grad_input(tf.constant([1, 2**32 + 6, 6, 16], tf.int64), W, DY, LAYOUT,
                                      8, 16, 16)
    with pytest.raises(tf.errors.InvalidArgumentError, match="kernel_size must fit in int32"):
        blocksparse_conv2d_grad_kernel(X, DY, LAYOUT, tf.constant([3, 2**32 + 3], tf.int64), 8,
                                       16, 16)
