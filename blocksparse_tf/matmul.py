"""Block-sparse matrix multiplication: ``y = bsmm(x, w)`` with only the nonzero blocks of W stored.

Example::

    import numpy as np, tensorflow as tf
    from blocksparse_tf import BlocksparseMatMul

    sparsity = np.random.randint(2, size=(4096 // 32, 4096 // 32))
    bsmm = BlocksparseMatMul(sparsity, block_size=32)
    w = tf.Variable(bsmm.ortho_init())            # shape bsmm.w_shape = (blocks, 32, 32)
    y = bsmm(tf.random.normal([64, 4096]), w)     # (64, 4096)
"""

import operator
import re

import numpy as np
import scipy.sparse
import tensorflow as tf

from blocksparse_tf._ops import ops

BLOCK_SIZES = (1, 8, 16, 32, 64)
FLOAT_DTYPES = (tf.float32, tf.float16, tf.bfloat16)


def check_float_dtype(dtype, what):
    """ValueError naming `what` unless dtype is one the kernels compute in (FLOAT_DTYPES)."""
    dtype = tf.as_dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32, float16 or bfloat16; got {dtype.name}")


def check_number(value, name, low=None):
    """ValueError naming ``name`` unless value is a finite real number (not a bool), at least
    ``low`` if given."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number; got {value!r}")
    if not np.isfinite(float(value)) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}; got {value!r}")


def checked_when_run(t, ok, message, summarize=None):
    """t (same static shape) once the graph has checked ``ok``: an InvalidArgumentError with
    ``message`` (a list of strings and tensors) if not, before anything that reads t."""
    with tf.control_dependencies([tf.debugging.Assert(ok, message, summarize=summarize)]):
        return tf.identity(t)


INT32_MAX = 2**31 - 1


def check_block_size(block_size):
    """block_size as an int; ValueError unless it is an integer in BLOCK_SIZES (a bool is not
    1, nor 16.0 16: a float taken here would reach the ops' integer attributes)."""
    if (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
            or block_size not in BLOCK_SIZES):
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}; got {block_size!r}")
    return int(block_size)


def is_integer(value):
    """Whether value is a Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_feature_axis(feature_axis):
    """feature_axis as an int; ValueError unless it is the integer 0 or 1."""
    if not is_integer(feature_axis) or feature_axis not in (0, 1):
        raise ValueError(f"feature_axis must be 0 or 1; got {feature_axis!r}")
    return int(feature_axis)


def _check_op_attrs(block_size, C, K, feature_axis):
    """The raw ops' integer attributes, checked here: TensorFlow would truncate a float
    (C=16.9 to 16) or take a bool as 0 or 1 without a word.  Their ranges are the kernels'."""
    check_block_size(block_size)
    for name, value in (("C", C), ("K", K)):
        if not is_integer(value):
            raise ValueError(f"{name} must be an integer; got {value!r}")
    check_feature_axis(feature_axis)


# What tf.name_scope accepts as the first name of a graph scope (eagerly it accepts anything,
# so a bad name would fail only once the product runs inside tf.function).
_SCOPE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")


def check_name(name):
    """name, or ValueError unless it is None or a valid TensorFlow scope name."""
    if name is not None and (not isinstance(name, str) or not _SCOPE_NAME.match(name)):
        raise ValueError("name must start with a letter, digit or '.' and hold only letters, "
                         f"digits and _ . \\ / > -; got {name!r}")
    return name


def int32_tensor(values, what):
    """Integer `values` (an array, a list or an integer tensor) as an int32 tensor.

    A float, or an integer past int32's range, would otherwise be truncated or wrap around
    without a word (a block coordinate to another block, a size to a smaller one): arrays and
    lists must hold integers in range, and tensors have an integer dtype, range-checked when
    run unless already int32 (which pass through as they are)."""
    if tf.is_tensor(values) or isinstance(values, tf.Variable):
        dtype = values.dtype.base_dtype
        if not dtype.is_integer:
            raise ValueError(f"{what} must be integers; got dtype {dtype.name}")
        if dtype == tf.int32:
            return values
        # Only the bounds the dtype can pass are tested (a bound out of the dtype's own range
        # would wrap around in it: -2^31 as uint32 is 2^31).
        checks = []
        if dtype.min < -INT32_MAX - 1:
            checks.append(tf.reduce_all(values >= tf.constant(-INT32_MAX - 1, dtype)))
        if dtype.max > INT32_MAX:
            checks.append(tf.reduce_all(values <= tf.constant(INT32_MAX, dtype)))
        if not checks:
            return tf.cast(values, tf.int32)
        in_range = tf.reduce_all(tf.stack(checks))
        with tf.control_dependencies([tf.debugging.Assert(in_range,
                                                          [f"{what} must fit in int32"])]):
            return tf.cast(values, tf.int32)
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be integers; got dtype {array.dtype}")
    if array.size and (array.min() < -INT32_MAX - 1 or array.max() > INT32_MAX):
        raise ValueError(f"{what} must fit in int32; got values from {array.min()} to "
                         f"{array.max()}")
    return tf.constant(array.astype(np.int32))


def coords_tensor(coords):
    """The raw ops' layout input, (blocks, 2) block coordinates, as an int32 tensor (see
    int32_tensor; the kernels know a constant int32 layout by its tensor, passed through)."""
    return int32_tensor(coords, "layout coordinates")


def _check_binary(values):
    """Raises unless every value is 0 or 1."""
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise ValueError(f"layout values must be 0 or 1; found {np.unique(bad)[:5]}")


def _coords_of_pairs(coords, shape):
    coords = np.asarray(coords)
    if coords.size == 0:  # no blocks (said below), whatever dtype numpy gave the empty list
        coords = coords.reshape(0, 2).astype(np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"block coordinates must have shape (blocks, 2); got {coords.shape}")
    if not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(f"block coordinates must be integers; got dtype {coords.dtype}")
    shape = tuple(shape)
    if len(shape) != 2 or not all(is_integer(s) for s in shape):
        raise ValueError(f"layout shape must be two integers; got {shape}")
    return coords, tuple(int(s) for s in shape)


def _coords_of_sparse(matrix):
    coo = scipy.sparse.coo_matrix(matrix)
    coo.sum_duplicates()
    _check_binary(coo.data)
    keep = coo.data != 0
    return np.stack([coo.row[keep], coo.col[keep]], axis=1), coo.shape


def _coords_of_array(layout):
    try:
        array = np.asarray(layout)
    except ValueError:  # ragged nesting: none of the forms
        raise ValueError("layout must be a 2-D 0/1 array of shape (C/bs, K/bs), a scipy.sparse "
                         "matrix, or (coords, (CB, KB)) with coords a sequence of (c, k) block "
                         f"coordinates; got {type(layout).__name__} {str(layout)[:80]}") from None
    if array.ndim != 2:
        raise ValueError(f"layout must be a 2-D 0/1 array of shape (C/bs, K/bs); got shape {array.shape}")
    if array.dtype != bool:
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"layout must hold 0/1 numbers; got dtype {array.dtype}")
        _check_binary(array)
    return np.argwhere(array != 0), array.shape


def _layout_coords(layout):
    """Returns ((blocks, 2) int32 coordinates in row-major order, (CB, KB)) for any layout form."""
    if (isinstance(layout, (tuple, list)) and len(layout) == 2 and np.shape(layout[1]) == (2,)
            and (np.ndim(layout[0]) != 1 or np.size(layout[0]) == 0)):
        # (coords, (CB, KB)) or [coords, shape], not a 2 x 2 0/1 layout (whose rows are 1-D
        # and never empty)
        coords, shape = _coords_of_pairs(*layout)
    elif scipy.sparse.issparse(layout):
        coords, shape = _coords_of_sparse(layout)
    else:
        coords, shape = _coords_of_array(layout)
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"layout shape must be at least (1, 1); got {shape}")
    if max(shape) > INT32_MAX:  # the ops' coordinates are int32
        raise ValueError(f"layout shape must be at most {INT32_MAX} blocks each way; got {shape}")
    if len(coords) == 0:
        raise ValueError(f"layout of shape {shape} has no nonzero blocks")
    if np.any(coords < 0) or np.any(coords[:, 0] >= shape[0]) or np.any(coords[:, 1] >= shape[1]):
        raise ValueError(f"block coordinates must lie inside the layout shape {shape}")
    coords = coords[np.lexsort((coords[:, 1], coords[:, 0]))]
    if np.any(np.all(coords[1:] == coords[:-1], axis=1)):
        raise ValueError("block coordinates contain duplicates")
    return coords.astype(np.int32), (int(shape[0]), int(shape[1]))


class _InitialWeights(np.ndarray):
    """A numpy array of w_shape that is also a Keras initializer: ``init(shape, dtype)``.

    ``recipe`` says how it was made (see BlocksparseMatMul.initial_weights_from_recipe), so a
    layer given it as an initializer can be saved: its config holds the recipe, not the
    values.  Arrays derived from it (slices, arithmetic) have no recipe."""

    recipe = None

    def __array_finalize__(self, obj):
        self.recipe = None

    def __call__(self, shape=None, dtype=None, **kwargs):
        if shape is not None and tuple(shape) != self.shape:
            raise ValueError(f"initializer holds weights of shape {self.shape}; asked for {tuple(shape)}")
        return tf.constant(np.asarray(self), dtype=dtype or tf.float32)


def _with_recipe(w, bsmm, method, **arguments):
    w = w.view(_InitialWeights)
    w.recipe = {"matmul": bsmm.get_config(), "method": method, "arguments": arguments}
    return w


def _minibatch(N, unknown=False):
    """N as an int, if it is an integer >= 0 (a minibatch size); None too with ``unknown``."""
    if N is None and unknown:
        return None
    if not is_integer(N) or N < 0:
        raise ValueError(f"N must be an integer >= 0 (the minibatch size); got {N!r}")
    return int(N)


class BlocksparseMatMul:
    """Product of activations with a block-sparse weight matrix W of shape (C, K).

    Only the nonzero (block_size x block_size) blocks of W are stored, as a tensor of shape
    ``w_shape = (blocks, block_size, block_size)``; block ``i`` sits at ``block_coord(i)``,
    blocks being numbered in row-major order of the layout.

    Parameters
    ----------
    layout : array_like, scipy.sparse matrix, or (coords, shape)
        Which blocks exist: a 2-D 0/1 array of shape (C / block_size, K / block_size), a
        scipy.sparse matrix of that shape, or a pair ``(coords, (CB, KB))`` (a tuple or a
        two-item list) with ``coords`` a sequence of (c, k) block coordinates.
    block_size : int
        One of 1, 8, 16, 32, 64.  Default 32.
    feature_axis : int
        1 (default): x is (..., C) and y is (..., K), the Keras convention.
        0: x is (C, N) and y is (K, N).
    name : str, optional
        Name scope for the ops.
    """

    def __init__(self, layout, block_size=32, feature_axis=1, name=None):
        self.block_size = check_block_size(block_size)
        self.feature_axis = check_feature_axis(feature_axis)
        self._coords, (self.CB, self.KB) = _layout_coords(layout)
        self.name = check_name(name) or "BlocksparseMatMul"
        self.C = self.CB * self.block_size
        self.K = self.KB * self.block_size
        self.blocks = len(self._coords)
        self.w_shape = (self.blocks, self.block_size, self.block_size)
        self.density = self.blocks / float(self.CB * self.KB)
        self.sparsity = 1.0 - self.density
        self._eager_coords = {}  # made once for eager calls: {transposed: int32 tensor}

    # ---- layout ------------------------------------------------------------------------
    @property
    def coords(self):
        """(blocks, 2) int32 array: the (c, k) block coordinates, in block order."""
        return self._coords.copy()

    @property
    def layout(self):
        """The layout as a (CB, KB) boolean numpy array."""
        dense = np.zeros((self.CB, self.KB), dtype=bool)
        dense[self._coords[:, 0], self._coords[:, 1]] = True
        return dense

    def block_coord(self, i):
        """(c, k): block row and block column of block ``i``."""
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"block index must be an integer; got {i!r}")
        i = operator.index(i)
        if not -self.blocks <= i < self.blocks:
            raise IndexError(f"block index {i} out of range for {self.blocks} blocks")
        c, k = self._coords[i]
        return int(c), int(k)

    def i_shape(self, N):
        """Shape of x for a minibatch of N (None: unknown, e.g. for a placeholder)."""
        N = _minibatch(N, unknown=True)
        return (N, self.C) if self.feature_axis == 1 else (self.C, N)

    def o_shape(self, N):
        """Shape of y for a minibatch of N (None: unknown)."""
        N = _minibatch(N, unknown=True)
        return (N, self.K) if self.feature_axis == 1 else (self.K, N)

    def flops(self, N):
        """Floating point operations of one product for a minibatch of N (2 per multiply-add)."""
        return 2 * _minibatch(N) * self.blocks * self.block_size * self.block_size

    # ---- the product -------------------------------------------------------------------
    def __call__(self, x, w, gate=None, name=None):
        """y = x . W (times the per-block ``gate``, shape (blocks,), if given)."""
        check_name(name)
        if tf.executing_eagerly():  # name scopes only name graph ops; eagerly they cost time
            return self._product(x, w, gate)
        with tf.name_scope(name or self.name):
            return self._product(x, w, gate)

    def _product(self, x, w, gate):
        x = tf.convert_to_tensor(x)
        w = tf.convert_to_tensor(w)
        self._check_operands(x, w)
        if gate is not None:
            gate = tf.convert_to_tensor(gate)
            if not (gate.dtype.is_floating or gate.dtype.is_integer or gate.dtype.is_bool):
                raise ValueError(f"gate must hold real numbers; got dtype {gate.dtype.name}")
            if not gate.shape.is_compatible_with([self.blocks]):
                raise ValueError(f"gate must have shape ({self.blocks},), one value per block; "
                                 f"got {gate.shape}")
            if not gate.shape.is_fully_defined():  # known only when run: checked then
                gate = shape_checked_when_run(gate, (self.blocks,),
                                               f"gate must have shape ({self.blocks},), one "
                                               f"value per block")
            if not w.shape.is_fully_defined():
                # The product with the gate would broadcast a wrong w (one block to all, say)
                # before the kernel could check its shape.
                w = shape_checked_when_run(w, self.w_shape,
                                            f"w must have shape w_shape={self.w_shape}")
            w = w * tf.reshape(tf.cast(gate, w.dtype), [-1, 1, 1])
        return blocksparse_matmul(x, w, self._layout_tensor(), self.block_size, self.C, self.K,
                                  self.feature_axis, constant_layout=True)

    def _layout_tensor(self, transposed=False):
        """The block coordinates as an int32 tensor ((k, c) pairs, W^T's layout, with
        ``transposed``): made once for eager calls (making it took about 10 us per call, a
        tenth of the smallest products; and the kernels keep a layout's tables while its tensor
        lives), afresh in each graph built."""
        coords = self._coords[:, ::-1] if transposed else self._coords
        if not tf.executing_eagerly():
            return tf.constant(coords)
        if transposed not in self._eager_coords:
            with tf.device("CPU:0"):  # the kernels read the layout on the host
                self._eager_coords[transposed] = tf.constant(np.ascontiguousarray(coords))
        return self._eager_coords[transposed]

    def _check_operands(self, x, w):
        check_float_dtype(x.dtype, "x")
        if w.dtype != x.dtype:
            raise ValueError(f"w dtype {w.dtype.name} does not match x dtype {x.dtype.name}")
        if w.shape.rank is not None and tuple(w.shape) != self.w_shape:
            if not w.shape.is_compatible_with(self.w_shape):
                raise ValueError(f"w must have shape w_shape={self.w_shape}; got {w.shape}")
        rank = x.shape.rank
        if rank is None:
            return
        if self.feature_axis == 1:
            if rank < 2 or x.shape[-1] not in (None, self.C):
                raise ValueError(f"x must have shape (..., C={self.C}) for feature_axis=1; "
                                 f"got {x.shape}")
        elif rank != 2 or x.shape[0] not in (None, self.C):
            raise ValueError(f"x must have shape (C={self.C}, N) for feature_axis=0; got {x.shape}")

    # ---- dense conversions and numpy references ---------------------------------------
    def to_dense(self, w):
        """Dense (C, K) matrix holding the blocks of ``w`` (numpy in, numpy out; tensor in, tensor out)."""
        bs, c, k = self.block_size, self._coords[:, 0], self._coords[:, 1]
        if isinstance(w, (tf.Tensor, tf.Variable)):
            w = _with_checked_shape(w, self.w_shape, f"w must have shape w_shape={self.w_shape}")
            grid = tf.scatter_nd(self._coords, w, (self.CB, self.KB, bs, bs))
            return tf.reshape(tf.transpose(grid, [0, 2, 1, 3]), (self.C, self.K))
        w = np.asarray(w)
        if w.shape != self.w_shape:
            raise ValueError(f"w must have shape w_shape={self.w_shape}; got {w.shape}")
        grid = np.zeros((self.CB, self.KB, bs, bs), dtype=w.dtype)
        grid[c, k] = w
        return grid.transpose(0, 2, 1, 3).reshape(self.C, self.K)

    def from_dense(self, W):
        """Blocks (blocks, bs, bs) of a dense (C, K) matrix at this layout's positions."""
        bs = self.block_size
        if isinstance(W, (tf.Tensor, tf.Variable)):
            W = _with_checked_shape(W, (self.C, self.K),
                                    f"W must have shape (C, K)=({self.C}, {self.K})")
            grid = tf.transpose(tf.reshape(W, (self.CB, bs, self.KB, bs)), [0, 2, 1, 3])
            return tf.gather_nd(grid, self._coords)
        W = np.asarray(W)
        if W.shape != (self.C, self.K):
            raise ValueError(f"W must have shape (C, K)=({self.C}, {self.K}); got {W.shape}")
        grid = W.reshape(self.CB, bs, self.KB, bs).transpose(0, 2, 1, 3)
        return grid[self._coords[:, 0], self._coords[:, 1]].copy()

    def _rows(self, a):
        """float64 (N, features) view of a numpy operand, whatever the feature axis."""
        a = np.asarray(a, dtype=np.float64)
        return a.reshape(-1, a.shape[-1]) if self.feature_axis == 1 else a.T

    def fprop_test(self, x, w):
        """float64 numpy reference of ``self(x, w)``."""
        y = self._rows(x) @ self.to_dense(np.asarray(w, dtype=np.float64))
        return y.reshape(*np.shape(x)[:-1], self.K) if self.feature_axis == 1 else y.T

    def bprop_test(self, dy, w):
        """float64 numpy reference of dx = dy . W^T."""
        dx = self._rows(dy) @ self.to_dense(np.asarray(w, dtype=np.float64)).T
        return dx.reshape(*np.shape(dy)[:-1], self.C) if self.feature_axis == 1 else dx.T

    def updat_test(self, x, dy):
        """float64 numpy reference of dw (blocks, bs, bs): x^T . dy at the stored blocks."""
        bs = self.block_size
        xr = self._rows(x).reshape(-1, self.CB, bs)
        dyr = self._rows(dy).reshape(-1, self.KB, bs)
        return np.einsum("nbi,nbj->bij", xr[:, self._coords[:, 0]], dyr[:, self._coords[:, 1]])

    # ---- initial weights ---------------------------------------------------------------
    def identity_init(self, scale=1.0):
        """Weights of w_shape that are ``scale`` times the identity on diagonal blocks (c == k), else 0.

        The result is a numpy array that is also a Keras initializer.
        """
        check_number(scale, "scale")
        w = np.zeros(self.w_shape, dtype=np.float32)
        w[self._coords[:, 0] == self._coords[:, 1]] = scale * np.eye(self.block_size, dtype=np.float32)
        return _with_recipe(w, self, "identity_init", scale=float(scale))

    def ortho_init(self, seed=None):
        """Random orthogonal blocks, scaled by 1/sqrt(blocks in the block column).

        Each output unit then sums its inputs with unit-norm weight rows, so activations keep
        their scale through the layer.  A numpy array that is also a Keras initializer.
        """
        if isinstance(seed, bool) or not (seed is None or is_integer(seed) or
                                          isinstance(seed, np.random.Generator)):
            # (default_rng takes a bool as 0 or 1, and refuses a float with a TypeError.)
            raise ValueError(f"seed must be None, an integer or a numpy Generator; got {seed!r}")
        rng = np.random.default_rng(seed)
        q, r = np.linalg.qr(rng.standard_normal((self.blocks, self.block_size, self.block_size)))
        q *= np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
        fan_in_blocks = np.bincount(self._coords[:, 1], minlength=self.KB)[self._coords[:, 1]]
        w = q / np.sqrt(fan_in_blocks)[:, None, None]
        w = w.astype(np.float32)
        if seed is not None and not isinstance(seed, (int, np.integer)):
            return w.view(_InitialWeights)  # a generator's state: no recipe to save
        return _with_recipe(w, self, "ortho_init", seed=None if seed is None else int(seed))

    @staticmethod
    def initial_weights_from_recipe(recipe):
        """The weights an ``identity_init`` / ``ortho_init`` result's ``recipe`` describes (the
        same values, unless made with seed=None)."""
        if recipe.get("method") not in ("identity_init", "ortho_init"):
            raise ValueError(f"unknown initial-weights recipe {recipe!r}")
        bsmm = BlocksparseMatMul.from_config(recipe["matmul"])
        return getattr(bsmm, recipe["method"])(**recipe["arguments"])

    # ---- serialisation -----------------------------------------------------------------
    def get_config(self):
        """JSON-serialisable description; ``BlocksparseMatMul.from_config(cfg)`` rebuilds it."""
        return {"layout": {"shape": [self.CB, self.KB], "coords": self._coords.tolist()},
                "block_size": self.block_size, "feature_axis": self.feature_axis, "name": self.name}

    @classmethod
    def from_config(cls, config):
        """The ``BlocksparseMatMul`` that ``get_config()`` described (a config loaded from
        JSON works: the layout's coordinates are checked as the constructor checks them)."""
        config = dict(config)
        layout = config.pop("layout")
        if isinstance(layout, dict):
            # Not cast to integers here: the constructor refuses fractional coordinates (a
            # cast truncated them), and a list that is not of pairs.
            coords = np.asarray(layout["coords"])
            if coords.size == 0:
                coords = np.zeros((0, 2), np.int64)
            layout = (coords, tuple(layout["shape"]))
        return cls(layout, **config)

    def __repr__(self):
        return (f"BlocksparseMatMul(C={self.C}, K={self.K}, block_size={self.block_size}, "
                f"blocks={self.blocks}, density={self.density:.3g}, feature_axis={self.feature_axis})")


def _with_checked_shape(t, shape, requirement):
    """Tensor t, which must have `shape`: a ValueError stating the requirement where its static
    shape already differs, else checked when run (a shape known only then)."""
    if not t.shape.is_compatible_with(shape):
        raise ValueError(f"{requirement}; got {t.shape}")
    return tf.ensure_shape(t, shape)


def shape_checked_when_run(t, shape, message):
    """t, checked when the graph runs to have `shape` (ints, or scalar tensors for sizes known
    only then) where its static shape leaves that open: an InvalidArgumentError with
    `message` (tf.ensure_shape would name only the tensor), and the static shape set.  Values
    that are not graph tensors (eager ones, arrays) are returned as they are."""
    static = [d if isinstance(d, int) else None for d in shape]
    if not tf.is_tensor(t) or tf.executing_eagerly() or (
            t.shape.rank == len(shape) and None not in static and t.shape.as_list() == static):
        return t
    rank = tf.debugging.assert_rank(t, len(shape), message=message)
    with tf.control_dependencies([rank]):  # the sizes compared only once the ranks agree
        sizes = tf.debugging.assert_equal(tf.shape(t, out_type=tf.int64),
                                          tf.cast(tf.stack(shape), tf.int64), message=message)
    with tf.control_dependencies([sizes]):
        t = tf.identity(t)
    t.set_shape(static)
    return t


def blocksparse_matmul(x, w, layout, block_size, C, K, feature_axis=1, transpose_w=False,
                       constant_layout=False):
    """Raw op: y = x . W for w (blocks, bs, bs) and int32 layout coordinates (blocks, 2).

    With ``transpose_w``, y = x . W^T (x has K features, y has C), reading w as stored.
    ``constant_layout`` promises that ``layout``'s memory is never written in place (true of
    constants and of results of ops; not of TF1 reference variables): the kernel then knows a
    layout it has seen by its address instead of comparing every coordinate on each call."""
    _check_op_attrs(block_size, C, K, feature_axis)
    return ops().blocksparse_matmul(x, w, coords_tensor(layout), block_size=block_size, C=C,
                                    K=K, feature_axis=feature_axis, transpose_w=transpose_w,
                                    constant_layout=constant_layout)


def blocksparse_matmul_grad_w(x, dy, layout, block_size, C, K, feature_axis=1,
                              constant_layout=False):
    """Raw op: dw = x^T . dy at the stored blocks, shape (blocks, bs, bs)."""
    _check_op_attrs(block_size, C, K, feature_axis)
    return ops().blocksparse_matmul_grad_w(x, dy, coords_tensor(layout), block_size=block_size,
                                           C=C, K=K, feature_axis=feature_axis,
                                           constant_layout=constant_layout)


def _attrs(op):
    return {name: op.get_attr(name)
            for name in ("block_size", "C", "K", "feature_axis", "constant_layout")}


@tf.RegisterGradient("BlocksparseMatmul")
def _blocksparse_matmul_grad(op, dy):
    x, w, layout = op.inputs
    a = _attrs(op)
    if op.get_attr("transpose_w"):
        # y = x . W^T: dx = dy . W, and dW = (x^T dy)^T = dy^T x at W's blocks.
        dx = blocksparse_matmul(dy, w, layout, **a)
        dw = blocksparse_matmul_grad_w(dy, x, layout, **a)
    else:
        dx = blocksparse_matmul(dy, w, layout, **a, transpose_w=True)
        dw = blocksparse_matmul_grad_w(x, dy, layout, **a)
    return dx, dw, None


@tf.RegisterGradient("BlocksparseMatmulGradW")
def _blocksparse_matmul_grad_w_grad(op, ddw):
    # dw = x^T dy is bilinear: its gradients are block-sparse products with ddw as the weights.
    x, dy, layout = op.inputs
    a = _attrs(op)
    dx = blocksparse_matmul(dy, ddw, layout, **a, transpose_w=True)
    ddy = blocksparse_matmul(x, ddw, layout, **a)
    return dx, ddy, None
