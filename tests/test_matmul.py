"""BlocksparseMatMul against independent float64 numpy references."""

import ctypes
import functools
import gc
import json
import os

import numpy as np
import pytest
import scipy.sparse
import tensorflow as tf

from blocksparse_tf import BlocksparseMatMul
from blocksparse_tf.matmul import blocksparse_matmul, blocksparse_matmul_grad_w
from tests.half_precision import (amx_serves, matmul_summed_in, product_and_bound_inputs,
                                  within_float32_accumulation)

BLOCK_SIZES = (1, 8, 16, 32, 64)
RNG = np.random.default_rng(1234)


def rect_layout(CB=5, KB=3):
    """A rectangular layout with an empty block row and an empty block column."""
    layout = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 0, 1], [1, 0, 0]])[:CB, :KB]
    return layout


def dense_reference(layout, bs, w):
    """float64 dense W built independently of the class under test."""
    CB, KB = layout.shape
    W = np.zeros((CB * bs, KB * bs))
    for b, (c, k) in enumerate(np.argwhere(layout)):  # row-major block order
        W[c * bs:(c + 1) * bs, k * bs:(k + 1) * bs] = w[b]
    return W


def rel_err(a, ref):
    return np.abs(np.asarray(a, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)


def products(bsmm, x, w, dy, gate=None):
    x, w, dy = tf.constant(x), tf.constant(w), tf.constant(dy)
    watched = [x, w] + ([tf.constant(gate)] if gate is not None else [])
    with tf.GradientTape() as tape:
        tape.watch(watched)
        y = bsmm(x, w, gate=watched[2] if gate is not None else None)
    grads = tape.gradient(y, watched, output_gradients=dy)
    return [y.numpy()] + [g.numpy() for g in grads]


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("feature_axis", [1, 0])
@pytest.mark.parametrize("N", [1, 7, 33])
def test_forward_and_gradients_match_float64(bs, feature_axis, N):
    layout = rect_layout()
    bsmm = BlocksparseMatMul(layout, block_size=bs, feature_axis=feature_axis)
    x = RNG.standard_normal(bsmm.i_shape(N)).astype(np.float32)
    w = RNG.standard_normal(bsmm.w_shape).astype(np.float32)
    dy = RNG.standard_normal(bsmm.o_shape(N)).astype(np.float32)
    gate = RNG.uniform(0.5, 1.5, bsmm.blocks).astype(np.float32)
    W = dense_reference(layout, bs, w.astype(np.float64))
    Wg = dense_reference(layout, bs, w.astype(np.float64) * gate[:, None, None])
    rows = lambda a: a.astype(np.float64) if feature_axis == 1 else a.astype(np.float64).T
    y, dx, dw, dgate = products(bsmm, x, w, dy, gate)
    y_ref = rows(x) @ Wg
    dx_ref = rows(dy) @ Wg.T
    dW_dense = rows(x).T @ rows(dy)
    dw_ref = bsmm.from_dense(dW_dense) * gate[:, None, None]
    dgate_ref = np.einsum("bij,bij->b", bsmm.from_dense(dW_dense), w.astype(np.float64))
    assert y.shape == bsmm.o_shape(N) and dx.shape == bsmm.i_shape(N)
    assert rel_err(y, rows(y_ref)) < 1e-5
    assert rel_err(dx, rows(dx_ref)) < 1e-5
    assert rel_err(dw, dw_ref) < 1e-5
    assert rel_err(dgate, dgate_ref) < 1e-5
    # Columns of y under the empty block column are exactly zero; so are dx's under the empty row.
    y_rows, dx_rows = rows(y), rows(dx)
    assert np.all(y_rows[:, bs:2 * bs] == 0) and np.all(dx_rows[:, bs:2 * bs] == 0)
    # Without a gate, the plain product.
    y0, dx0, dw0 = products(bsmm, x, w, dy)
    assert rel_err(y0, rows(rows(x) @ W)) < 1e-5
    assert rel_err(dw0, bsmm.from_dense(dW_dense)) < 1e-5


@pytest.mark.parametrize("bs", [8, 16, 32, 64])
@pytest.mark.parametrize("N", [96, 97, 250])
@pytest.mark.parametrize("density", [0.4, 0.01])
def test_forward_over_many_row_groups_and_column_ranges(bs, N, density):
    """Batches that the CPU forward splits into several row groups (last register tile
    partial) times several ranges of output block columns; below 2% density 8-wide blocks take
    the in-place path, at 40% the transposed one, as do blocks one vector wide (16 under
    AVX-512, 8 under AVX2), which run in place at 1%."""
    layout = RNG.random((24, 40)) < density
    layout[0, :4] = 1  # never empty
    layout[3, :] = 0  # an empty block row
    layout[:, 5] = 0  # an empty block column
    bsmm = BlocksparseMatMul(layout, block_size=bs)
    x = RNG.standard_normal((N, bsmm.C)).astype(np.float32)
    w = RNG.standard_normal(bsmm.w_shape).astype(np.float32)
    dy = RNG.standard_normal((N, bsmm.K)).astype(np.float32)
    W = dense_reference(layout, bs, w.astype(np.float64))
    y, dx, _ = products(bsmm, x, w, dy)
    assert rel_err(y, x.astype(np.float64) @ W) < 1e-5
    assert rel_err(dx, dy.astype(np.float64) @ W.T) < 1e-5
    assert np.all(y[:, 5 * bs:6 * bs] == 0)


def transposed_product(layout, bs, N, feature_axis=1):
    """y = x . W^T from the raw op with transpose_w, and its float64 reference."""
    bsmm = BlocksparseMatMul(layout, block_size=bs, feature_axis=feature_axis)
    x = RNG.standard_normal((N, bsmm.K))
    w = RNG.standard_normal(bsmm.w_shape)
    x_in = x if feature_axis == 1 else x.T
    y = blocksparse_matmul(tf.constant(x_in, tf.float32), tf.constant(w, tf.float32),
                           tf.constant(bsmm.coords), bs, bsmm.C, bsmm.K, feature_axis,
                           transpose_w=True)
    ref = x.astype(np.float32).astype(np.float64) @ dense_reference(
        layout, bs, w.astype(np.float32).astype(np.float64)).T
    return y.numpy(), ref if feature_axis == 1 else ref.T


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("feature_axis", [1, 0])
@pytest.mark.parametrize("N,density", [(7, 0.4), (64, 0.01), (250, 0.4), (130, 1.0), (300, 1.0)])
def test_transposed_product_reads_w_as_stored(bs, feature_axis, N, density):
    """transpose_w on every path of the CPU forward: one row group (each task transposes its
    column range), several (a shared transposed copy), 8-wide blocks in place (below 2%) and on
    transposed operands, full layouts repacked into wider blocks (N = 300), and feature_axis 0
    with x read in place (N <= 96) or in slabs."""
    CB, KB = (24, 16) if bs > 1 else (70, 45)
    layout = RNG.random((CB, KB)) < density
    layout[0, 1] = 1
    if density < 1:
        layout[2, :] = 0  # an empty block row: columns of y that must be exactly zero
    y, ref = transposed_product(layout, bs, N, feature_axis)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-5
    if density < 1:
        y_rows = y if feature_axis == 1 else y.T
        assert np.all(y_rows[:, 2 * bs:3 * bs] == 0)


def test_transposed_product_of_columns_wider_than_a_thread_buffer():
    """A column of more than 2 MiB of 64-wide blocks: one row group, yet a shared copy."""
    layout = np.ones((130, 2), bool)
    y, ref = transposed_product(layout, 64, 5)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
@pytest.mark.parametrize("feature_axis", [1, 0])
def test_transposed_product_accumulates_in_float32(dtype, feature_axis):
    """y = x . W^T in float16 / bfloat16: float32 sums rounded once (tests/half_precision.py)."""
    layout, bs, N = rect_layout(), 16, 9
    bsmm = BlocksparseMatMul(layout, block_size=bs, feature_axis=feature_axis)
    np_dtype = dtype.as_numpy_dtype
    x = RNG.standard_normal((N, bsmm.K)).astype(np_dtype)
    w = RNG.standard_normal(bsmm.w_shape).astype(np_dtype)
    y = blocksparse_matmul(tf.constant(x if feature_axis == 1 else x.T), tf.constant(w),
                           tf.constant(bsmm.coords), bs, bsmm.C, bsmm.K, feature_axis,
                           transpose_w=True).numpy()
    assert y.dtype == np_dtype
    WT = dense_reference(layout, bs, w.astype(np.float64)).T
    exact, abs_sum = product_and_bound_inputs(x.astype(np.float64), WT)
    assert within_float32_accumulation(y if feature_axis == 1 else y.T, exact, abs_sum, bsmm.K,
                                       np_dtype)


def test_gradients_of_the_transposed_product():
    """The op with transpose_w has gradients of its own (dx = dy . W, dW = dy^T x), checked
    by finite differences; y = x . W^T is checked against the reference on the way."""
    layout = rect_layout()
    bsmm = BlocksparseMatMul(layout, block_size=8)
    x = tf.constant(RNG.standard_normal((4, bsmm.K)), tf.float64)
    w = tf.constant(RNG.standard_normal(bsmm.w_shape), tf.float64)
    coords = tf.constant(bsmm.coords)

    def product(a, b):
        # float64 in, through the float32 op
        y = blocksparse_matmul(tf.cast(a, tf.float32), tf.cast(b, tf.float32), coords, 8,
                               bsmm.C, bsmm.K, transpose_w=True)
        return tf.cast(y, tf.float64)

    W = dense_reference(layout, 8, w.numpy())
    assert rel_err(product(x, w), x.numpy() @ W.T) < 1e-5
    theoretical, numerical = tf.test.compute_gradient(product, [x, w], delta=1e-3)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-3, atol=1e-3)
        assert np.abs(t).max() > 0.1


def test_forward_with_rows_wider_than_a_row_group():
    """x rows of 2^15 + 64 features: a row group is then a single register tile (its rows
    alone about fill the group's L2 budget)."""
    bs = 64
    layout = np.zeros((513, 3), bool)
    layout[RNG.choice(513, 60, replace=False), RNG.integers(0, 3, 60)] = True
    layout[-1, 2] = True
    bsmm = BlocksparseMatMul(layout, block_size=bs)
    x = RNG.standard_normal((29, bsmm.C)).astype(np.float32)
    w = RNG.standard_normal(bsmm.w_shape).astype(np.float32)
    y = bsmm(tf.constant(x), tf.constant(w)).numpy()
    assert rel_err(y, x.astype(np.float64) @ dense_reference(layout, bs, w.astype(np.float64))) < 1e-5


@pytest.mark.parametrize("CB,KB", [(16, 24), (12, 20), (6, 10)])  # run as bs 32, 32, 16
@pytest.mark.parametrize("feature_axis", [1, 0])
def test_full_layouts_of_8_wide_blocks_over_many_rows(CB, KB, feature_axis):
    """Full layouts of 8-wide blocks with N >= 256 run on 32-wide blocks where 32 divides C and
    K (64 too, for the first layout), else on 16-wide ones (w repacked; the weight gradient
    computed in the wide blocks and copied back)."""
    N = 263
    bsmm = check_products(np.ones((CB, KB)), 8, feature_axis, N)
    # The kernels' choice, for full layouts over at least 256 rows only.
    wide = 32 if bsmm.C % 32 == 0 and bsmm.K % 32 == 0 else 16
    assert product_block_size(CB, KB, 8, CB * KB, N) == wide == {16: 32, 12: 32, 6: 16}[CB]
    assert product_block_size(CB, KB, 8, CB * KB, 1031) == wide
    assert product_block_size(CB, KB, 8, CB * KB, 255) == 8
    assert product_block_size(CB, KB, 8, CB * KB - 1, N) == 8


@pytest.mark.parametrize("CB,KB", [(8, 12), (6, 10), (3, 5)])  # bs 32 (64 dividing too), 32, 16
@pytest.mark.parametrize("feature_axis", [1, 0])
def test_full_layouts_of_16_wide_blocks_over_many_rows(CB, KB, feature_axis):
    """Full layouts of 16-wide blocks with N >= 1024 run on 32-wide blocks where 32 divides C
    and K and AVX-512 runs at full width (not on Zen 4, nor with 8-float vectors); the results
    are right either way."""
    N = 1031
    bsmm = check_products(np.ones((CB, KB)), 16, feature_axis, N)
    wide = 32 if bsmm.C % 32 == 0 and bsmm.K % 32 == 0 else 16
    expected = wide if coarsens_bs16() else 16
    assert product_block_size(CB, KB, 16, CB * KB, N) == expected
    assert product_block_size(CB, KB, 16, CB * KB, 1023) == 16
    assert product_block_size(CB, KB, 16, CB * KB - 1, N) == 16


@pytest.mark.parametrize("bs,feature_axis", [(32, 0), (8, 0), (8, 1), (1, 1)])
@pytest.mark.parametrize("N", [256, 512])
def test_batches_of_a_multiple_of_256_rows(bs, feature_axis, N):
    """With feature_axis=0 (and on the transposed copies that bs 1 and most bs-8 layouts take
    with feature_axis=1), x's rows are read with a stride that is not a multiple of 1 KiB:
    N = 256 and 512 take that copy, with empty block rows and columns in the layout."""
    layout = RNG.random((12, 10)) < 0.4
    layout[3, :] = False
    layout[:, 4] = False
    layout[0, 0] = True
    check_products(layout, bs, feature_axis, N)


@pytest.mark.parametrize("bs,N", [(8, 1025), (8, 64), (1, 1025), (1, 83)])
@pytest.mark.parametrize("feature_axis", [1, 0])
def test_weight_gradient_over_many_block_columns(bs, N, feature_axis):
    """The weight gradient of bs 1 and 8 runs its blocks in groups of block columns whose dy
    panels fill about 2 MiB, block row by block row within a group, with panels packed several
    at a time (bs 8 with feature_axis 1: all first, row by row); bs 8 reads rows in interleaved pairs (an odd N's last with zeros), bs 1 sums
    vectors along N (N = 1025 and 83: whole and partial steps of four vectors, then one float at
    a time).  Layouts of one group and of several, with empty block rows and columns."""
    CB, KB, density = {8: (20, 70, 0.3), 1: (3000, 600, 0.001)}[bs]
    layout = RNG.random((CB, KB)) < density
    layout[:, 7] = False
    layout[5, :] = False
    layout[0, 0] = True
    check_products(layout, bs, feature_axis, N)
    if bs == 1:
        check_products(RNG.random((50, 600)) < 0.05, 1, feature_axis, N)


def check_products(layout, bs, feature_axis, N):
    """Forward, dx and dW of a layout over N rows against float64; returns the op."""
    bsmm = BlocksparseMatMul(layout, block_size=bs, feature_axis=feature_axis)
    x = RNG.standard_normal(bsmm.i_shape(N)).astype(np.float32)
    w = RNG.standard_normal(bsmm.w_shape).astype(np.float32)
    dy = RNG.standard_normal(bsmm.o_shape(N)).astype(np.float32)
    W = dense_reference(layout, bs, w.astype(np.float64))
    rows = lambda a: a.astype(np.float64) if feature_axis == 1 else a.astype(np.float64).T
    y, dx, dw = products(bsmm, x, w, dy)
    assert rel_err(y, rows(rows(x) @ W)) < 1e-5
    assert rel_err(dx, rows(rows(dy) @ W.T)) < 1e-5
    assert rel_err(dw, bsmm.from_dense(rows(x).T @ rows(dy))) < 1e-5
    return bsmm


def loaded_library():
    from blocksparse_tf import _ops
    _ops.ops()
    return ctypes.CDLL(_ops._path)


def product_block_size(CB, KB, bs, blocks, N):
    """The block size the CPU products of such a layout run with (the library's own rule)."""
    fn = loaded_library().blocksparse_tf_cpu_product_block_size
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64] * 5
    return fn(CB, KB, bs, blocks, N)


def coarsens_bs16():
    """Whether this processor's kernels repack full layouts of 16-wide blocks."""
    fn = loaded_library().blocksparse_tf_cpu_coarsens_bs16
    fn.restype = ctypes.c_int
    return bool(fn())


@pytest.mark.parametrize("bs", [8, 32])
def test_leading_batch_dims(bs):
    layout = RNG.random((4, 6)) < 0.5
    layout[0, 0] = True
    bsmm = BlocksparseMatMul(layout, block_size=bs)
    x = RNG.standard_normal((3, 5, bsmm.C)).astype(np.float32)
    w = RNG.standard_normal(bsmm.w_shape).astype(np.float32)
    dy = RNG.standard_normal((3, 5, bsmm.K)).astype(np.float32)
    y, dx, dw = products(bsmm, x, w, dy)
    W = dense_reference(layout, bs, w.astype(np.float64))
    assert y.shape == (3, 5, bsmm.K)
    assert rel_err(y, x.astype(np.float64) @ W) < 1e-5
    assert rel_err(dx, dy.astype(np.float64) @ W.T) < 1e-5
    dW = np.einsum("btc,btk->ck", x.astype(np.float64), dy.astype(np.float64))
    assert rel_err(dw, bsmm.from_dense(dW)) < 1e-5


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
@pytest.mark.parametrize("feature_axis", [1, 0])
@pytest.mark.parametrize("bs,N", [(16, 9), (32, 70), (64, 33)])
def test_half_precision_accumulates_in_float32(dtype, feature_axis, bs, N):
    """float16 / bfloat16 y, dx and dw are float32 sums of the (exact) half-precision inputs
    rounded once: each element within the bound of tests/half_precision.py of the float64
    sums, which the same sums kept in half precision miss (bfloat16 on AMX tiles too, whose
    rows go 32 at a time: N = 70 and 33 end in a part of one, N = 9 in a part of 16 examples
    with feature_axis 0, whose tiles' rows are y's columns)."""
    layout = rect_layout()
    bsmm = BlocksparseMatMul(layout, block_size=bs, feature_axis=feature_axis)
    np_dtype = dtype.as_numpy_dtype
    x, dy = (RNG.standard_normal(shape).astype(np_dtype) for shape in (bsmm.i_shape(N),
                                                                       bsmm.o_shape(N)))
    w = RNG.standard_normal(bsmm.w_shape).astype(np_dtype)
    y, dx, dw = products(bsmm, x, w, dy)
    assert y.dtype == dx.dtype == dw.dtype == np_dtype
    def rows(a):  # (batch, features) float64
        return a.astype(np.float64) if feature_axis == 1 else a.astype(np.float64).T

    W = dense_reference(layout, bs, w.astype(np.float64))
    block_mask = dense_reference(layout, bs, np.ones(bsmm.w_shape)) != 0
    checks = [(y, rows(x), W, bsmm.C), (dx, rows(dy), W.T, bsmm.K)]
    for actual, a, b, terms in checks:
        exact, abs_sum = product_and_bound_inputs(a, b)
        assert within_float32_accumulation(rows(actual), exact, abs_sum, terms, np_dtype)
    exact, abs_sum = product_and_bound_inputs(rows(x).T, rows(dy))
    assert within_float32_accumulation(bsmm.to_dense(dw.astype(np.float64))[block_mask],
                                       exact[block_mask], abs_sum[block_mask], N, np_dtype)
    # The bound tells half-precision sums apart.
    assert not within_float32_accumulation(matmul_summed_in(np_dtype, rows(x), W),
                                           *product_and_bound_inputs(rows(x), W), bsmm.C,
                                           np_dtype)


def _same_values(a, b):
    """Bitwise equal, NaN for NaN (a NaN's sign and payload aside)."""
    a, b = np.asarray(a), np.asarray(b)
    nan = np.isnan(a.astype(np.float32))
    return (np.array_equal(nan, np.isnan(b.astype(np.float32)))
            and np.array_equal(a[~nan].view(np.uint16), b[~nan].view(np.uint16)))


@pytest.mark.parametrize("feature_axis", [1, 0])
def test_bfloat16_on_amx_counts_subnormal_inputs_and_sums_as_zero(feature_axis):
    """On AMX tiles, as in dense bfloat16 products there, subnormal inputs count as zero and
    so do subnormal float32 sums (where the float32 kernels would keep them)."""
    if not amx_serves(tf.bfloat16, 16):
        pytest.skip("this processor has no AMX")
    x = np.zeros((5, 16), np.float32)
    x[:, 0] = 2.0 ** -128  # subnormal in bfloat16
    x[:, 1] = 2.0 ** -70
    x[:, 2] = 3.0
    w = np.zeros((1, 16, 16), np.float32)
    w[0, 0, 0] = 1.0
    w[0, 1, 1] = 2.0 ** -70  # 2^-140: a subnormal product
    w[0, 2, 2] = 0.5
    x = x if feature_axis == 1 else x.T
    y = blocksparse_matmul(tf.cast(x, tf.bfloat16), tf.cast(w, tf.bfloat16),
                           tf.constant([[0, 0]], tf.int32), block_size=16, C=16, K=16,
                           feature_axis=feature_axis).numpy()
    expected = np.zeros((5, 16), np.float32)
    expected[:, 2] = 1.5
    np.testing.assert_array_equal(y.astype(np.float32),
                                  expected if feature_axis == 1 else expected.T)


@pytest.mark.parametrize("bs", [16, 32, 64])
def test_bfloat16_on_amx_feature_axes_give_the_same_bits(bs):
    """On AMX tiles feature_axis 0 turns x and y around the same tile products as feature_axis
    1: y, dx and dw bit for bit the other axis's (transposed), over a ragged last panel of
    rows (N = 37: 32 + 5) and a layout with an empty block row and column."""
    if not amx_serves(tf.bfloat16, bs):
        pytest.skip("this processor has no AMX")
    layout = rect_layout()
    N = 37
    x = RNG.standard_normal((N, layout.shape[0] * bs)).astype(np.float32)
    dy = RNG.standard_normal((N, layout.shape[1] * bs)).astype(np.float32)
    w = RNG.standard_normal((int(layout.sum()), bs, bs)).astype(np.float32)
    x, dy, w = (tf.cast(a, tf.bfloat16).numpy() for a in (x, dy, w))
    rows = products(BlocksparseMatMul(layout, block_size=bs), x, w, dy)
    columns = products(BlocksparseMatMul(layout, block_size=bs, feature_axis=0), x.T, w, dy.T)
    for by_rows, by_columns in zip(rows, [columns[0].T, columns[1].T, columns[2]]):
        assert np.array_equal(by_rows.view(np.uint16), by_columns.view(np.uint16))


@pytest.mark.parametrize("dtype,feature_axis",
                         [(tf.bfloat16, 1), (tf.bfloat16, 0), (tf.float32, 1)])
def test_bfloat16_products_over_several_ranges_of_columns(dtype, feature_axis):
    """On AMX tiles the forward products go over ranges of output columns whose blocks fit in
    a core's cache (1 MiB, 128 blocks of 64 x 64): a column of 160 blocks, alone in its range,
    between columns of a few blocks and an empty one; rows in two panels and a part of one.
    float32 as the control."""
    CB, bs, N = 160, 64, 70
    layout = np.zeros((CB, 4), bool)
    layout[:, 1] = True
    layout[::7, 0] = layout[::5, 3] = True
    bsmm = BlocksparseMatMul(layout, block_size=bs, feature_axis=feature_axis)
    np_dtype = dtype.as_numpy_dtype
    x = RNG.standard_normal((N, bsmm.C)).astype(np_dtype)
    dy = RNG.standard_normal((N, bsmm.K)).astype(np_dtype)
    w = RNG.standard_normal(bsmm.w_shape).astype(np_dtype)
    turn = (lambda a: a) if feature_axis == 1 else (lambda a: a.T)  # (N, features) <-> op's
    y, dx, dw = products(bsmm, turn(x), w, turn(dy))
    y, dx = turn(y), turn(dx)
    W = bsmm.to_dense(w.astype(np.float64))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    for actual, a, b, terms in [(y, x64, W, bsmm.C), (dx, dy64, W.T, bsmm.K)]:
        assert within_float32_accumulation(actual, *product_and_bound_inputs(a, b), terms,
                                           np_dtype)
    exact, abs_sum = product_and_bound_inputs(x64.T, dy64)
    assert within_float32_accumulation(dw, bsmm.from_dense(exact), bsmm.from_dense(abs_sum), N,
                                       np_dtype)


def _overflowing_terms(a, b):
    """Whether any product a[i, p] b[p, j] of the sums a @ b lies past float32's range."""
    big = np.float64(np.finfo(np.float32).max)
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    with np.errstate(invalid="ignore", over="ignore"):
        return np.array([[np.any(a[i] * b[:, j] > big) for j in range(b.shape[1])]
                         for i in range(a.shape[0])])


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
@pytest.mark.parametrize("bs", [8, 32])
@pytest.mark.parametrize("feature_axis", [1, 0])
def test_half_precision_is_the_float32_product_rounded_once(dtype, bs, feature_axis):
    """y, dx and dw in half precision are, bit for bit, the float32 op on the inputs widened
    and its results narrowed by tf.cast (round to nearest even), with infinities, NaN,
    subnormals and values past the largest finite one among the inputs.  On AMX tiles
    (bfloat16, bs 32 here) the float32 sums are added in the hardware's order, so the finite
    results are float32 sums rounded once (within the bound of tests/half_precision.py) but
    not always the float32 op's bits; infinities and NaN come out where the float32 op's do,
    except that the products are not fused into the sums: a sum with a product past float32's
    range is infinite or NaN there."""
    layout = rect_layout()
    bsmm = BlocksparseMatMul(layout, block_size=bs)
    N = 37
    x = RNG.standard_normal((N, bsmm.C)).astype(np.float32)
    dy = RNG.standard_normal((N, bsmm.K)).astype(np.float32)
    largest, smallest_normal = ((65504.0, 2.0 ** -14) if dtype == tf.float16
                                else (float(tf.bfloat16.max), 2.0 ** -126))
    x[0, :4] = [np.inf, -np.inf, np.nan, 0.0]
    x[1, :3] = [largest, -largest, smallest_normal / 4]  # the last one subnormal
    x[2] *= 1e4  # sums past the largest finite half-precision value
    x, dy = tf.cast(x, dtype), tf.cast(dy, dtype)
    w = tf.cast(RNG.standard_normal(bsmm.w_shape), dtype)
    wide = [tf.cast(t, tf.float32) for t in (x, w, dy)]
    x64, dy64 = (t.numpy().astype(np.float64) for t in wide[::2])
    if feature_axis == 0:  # the op's operands (C, N) and (K, N); its y and dx turned back below
        x, dy, wide[0], wide[2] = (tf.transpose(t) for t in (x, dy, wide[0], wide[2]))
    args = dict(block_size=bs, C=bsmm.C, K=bsmm.K, feature_axis=feature_axis)
    coords = tf.constant(bsmm.coords)
    W = bsmm.to_dense(wide[1].numpy())
    on_amx, overflowed = amx_serves(dtype, bs), 0
    for half, single, (a, b, terms) in [
            (blocksparse_matmul(x, w, coords, **args),
             blocksparse_matmul(wide[0], wide[1], coords, **args), (x64, W, bsmm.C)),
            (blocksparse_matmul(dy, w, coords, **args, transpose_w=True),
             blocksparse_matmul(wide[2], wide[1], coords, **args, transpose_w=True),
             (dy64, W.T, bsmm.K)),
            (blocksparse_matmul_grad_w(x, dy, coords, **args),
             blocksparse_matmul_grad_w(wide[0], wide[2], coords, **args), (x64.T, dy64, N))]:
        assert half.dtype == dtype
        half, single = half.numpy(), tf.cast(single, dtype).numpy()
        if feature_axis == 0 and half.ndim == 2:
            half, single = half.T, single.T
        if not on_amx:
            assert _same_values(half, single)
            continue
        as_stored = (lambda m: bsmm.from_dense(m)) if half.ndim == 3 else (lambda m: m)
        overflowing = as_stored(_overflowing_terms(a, b).astype(np.float64)) != 0
        assert overflowing.mean() < 0.2  # most elements still compared
        assert not np.isfinite(half[overflowing].astype(np.float32)).any()
        overflowed += overflowing.sum()
        finite = np.isfinite(single.astype(np.float32)) & ~overflowing
        assert _same_values(half[~finite & ~overflowing], single[~finite & ~overflowing])
        # A finite result has no infinity or NaN among its terms' inputs (where W is stored).
        exact, abs_sum = (as_stored(m) for m in product_and_bound_inputs(
            *(np.where(np.isfinite(m), m, 0.0) for m in (a, b))))
        assert within_float32_accumulation(half[finite], exact[finite], abs_sum[finite], terms,
                                           np.dtype(half.dtype))
    assert overflowed > 0 or not on_amx


@pytest.mark.parametrize("dtype,bs", [(tf.float16, 8), (tf.bfloat16, 8), (tf.bfloat16, 16)])
def test_half_precision_rounds_ties_to_even(dtype, bs):
    """Sums exactly halfway between two neighbours of the half-precision type round to the
    one with an even last bit: y = x_0 + x_1 with x_0 = 1 + m ulp and x_1 = ulp / 2 (bfloat16
    bs 16 runs on AMX tiles where the processor has them)."""
    bits = 10 if dtype == tf.float16 else 7  # explicit mantissa bits
    ulp = 2.0 ** -bits
    m = np.arange(64)
    x = np.zeros((64, bs), np.float32)
    x[:, 0], x[:, 1] = 1 + m * ulp, ulp / 2
    w = np.zeros((1, bs, bs), np.float32)
    w[0, 0, 0] = w[0, 1, 0] = 1.0
    y = blocksparse_matmul(tf.cast(x, dtype), tf.cast(w, dtype), tf.constant([[0, 0]], tf.int32),
                           block_size=bs, C=bs, K=bs).numpy()
    expected = 1 + (m + m % 2) * ulp
    np.testing.assert_array_equal(y[:, 0].astype(np.float64), expected)


def test_float16_rounds_subnormal_and_overflowing_sums_to_nearest_even():
    """float16 results below its smallest normal value (multiples of 2^-24) and past its
    largest finite one: y = x_0 + x_1 w with x_0 = m 2^-24, and x_1 w a quarter, a half or
    three quarters of 2^-24 (ties to the even neighbour); 65504 + 16 (a tie) and + 15 round to
    infinity and back to 65504."""
    m = np.arange(1, 41)
    offsets = np.array([0.25, 0.5, 0.75])
    x = np.zeros((len(m) * len(offsets) + 2, 8), np.float32)
    w = np.zeros((1, 8, 8), np.float32)
    w[0, 0, 0], w[0, 1, 0], w[0, 2, 0] = 1.0, 2.0 ** -24, 1.0
    x[:-2, 0] = np.repeat(m, len(offsets)) * 2.0 ** -24
    x[:-2, 1] = np.tile(offsets, len(m))  # x_1 w: offset x 2^-24, exact in float32
    x[-2:, 0] = 65504.0
    x[-2:, 2] = [16.0, 15.0]
    y = blocksparse_matmul(tf.constant(x, tf.float16), tf.constant(w, tf.float16),
                           tf.constant([[0, 0]], tf.int32), block_size=8, C=8, K=8).numpy()
    exact = np.repeat(m, len(offsets)) + np.tile(offsets, len(m))
    nearest_even = np.where(exact % 1 == 0.5, 2 * np.round(exact / 2), np.round(exact))
    np.testing.assert_array_equal(y[:-2, 0].astype(np.float64), nearest_even * 2.0 ** -24)
    assert y[-2, 0] == np.inf and y[-1, 0] == 65504.0


@pytest.mark.parametrize("feature_axis,batch", [(1, (4,)), (1, (2, 3)), (0, (4,))])
def test_numpy_references_agree_with_independent_reference(feature_axis, batch):
    """fprop_test / bprop_test / updat_test (used as references by other tests) against dense
    float64 products, for both feature axes and leading batch dimensions."""
    layout = rect_layout()
    bsmm = BlocksparseMatMul(layout, block_size=8, feature_axis=feature_axis)
    rows = int(np.prod(batch))
    x, dy = RNG.standard_normal((rows, bsmm.C)), RNG.standard_normal((rows, bsmm.K))
    w = RNG.standard_normal(bsmm.w_shape)
    W = dense_reference(layout, 8, w)

    def as_input(a):  # (rows, features) in the layout the op takes
        return a.reshape(*batch, -1) if feature_axis == 1 else a.T

    def as_rows(a):
        return a.reshape(rows, -1) if feature_axis == 1 else a.T

    np.testing.assert_allclose(as_rows(bsmm.fprop_test(as_input(x), w)), x @ W, rtol=1e-12)
    np.testing.assert_allclose(as_rows(bsmm.bprop_test(as_input(dy), w)), dy @ W.T, rtol=1e-12)
    np.testing.assert_allclose(bsmm.to_dense(bsmm.updat_test(as_input(x), as_input(dy))),
                               (x.T @ dy) * (W != 0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("feature_axis", [1, 0])
def test_finite_difference_gradients(feature_axis):
    layout = np.array([[1, 0, 1], [0, 1, 1]])
    bsmm = BlocksparseMatMul(layout, block_size=8, feature_axis=feature_axis)
    x = tf.constant(RNG.standard_normal(bsmm.i_shape(3)).astype(np.float32))
    w = tf.constant(RNG.standard_normal(bsmm.w_shape).astype(np.float32))
    gate = tf.constant(RNG.uniform(0.5, 1.5, bsmm.blocks).astype(np.float32))
    theoretical, numerical = tf.test.compute_gradient(lambda a, b, g: bsmm(a, b, gate=g),
                                                      [x, w, gate], delta=1e-2)
    for t, n in zip(theoretical, numerical):
        assert t.shape == n.shape
        np.testing.assert_allclose(t, n, rtol=2e-2, atol=2e-2)
        assert np.abs(t).max() > 0.1  # the check is not vacuous


@pytest.mark.parametrize("feature_axis", [1, 0])
def test_second_order_gradient(feature_axis):
    layout = np.array([[1, 1], [0, 1]])
    bsmm = BlocksparseMatMul(layout, block_size=8, feature_axis=feature_axis)
    x = tf.constant(RNG.standard_normal(bsmm.i_shape(3)).astype(np.float32))
    w = tf.constant(RNG.standard_normal(bsmm.w_shape).astype(np.float32))

    def grad_norm(a, b):  # depends on x and w through BlocksparseMatmulGradW
        with tf.GradientTape() as tape:
            tape.watch(b)
            y = bsmm(a, b)
            loss = tf.reduce_sum(tf.sin(y))
        return tf.reduce_sum(tape.gradient(loss, b) ** 2)

    theoretical, numerical = tf.test.compute_gradient(grad_norm, [x, w], delta=1e-2)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=5e-2, atol=5e-2)
        assert np.abs(t).max() > 1.0  # the check is not vacuous


def test_tf_function_and_shape_inference():
    bsmm = BlocksparseMatMul(rect_layout(), block_size=8)
    w = tf.Variable(bsmm.ortho_init(seed=0))

    @tf.function(input_signature=[tf.TensorSpec([None, bsmm.C], tf.float32)])
    def f(x):
        y = bsmm(x, w)
        assert y.shape.as_list() == [None, bsmm.K]
        return y

    x = RNG.standard_normal((6, bsmm.C)).astype(np.float32)
    np.testing.assert_allclose(f(x).numpy(), bsmm.fprop_test(x, w.numpy()), rtol=1e-5, atol=1e-5)


def test_tf1_graph_mode_session():
    bsmm = BlocksparseMatMul(rect_layout(), block_size=16)
    x_val = RNG.standard_normal((5, bsmm.C)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, bsmm.C])
        w = tf.compat.v1.get_variable("w", bsmm.w_shape, initializer=bsmm.ortho_init(seed=3))
        y = bsmm(x, w)
        assert y.shape.as_list() == [None, bsmm.K]
        loss = tf.reduce_sum(y * y)
        dx, dw = tf.compat.v1.gradients(loss, [x, w])
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            y_val, dx_val, dw_val, w_val = sess.run([y, dx, dw, w], {x: x_val})
    y_ref = bsmm.fprop_test(x_val, w_val)
    np.testing.assert_allclose(y_val, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx_val, bsmm.bprop_test(2 * y_ref, w_val), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw_val, bsmm.updat_test(x_val, 2 * y_ref), rtol=1e-4, atol=1e-4)


def test_one_instance_in_eager_calls_tf_function_and_a_graph():
    """Eager calls keep the layout as a tensor between calls; a graph built afterwards with the
    same instance must get its own (an eager tensor cannot enter a graph)."""
    bsmm = BlocksparseMatMul(rect_layout(), block_size=16)
    w_val = bsmm.ortho_init(seed=4)
    x_val = RNG.standard_normal((3, bsmm.C)).astype(np.float32)
    y_ref = bsmm.fprop_test(x_val, w_val)
    for _ in range(2):
        np.testing.assert_allclose(bsmm(x_val, w_val).numpy(), y_ref, rtol=1e-5, atol=1e-5)
    traced = tf.function(lambda x: bsmm(x, w_val))
    np.testing.assert_allclose(traced(x_val).numpy(), y_ref, rtol=1e-5, atol=1e-5)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, bsmm.C])
        y = bsmm(x, tf.constant(w_val))
        with tf.compat.v1.Session(graph=graph) as sess:
            y_val = sess.run(y, {x: x_val})
    np.testing.assert_allclose(y_val, y_ref, rtol=1e-5, atol=1e-5)


class _SparseDense(tf.keras.layers.Layer):
    """Minimal Keras layer over the op, for the fit test."""

    def __init__(self, bsmm, **kwargs):
        super().__init__(**kwargs)
        self.bsmm = bsmm

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=self.bsmm.w_shape, initializer=self.bsmm.ortho_init(seed=1))

    def call(self, x):
        return self.bsmm(x, self.w)


def test_keras_fit_trains_with_the_kernels():
    bsmm = BlocksparseMatMul(np.eye(4, dtype=int) + np.eye(4, k=1, dtype=int), block_size=8)
    target = BlocksparseMatMul(bsmm.layout, block_size=8)
    w_true = RNG.standard_normal(bsmm.w_shape).astype(np.float32) / 8
    x = RNG.standard_normal((256, bsmm.C)).astype(np.float32)
    y = target.fprop_test(x, w_true).astype(np.float32)
    model = tf.keras.Sequential([tf.keras.Input((bsmm.C,)), _SparseDense(bsmm)])
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="mse")
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=30, batch_size=64, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.05 * first
    assert model.count_params() == bsmm.blocks * 64


DETERMINISM_SCRIPT = r"""
import hashlib, sys, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from blocksparse_tf import BlocksparseMatMul
rng = np.random.default_rng(7)
# bs 8 and 1: weight-gradient tiles of several blocks of a row, in column groups.  bfloat16
# with bs 32: AMX tiles where the processor has them, over two ranges of columns.
for axis, bs, shape, dtype in ((1, 32, (16, 12), tf.float32), (0, 32, (16, 12), tf.float32),
                               (1, 8, (40, 70), tf.float32), (1, 1, (300, 200), tf.float32),
                               (1, 32, (60, 40), tf.bfloat16), (0, 32, (60, 40), tf.bfloat16)):
    bsmm = BlocksparseMatMul(rng.random(shape) < 0.4, block_size=bs, feature_axis=axis)
    x = tf.cast(rng.standard_normal(bsmm.i_shape(300)).astype(np.float32), dtype)
    w = tf.cast(rng.standard_normal(bsmm.w_shape).astype(np.float32), dtype)
    with tf.GradientTape() as t:
        t.watch([x, w])
        y = bsmm(x, w)
        loss = tf.reduce_sum(y * y)
    dx, dw = t.gradient(loss, [x, w])
    h = hashlib.sha256()
    for a in (y, dx, dw):
        h.update(a.numpy().tobytes())
    print(h.hexdigest())
"""


def test_bitwise_deterministic_across_runs_and_thread_counts(outputs_across_thread_counts):
    outputs = outputs_across_thread_counts(DETERMINISM_SCRIPT)
    assert outputs[0].count("\n") == 6
    assert len(outputs) >= 2 and all(out == outputs[0] for out in outputs)


def test_repeated_calls_are_bitwise_identical():
    bsmm = BlocksparseMatMul(RNG.random((8, 8)) < 0.5, block_size=16)
    x = tf.constant(RNG.standard_normal((65, bsmm.C)).astype(np.float32))
    w = tf.constant(RNG.standard_normal(bsmm.w_shape).astype(np.float32))
    first = bsmm(x, w).numpy()
    for _ in range(3):
        assert np.array_equal(first, bsmm(x, w).numpy())


def test_neuron_level_connectivity_100k():
    n = 100_000
    fan_in = RNG.integers(2, 7, size=n)  # 2 to 6 incoming connections per neuron
    k = np.repeat(np.arange(n), fan_in)
    c = RNG.integers(0, n, size=k.size)
    coords = np.unique(np.stack([c, k], axis=1), axis=0)
    bsmm = BlocksparseMatMul((coords, (n, n)), block_size=1)
    assert bsmm.w_shape == (len(coords), 1, 1) and bsmm.C == bsmm.K == n
    vals = RNG.standard_normal(len(coords))
    W = scipy.sparse.csr_matrix((vals, (bsmm.coords[:, 0], bsmm.coords[:, 1])), shape=(n, n))
    x = RNG.standard_normal((3, n)).astype(np.float32)
    dy = RNG.standard_normal((3, n)).astype(np.float32)
    y, dx, dw = products(bsmm, x, vals.reshape(-1, 1, 1).astype(np.float32), dy)
    assert rel_err(y, (W.T @ x.astype(np.float64).T).T) < 1e-5
    assert rel_err(dx, (W @ dy.astype(np.float64).T).T) < 1e-5
    dw_ref = np.einsum("nb,nb->b", x[:, bsmm.coords[:, 0]].astype(np.float64),
                       dy[:, bsmm.coords[:, 1]].astype(np.float64))
    assert rel_err(dw.ravel(), dw_ref) < 1e-5


# ---- the Python API --------------------------------------------------------------------------

def test_attributes():
    layout = rect_layout()
    bsmm = BlocksparseMatMul(layout, block_size=32)
    assert (bsmm.CB, bsmm.KB, bsmm.C, bsmm.K) == (5, 3, 160, 96)
    assert bsmm.blocks == layout.sum() == 6 and bsmm.w_shape == (6, 32, 32)
    assert bsmm.block_size == 32 and bsmm.feature_axis == 1
    assert bsmm.density == pytest.approx(6 / 15) and bsmm.sparsity == pytest.approx(9 / 15)
    assert bsmm.flops(10) == 2 * 10 * 6 * 32 * 32
    assert bsmm.i_shape(10) == (10, 160) and bsmm.o_shape(10) == (10, 96)
    assert [bsmm.block_coord(i) for i in range(6)] == [tuple(c) for c in np.argwhere(layout)]
    axis0 = BlocksparseMatMul(layout, block_size=32, feature_axis=0)
    assert axis0.i_shape(10) == (160, 10) and axis0.o_shape(10) == (96, 10)
    with pytest.raises(IndexError, match="out of range"):
        bsmm.block_coord(6)


def test_layout_forms_agree():
    layout = rect_layout()
    coords = np.argwhere(layout)[::-1]  # any order: blocks are numbered row-major
    forms = [layout, layout.astype(bool), scipy.sparse.csr_matrix(layout), (coords, layout.shape),
             (coords.tolist(), layout.shape), [coords.tolist(), list(layout.shape)]]
    for form in forms:
        bsmm = BlocksparseMatMul(form, block_size=8)
        assert np.array_equal(bsmm.layout, layout.astype(bool))
        assert np.array_equal(bsmm.coords, np.argwhere(layout))
    # A 2 x 2 layout written as nested tuples is a layout, not (coords, shape).
    assert BlocksparseMatMul(((1, 0), (1, 1)), block_size=8).blocks == 3


def test_dense_round_trips():
    bsmm = BlocksparseMatMul(rect_layout(), block_size=8)
    w = RNG.standard_normal(bsmm.w_shape).astype(np.float32)
    W = bsmm.to_dense(w)
    assert W.shape == (bsmm.C, bsmm.K)
    np.testing.assert_array_equal(W, dense_reference(rect_layout(), 8, w))
    np.testing.assert_array_equal(bsmm.from_dense(W), w)
    np.testing.assert_array_equal(bsmm.to_dense(tf.constant(w)).numpy(), W)
    np.testing.assert_array_equal(bsmm.from_dense(tf.constant(W)).numpy(), w)
    # Wrong shapes raise, numpy or tensor, even where the element count is right (W^T).
    w_message = r"w must have shape w_shape=\(6, 8, 8\); got"
    W_message = r"W must have shape \(C, K\)=\(40, 24\); got"
    for convert, message, bad in [(bsmm.from_dense, W_message, W.T),
                                  (bsmm.to_dense, w_message, w.reshape(8, 6, 8))]:
        with pytest.raises(ValueError, match=message):
            convert(bad)
        with pytest.raises(ValueError, match=message):
            convert(tf.constant(bad))
    unknown = tf.function(bsmm.from_dense, input_signature=[tf.TensorSpec(None)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="not compatible with expected shape"):
        unknown(W.T)
    np.testing.assert_array_equal(unknown(W).numpy(), w)


def test_config_and_npz_round_trips(tmp_path):
    bsmm = BlocksparseMatMul(rect_layout(), block_size=16, feature_axis=0, name="proj")
    config = json.loads(json.dumps(bsmm.get_config()))
    again = BlocksparseMatMul.from_config(config)
    assert again.get_config() == bsmm.get_config()
    # Hand-made configs: coordinates are not truncated to integers nor paired up.
    for coords, what in (([[0.7, 1.9]], "float64"), ([[True, False]], "bool"), ([["1", "0"]], "<U1")):
        with pytest.raises(ValueError, match=f"block coordinates must be integers; got dtype {what}"):
            BlocksparseMatMul.from_config({"layout": {"shape": [2, 2], "coords": coords},
                                           "block_size": 8})
    with pytest.raises(ValueError, match="sequence of \\(c, k\\) block coordinates"):
        BlocksparseMatMul.from_config({"layout": {"shape": [2, 2], "coords": [0, 1, 1, 0]},
                                       "block_size": 8})
    np.savez(tmp_path / "layout.npz", layout=bsmm.layout)
    loaded = np.load(tmp_path / "layout.npz", allow_pickle=False)["layout"]
    assert np.array_equal(BlocksparseMatMul(loaded, block_size=16).coords, bsmm.coords)


def test_initializers():
    layout = np.eye(3, dtype=int)
    layout[0, 2] = 1
    bsmm = BlocksparseMatMul(layout, block_size=8)
    ident = bsmm.identity_init(scale=2.0)
    assert ident.shape == bsmm.w_shape
    np.testing.assert_array_equal(bsmm.to_dense(ident)[:, :], np.pad(2 * np.eye(24), 0))
    ortho = bsmm.ortho_init(seed=0)
    for b in range(bsmm.blocks):  # orthogonal up to the fan-in scale
        fan_in = layout[:, bsmm.block_coord(b)[1]].sum()
        np.testing.assert_allclose(ortho[b] @ ortho[b].T * fan_in, np.eye(8), atol=1e-5)
    as_keras = ortho(bsmm.w_shape, tf.float32)  # also a Keras initializer
    np.testing.assert_array_equal(as_keras.numpy(), np.asarray(ortho))
    with pytest.raises(ValueError, match="shape"):
        ortho((1, 8, 8))


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,message", [
    (np.ones(4), "2-D"),
    (np.ones((2, 2, 2)), "2-D"),
    (np.array([[1, 2], [0, 1]]), "0 or 1"),
    (np.array([[1, 0.5]]), "0 or 1"),
    (scipy.sparse.csr_matrix(np.array([[2.0, 0.0], [0.0, 1.0]])), "0 or 1"),
    (np.zeros((3, 3)), "no nonzero blocks"),
    (([], (2, 2)), r"layout of shape \(2, 2\) has no nonzero blocks"),
    (np.zeros((0, 3)), "at least"),
    (np.array([["a"]]), "0/1 numbers"),
    (([[0, 0], [0, 0]], (2, 2)), "duplicates"),
    (([[0, 5]], (2, 2)), "inside the layout"),
    (([[0, 0, 1]], (2, 2)), r"\(blocks, 2\)"),
    (([[0, 0]], (2.9, 3)), "two integers"),  # not truncated to 2
    (([[0, 0]], (2**33, 1)), "at most 2147483647 blocks"),  # past int32 would wrap around
    (scipy.sparse.coo_matrix(([1.0], ([0], [2**31 + 1])), shape=(1, 2**31 + 5)),
     "at most 2147483647 blocks"),  # the same for a scipy.sparse layout
    ([[(0, 0), (1, 1)], (2, 2, 3)], "a 2-D 0/1 array .* a scipy.sparse matrix, or"),  # ragged
])
def test_bad_layouts_raise(layout, message):
    with pytest.raises(ValueError, match=message):
        BlocksparseMatMul(layout, block_size=8)


def test_bad_arguments_raise():
    layout = rect_layout()
    with pytest.raises(ValueError, match="block_size must be one of"):
        BlocksparseMatMul(layout, block_size=12)
    with pytest.raises(ValueError, match="feature_axis must be 0 or 1"):
        BlocksparseMatMul(layout, block_size=8, feature_axis=2)
    with pytest.raises(ValueError, match="block_size must be one of"):
        BlocksparseMatMul(layout, block_size=True)  # not taken for 1
    with pytest.raises(ValueError, match="feature_axis must be 0 or 1"):
        BlocksparseMatMul(layout, block_size=8, feature_axis=True)
    bsmm = BlocksparseMatMul(layout, block_size=8)
    w = tf.zeros(bsmm.w_shape) + 1.0
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., C=40\)"):
        bsmm(tf.ones((4, 41)), w)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., C=40\)"):
        bsmm(tf.ones((40,)), w)
    with pytest.raises(ValueError, match=r"w must have shape w_shape=\(6, 8, 8\)"):
        bsmm(tf.ones((4, 40)), tf.ones((6, 8, 4)))
    with pytest.raises(ValueError, match="does not match x dtype"):
        bsmm(tf.ones((4, 40)), tf.ones(bsmm.w_shape, tf.float16))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        bsmm(tf.ones((4, 40), tf.float64), tf.ones(bsmm.w_shape, tf.float64))
    with pytest.raises(ValueError, match=r"gate must have shape \(6,\)"):
        bsmm(tf.ones((4, 40)), w, gate=tf.ones(5))
    axis0 = BlocksparseMatMul(layout, block_size=8, feature_axis=0)
    with pytest.raises(ValueError, match=r"x must have shape \(C=40, N\)"):
        axis0(tf.ones((4, 40)), w)
    with pytest.raises(ValueError, match="shape"):
        bsmm.to_dense(np.ones((5, 8, 8)))
    with pytest.raises(ValueError, match="shape"):
        bsmm.from_dense(np.ones((40, 40)))


def test_kernel_validates_inputs_itself():
    """The C++ kernels check everything too: the ops called directly, past every Python check
    (the wrappers would raise ValueError themselves for some of these)."""
    from blocksparse_tf._ops import ops

    def blocksparse_matmul(x, w, layout, block_size, C, K, feature_axis=1, transpose_w=False):
        return ops().blocksparse_matmul(x, w, layout, block_size=block_size, C=C, K=K,
                                        feature_axis=feature_axis, transpose_w=transpose_w)

    def blocksparse_matmul_grad_w(x, dy, layout, block_size, C, K):
        return ops().blocksparse_matmul_grad_w(x, dy, layout, block_size=block_size, C=C, K=K)

    x, w = tf.ones((2, 16)), tf.ones((2, 8, 8))
    good = tf.constant([[0, 0], [1, 1]], tf.int32)
    cases = [
        (lambda: blocksparse_matmul(x, w, tf.constant([[0, 0], [2, 1]]), 8, 16, 16), "outside the layout"),
        (lambda: blocksparse_matmul(x, w, tf.constant([[0, 0], [0, 0]]), 8, 16, 16), "appears twice"),
        (lambda: blocksparse_matmul(x, w, tf.constant([[0, -1], [1, 1]]), 8, 16, 16), "outside the layout"),
        (lambda: blocksparse_matmul(tf.ones((2, 24)), w, good, 8, 16, 16), "x must have shape"),
        (lambda: blocksparse_matmul(x, tf.ones((3, 8, 8)), good, 8, 16, 16), "w must have shape"),
        (lambda: blocksparse_matmul(x, w, good, 12, 24, 24), "block_size must be one of"),
        (lambda: blocksparse_matmul(x, w, good, 8, 20, 16), "multiples of block_size"),
        (lambda: blocksparse_matmul(x, w, tf.zeros((0, 2), tf.int32), 8, 16, 16), "no blocks"),
        (lambda: blocksparse_matmul(x, w, good, 8, 16, 16, feature_axis=3), "feature_axis"),
        # transpose_w: x has K features, and layout errors name W's coordinates as given.
        (lambda: blocksparse_matmul(x, w, good, 8, 16, 24, transpose_w=True),
         r"x must have shape \(\.\.\., 24\)"),
        (lambda: blocksparse_matmul(tf.ones((2, 24)), w, tf.constant([[0, 0], [2, 1]]), 8, 16, 24,
                                    transpose_w=True), r"\(2, 1\) outside the layout shape \(2, 3\)"),
        (lambda: blocksparse_matmul(tf.ones((2, 24)), w, tf.constant([[1, 2], [1, 2]]), 8, 16, 24,
                                    transpose_w=True), r"at \(1, 2\) appears twice"),
        (lambda: blocksparse_matmul_grad_w(x, tf.ones((3, 16)), good, 8, 16, 16),
         "same leading dimensions"),
        # Six rows each, but not the same rows.
        (lambda: blocksparse_matmul_grad_w(tf.ones((2, 3, 16)), tf.ones((3, 2, 16)), good, 8, 16,
                                           16), "same leading dimensions"),
        (lambda: blocksparse_matmul_grad_w(tf.ones((2, 3, 16)), tf.ones((6, 16)), good, 8, 16, 16),
         "same leading dimensions"),
        # x is checked before the layout's tables, which would take memory in proportion to C.
        (lambda: blocksparse_matmul(tf.ones((1, 8)), tf.ones((1, 1, 1)), good[:1], 1, 2**31 - 1, 8),
         "x must have shape"),
        (lambda: blocksparse_matmul_grad_w(tf.ones((1, 8)), tf.ones((1, 8)), good[:1], 1,
                                           2**31 - 1, 8), "x must have shape"),
        # A K no int32 block coordinate can address: an error, not an allocation that ends the
        # process.
        (lambda: blocksparse_matmul(x, w, good, 8, 16, 8 * 2 ** 40), "larger than int32"),
    ]
    for call, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            call()


def test_layout_tables_beyond_half_the_memory_raise():
    """A layout whose lookup tables would take more than half of the machine's memory (here
    2^31 - 1 block rows, one block, no examples) is refused with an error naming its shape:
    allocating them would succeed and filling them would get the process killed."""
    block_rows = 2**31 - 1
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if 8 * block_rows <= memory / 2:
        pytest.skip("this machine's memory holds such tables")
    bsmm = BlocksparseMatMul(([[0, 0]], (block_rows, 1)), block_size=64, feature_axis=0)
    message = (r"the lookup tables of a layout of shape \(2147483647, 1\) blocks with 1 blocks "
               r"would take \d+ MiB, more than half of this machine's memory")
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        bsmm(tf.zeros((bsmm.C, 0)), tf.ones(bsmm.w_shape))


def test_raw_ops_take_only_integer_coordinates():
    """A float coordinate, or an integer past int32's range, would be truncated or wrap around to
    another block; integer tensors of another width are range-checked when run."""
    x, w = tf.ones((2, 16)), tf.ones((2, 8, 8))
    with pytest.raises(ValueError, match="layout coordinates must be integers"):
        blocksparse_matmul(x, w, np.array([[0, 0], [1, 0.7]]), 8, 16, 16)
    with pytest.raises(ValueError, match="must fit in int32"):
        blocksparse_matmul(x, w, np.array([[0, 0], [1, 2**32 + 1]]), 8, 16, 16)
    with pytest.raises(ValueError, match="must be integers"):
        blocksparse_matmul_grad_w(x, x, tf.constant([[0.0, 0.0]]), 8, 16, 16)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must fit in int32"):
        blocksparse_matmul(x, w, tf.constant([[0, 0], [1, 2**32 + 1]], tf.int64), 8, 16, 16)
    # Integer tensors of other widths give the same product: the next test.


@pytest.mark.parametrize("dtype", [tf.int8, tf.int16, tf.uint8, tf.uint16, tf.uint32,
                                   tf.uint64, tf.int64])
def test_raw_ops_take_integer_coordinates_of_any_width(dtype):
    """The int32 range check must not wrap its own bounds into narrow or unsigned dtypes (-2^31
    as uint32 is 2^31, and as int8 it is 0: both refused every coordinate)."""
    x = RNG.standard_normal((3, 24)).astype(np.float32)
    w = RNG.standard_normal((2, 8, 8)).astype(np.float32)
    coords = np.array([[0, 1], [2, 0]])  # neither symmetric nor in order: a swap would show
    y = blocksparse_matmul(x, w, tf.constant(coords, dtype), 8, 24, 24)
    W = np.zeros((24, 24))
    for (c, k), block in zip(coords, w.astype(np.float64)):
        W[c * 8:(c + 1) * 8, k * 8:(k + 1) * 8] = block
    assert rel_err(y, x.astype(np.float64) @ W) < 1e-5
    if dtype.max > 2**31:
        with pytest.raises(tf.errors.InvalidArgumentError, match="must fit in int32"):
            blocksparse_matmul(x, w, tf.constant([[0, 0], [1, 2**31 + 5]], dtype), 8, 16, 16)


@pytest.mark.parametrize("attrs, message", [
    ((8, 16.9, 16, 1), "C must be an integer; got 16.9"),  # TensorFlow would take C=16
    ((8, 16, 16.0, 1), "K must be an integer; got 16.0"),
    ((8.7, 16, 16, 1), "block_size must be one of"),
    ((8, True, 16, 1), "C must be an integer; got True"),
    ((8, 16, 16, 0.9), "feature_axis must be 0 or 1; got 0.9"),  # would run as 0
    ((8, 16, 16, 1.0), "feature_axis must be 0 or 1; got 1.0"),
])
def test_raw_ops_refuse_non_integer_attributes(attrs, message):
    x, w, layout = tf.ones((2, 16)), tf.ones((2, 8, 8)), np.array([[0, 0], [1, 1]])
    with pytest.raises(ValueError, match=message):
        blocksparse_matmul(x, w, layout, *attrs)
    with pytest.raises(ValueError, match=message):
        blocksparse_matmul_grad_w(x, x, layout, *attrs)


def test_weight_gradient_shape_function_checks_rows_and_layout():
    """The raw weight gradient's static shapes: x and dy must describe the same rows, and the
    layout must be (blocks, 2); found when the graph is built, not when it runs."""
    layout = np.array([[0, 0], [1, 1]], np.int32)

    def trace(x_shape, dy_shape, layout_shape=(2, 2), feature_axis=1):
        f = tf.function(lambda x, dy, c: blocksparse_matmul_grad_w(x, dy, c, 8, 16, 16,
                                                                   feature_axis))
        return f.get_concrete_function(tf.TensorSpec(x_shape), tf.TensorSpec(dy_shape),
                                       tf.TensorSpec(layout_shape, tf.int32))

    for x_shape, dy_shape, axis in [((4, 16), (5, 16), 1), ((2, 3, 16), (3, 2, 16), 1),
                                    ((16, 4), (16, 5), 0)]:
        with pytest.raises(ValueError, match="must be equal|are not compatible|Dimensions"):
            trace(x_shape, dy_shape, feature_axis=axis)
    with pytest.raises(ValueError, match="must be equal|Dimension"):
        trace((4, 16), (4, 16), layout_shape=(2, 3))
    ok = trace((None, 16), (4, 16)).structured_outputs
    assert ok.shape.as_list() == [2, 8, 8]
    assert trace((2, None, 16), (None, 3, 16)).structured_outputs.shape.as_list() == [2, 8, 8]
    x = RNG.standard_normal((2, 3, 16)).astype(np.float32)
    dy = RNG.standard_normal((2, 3, 16)).astype(np.float32)
    dw = blocksparse_matmul_grad_w(x, dy, layout, 8, 16, 16)
    x2, dy2 = x.reshape(-1, 16).astype(np.float64), dy.reshape(-1, 16).astype(np.float64)
    expected = np.stack([x2[:, :8].T @ dy2[:, :8], x2[:, 8:].T @ dy2[:, 8:]])
    assert rel_err(dw, expected) < 1e-5


def test_flops_block_coord_and_name_checks():
    bsmm = BlocksparseMatMul(np.ones((128, 128)), block_size=32)
    assert bsmm.flops(np.int32(64)) == 2 * 64 * 4096 * 4096  # not wrapped in int32
    assert bsmm.block_coord(np.int64(129)) == (1, 1)
    with pytest.raises(TypeError, match="block index must be an integer; got True"):
        bsmm.block_coord(True)
    with pytest.raises(TypeError, match="block index must be an integer; got 1.5"):
        bsmm.block_coord(1.5)
    with pytest.raises(ValueError, match="name must start with"):
        BlocksparseMatMul(np.ones((2, 2)), block_size=8, name="my layer")
    small = BlocksparseMatMul(np.ones((2, 2)), block_size=8, name="sparse.layer-1")
    with pytest.raises(ValueError, match="name must start with"):
        small(tf.ones((1, 16)), tf.ones(small.w_shape), name="bad name")  # eagerly too
    x = RNG.standard_normal((2, 16)).astype(np.float32)
    w = RNG.standard_normal(small.w_shape).astype(np.float32)
    y = tf.function(lambda x: small(x, w))(x)  # the scope name is used in a graph
    assert rel_err(y, x.astype(np.float64) @ dense_reference(small.layout, 8, w)) < 1e-5


def test_minibatch_sizes_scales_seeds_and_gates_are_checked():
    bsmm = BlocksparseMatMul(np.eye(2), block_size=8)
    assert bsmm.i_shape(None) == (None, 16) and bsmm.o_shape(np.int64(3)) == (3, 16)
    for bad in (1.5, -2, True, "4"):  # flops(1.5) counted one row, flops(-2) was negative
        with pytest.raises(ValueError, match="N must be an integer >= 0"):
            bsmm.flops(bad)
        with pytest.raises(ValueError, match="N must be an integer >= 0"):
            bsmm.i_shape(bad)
    with pytest.raises(ValueError, match="N must be an integer >= 0"):
        bsmm.flops(None)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            bsmm.identity_init(bad)
    for bad in (True, "2"):
        with pytest.raises(ValueError, match="scale must be a number"):
            bsmm.identity_init(bad)
    for bad in (True, 1.5, "3"):  # True was seed 1; 1.5 and "3" numpy's TypeError
        with pytest.raises(ValueError, match="seed must be None, an integer or a numpy Generator"):
            bsmm.ortho_init(bad)
    with pytest.raises(ValueError, match="gate must hold real numbers; got dtype complex64"):
        bsmm(tf.ones((1, 16)), tf.ones(bsmm.w_shape), gate=tf.constant([1j, 1j], tf.complex64))


def test_gate_of_shape_known_only_when_run():
    bsmm = BlocksparseMatMul(rect_layout(), block_size=8)
    x = RNG.standard_normal((3, bsmm.C)).astype(np.float32)
    w = RNG.standard_normal(bsmm.w_shape).astype(np.float32)
    gate = RNG.random(bsmm.blocks).astype(np.float32)
    run = tf.function(lambda g: bsmm(x, w, gate=g), input_signature=[tf.TensorSpec([None])])
    W = dense_reference(bsmm.layout, 8, w.astype(np.float64) * gate[:, None, None])
    assert rel_err(run(gate), x.astype(np.float64) @ W) < 1e-5
    message = rf"gate must have shape \({bsmm.blocks},\), one value per block"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        run(gate[:1])  # one value would broadcast over every block without the check
    unknown_rank = tf.function(lambda g: bsmm(x, w, gate=g),
                               input_signature=[tf.TensorSpec(None)])
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        unknown_rank(gate[:1])
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        unknown_rank(gate.reshape(2, -1))  # every value, but not as a vector
    assert rel_err(unknown_rank(gate), x.astype(np.float64) @ W) < 1e-5


def test_gated_product_checks_a_weight_shape_known_only_when_run():
    """w times the gate broadcast a wrong w (one block to every block, its gradient summed
    into it) before the kernel could refuse its shape."""
    bsmm = BlocksparseMatMul(np.eye(3), block_size=8)
    x = RNG.standard_normal((2, 24)).astype(np.float32)
    gate = tf.constant([1.0, 2.0, 3.0])
    message = r"w must have shape w_shape=\(3, 8, 8\)"
    for spec, bad in ((tf.TensorSpec([None, 8, 8]), np.ones((1, 8, 8), np.float32)),
                      (tf.TensorSpec([None, 8, 8]), np.ones((5, 8, 8), np.float32)),
                      (tf.TensorSpec(None), np.ones((8, 8), np.float32))):
        run = tf.function(lambda w: bsmm(x, w, gate=gate), input_signature=[spec])
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            run(bad)
        w = RNG.standard_normal(bsmm.w_shape).astype(np.float32)
        W = dense_reference(bsmm.layout, 8, w.astype(np.float64) * np.array([1, 2, 3])[:, None, None])
        assert rel_err(run(w), x.astype(np.float64) @ W) < 1e-5


@pytest.mark.parametrize("bs, N", [(1, 96), (1, 97), (8, 3), (32, 40)])
@pytest.mark.parametrize("constant_layout", [False, True])
def test_one_kernel_fed_different_layouts(bs, N, constant_layout):
    """The kernels keep the tables of the last 16 layouts they saw.  One kernel (eager calls with
    the same attributes; one graph with the layout as an argument) fed layouts of the same shape
    in turn (a few alternating, then more than it keeps, two of them alike but for their last
    block; each layout's tensor used again, or a new copy of it), a bad one between them, must
    use each call's own layout."""
    CB, KB = 6, 5
    C, K = CB * bs, KB * bs
    layouts = []
    for _ in range(18):
        layout = np.zeros((CB, KB), bool)
        layout.flat[RNG.permutation(CB * KB)[:9]] = True  # 9 blocks each: same coords shape
        layouts.append(layout)
    layouts[0] = np.zeros((CB, KB), bool)
    layouts[0].flat[RNG.permutation(CB * KB - 1)[:9]] = True  # the last cell empty
    layouts[1] = layouts[0].copy()  # its last block moved to the last cell
    layouts[1].flat[np.flatnonzero(layouts[0])[-1]] = False
    layouts[1].flat[-1] = True
    tensors = [tf.constant(np.argwhere(layout).astype(np.int32)) for layout in layouts]
    flags = dict(constant_layout=constant_layout)
    graph = tf.function(lambda x, w, coords, dy: (
        blocksparse_matmul(x, w, coords, bs, C, K, **flags),
        blocksparse_matmul(dy, w, coords, bs, C, K, transpose_w=True, **flags),
        blocksparse_matmul_grad_w(x, dy, coords, bs, C, K, **flags)))
    eager = lambda *args: graph.python_function(*args)
    bad = tf.constant(np.repeat([[0, 0]], 9, axis=0).astype(np.int32))
    order = [0, 1, 2, 0, 1, 2, 1] + list(range(18)) + [0, 17, 3]
    for i, (run, which) in enumerate((run, which) for run in (eager, graph) for which in order):
        layout = layouts[which]
        coords = np.argwhere(layout).astype(np.int32)
        x = RNG.standard_normal((N, C)).astype(np.float32)
        dy = RNG.standard_normal((N, K)).astype(np.float32)
        w = RNG.standard_normal((9, bs, bs)).astype(np.float32)
        W = dense_reference(layout, bs, w.astype(np.float64))
        y, dx, dw = run(x, w, tf.constant(coords) if i % 3 == 2 else tensors[which], dy)
        assert rel_err(y, x.astype(np.float64) @ W) < 1e-5
        assert rel_err(dx, dy.astype(np.float64) @ W.T) < 1e-5
        dW = x.astype(np.float64).T @ dy.astype(np.float64)
        ref = np.stack([dW[c * bs:(c + 1) * bs, k * bs:(k + 1) * bs] for c, k in coords])
        assert rel_err(dw, ref) < 1e-5
        if i % 8 == 0:
            with pytest.raises(tf.errors.InvalidArgumentError, match="appears twice"):
                run(x, w, bad, dy)


def _layout_tables(counter):
    """The library's count of layout tables `built` or `alive`, or their `bytes_alive`."""
    fn = getattr(loaded_library(), f"blocksparse_tf_layout_tables_{counter}")
    fn.restype = ctypes.c_int64
    return fn()


def _half_full_bs8_layer(rng, CB, KB):
    """A BlocksparseMatMul of bs 8 on a random layout of about half the blocks (block 0 kept)."""
    layout = rng.random((CB, KB)) < 0.5
    layout[0, 0] = True
    return BlocksparseMatMul(layout, block_size=8)


def test_layers_of_one_shape_keep_their_tables_in_eager_mode():
    """In eager mode every call with the same attributes runs one kernel: twenty layers of one
    shape must each find their tables on a second pass (none built again), and the tables of
    deleted layers must be dropped once a kernel builds tables again."""
    rng = np.random.default_rng(11)
    layer = functools.partial(_half_full_bs8_layer, rng)
    layers = [layer(6, 5) for _ in range(20)]
    x = tf.constant(rng.standard_normal((3, 48)).astype(np.float32))
    ws = [rng.standard_normal(m.w_shape).astype(np.float32) for m in layers]
    built = _layout_tables("built")
    for m, w in zip(layers, ws):
        m(x, w)
    assert _layout_tables("built") - built == 20
    alive = _layout_tables("alive")
    built = _layout_tables("built")
    for m, w in zip(layers, ws):
        y = m(x, w).numpy()
        assert rel_err(y, m.fprop_test(x.numpy(), w)) < 1e-5
    assert _layout_tables("built") == built
    del layers, m
    gc.collect()
    other = layer(7, 3)  # another shape: another kernel, whose tables are built
    other(tf.ones((1, 56)), np.ones(other.w_shape, np.float32))
    # TensorFlow keeps some freed tensors referenced for a while: most, not all, are dropped.
    assert _layout_tables("alive") <= alive + 1 - 10


def test_layouts_used_in_training_are_dropped_with_their_layers():
    """A training step runs the forward, input-gradient and weight-gradient kernels on one
    layout constant.  Each kernel's cache held its own reference to it, so the constant never
    looked unowned and no table of a layer used in training was dropped after the layer."""
    rng = np.random.default_rng(13)
    layer = functools.partial(_half_full_bs8_layer, rng)
    layers = [layer(5, 6) for _ in range(20)]
    x = tf.constant(rng.standard_normal((3, 40)).astype(np.float32))
    ws = [tf.Variable(rng.standard_normal(m.w_shape).astype(np.float32)) for m in layers]
    start = _layout_tables("alive")
    for m, w in zip(layers, ws):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(m(x, w) ** 2)
        dx, dw = tape.gradient(loss, [x, w])
        assert rel_err(dx.numpy(), m.bprop_test(2 * m.fprop_test(x.numpy(), w.numpy()),
                                                w.numpy())) < 1e-5
    alive = _layout_tables("alive")
    assert alive - start >= 50  # three kernels' tables per layer (a few may be pushed out)
    del layers, m, ws, w, tape
    gc.collect()
    other = layer(7, 3)  # another shape: another kernel, whose tables are built
    other(tf.ones((1, 56)), np.ones(other.w_shape, np.float32))
    # TensorFlow keeps some freed tensors referenced for a while: most, not all, are dropped
    # (none were before).
    assert _layout_tables("alive") <= alive + 1 - 30


def test_layout_tables_kept_are_bounded_in_bytes():
    """Tables grow with C / bs + K / bs, not only with the blocks: a one-block layout of 2^22
    output columns takes 16 MiB.  The tables kept for layouts that no constant holds are
    bounded in bytes, by each kernel (64 MiB besides the newest) and, since in eager mode
    every attribute set has a kernel of its own, across the library (256 MiB): they once
    added up until the process ran out of memory."""
    K, mib = 1 << 22, 1 << 20
    x, w = tf.ones((1, 1)), np.full((1, 1, 1), 2.0, np.float32)
    start = _layout_tables("bytes_alive")
    for i in range(12):  # one kernel, twelve layouts
        y = blocksparse_matmul(x, w, np.array([[0, 3 * i]], np.int32), 1, 1, K).numpy()
        assert y[0, 3 * i] == 2.0 and np.count_nonzero(y) == 1
        assert _layout_tables("bytes_alive") - start <= 64 * mib + 17 * mib
    for i in range(24):  # a kernel each
        y = blocksparse_matmul(x, w, np.array([[0, i]], np.int32), 1, 1, K + i).numpy()
        assert y.shape == (1, K + i) and y[0, i] == 2.0 and np.count_nonzero(y) == 1
        assert _layout_tables("bytes_alive") - start <= 256 * mib + 17 * mib
    # Dropped tables are built again when their layout comes back.
    built = _layout_tables("built")
    y = blocksparse_matmul(x, w, np.array([[0, 0]], np.int32), 1, 1, K).numpy()
    assert y[0, 0] == 2.0 and _layout_tables("built") == built + 1


def test_a_layout_rewritten_in_place_is_seen():
    """Without constant_layout (the raw ops' default) the kernels compare the coordinates on
    every call: a TF1 reference variable's memory is written in place by an assignment, so
    the same memory then holds another layout."""
    rng = np.random.default_rng(7)
    first, second = np.array([[0, 0], [1, 1]], np.int32), np.array([[0, 1], [1, 0]], np.int32)
    x_value = rng.standard_normal((3, 16)).astype(np.float32)
    w_value = rng.standard_normal((2, 8, 8)).astype(np.float32)
    with tf.Graph().as_default():
        coords = tf.compat.v1.Variable(first, use_resource=False)
        x, w = tf.constant(x_value), tf.constant(w_value)
        y = blocksparse_matmul(x, w, coords, 8, 16, 16)
        dx = blocksparse_matmul(x, w, coords, 8, 16, 16, transpose_w=True)
        dw = blocksparse_matmul_grad_w(x, x, coords, 8, 16, 16)
        rewrite = tf.compat.v1.assign(coords, second)
        with tf.compat.v1.Session() as sess:
            sess.run(coords.initializer)
            for layout_coords in (first, second):
                layout = np.zeros((2, 2), bool)
                layout[tuple(layout_coords.T)] = True
                W = dense_reference(layout, 8, w_value.astype(np.float64))
                got = sess.run([y, dx, dw])
                assert rel_err(got[0], x_value @ W) < 1e-5
                assert rel_err(got[1], x_value @ W.T) < 1e-5
                xx = x_value.astype(np.float64).T @ x_value
                ref = np.stack([xx[c * 8:c * 8 + 8, k * 8:k * 8 + 8] for c, k in layout_coords])
                assert rel_err(got[2], ref) < 1e-5
                sess.run(rewrite)


@pytest.mark.parametrize("bs", [1, 8, 16, 32])
@pytest.mark.parametrize("feature_axis", [1, 0])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_a_rows_product_does_not_depend_on_its_batch(bs, feature_axis, transpose_w):
    """Every path sums each output over the same blocks in the same order, so a row's product
    alone (bs 1 below one vector of rows reads x and y where they lie) or in a batch of 3 is
    bitwise the same row of a batch of 40 (transposed copies, vectors along the rows); for bs
    16 at 10% density, of a batch of 100 (under AVX-512 in place past one slab of rows, on
    transposed operands up to it)."""
    CB, KB = {1: (900, 700), 8: (40, 30), 16: (30, 30), 32: (12, 10)}[bs]
    layout = RNG.random((CB, KB)) < {1: 0.01, 16: 0.1}.get(bs, 0.3)
    layout[3, :] = False
    layout[0, 0] = True
    coords = np.argwhere(layout).astype(np.int32)
    C, K = (KB * bs, CB * bs) if transpose_w else (CB * bs, KB * bs)
    x = RNG.standard_normal((100 if bs == 16 else 40, C)).astype(np.float32)
    w = tf.constant(RNG.standard_normal((len(coords), bs, bs)).astype(np.float32))

    def product(rows):
        x_in = rows if feature_axis == 1 else rows.T
        y = blocksparse_matmul(tf.constant(x_in), w, tf.constant(coords), bs, CB * bs, KB * bs,
                               feature_axis, transpose_w=transpose_w).numpy()
        return y if feature_axis == 1 else y.T

    batch = product(x)
    W = dense_reference(layout, bs, w.numpy().astype(np.float64))
    assert rel_err(batch, x.astype(np.float64) @ (W.T if transpose_w else W)) < 1e-5
    for n in (0, 17, 39):
        np.testing.assert_array_equal(product(x[n:n + 1])[0], batch[n])
    np.testing.assert_array_equal(product(x[5:8]), batch[5:8])


@pytest.mark.parametrize("bs", [1, 8, 32])
@pytest.mark.parametrize("feature_axis", [1, 0])
def test_empty_batch(bs, feature_axis):
    """No examples: empty y and dx of the right shapes, and a weight gradient of zeros."""
    bsmm = BlocksparseMatMul(rect_layout(), block_size=bs, feature_axis=feature_axis)
    w = tf.constant(RNG.standard_normal(bsmm.w_shape).astype(np.float32))
    x = tf.zeros(bsmm.i_shape(0))
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = bsmm(x, w)
    assert y.shape == bsmm.o_shape(0)
    dx, dw = tape.gradient(y, [x, w], output_gradients=tf.zeros(bsmm.o_shape(0)))
    assert dx.shape == bsmm.i_shape(0)
    np.testing.assert_array_equal(dw.numpy(), np.zeros(bsmm.w_shape))
