"""sparse_dot (conditional computation) against float64 numpy references."""

import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf import sparse_dot
from blocksparse_tf._ops import ops
from tests.half_precision import matmul_summed_in, within_float32_accumulation

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


def masked_case(bs, n, masks):
    """x (n, 5 bs), w (5 bs, 3 bs), bias and the masks `masks` names ("none", "in", "out" or
    "both"; the others None), from random_masks, the input mask's active entries scaled by 0.5,
    -2 or 3."""
    m, p = 5 * bs, 3 * bs
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    bias = RNG.standard_normal(p).astype(np.float32)
    in_mask, out_mask = random_masks(n, m // bs, p // bs, masks)
    in_mask = in_mask * RNG.choice([0.5, -2.0, 3.0], in_mask.shape).astype(np.float32)
    return (x, w, bias, in_mask if masks in ("in", "both") else None,
            out_mask if masks in ("out", "both") else None)


@pytest.mark.parametrize("bs", [1, 8, 16, 32, 64])
@pytest.mark.parametrize("masks", ["none", "in", "out", "both"])
@pytest.mark.parametrize("n", [1, 13])
def test_forward_and_gradients(bs, masks, n):
    """Masks with empty rows and columns (random_masks); any nonzero mask value (here 0.5, -2
    or 3) means active, as 1 does."""
    x, w, bias, in_mask, out_mask = masked_case(bs, n, masks)
    dy = RNG.standard_normal((n, w.shape[1])).astype(np.float32)
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


@pytest.mark.parametrize("which", ["in", "out"])
def test_shapes_known_only_when_run(which):
    """In a graph whose x and mask shapes (even their ranks) are unknown until run time, the
    absent mask, the output mask's expansion and the bias still follow the inputs."""
    bs, n, m, p = 8, 5, 24, 16
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    bias = RNG.standard_normal(p).astype(np.float32)
    mask = (RNG.random((n, (m if which == "in" else p) // bs)) < 0.5).astype(np.float32)
    unknown = tf.TensorSpec(None, tf.float32)
    f = tf.function(lambda x, mask: sparse_dot(x, w, bias=bias, block_size=bs,
                                               **{which + "_mask": mask}),
                    input_signature=[tf.TensorSpec((None, m), tf.float32), unknown])
    ref, _, _ = reference(x, w, mask if which == "in" else None,
                          mask if which == "out" else None, bias, bs)
    assert rel_err(f(x, mask), ref) < 1e-5


@pytest.mark.parametrize("bs", [1, 8, 32])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_no_examples(bs, transpose_w):
    """n = 0: empty y and dx of the right shapes, zero weight and bias gradients."""
    m, p = 3 * bs, 2 * bs
    x = tf.zeros((0, m))
    w = tf.constant(RNG.standard_normal((p, m) if transpose_w else (m, p)).astype(np.float32))
    bias = tf.constant(RNG.standard_normal(p).astype(np.float32))
    in_mask, out_mask = np.zeros((0, 3), np.float32), np.zeros((0, 2), np.float32)
    with tf.GradientTape() as tape:
        tape.watch([x, w, bias])
        y = sparse_dot(x, w, in_mask, out_mask, bias=bias, block_size=bs,
                       transpose_w=transpose_w)
    assert y.shape == (0, p)
    dx, dw, db = tape.gradient(y, [x, w, bias], output_gradients=tf.zeros((0, p)))
    assert dx.shape == (0, m)
    np.testing.assert_array_equal(dw.numpy(), np.zeros(w.shape))
    np.testing.assert_array_equal(db.numpy(), np.zeros(p))


def test_inactive_inputs_are_never_read():
    bs, n = 8, 6
    x = RNG.standard_normal((n, 4 * bs)).astype(np.float32)
    in_mask = (RNG.random((n, 4)) < 0.5).astype(np.float32)
    poisoned = x.copy()
    poisoned[np.repeat(in_mask == 0, bs, axis=1)] = np.nan
    w = RNG.standard_normal((4 * bs, 2 * bs)).astype(np.float32)
    y = sparse_dot(poisoned, w, in_mask=in_mask, block_size=bs).numpy()
    np.testing.assert_allclose(y, reference(x, w, in_mask, None, None, bs)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    """float16 / bfloat16 outputs are float32 sums of the (exact) half-precision inputs rounded
    once: each within the bound of tests/half_precision.py, which half-precision sums miss."""
    bs, n = 16, 9
    np_dtype = dtype.as_numpy_dtype
    x = RNG.standard_normal((n, 4 * bs)).astype(np_dtype)
    w = RNG.standard_normal((4 * bs, 3 * bs)).astype(np_dtype)
    in_mask = (RNG.random((n, 4)) < 0.6).astype(np.float32)
    out_mask = (RNG.random((n, 3)) < 0.6).astype(np.float32)
    y = sparse_dot(tf.constant(x), tf.constant(w), in_mask, out_mask, block_size=bs).numpy()
    assert y.dtype == np_dtype
    exact, in_e, out_e = reference(x, w, in_mask, out_mask, None, bs)
    abs_sum = reference(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)), in_mask,
                        out_mask, None, bs)[0]
    assert within_float32_accumulation(y, exact, abs_sum, 4 * bs, np_dtype)
    # The bound tells half-precision sums apart.
    summed_in_half = matmul_summed_in(np_dtype, x * in_e, w) * out_e
    assert not within_float32_accumulation(summed_in_half, exact, abs_sum, 4 * bs, np_dtype)


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
    with pytest.raises(ValueError, match=r"in_mask must hold numbers or booleans .*; got dtype string"):
        sparse_dot(x, w, in_mask=np.full((4, 4), "1"), block_size=8)
    with pytest.raises(ValueError, match="block_size 16 must divide p = 24"):
        sparse_dot(x, tf.ones((32, 24)), block_size=16)
    for bad in (4, 12, 0, 2.5, 8.0):  # 8.0: a float would reach the op's integer attribute
        with pytest.raises(ValueError, match="block_size must be one of"):
            sparse_dot(x, w, block_size=bad)
        with pytest.raises(ValueError, match="block_size must be one of"):
            sparse_dot(x, w, in_mask=np.ones((4, 4)), block_size=bad)
    with pytest.raises(ValueError, match="must agree on m"):
        sparse_dot(x, tf.ones((16, 16)), block_size=8)
    with pytest.raises(ValueError, match="does not match"):
        sparse_dot(x, tf.ones((32, 16), tf.float16), block_size=8)
    for masks in ({}, {"out_mask": np.ones((4, 2))}):
        with pytest.raises(ValueError, match=r"bias must have shape \(p,\)"):
            sparse_dot(x, w, bias=tf.ones(8), block_size=8, **masks)
    # Where the shapes are known only when the graph runs, a wrong bias raises then (it would
    # otherwise broadcast into a wrong output shape).
    for masks in ({}, {"out_mask": np.ones((4, 2), np.float32)}):
        f = tf.function(lambda x, w, b: sparse_dot(x, w, bias=b, block_size=8, **masks),
                        input_signature=[tf.TensorSpec(None)] * 3)
        for bad in (np.ones((4, 1, 16)), np.ones((4, 16)), np.ones((1, 16)), np.ones(15)):
            with pytest.raises(tf.errors.InvalidArgumentError, match="bias|compatible"):
                f(x, w, bad.astype(np.float32))
        bias = np.arange(16, dtype=np.float32)
        expected = sparse_dot(x, w, bias=bias, block_size=8, **masks)
        np.testing.assert_array_equal(f(x, w, bias).numpy(), expected.numpy())
    # transpose_w is a flag (the string "False" would be true) and name a scope name, with or
    # without masks (without, the product is tf.matmul's).
    for masks in ({}, {"in_mask": np.ones((4, 4))}):
        for bad in (0, 1, "False", None):
            with pytest.raises(ValueError, match=f"transpose_w must be True or False, got {bad!r}"):
                sparse_dot(x, w, block_size=8, transpose_w=bad, **masks)
        with pytest.raises(ValueError, match="name must start with a letter.*got 'a b'"):
            sparse_dot(x, w, block_size=8, name="a b", **masks)
    np.testing.assert_array_equal(
        sparse_dot(x, tf.transpose(w), block_size=8, transpose_w=np.True_).numpy(),
        sparse_dot(x, w, block_size=8).numpy())
    # The kernel checks too, when called directly.
    for in_m, out_m, message in [(tf.ones((4, 3)), tf.ones((4, 2)), "in_mask must have shape"),
                                 (tf.ones((4, 4)), tf.ones((3, 2)), "out_mask must have shape")]:
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
            ops().blocksparse_sparse_dot(x, w, in_m, out_m, block_size=8)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="block_size must be one of"):
        ops().blocksparse_sparse_dot(x, w, tf.ones((4, 8)), tf.ones((4, 4)), block_size=4)


# --- The weight gradient op and the transposed product (the gradient's two halves). ---

def random_masks(n, in_blocks, out_blocks, masks, keep=0.5):
    """0/1 float32 masks (all ones where `masks` leaves one out), with empty rows and columns:
    example 0 has no active input block, the last example no active output block, input block 0
    and output block 0 are inactive for every example.  With one example (first and last at
    once) that example keeps its rows, and with one block that block its column, and some of
    what is left is active: the products must not all be empty."""
    in_mask = np.ones((n, in_blocks), np.float32)
    out_mask = np.ones((n, out_blocks), np.float32)
    if masks in ("in", "both"):
        in_mask = _mask_with_empties(n, in_blocks, keep, empty_row=0 if n > 1 else None)
    if masks in ("out", "both"):
        out_mask = _mask_with_empties(n, out_blocks, keep, empty_row=n - 1 if n > 1 else None)
    return in_mask, out_mask


def _mask_with_empties(n, blocks, keep, empty_row):
    mask = (RNG.random((n, blocks)) < keep).astype(np.float32)
    if empty_row is not None:
        mask[empty_row] = 0
    if blocks > 1:
        mask[:, 0] = 0
    rows = [r for r in range(n) if r != empty_row]
    if rows and not mask[rows][:, 1 if blocks > 1 else 0:].any():
        mask[rows[0], -1] = 1  # at least one active entry outside the empty row and column
    return mask


def grad_references(x, dy, w, in_mask, out_mask, bs):
    """float64 dw = (x * in)^T (dy * out) and dx = (dy * out) w^T * in."""
    in_e = np.repeat(in_mask != 0, bs, axis=1)
    out_e = np.repeat(out_mask != 0, bs, axis=1)
    x_in, dy_out = x.astype(np.float64) * in_e, dy.astype(np.float64) * out_e
    return x_in.T @ dy_out, (dy_out @ w.astype(np.float64).T) * in_e


@pytest.mark.parametrize("bs", [1, 8, 16, 32, 64])
@pytest.mark.parametrize("masks", ["none", "in", "out", "both"])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_grad_w_and_transposed_dx_ops(bs, masks, n):
    m, p = 3 * bs, 2 * bs
    x = RNG.standard_normal((n, m)).astype(np.float32)
    dy = RNG.standard_normal((n, p)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    in_mask, out_mask = random_masks(n, 3, 2, masks)
    ops().blocksparse_sparse_dot_grad_w(x, dy, np.ones_like(in_mask), np.ones_like(out_mask),
                                        block_size=bs)  # leaves nonzero memory for the allocator
    dw = ops().blocksparse_sparse_dot_grad_w(x, dy, in_mask, out_mask, block_size=bs).numpy()
    dx = ops().blocksparse_sparse_dot(dy, w, out_mask, in_mask, block_size=bs, transpose_w=True).numpy()
    dw_ref, dx_ref = grad_references(x, dy, w, in_mask, out_mask, bs)
    assert dw.shape == (m, p) and dx.shape == (n, m)
    assert rel_err(dw, dw_ref) < 1e-5
    assert rel_err(dx, dx_ref) < 1e-5
    # Blocks no example reaches are written as exact zeros (and so is the whole of dx there).
    never = np.kron((in_mask.T @ out_mask) == 0, np.ones((bs, bs))).astype(bool)
    assert np.all(dw[never] == 0) and np.all(dw[~never] != 0)
    if masks in ("in", "both"):
        assert np.all(dx[:, :bs] == 0)
        assert n == 1 or np.all(dx[0] == 0)  # one example keeps its row (random_masks)


def test_grad_w_never_reads_inactive_entries():
    bs, n = 8, 20
    x = RNG.standard_normal((n, 4 * bs)).astype(np.float32)
    dy = RNG.standard_normal((n, 3 * bs)).astype(np.float32)
    in_mask, out_mask = random_masks(n, 4, 3, "both")
    x_bad, dy_bad = x.copy(), dy.copy()
    x_bad[np.repeat(in_mask == 0, bs, axis=1)] = np.nan
    dy_bad[np.repeat(out_mask == 0, bs, axis=1)] = np.nan
    dw = ops().blocksparse_sparse_dot_grad_w(x_bad, dy_bad, in_mask, out_mask, block_size=bs).numpy()
    dw_ref, _ = grad_references(x, dy, np.zeros((4 * bs, 3 * bs)), in_mask, out_mask, bs)
    assert rel_err(dw, dw_ref) < 1e-5


def masks_with_quiet_blocks(n, in_blocks, out_blocks, in_keep, out_keep, quiet, quiet_keep):
    """Random masks active at in_keep / out_keep, except input and output blocks 0 .. quiet - 1,
    active for round(quiet_keep n) examples each."""
    in_mask = (RNG.random((n, in_blocks)) < in_keep).astype(np.float32)
    out_mask = (RNG.random((n, out_blocks)) < out_keep).astype(np.float32)
    for mask in (in_mask, out_mask):
        for b in range(quiet):
            mask[:, b] = 0
            mask[RNG.choice(n, round(quiet_keep * n), replace=False), b] = 1
    return in_mask, out_mask


@pytest.mark.parametrize("bs,quiet_keep", [(8, 0.1), (16, 0.2)])
@pytest.mark.parametrize("wider", ["outputs", "inputs"])
def test_masked_wide_weight_gradient_gives_the_block_pairs_sums(bs, quiet_keep, wider):
    """Where one side of a tile of dw is active enough (from 20% of its entries for bs 8, 40% for
    bs 16), each block of the other side is one product over its examples against the wide
    side's blocks side by side, inactive ones zeroed: right against float64 (with NaNs in the
    inactive entries, which must never count), and bitwise equal to the block pairs' sums.  A
    pair of blocks (i, j) alone, both quiet, takes the block pairs.  The wider side decides
    which side's blocks the products run over (with inputs wider, dy's: products of dw's
    blocks turned around).  20 x 18 blocks: tiles of 256 features and partial ones; 300
    examples: a partial last mask word."""
    n, in_blocks, out_blocks, quiet = 300, 20, 18, 2
    keeps = (0.5, 0.75) if wider == "outputs" else (0.75, 0.5)
    in_mask, out_mask = masks_with_quiet_blocks(n, in_blocks, out_blocks, *keeps, quiet, quiet_keep)
    x = RNG.standard_normal((n, in_blocks * bs)).astype(np.float32)
    dy = RNG.standard_normal((n, out_blocks * bs)).astype(np.float32)
    x_bad, dy_bad = x.copy(), dy.copy()
    x_bad[np.repeat(in_mask == 0, bs, axis=1)] = np.nan
    dy_bad[np.repeat(out_mask == 0, bs, axis=1)] = np.inf
    dw = ops().blocksparse_sparse_dot_grad_w(x_bad, dy_bad, in_mask, out_mask,
                                             block_size=bs).numpy()
    dw_ref, _ = grad_references(x, dy, np.zeros((x.shape[1], dy.shape[1])), in_mask, out_mask, bs)
    assert rel_err(dw, dw_ref) < 1e-5
    for i in range(quiet):
        for j in range(quiet):
            cols_i, cols_j = slice(i * bs, (i + 1) * bs), slice(j * bs, (j + 1) * bs)
            pair = ops().blocksparse_sparse_dot_grad_w(
                x[:, cols_i], dy[:, cols_j], in_mask[:, i:i + 1], out_mask[:, j:j + 1],
                block_size=bs).numpy()
            assert np.array_equal(dw[cols_i, cols_j], pair)


@pytest.mark.parametrize("bs", [1, 8, 16])
@pytest.mark.parametrize("wider", ["outputs", "inputs"])
def test_masked_wide_weight_gradient_with_non_finite_active_entries(bs, wider):
    """An infinity in an active entry of the less active side would meet the zeros of the wide
    side's inactive blocks (infinity times zero is NaN): dw must still be what the block pairs
    give, non-finite only in the blocks where the infinity's example is active on both sides."""
    n, in_blocks, out_blocks = 70, 40, 36
    keeps = (0.5, 0.75) if wider == "outputs" else (0.75, 0.5)
    in_mask = (RNG.random((n, in_blocks)) < keeps[0]).astype(np.float32)
    out_mask = (RNG.random((n, out_blocks)) < keeps[1]).astype(np.float32)
    x = RNG.standard_normal((n, in_blocks * bs)).astype(np.float32)
    dy = RNG.standard_normal((n, out_blocks * bs)).astype(np.float32)
    r = 5
    if wider == "outputs":  # the products run over x's blocks
        b = int(np.flatnonzero(in_mask[r])[0])
        x_bad, dy_bad = x.copy(), dy.copy()
        x_bad[r, b * bs] = np.inf
        hit = np.zeros((in_blocks, out_blocks), bool)
        hit[b] = out_mask[r] != 0
    else:  # over dy's blocks
        b = int(np.flatnonzero(out_mask[r])[0])
        x_bad, dy_bad = x.copy(), dy.copy()
        dy_bad[r, b * bs] = -np.inf
        hit = np.zeros((in_blocks, out_blocks), bool)
        hit[:, b] = in_mask[r] != 0
    dw = ops().blocksparse_sparse_dot_grad_w(x_bad, dy_bad, in_mask, out_mask,
                                             block_size=bs).numpy()
    dw_ref, _ = grad_references(x, dy, np.zeros((x.shape[1], dy.shape[1])), in_mask, out_mask, bs)
    hit_entries = np.kron(hit, np.ones((bs, bs))).astype(bool)
    # Non-finite exactly where the infinity's feature meets the hit blocks: the row of dw of
    # x's infinite entry, or the column of dy's; every other entry is the reference's.
    non_finite = np.zeros_like(hit_entries)
    if wider == "outputs":
        non_finite[b * bs] = hit_entries[b * bs]
    else:
        non_finite[:, b * bs] = hit_entries[:, b * bs]
    assert non_finite.any()
    np.testing.assert_array_equal(~np.isfinite(dw), non_finite)
    assert rel_err(dw[~non_finite], dw_ref[~non_finite]) < 1e-5


@pytest.mark.parametrize("keep", [0.04, 0.3, 0.97])
@pytest.mark.parametrize("bs", [8, 32])
def test_examples_listed_at_every_activity(keep, bs):
    """Block pairs' examples are listed by a scalar loop where pairs share under two examples per
    64 rows on average and by vector code from there (AVX-512's compress, AVX2's table lookup;
    up to 64 per word, a partial last word): the products must not depend on which."""
    n, m, p = 300, 12 * bs, 9 * bs
    x = RNG.standard_normal((n, m)).astype(np.float32)
    dy = RNG.standard_normal((n, p)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    in_mask, out_mask = random_masks(n, 12, 9, "both", keep=keep)
    y = ops().blocksparse_sparse_dot(x, w, in_mask, out_mask, block_size=bs).numpy()
    dw = ops().blocksparse_sparse_dot_grad_w(x, dy, in_mask, out_mask, block_size=bs).numpy()
    dw_ref, _ = grad_references(x, dy, w, in_mask, out_mask, bs)
    y_ref = reference(x, w, in_mask, out_mask, None, bs)[0]
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(dw, dw_ref) < 1e-5


@pytest.mark.parametrize("bs", [8, 16, 64])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_many_examples_per_block_pair(bs, transpose_w):
    """Dozens of examples per (input block, output block) pair: full register tiles and a
    shorter last one, packed weight blocks, several forward tasks and input groups (more than
    512 features each way), plus an input block used by only 3 examples (its weight block read
    in place); NaN wherever a mask is off, in x and in the output gradient, must never be
    read."""
    n, m, p = 157, 640, 576
    x = RNG.standard_normal((n, m)).astype(np.float32)
    dy = RNG.standard_normal((n, p)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    in_mask = (RNG.random((n, m // bs)) < 0.7).astype(np.float32)
    out_mask = (RNG.random((n, p // bs)) < 0.7).astype(np.float32)
    in_mask[:, 1] = 0
    in_mask[[4, 50, 151], 1] = 1
    x_bad, dy_bad = x.copy(), dy.copy()
    x_bad[np.repeat(in_mask == 0, bs, axis=1)] = np.nan
    dy_bad[np.repeat(out_mask == 0, bs, axis=1)] = np.nan
    xt = tf.constant(x_bad)
    wt = tf.constant(w.T.copy() if transpose_w else w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        y = sparse_dot(xt, wt, in_mask, out_mask, block_size=bs, transpose_w=transpose_w)
    dx, dw = tape.gradient(y, [xt, wt], output_gradients=tf.constant(dy_bad))
    y_ref, _, out_e = reference(x, w, in_mask, out_mask, None, bs)
    dw_ref, dx_ref = grad_references(x, dy, w, in_mask, out_mask, bs)
    assert rel_err(y, y_ref) < 1e-5
    assert np.all(y.numpy()[out_e == 0] == 0)
    assert rel_err(dx, dx_ref) < 1e-5
    assert rel_err(dw, dw_ref.T if transpose_w else dw_ref) < 1e-5


def check_forward_never_reads_inactive(x, w, in_mask, out_mask, bs, transpose_w):
    """The forward (w given as it is, or transposed for transpose_w) against the float64
    reference, with NaN in x wherever the input mask is off; inactive outputs exactly zero."""
    x_bad = x.copy()
    x_bad[np.repeat(in_mask == 0, bs, axis=1)] = np.nan
    wt = w.T.copy() if transpose_w else w
    y = sparse_dot(x_bad, wt, in_mask, out_mask, block_size=bs, transpose_w=transpose_w).numpy()
    y_ref, _, out_e = reference(x, w, in_mask, out_mask, None, bs)
    assert rel_err(y, y_ref) < 1e-5
    assert np.all(y[out_e == 0] == 0)


@pytest.mark.parametrize("bs", [8, 16, 32])
def test_output_blocks_in_passes(bs):
    """A layer wide enough that each forward task takes its output blocks in several passes
    (their active rows of y's panels fitting in 512 KiB each, input blocks outside): every
    output block once, whatever pass it falls in; output blocks active nowhere, for one example
    or for all of them, on pass boundaries or not.  NaN wherever a mask is off."""
    n, m, p = 1024, 64, 4096
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    in_mask = (RNG.random((n, m // bs)) < 0.5).astype(np.float32)
    out_mask = (RNG.random((n, p // bs)) < 0.5).astype(np.float32)
    out_mask[:, [3, 17, p // bs - 1]] = 0
    out_mask[:, [5, 40]] = 1
    out_mask[:, 41] = 0
    out_mask[7, 41] = 1
    check_forward_never_reads_inactive(x, w, in_mask, out_mask, bs, False)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_batches_longer_than_one_row_chunk(transpose_w):
    """More examples than the forward works on at a time (1024): three chunks, the last partial
    and not a multiple of 64, with examples active nowhere and block pairs used only in one
    chunk; the first two share enough examples per block pair to be copied into panels, the last
    (65 examples, about 16 per pair) is read in place.  NaN wherever a mask is off."""
    bs, n, m, p = 16, 2113, 80, 48
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    in_mask = (RNG.random((n, m // bs)) < 0.5).astype(np.float32)
    out_mask = (RNG.random((n, p // bs)) < 0.5).astype(np.float32)
    in_mask[1500:1600] = 0
    out_mask[:1024, 2] = 0
    in_mask[1024:, 4] = 0
    check_forward_never_reads_inactive(x, w, in_mask, out_mask, bs, transpose_w)


@pytest.mark.parametrize("bs", [8, 16, 64])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_fully_active_chunks_give_the_block_pairs_sums(bs, transpose_w):
    """Row chunks whose examples are all active in every block are computed as one dense product
    (sums kept in registers across input blocks): right against float64, and bitwise equal to
    what the block pairs compute elsewhere.  Three chunks (1024, 1024 and 65 examples): the
    first fully active; in the second one output block of one example is off, so that task's
    pairs take the general path while its other tasks are dense; in the third one input block
    of one example is off (all its tasks general).  2624 outputs: tasks wider than 256 features
    (640-1024, by the thread count), computed in passes of 256 features of packed weight
    columns, the last one narrower; 640 inputs: each pass in two calls (512 and 128 input
    features), the second going on from the first's sums."""
    n, m, p = 2113, 640, 2624
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    wt = tf.constant(w.T.copy() if transpose_w else w)
    ones_in = np.ones((n, m // bs), np.float32)
    ones_out = np.ones((n, p // bs), np.float32)
    in_mask, out_mask = ones_in.copy(), ones_out.copy()
    out_mask[1500, 3] = 0
    in_mask[2100, 5] = 0
    check_forward_never_reads_inactive(x, w, in_mask, out_mask, bs, transpose_w)
    y = sparse_dot(x, wt, in_mask, out_mask, block_size=bs, transpose_w=transpose_w).numpy()
    y_all = sparse_dot(x, wt, ones_in, ones_out, block_size=bs, transpose_w=transpose_w).numpy()
    y_ref, _, _ = reference(x, w, None, None, None, bs)
    assert rel_err(y_all, y_ref) < 1e-5
    same = np.ones((n, p), bool)
    same[2100] = False
    same[1500, 3 * bs:4 * bs] = False
    assert np.array_equal(y[same], y_all[same])
    # The weight gradient likewise: tiles of dw whose blocks see every example gather each
    # block's rows once; dw's blocks away from input block 5 and output block 3 (whose sums lose
    # one example) come out bitwise as the pairs make them.
    dy = RNG.standard_normal((n, p)).astype(np.float32)

    def grad_w(in_m, out_m):
        with tf.GradientTape() as tape:
            tape.watch(wt)
            out = sparse_dot(x, wt, in_m, out_m, block_size=bs, transpose_w=transpose_w)
        dw = tape.gradient(out, wt, output_gradients=tf.constant(dy)).numpy()
        return dw.T if transpose_w else dw

    dw, dw_all = grad_w(in_mask, out_mask), grad_w(ones_in, ones_out)
    dw_ref, _ = grad_references(x, dy, w, ones_in, ones_out, bs)
    assert rel_err(dw_all, dw_ref) < 1e-5
    same = np.ones((m, p), bool)
    same[5 * bs:6 * bs] = False
    same[:, 3 * bs:4 * bs] = False
    assert np.array_equal(dw[same], dw_all[same])


@pytest.mark.parametrize("bs", [8, 16, 64])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("full_side", ["inputs", "outputs"])
def test_fully_active_side_gives_the_block_pairs_sums(bs, transpose_w, full_side):
    """Where every example is active in every input block, each output block's examples pass
    through several input blocks per call (sums kept in registers); where every example is
    active in every output block of a task, each input block's examples go through all those
    output blocks at once, into task-wide rows.  Either way: right against float64, and bitwise
    equal to the block pairs' sums, which the same product takes once one example's block on
    the full side is switched off (every row but that example's must come out the same).  512
    input features: two or more calls per output block where the inputs are full."""
    n, m, p = 300, 512, 384
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    wt = tf.constant(w.T.copy() if transpose_w else w)
    full = {"inputs": np.ones((n, m // bs), np.float32),
            "outputs": np.ones((n, p // bs), np.float32)}[full_side]
    partial = (RNG.random((n, (p if full_side == "inputs" else m) // bs)) < 0.5).astype(np.float32)
    partial[:, 1] = 0  # a block no example uses
    masks = (lambda f: (f, partial)) if full_side == "inputs" else (lambda f: (partial, f))
    y_full = sparse_dot(x, wt, *masks(full), block_size=bs, transpose_w=transpose_w).numpy()
    y_ref, _, _ = reference(x, w, *masks(full), None, bs)
    assert rel_err(y_full, y_ref) < 1e-5
    one_off = full.copy()
    one_off[7, 2] = 0
    check_forward_never_reads_inactive(x, w, *masks(one_off), bs, transpose_w)
    y_pairs = sparse_dot(x, wt, *masks(one_off), block_size=bs, transpose_w=transpose_w).numpy()
    rows = np.arange(n) != 7
    assert np.array_equal(y_full[rows], y_pairs[rows])


@pytest.mark.parametrize("p", [3, 20, 39])
@pytest.mark.parametrize("out_mask_given", [False, True])
def test_neuron_level_outputs_side_by_side_at_any_width(p, out_mask_given):
    """bs 1 with every output active: a task's outputs go side by side through one product
    whose width is the task's output count, any number (whole vectors, then single columns).
    Such widths once ran vectors past the panel's end (corrupting the heap) under AVX-512 and
    computed nothing under AVX2.  Right against float64, bitwise the pairs' sums, and the input
    gradient (the same product on dy with the masks' roles swapped) right too."""
    n, m = 300, 38
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    in_mask = (RNG.random((n, m)) < 0.5).astype(np.float32)
    full = np.ones((n, p), np.float32)
    out_mask = full if out_mask_given else None
    for _ in range(20):  # a write past the end shows up as a wrong value or a crash, in time
        y = sparse_dot(x, w, in_mask, out_mask, block_size=1).numpy()
        y_ref, _, _ = reference(x, w, in_mask, None, None, 1)
        assert rel_err(y, y_ref) < 1e-5
    one_off = full.copy()
    one_off[7, 2] = 0
    y_pairs = sparse_dot(x, w, in_mask, one_off, block_size=1).numpy()
    rows = np.arange(n) != 7
    assert np.array_equal(y[rows], y_pairs[rows])
    # The input gradient with only an output mask: the product of dy and w^T, every one of its
    # m = 38 outputs active, side by side.
    dy = RNG.standard_normal((n, p)).astype(np.float32)
    out_mask = (RNG.random((n, p)) < 0.5).astype(np.float32)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        z = sparse_dot(xt, w, None, out_mask, block_size=1)
    dx = tape.gradient(z, xt, output_gradients=tf.constant(dy))
    out_e = out_mask != 0
    assert rel_err(dx, (dy.astype(np.float64) * out_e) @ w.astype(np.float64).T) < 1e-5


@pytest.mark.parametrize("transpose_w", [False, True])
def test_panels_gathered_per_task(transpose_w):
    """Output activity concentrated in the first task's output blocks: over the whole product
    block pairs share too few examples for x's rows to be gathered once for all tasks, but that
    task's pairs share enough for panels of its own (the other tasks read in place).  NaN
    wherever a mask is off."""
    bs, n, m, p = 16, 256, 64, 256
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    in_mask = np.ones((n, m // bs), np.float32)
    in_mask[RNG.random(n) < 0.1, 2] = 0
    out_mask = np.zeros((n, p // bs), np.float32)
    out_mask[:, :2] = RNG.random((n, 2)) < 0.5
    out_mask[[3, 100], 9] = 1
    check_forward_never_reads_inactive(x, w, in_mask, out_mask, bs, transpose_w)


@pytest.mark.parametrize("bs", [1, 8, 16, 32, 64])
@pytest.mark.parametrize("masks", ["none", "in", "out", "both"])
def test_transpose_w_forward(bs, masks):
    n, m, p = 33, 4 * bs, 3 * bs
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    bias = RNG.standard_normal(p).astype(np.float32)
    in_mask, out_mask = random_masks(n, 4, 3, masks)
    in_mask = None if masks in ("none", "out") else in_mask
    out_mask = None if masks in ("none", "in") else out_mask
    y = sparse_dot(x, np.ascontiguousarray(w.T), in_mask, out_mask, bias=bias, block_size=bs,
                   transpose_w=True)
    assert rel_err(y, reference(x, w, in_mask, out_mask, bias, bs)[0]) < 1e-5


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("bs,n", [(64, 7), (16, 33), (1, 1)])
def test_gradients_through_sparse_dot(bs, n, transpose_w):
    m, p = 2 * bs, 3 * bs
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    dy = RNG.standard_normal((n, p)).astype(np.float32)
    in_mask, out_mask = random_masks(n, 2, 3, "both", keep=0.7)
    xt = tf.constant(x)
    wt = tf.constant(w.T.copy() if transpose_w else w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        y = sparse_dot(xt, wt, in_mask, out_mask, block_size=bs, transpose_w=transpose_w)
    dx, dw = tape.gradient(y, [xt, wt], output_gradients=tf.constant(dy))
    dw_ref, dx_ref = grad_references(x, dy, w, in_mask, out_mask, bs)
    assert rel_err(dx, dx_ref) < 1e-5
    assert rel_err(dw, dw_ref.T if transpose_w else dw_ref) < 1e-5


def test_gradient_graph_has_no_transpose_and_no_dense_product():
    bs = 8
    x = tf.constant(RNG.standard_normal((5, 4 * bs)).astype(np.float32))
    in_mask, out_mask = random_masks(5, 4, 2, "both")
    for transpose_w, shape in ((False, (4 * bs, 2 * bs)), (True, (2 * bs, 4 * bs))):
        w = tf.constant(RNG.standard_normal(shape).astype(np.float32))

        @tf.function
        def grads(x, w):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = sparse_dot(x, w, in_mask, out_mask, block_size=bs, transpose_w=transpose_w)
            return tape.gradient(y, [x, w])

        types = {op.type for op in grads.get_concrete_function(x, w).graph.get_operations()}
        assert "BlocksparseSparseDotGradW" in types
        assert not types & {"Transpose", "MatMul", "BatchMatMulV2", "BatchMatMulV3"}, types


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_gradients_accumulate_in_float32(dtype):
    """dw and dx in float16 / bfloat16: float32 sums rounded once (tests/half_precision.py)."""
    bs, n = 16, 33
    np_dtype = dtype.as_numpy_dtype
    x = RNG.standard_normal((n, 4 * bs)).astype(np_dtype)
    dy = RNG.standard_normal((n, 3 * bs)).astype(np_dtype)
    w = RNG.standard_normal((4 * bs, 3 * bs)).astype(np_dtype)
    in_mask, out_mask = random_masks(n, 4, 3, "both", keep=0.6)
    dw = ops().blocksparse_sparse_dot_grad_w(x, dy, in_mask, out_mask, block_size=bs).numpy()
    dx = ops().blocksparse_sparse_dot(dy, w, out_mask, in_mask, block_size=bs,
                                      transpose_w=True).numpy()
    assert dw.dtype == np_dtype and dx.dtype == np_dtype
    dw_ref, dx_ref = grad_references(x, dy, w, in_mask, out_mask, bs)
    magnitude = lambda a: np.abs(a.astype(np.float64))  # noqa: E731
    dw_abs, dx_abs = grad_references(magnitude(x), magnitude(dy), magnitude(w), in_mask,
                                     out_mask, bs)
    assert within_float32_accumulation(dw, dw_ref, dw_abs, n, np_dtype)
    assert within_float32_accumulation(dx, dx_ref, dx_abs, 3 * bs, np_dtype)


def test_finite_differences_transpose_w():
    bs, n = 8, 3
    x = tf.constant(RNG.standard_normal((n, 3 * bs)).astype(np.float32))
    w = tf.constant(RNG.standard_normal((2 * bs, 3 * bs)).astype(np.float32))
    in_mask = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 0]], np.float32)
    out_mask = np.array([[1, 1], [0, 1], [1, 0]], np.float32)
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, c: sparse_dot(a, c, in_mask, out_mask, block_size=bs, transpose_w=True), [x, w],
        delta=1e-2)
    for t, num in zip(theoretical, numerical):
        np.testing.assert_allclose(t, num, rtol=2e-2, atol=2e-2)
        assert np.abs(t).max() > 0.1


def test_second_order_finite_differences():
    """The weight gradient op is differentiable too: d/dx and d/ddy of <dw, g>."""
    bs, n = 8, 4
    x = tf.constant(RNG.standard_normal((n, 2 * bs)).astype(np.float32))
    dy = tf.constant(RNG.standard_normal((n, 3 * bs)).astype(np.float32))
    in_mask, out_mask = random_masks(n, 2, 3, "both", keep=0.7)
    in_mask[1:, 0] = 1  # keep some of every block active
    out_mask[:-1, 0] = 1
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, d: ops().blocksparse_sparse_dot_grad_w(a, d, in_mask, out_mask, block_size=bs),
        [x, dy], delta=1e-2)
    for t, num in zip(theoretical, numerical):
        np.testing.assert_allclose(t, num, rtol=2e-2, atol=2e-2)
        assert np.abs(t).max() > 0.1


DETERMINISM_SCRIPT = r"""
import hashlib, sys, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from blocksparse_tf import sparse_dot
rng = np.random.default_rng(5)
n, bs = 301, 16
# Half of the blocks active each side (block pairs), then one side or both full (the paths
# that share work across input or output blocks): the forward's tasks span 8 output blocks
# with one thread and 4 with two.
for transpose_w, keep_in, keep_out in [(False, 0.5, 0.5), (True, 0.5, 0.5), (False, 1, 0.25),
                                       (False, 0.25, 1), (True, 1, 1)]:
    x = tf.constant(rng.standard_normal((n, 24 * bs)).astype(np.float32))
    w = tf.constant(rng.standard_normal((16 * bs, 24 * bs) if transpose_w else (24 * bs, 16 * bs))
                    .astype(np.float32))
    in_mask = (rng.random((n, 24)) < keep_in).astype(np.float32)
    out_mask = (rng.random((n, 16)) < keep_out).astype(np.float32)
    with tf.GradientTape() as t:
        t.watch([x, w])
        y = sparse_dot(x, w, in_mask, out_mask, block_size=bs, transpose_w=transpose_w)
        loss = tf.reduce_sum(y * y)
    dx, dw = t.gradient(loss, [x, w])
    h = hashlib.sha256()
    for a in (y, dx, dw):
        h.update(a.numpy().tobytes())
    print(h.hexdigest())
"""


def test_gradients_bitwise_deterministic_across_thread_counts(outputs_across_thread_counts):
    outputs = outputs_across_thread_counts(DETERMINISM_SCRIPT)
    assert outputs[0].count("\n") == 5
    assert len(outputs) >= 2 and all(out == outputs[0] for out in outputs)


def test_bad_inputs_to_grad_w_op_raise():
    x, dy = tf.ones((4, 32)), tf.ones((4, 16))
    in_m, out_m = tf.ones((4, 4)), tf.ones((4, 2))
    grad_w = ops().blocksparse_sparse_dot_grad_w
    for args, message in [
            ((tf.ones((4, 32, 1)), dy, in_m, out_m), r"x \(n, m\) and dy \(n, p\) must be matrices"),
            ((x, tf.ones((5, 16)), in_m, out_m), r"with the same n; got x \[4,32\] and dy \[5,16\]"),
            ((x, tf.ones((4, 12)), in_m, out_m), r"block_size 8 must divide m and p; got x \[4,32\] and dy \[4,12\]"),
            ((x, dy, tf.ones((4, 3)), out_m), r"in_mask must have shape \(n, m / block_size\) = \(4, 4\); got \[4,3\]"),
            ((x, dy, tf.ones((4,)), out_m), r"in_mask must have shape .* got \[4\]"),
            ((x, dy, in_m, tf.ones((3, 2))), r"out_mask must have shape \(n, p / block_size\) = \(4, 2\); got \[3,2\]")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            grad_w(*args, block_size=8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="block_size must be one of 1, 8, 16, 32, 64; got 4"):
        grad_w(x, dy, tf.ones((4, 8)), tf.ones((4, 4)), block_size=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="block_size must be one of"):
        grad_w(tf.ones((4, 32), tf.float16), tf.ones((4, 16), tf.float16), in_m, out_m, block_size=12)


def test_shape_functions_refuse_unsupported_block_sizes():
    """Found when the graph is built (as the matmul's shape functions do), not when it runs."""
    forward = tf.function(lambda: ops().blocksparse_sparse_dot(
        tf.ones((4, 12)), tf.ones((12, 12)), tf.ones((4, 3)), tf.ones((4, 3)), block_size=4))
    with pytest.raises(ValueError, match="block_size must be one of 1, 8, 16, 32, 64; got 4"):
        forward.get_concrete_function()
    grad_w = tf.function(lambda: ops().blocksparse_sparse_dot_grad_w(
        tf.ones((4, 12)), tf.ones((4, 12)), tf.ones((4, 3)), tf.ones((4, 3)), block_size=4))
    with pytest.raises(ValueError, match="block_size must be one of 1, 8, 16, 32, 64; got 4"):
        grad_w.get_concrete_function()


def test_outputs_too_large_for_a_tensor_raise_instead_of_aborting():
    """Empty operands whose products' shapes have more elements than a tensor can hold: an
    error, where building such a TensorShape ends the process."""
    with pytest.raises(tf.errors.InvalidArgumentError, match="too many elements"):
        ops().blocksparse_sparse_dot_grad_w(tf.zeros((0, 2**40)), tf.zeros((0, 2**34)),
                                            tf.zeros((0, 2**34)), tf.zeros((0, 2**28)),
                                            block_size=64)
    # The forward's output (2**30, 2**40) needs an out_mask no tensor can be: its check, which
    # compared against such a shape, says so.
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask must have shape"):
        ops().blocksparse_sparse_dot(tf.zeros((2**30, 0)), tf.zeros((0, 2**40)),
                                     tf.zeros((2**30, 0)), tf.zeros((1, 1)), block_size=64)


def test_masks_of_any_dtype_and_operands_of_unknown_rank():
    """Bool masks work as 0/1 ones do; x and w of a rank unknown until run are checked then."""
    n, m, p, bs = 6, 32, 16, 8
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    in_mask = RNG.random((n, m // bs)) < 0.5
    out_mask = RNG.random((n, p // bs)) < 0.5
    y_ref, _, _ = reference(x, w, in_mask, out_mask, None, bs)
    assert rel_err(sparse_dot(x, w, in_mask, out_mask, block_size=bs), y_ref) < 1e-5
    run = tf.function(lambda a, b: sparse_dot(a, b, in_mask, out_mask, block_size=bs),
                      input_signature=[tf.TensorSpec(None), tf.TensorSpec(None)])
    assert rel_err(run(x, w), y_ref) < 1e-5
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be matrices"):
        run(x[None], w)


def test_bad_inputs_to_transposed_product_raise():
    x = tf.ones((4, 32))
    dot = ops().blocksparse_sparse_dot
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"x \(n, m\) and w \(p, m\) must be matrices with matching m; got x \[4,32\] and w \[32,16\]"):
        dot(x, tf.ones((32, 16)), tf.ones((4, 4)), tf.ones((4, 2)), block_size=8, transpose_w=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"out_mask must have shape \(n, p / block_size\) = \(4, 2\)"):
        dot(x, tf.ones((16, 32)), tf.ones((4, 4)), tf.ones((4, 4)), block_size=8, transpose_w=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="block_size 16 must divide m and p"):
        dot(x, tf.ones((24, 32)), tf.ones((4, 2)), tf.ones((4, 1)), block_size=16, transpose_w=True)
    with pytest.raises(ValueError, match=r"x \(n, m\) and w \(p, m\) must agree on m"):
        sparse_dot(x, tf.ones((32, 16)), block_size=8, transpose_w=True)


def test_shape_functions():
    spec = lambda *shape: tf.TensorSpec(shape, tf.float32)  # noqa: E731

    @tf.function(input_signature=[spec(None, None), spec(None, None), spec(None, None), spec(None, None)])
    def unknown(x, dy, in_m, out_m):
        return ops().blocksparse_sparse_dot_grad_w(x, dy, in_m, out_m, block_size=8)

    assert unknown.get_concrete_function().structured_outputs.shape.rank == 2
    graph = tf.Graph()
    with graph.as_default():
        x, dy = tf.compat.v1.placeholder(tf.float32, (None, 32)), tf.compat.v1.placeholder(tf.float32, (None, 16))
        dw = ops().blocksparse_sparse_dot_grad_w(x, dy, tf.ones((4, 4)), tf.ones((4, 2)), block_size=8)
        assert dw.shape.as_list() == [32, 16]
        y = ops().blocksparse_sparse_dot(x, tf.ones((16, 32)), tf.ones((4, 4)), tf.ones((4, 2)),
                                         block_size=8, transpose_w=True)
        assert y.shape.as_list() == [4, 16]
        with pytest.raises(ValueError, match="evenly divisible by 8"):
            ops().blocksparse_sparse_dot_grad_w(x, tf.ones((4, 12)), tf.ones((4, 4)), tf.ones((4, 1)), block_size=8)
        with pytest.raises(ValueError, match="must be equal"):
            ops().blocksparse_sparse_dot_grad_w(x, dy, tf.ones((4, 3)), tf.ones((4, 2)), block_size=8)
        with pytest.raises(ValueError, match="must be equal"):
            ops().blocksparse_sparse_dot(x, tf.ones((16, 32)), tf.ones((4, 4)), tf.ones((4, 2)), block_size=8)


def test_no_masks_with_unknown_rank_still_takes_matrices_only():
    """Without masks the product is tf.matmul, which would multiply a batch of matrices: an
    input whose rank is known only when the graph runs is checked then, as the kernel does."""
    f = tf.function(lambda x, w: sparse_dot(x, w, block_size=16),
                    input_signature=[tf.TensorSpec(None, tf.float32)] * 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="compatible|matrix"):
        f(tf.ones([2, 4, 16]), tf.ones([16, 32]))
    x, w = np.random.rand(4, 16).astype(np.float32), np.random.rand(16, 32).astype(np.float32)
    np.testing.assert_allclose(f(x, w).numpy(), x.astype(np.float64) @ w, rtol=1e-5)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_no_masks_with_sizes_known_only_when_run_still_need_block_size_to_divide(transpose_w):
    """Eagerly a block size that does not divide m or p raises; in a graph that learns the sizes
    only when it runs, the dense product without masks must refuse them too (it multiplied)."""
    f = tf.function(lambda x, w: sparse_dot(x, w, block_size=32, transpose_w=transpose_w),
                    input_signature=[tf.TensorSpec([None, None], tf.float32)] * 2)
    w_of = (lambda m, p: tf.ones([p, m])) if transpose_w else (lambda m, p: tf.ones([m, p]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"block_size 32 must divide m =\] \[40\]"):
        f(tf.ones([4, 40]), w_of(40, 64))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"block_size 32 must divide p =\] \[48\]"):
        f(tf.ones([4, 64]), w_of(64, 48))
    assert f(tf.ones([4, 64]), w_of(64, 96)).shape == (4, 96)


def test_mask_entries_active_where_nonzero_subnormals_counting_as_zero():
    """As documented: NaN, infinities and negative values are active; a subnormal entry counts
    as zero (TensorFlow's CPU comparisons flush it), in float32 and float64 masks alike."""
    x, w = tf.ones([1, 32]), tf.ones([32, 8])
    for value, dtype, active in ((np.nan, np.float32, True), (-np.inf, np.float32, True),
                                 (-2.0, np.float32, True), (1e-45, np.float32, False),
                                 (1e-310, np.float64, False), (1e-30, np.float32, True),
                                 (1e-7, np.float16, False), (6.2e-5, np.float16, True),
                                 (np.nan, np.float16, True), (-np.inf, np.float16, True)):
        y = sparse_dot(x, w, in_mask=np.array([[value, 0, 0, 0]], dtype), block_size=8)
        np.testing.assert_array_equal(y.numpy(), np.full((1, 8), 8.0 if active else 0.0),
                                      err_msg=f"{value} as {np.dtype(dtype).name}")


def test_one_mask_with_operands_of_unknown_rank():
    """The missing mask is made from x's and w's shapes: a vector among them, known only when
    the graph runs, is refused as one (not an out-of-range slice of its shape)."""
    for masks in ({"out_mask": tf.ones((4, 2))}, {"in_mask": tf.ones((4, 4))}):
        f = tf.function(lambda x, w: sparse_dot(x, w, block_size=8, **masks),
                        input_signature=[tf.TensorSpec(None)] * 2)
        for x, w, bad in ((tf.ones(32), tf.ones((32, 16)), "x"), (tf.ones((4, 32)), tf.ones(32), "w")):
            with pytest.raises(tf.errors.InvalidArgumentError, match=f"tensor {bad} .* expected shape"):
                f(x, w)
        assert f(tf.ones((4, 32)), tf.ones((32, 16))).shape == (4, 16)


def test_sizes_of_2_to_the_31_or_more_known_only_when_run():
    """Zero-sized operands with a dimension of 2**31 or more: a graph reading their shapes as
    int32 failed where eager calls gave (0, 0)."""
    spec = [tf.TensorSpec([None, None])] * 3
    with_mask = tf.function(lambda x, w, m: sparse_dot(x, w, in_mask=m, block_size=64),
                            input_signature=spec)
    without = tf.function(lambda x, w: sparse_dot(x, w, block_size=64), input_signature=spec[:2])
    x, w = tf.zeros((0, 2 ** 40)), tf.zeros((2 ** 40, 0))
    assert with_mask(x, w, tf.zeros((0, 2 ** 34))).shape == (0, 0)
    assert without(x, w).shape == (0, 0)


def test_output_gradient_of_the_wrong_shape_is_named_as_such():
    """The gradient runs the product backwards with dy as its x and out_mask as its in_mask: a
    wrong dy was reported as a wrong in_mask."""
    x, w = tf.ones((4, 32)), tf.ones((32, 16))
    for dy in (tf.ones((5, 16)), tf.ones((4, 8))):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = sparse_dot(x, w, np.ones((4, 4)), block_size=8)
        with pytest.raises(ValueError, match=r"output gradient must have its output's shape "
                                             r"\(n, p\) = \(4, 16\); got \(" + str(dy.shape[0])):
            tape.gradient(y, x, output_gradients=dy)


def test_non_finite_bias_stays_out_of_inactive_outputs():
    """bias is added only where out_mask is nonzero: where it is 0 the output is exactly 0,
    even for an infinite or NaN bias (inf * 0 would be NaN), and the bias gradient sums dy
    over the active rows only."""
    x = tf.constant(np.random.rand(3, 32), tf.float32)
    w = tf.constant(np.random.rand(32, 32), tf.float32)
    out_mask = np.array([[0, 1], [1, 0], [1, 1]], np.float32)
    for value in (np.inf, np.nan):
        y = sparse_dot(x, w, out_mask=out_mask, bias=np.full(32, value, np.float32),
                       block_size=16).numpy()
        inactive = np.repeat(out_mask, 16, axis=1) == 0
        assert np.all(y[inactive] == 0)
        assert np.all(~np.isfinite(y[~inactive]))
    b = tf.Variable(np.random.rand(32).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(sparse_dot(x, w, out_mask=out_mask, bias=b, block_size=16)
                             * tf.range(32, dtype=tf.float32))
    expected = (np.repeat(out_mask, 16, axis=1) * np.arange(32)).sum(axis=0)
    np.testing.assert_allclose(tape.gradient(loss, b).numpy(), expected)


@pytest.mark.parametrize("bs", [1, 8, 32])
@pytest.mark.parametrize("masks", ["in", "out", "both"])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_dense_implementation_against_reference_and_kernels(bs, masks, transpose_w):
    """implementation="dense" (one tf.matmul, masks applied around it) gives the reference's
    product and gradients, as the kernels do; NaN and infinity in x's inactive blocks stay
    out of both, and their gradient there is 0."""
    n, p = 13, 3 * bs
    x, w, bias, in_mask, out_mask = masked_case(bs, n, masks)
    y_ref, in_e, out_e = reference(x, w, in_mask, out_mask, bias, bs)
    x_poisoned = np.where(in_e != 0, x, RNG.choice([np.nan, np.inf, -np.inf], x.shape))
    x_poisoned = x_poisoned.astype(np.float32)
    dy = RNG.standard_normal((n, p)).astype(np.float32)
    dyo = dy.astype(np.float64) * out_e
    stored_w = w.T.copy() if transpose_w else w
    results = {}
    for implementation in ("sparse", "dense"):
        xt, wt, bt = tf.constant(x_poisoned), tf.constant(stored_w), tf.constant(bias)
        with tf.GradientTape() as tape:
            tape.watch([xt, wt, bt])
            y = sparse_dot(xt, wt, in_mask, out_mask, bias=bt, block_size=bs,
                           transpose_w=transpose_w, implementation=implementation)
        dx, dw, db = tape.gradient(y, [xt, wt, bt], output_gradients=tf.constant(dy))
        dw = dw.numpy().T if transpose_w else dw.numpy()
        assert rel_err(y, y_ref) < 1e-5, implementation
        assert rel_err(dx, (dyo @ w.astype(np.float64).T) * in_e) < 1e-5, implementation
        assert rel_err(dw, (x.astype(np.float64) * in_e).T @ dyo) < 1e-5, implementation
        assert rel_err(db, dyo.sum(axis=0)) < 1e-5, implementation
        assert np.all(dx.numpy()[in_e == 0] == 0) and np.all(y.numpy()[out_e == 0] == 0)
        results[implementation] = y.numpy()
    np.testing.assert_allclose(results["dense"], results["sparse"], rtol=1e-5, atol=1e-5)


def test_dense_implementation_keeps_a_non_finite_bias_out_of_inactive_outputs():
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    w = RNG.standard_normal((32, 32)).astype(np.float32)
    out_mask = np.array([[0, 1], [1, 0], [1, 1]], np.float32)
    inactive = np.repeat(out_mask, 16, axis=1) == 0
    for value in (np.inf, np.nan):
        y = sparse_dot(x, w, out_mask=out_mask, bias=np.full(32, value, np.float32),
                       block_size=16, implementation="dense").numpy()
        assert np.all(y[inactive] == 0)
        assert np.all(~np.isfinite(y[~inactive]))


def test_dense_implementation_checks_shapes_known_only_when_run():
    """Where shapes are unknown until run time, a mask that does not fit x or the output, and
    sizes that block_size does not divide, raise errors that name them."""
    bs, n, m, p = 8, 5, 24, 16
    x = RNG.standard_normal((n, m)).astype(np.float32)
    w = RNG.standard_normal((m, p)).astype(np.float32)
    in_mask = (RNG.random((n, m // bs)) < 0.5).astype(np.float32)
    out_mask = (RNG.random((n, p // bs)) < 0.5).astype(np.float32)
    unknown = tf.TensorSpec(None, tf.float32)
    f = tf.function(lambda x, w, i, o: sparse_dot(x, w, i, o, block_size=bs,
                                                  implementation="dense"),
                    input_signature=[unknown] * 4)
    ref, _, _ = reference(x, w, in_mask, out_mask, None, bs)
    assert rel_err(f(x, w, in_mask, out_mask), ref) < 1e-5
    bad = [((x, w, in_mask[:, :2], out_mask), r"in_mask must have shape \(n, m / block_size\)"),
           ((x[:4], w, in_mask, out_mask), r"in_mask must have shape \(n, m / block_size\)"),
           ((x, w, in_mask, out_mask[:4]), r"out_mask must have shape \(n, p / block_size\)"),
           ((x, w, in_mask, out_mask[:, :1]), r"out_mask must have shape \(n, p / block_size\)"),
           ((x[:, :20], w[:20], in_mask, out_mask), "block_size 8 must divide m"),
           ((x, w[:, :12], in_mask, out_mask), "block_size 8 must divide p")]
    for args, match in bad:
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            f(*args)


@pytest.mark.parametrize("implementation", ["Dense", "", None, 1, "kernel"])
def test_unknown_implementation_raises(implementation):
    x = np.ones((2, 16), np.float32)
    with pytest.raises(ValueError, match="implementation must be one of"):
        sparse_dot(x, np.ones((16, 16), np.float32), out_mask=np.ones((2, 2), np.float32),
                   block_size=8, implementation=implementation)
