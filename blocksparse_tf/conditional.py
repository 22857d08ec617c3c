"""Conditional computation: a product with per-example block masks on its input and output.

From Bengio, Bacon, Pineau and Precup, "Conditional Computation in Neural Networks for faster
models" (arXiv 1511.06297)::

    O = (dot(x * expand(in_mask), w) + bias) * expand(out_mask)

For an (n, m) matrix a mask has shape (n, m / block_size) and ``expand`` repeats each entry over
its block of features.  An entry is active where it is nonzero (or True): masks are 0/1, and any
other value counts as 1, not as a scale.  The kernel skips every (example, input block, output
block) triple with an inactive mask entry, so the cost follows the active fractions.
"""

import numpy as np
import tensorflow as tf

from blocksparse_tf._ops import ops
from blocksparse_tf.layouts import _check_bool
from blocksparse_tf.matmul import (check_block_size, check_float_dtype, check_name,
                                   checked_when_run)


def _static_dim(t, i):
    return t.shape[i] if t.shape.rank is not None else None


def check_mask(mask, name, rows, features, block_size):
    """Float32 0/1 mask of shape (rows, features / block_size), or all ones if mask is None."""
    if mask is None:
        return None
    mask = tf.convert_to_tensor(mask)
    if not (mask.dtype.is_bool or mask.dtype.is_integer or mask.dtype.is_floating):
        raise ValueError(f"{name} must hold numbers or booleans (nonzero: active); got dtype "
                         f"{mask.dtype.name}")
    expected = (rows, features // block_size if features is not None else None)
    if mask.shape.rank is None:  # checked when run, before anything reads its columns
        message = f"{name} must be a matrix (n, blocks)"
        with tf.control_dependencies([tf.debugging.assert_rank(mask, 2, message=message)]):
            mask = tf.identity(mask)
        mask.set_shape([None, None])
    if mask.shape.rank is not None and (
            mask.shape.rank != 2 or not mask.shape.is_compatible_with(expected)):
        raise ValueError(f"{name} must have shape (n, {'m' if name == 'in_mask' else 'p'} / block_size)"
                         f" = {expected}; got {mask.shape}")
    if mask.dtype == tf.bool:
        active = mask
    elif mask.dtype == tf.float16:
        # TensorFlow compares float16 without flushing subnormals to zero, as float32,
        # bfloat16 and float64 comparisons here do: a float16 subnormal counts as zero too (and
        # NaN, which no comparison holds for, as active).
        active = tf.logical_not(tf.abs(mask) < np.finfo(np.float16).tiny)
    else:
        active = tf.not_equal(mask, 0)
    return tf.cast(active, tf.float32)


def expand_mask(mask, block_size):
    """Repeats each mask entry over its block: (n, blocks) -> (n, blocks * block_size)."""
    # A broadcast and a reshape (three ops) rather than tf.repeat, whose many small ops took
    # about 0.5 ms per eager call, more than a small layer's product.
    rows, blocks = _matrix_dims(mask)
    expanded = tf.broadcast_to(mask[:, :, None], [rows, blocks, block_size])
    return tf.reshape(expanded, [rows, blocks * block_size])


def _matrix_dims(t):
    """The two dimensions of matrix t: Python ints where known (no ops when eager), else scalar
    tensors (also where the rank is unknown until run time)."""
    static = [_static_dim(t, i) for i in (0, 1)]
    if None not in static:
        return static
    dynamic = tf.shape(t, out_type=tf.int64)  # int32 would fail from 2**31 (zero-sized t)
    return [d if d is not None else dynamic[i] for i, d in enumerate(static)]


IMPLEMENTATIONS = ("sparse", "dense")


def check_implementation(implementation):
    """implementation, checked to be one of IMPLEMENTATIONS."""
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    return implementation


def sparse_dot(x, w, in_mask=None, out_mask=None, bias=None, block_size=32, transpose_w=False,
               name=None, implementation="sparse"):
    """(dot(x * expand(in_mask), w) + bias) * expand(out_mask), skipping inactive blocks.

    Parameters
    ----------
    x : tensor (n, m)
    w : tensor (m, p), dense; (p, m) with transpose_w, which then multiplies by w^T
    in_mask : (n, m / block_size), optional
        Nonzero where an input block of an example takes part (NaN too; a subnormal counts as
        zero); absent means all do.  The product never reads x where the mask is 0.  With
        neither mask the product is tf.matmul's, whose rounding may change with the thread
        count and the batch; the kernels' sums, which do not, run wherever a mask is given.
    out_mask : (n, p / block_size), optional
        Nonzero where an output block of an example is computed; elsewhere the output is 0.
    bias : (p,), optional
        Added only where out_mask is nonzero.
    block_size : int
        Features per mask entry: 1, 8, 16, 32 (default) or 64; must divide m and p.
    transpose_w : bool
        Use w^T (w stored as (p, m)) without a transposed copy.
    name : str, optional
        Name scope of the ops (default "sparse_dot").
    implementation : "sparse" (default) or "dense"
        "sparse": the block-skipping kernels, whose cost follows the active blocks.  "dense":
        one dense ``tf.matmul`` of x with its inactive blocks set to zero, then the output's
        inactive blocks set to zero (the same result and gradients up to rounding, and, like
        the kernels, never a value of x or of the bias from an inactive block).  For GPUs
        where the active fractions are too high for the kernels to win: in 16-bit on an H100
        the kernels beat dense cuBLAS only for bs 64 with many examples and about 10% active
        outputs (see docs/benchmarks_gpu.md); on the CPU the kernels were faster at every
        activity measured.  Unlike the kernels, the dense product multiplies inactive inputs'
        zeros by their weights, so a weight that is infinite or NaN spreads to its whole
        output column, and its sums' rounding may change with the thread count.

    Returns
    -------
    (n, p) tensor of x's dtype.  Gradients flow to x, w and bias (masks get none).
    """
    transpose_w = _check_bool("transpose_w", transpose_w)
    implementation = check_implementation(implementation)
    with tf.name_scope(check_name(name) or "sparse_dot"):
        x = tf.convert_to_tensor(x)
        w = tf.convert_to_tensor(w, dtype=x.dtype if isinstance(w, np.ndarray) else None)
        w_dims = "(p, m)" if transpose_w else "(m, p)"
        check_float_dtype(x.dtype, "x")
        if w.dtype != x.dtype:
            raise ValueError(f"w dtype {w.dtype.name} does not match x dtype {x.dtype.name}")
        if x.shape.rank not in (None, 2) or w.shape.rank not in (None, 2):  # else checked when run
            raise ValueError(f"x (n, m) and w {w_dims} must be matrices; got x {x.shape}, w {w.shape}")
        block_size = check_block_size(block_size)
        m_axis = 1 if transpose_w else 0  # w's axis of length m
        n, m, p = _static_dim(x, 0), _static_dim(x, 1), _static_dim(w, 1 - m_axis)
        if m is not None and _static_dim(w, m_axis) not in (None, m):
            raise ValueError(f"x (n, m) and w {w_dims} must agree on m; got x {x.shape}, w {w.shape}")
        for dim, label in ((m, "m"), (p, "p")):
            if dim is not None and dim % block_size:
                raise ValueError(f"block_size {block_size} must divide {label} = {dim}")
        in_m = check_mask(in_mask, "in_mask", n, m, block_size)
        out_m = check_mask(out_mask, "out_mask", n, p, block_size)
        if in_m is None and out_m is None:  # nothing to skip: the dense product is best
            # tf.matmul would multiply a batch of matrices, and multiply sizes that block_size
            # does not divide; the kernel checks both itself.
            x, w = _ensure_matrix(x, "x"), _ensure_matrix(w, "w")
            if m is None:
                x = _divisible_when_run(x, 1, block_size, "m")
            if p is None:
                w = _divisible_when_run(w, 1 - m_axis, block_size, "p")
            y = tf.matmul(x, w, transpose_b=transpose_w)
            return y if bias is None else y + _check_bias(bias, x.dtype, p, y)
        if implementation == "dense":
            return _masked_dense_product(x, w, in_m, out_m, bias, block_size, transpose_w, p)
        if in_m is None or out_m is None:
            # The missing mask's shape is read from x and w, so their rank is checked first.
            x, w = _ensure_matrix(x, "x"), _ensure_matrix(w, "w")
            x_shape, w_shape = _matrix_dims(x), _matrix_dims(w)
            if in_m is None:
                in_m = tf.ones([x_shape[0], x_shape[1] // block_size], tf.float32)
            if out_m is None:
                out_m = tf.ones([x_shape[0], w_shape[1 - m_axis] // block_size], tf.float32)
        y = ops().blocksparse_sparse_dot(x, w, in_m, out_m, block_size=block_size,
                                         transpose_w=transpose_w)
        if bias is not None:
            # Selected, not multiplied by the mask: an infinite or NaN bias times 0 would be NaN
            # where the output is 0.
            active = tf.not_equal(expand_mask(out_m, block_size), 0)
            y += tf.where(active, _check_bias(bias, x.dtype, p, y), tf.zeros([], x.dtype))
        return y


def _masked_dense_product(x, w, in_m, out_m, bias, block_size, transpose_w, p):
    """sparse_dot's product as one dense tf.matmul: x's inactive blocks and then the output's
    selected to zero (selected, not multiplied, so that an infinite or NaN value there stays
    out, as the kernels never read it)."""
    x, w = _ensure_matrix(x, "x"), _ensure_matrix(w, "w")
    p_axis = 0 if transpose_w else 1
    if _static_dim(x, 1) is None:  # else checked already
        x = _divisible_when_run(x, 1, block_size, "m")
    if _static_dim(w, p_axis) is None:
        w = _divisible_when_run(w, p_axis, block_size, "p")
    zero = tf.zeros([], x.dtype)
    if in_m is not None:
        x = tf.where(_expanded_active(in_m, x, block_size, "in_mask", "m"), x, zero)
    y = tf.matmul(x, w, transpose_b=transpose_w)
    if bias is not None:
        y += _check_bias(bias, x.dtype, p, y)
    if out_m is not None:
        y = tf.where(_expanded_active(out_m, y, block_size, "out_mask", "p"), y, zero)
    return y


def _expanded_active(mask, t, block_size, name, label):
    """Where mask (n, blocks) is active, over t's (n, blocks * block_size) elements; the mask's
    shape checked against t's when the graph runs where either is unknown until then (a
    mismatch would otherwise broadcast or fail with a message naming neither)."""
    if not (mask.shape.is_fully_defined() and t.shape.is_fully_defined()):
        want = tf.shape(t, out_type=tf.int64) // tf.constant([1, block_size], tf.int64)
        got = tf.shape(mask, out_type=tf.int64)
        mask = _checked_when_run(mask, tf.reduce_all(tf.equal(got, want)),
                                 [f"{name} must have shape (n, {label} / block_size) =", want,
                                  "; got", got], mask.shape)
    return tf.not_equal(expand_mask(mask, block_size), 0)


def _checked_when_run(t, ok, message, shape):
    """t once the graph has checked ``ok`` (an InvalidArgumentError with ``message`` if not),
    with the static ``shape`` the check guarantees."""
    return tf.ensure_shape(checked_when_run(t, ok, message), shape)


def _divisible_when_run(t, axis, block_size, label):
    """t, checked when the graph runs to have a size along `axis` that block_size divides."""
    size = tf.shape(t, out_type=tf.int64)[axis]
    return _checked_when_run(t, tf.equal(size % block_size, 0),
                             [f"block_size {block_size} must divide {label} =", size], t.shape)


def _ensure_matrix(t, what):
    """t, checked to be a matrix when the graph runs where its rank is unknown until then."""
    if t.shape.rank is not None:
        return t
    return _checked_when_run(t, tf.equal(tf.rank(t), 2),
                             [f"{what} must be a matrix; got shape", tf.shape(t)], [None, None])


def _check_bias(bias, dtype, p, y):
    """bias as a tensor, checked to be (p,) for the product y (n, p): now where its shape is
    known, else when the graph runs (unchecked, a wrong shape would broadcast silently)."""
    bias = tf.convert_to_tensor(bias, dtype=dtype)
    if bias.shape.rank is not None and not bias.shape.is_compatible_with([p]):
        raise ValueError(f"bias must have shape (p,) = ({p},); got {bias.shape}")
    if p is not None and bias.shape.is_fully_defined():
        return bias
    p_now = tf.shape(y, out_type=tf.int64)[-1:]
    ok = tf.logical_and(tf.equal(tf.rank(bias), 1),
                        tf.equal(tf.size(bias, out_type=tf.int64), p_now[0]))
    return _checked_when_run(bias, ok, ["bias must have shape (p,) = ", p_now, "; got",
                                        tf.shape(bias, out_type=tf.int64)], [p])


@tf.RegisterGradient("BlocksparseSparseDot")
def _sparse_dot_grad(op, dy):
    x, w, in_m, out_m = op.inputs
    bs = op.get_attr("block_size")
    transpose_w = op.get_attr("transpose_w")
    # The products below would name a wrong dy after the roles it plays there (x, in_mask).
    y_shape = op.outputs[0].shape
    if dy.shape.rank is not None and y_shape.rank is not None and (
            not dy.shape.is_compatible_with(y_shape)):
        raise ValueError(f"sparse_dot's output gradient must have its output's shape (n, p) = "
                         f"{y_shape}; got {dy.shape}")
    # dx: the same masked product backwards, output masks becoming input masks and vice versa,
    # reading w the other way round in place (no transposed copy).
    dx = ops().blocksparse_sparse_dot(dy, w, out_m, in_m, block_size=bs, transpose_w=not transpose_w)
    # dw over the active (example, input block, output block) triples only; for w stored (p, m)
    # it is the transpose, which is the same product with the roles of x and dy swapped.
    if transpose_w:
        dw = ops().blocksparse_sparse_dot_grad_w(dy, x, out_m, in_m, block_size=bs)
    else:
        dw = ops().blocksparse_sparse_dot_grad_w(x, dy, in_m, out_m, block_size=bs)
    return dx, dw, None, None


@tf.RegisterGradient("BlocksparseSparseDotGradW")
def _sparse_dot_grad_w_grad(op, ddw):
    """dw = (x * in)^T (dy * out) is bilinear: its gradients are masked products with ddw."""
    x, dy, in_m, out_m = op.inputs
    bs = op.get_attr("block_size")
    dx = ops().blocksparse_sparse_dot(dy, ddw, out_m, in_m, block_size=bs, transpose_w=True)
    ddy = ops().blocksparse_sparse_dot(x, ddw, in_m, out_m, block_size=bs)
    return dx, ddy, None, None
