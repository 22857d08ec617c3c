"""Sparsity layouts: which blocks of a block-sparse weight matrix exist.

A *layout* is a 2-D boolean array of shape ``(C // bs, K // bs)``: ``layout[c, k]`` is True
when the ``bs x bs`` block that connects input block row ``c`` to output block column ``k``
is stored.  Every generator here returns such an array (``numpy.ndarray`` of dtype bool), or,
for very large layouts, a ``scipy.sparse.csr_matrix`` of dtype bool, which is what
``BlocksparseMatMul(layout, block_size)`` accepts.

For a square layout used as a recurrent weight matrix, the block rows and columns are the
same units; the layout is then the adjacency matrix of a directed graph ``c -> k``
("information flows from unit c to unit k in one step").  Graph generators (Watts-Strogatz,
Barabasi-Albert, ...) give layouts in which, despite high sparsity, every unit reaches every
other one in a few steps; :func:`describe` and :func:`plot_mixing` measure that.

Dense or sparse output
----------------------
Every generator takes ``sparse=None|True|False``.  ``None`` (the default) returns a dense
``numpy.ndarray`` when ``rows * cols <= SPARSE_THRESHOLD`` (2**24 blocks, e.g. 4096 x 4096)
and a ``scipy.sparse.csr_matrix`` above it; ``True``/``False`` force one or the other.
With sparse output no ``rows x cols`` dense array is ever built.

Determinism
-----------
Every random generator takes ``seed`` (a non-negative int, or None for fresh entropy).  The
same seed gives the same layout; numpy generators use ``numpy.random.default_rng(seed)``
and networkx generators are passed the integer seed.

This module does not import TensorFlow; matplotlib is imported only by the plotting
functions (with the non-interactive Agg canvas).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import weakref

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

__all__ = [
    "SPARSE_THRESHOLD",
    "dense",
    "random",
    "balanced_random",
    "banded",
    "barabasi_albert",
    "watts_strogatz",
    "watts_strogatz_2d",
    "bipartite_small_world",
    "tile",
    "from_graph",
    "block_norms",
    "from_dense_weights",
    "params_for_density",
    "describe",
    "plot",
    "plot_mixing",
    "save",
    "load",
    "metadata",
]

#: Above this many blocks (rows * cols) generators return ``scipy.sparse.csr_matrix`` by
#: default instead of a dense boolean array.
SPARSE_THRESHOLD = 1 << 24

# describe(): exact statistics up to this many units, sampled sources above it.
_EXACT_UNITS = 1000
_SAMPLED_SOURCES = 256
# plot(): layouts with more block rows/cols than this are drawn as a binned density image.
_SPY_PIXELS = 512
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------
# validation helpers (shared by every public function)
# --------------------------------------------------------------------------------------


def _check_int(name, value, minimum=None):
    """Return ``value`` as int; ValueError unless it is an integer >= ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_density(density, name="density"):
    """Return ``density`` as float; ValueError unless it lies in (0, 1]."""
    if isinstance(density, (bool, np.bool_)) or not isinstance(density, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1], got {density!r}")
    density = float(density)
    if not (0.0 < density <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {density!r}")
    return density


def _check_probability(p, name="p"):
    """Return ``p`` as float; ValueError unless it lies in [0, 1]."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    p = float(p)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return p


def _check_seed(seed):
    """Return ``seed`` (None or a non-negative int); ValueError otherwise."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def _check_bool(name, value):
    """Return ``value`` as bool; ValueError unless it is a bool (1 or "no" are not)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_sparse(sparse):
    if sparse is not None and not isinstance(sparse, (bool, np.bool_)):
        raise ValueError(f"sparse must be None, True or False, got {sparse!r}")
    return sparse if sparse is None else bool(sparse)


def _check_layout(layout, name="layout"):
    """Return ``layout`` as a dense bool ndarray or a bool csr_matrix, checking it is 2-D."""
    if sp.issparse(layout):
        if len(layout.shape) != 2:
            raise ValueError(f"{name} must be 2-D (rows, cols), got shape {layout.shape}")
        csr = sp.csr_matrix(layout)
        # Copies of the index arrays: the matrix made from them is changed in place below
        # (and sorted by save), and csr_matrix() shares them with the caller's matrix.
        out = sp.csr_matrix((csr.data != 0, csr.indices.copy(), csr.indptr.copy()),
                            shape=csr.shape)
        out.eliminate_zeros()
        out.sum_duplicates()
    else:
        out = np.asarray(layout)
        if out.ndim != 2:
            raise ValueError(
                f"{name} must be a 2-D array (rows, cols), got an array of shape {out.shape}"
            )
        out = out != 0
    if 0 in out.shape:
        raise ValueError(f"{name} must have at least one row and one column, got {out.shape}")
    return out


def _to_csr(layout):
    """Bool csr_matrix view of a checked layout."""
    if sp.issparse(layout):
        return layout
    return sp.csr_matrix(layout)


def _use_sparse(sparse, rows, cols):
    if sparse is None:
        return rows * cols > SPARSE_THRESHOLD
    return bool(sparse)


def _rng(seed):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------
# metadata registry: generators remember their parameters for save()
# --------------------------------------------------------------------------------------

_META = {}


def _record(layout, info):
    """Attach the metadata dict ``info`` to the object ``layout`` (see :func:`metadata`)."""
    key = id(layout)
    ref = weakref.ref(layout, lambda _r, key=key: _META.pop(key, None))
    _META[key] = (ref, info)
    return layout


def _remember(layout, generator, params):
    """Record how a generator made ``layout``."""
    return _record(layout, {"generator": generator, "params": dict(params)})


def metadata(layout):
    """Generator name and parameters recorded for ``layout``.

    Generators and :func:`load` record how a layout was made for the very object they
    return; :func:`save` stores it.  Derived arrays (copies, slices, ``layout.T``) have no
    record.

    Parameters
    ----------
    layout : array_like or scipy.sparse matrix

    Returns
    -------
    dict
        ``{"generator": str, "params": dict}``, or an empty dict when nothing is recorded.

    Examples
    --------
    >>> L = watts_strogatz(16, 4, 0.1, seed=0)
    >>> metadata(L)["params"]["k"]
    4
    """
    entry = _META.get(id(layout))
    if entry is None or entry[0]() is not layout:
        return {}
    return json.loads(json.dumps(entry[1]))  # deep copy


def _finish(rows_idx, cols_idx, shape, sparse, generator, params, identity=False):
    """Build the layout (dense or csr) from block coordinates and record its parameters."""
    R, C = shape
    r = np.asarray(rows_idx, dtype=np.int64).ravel()
    c = np.asarray(cols_idx, dtype=np.int64).ravel()
    if identity:
        d = np.arange(min(R, C), dtype=np.int64)
        r = np.concatenate([r, d])
        c = np.concatenate([c, d])
    if _use_sparse(sparse, R, C):
        lin = np.unique(r * C + c)
        r, c = np.divmod(lin, C)
        out = sp.csr_matrix((np.ones(lin.size, dtype=bool), (r, c)), shape=(R, C))
    else:
        out = np.zeros((R, C), dtype=bool)
        out[r, c] = True
    return _remember(out, generator, params)


# --------------------------------------------------------------------------------------
# simple generators
# --------------------------------------------------------------------------------------


def dense(rows, cols=None, *, sparse=None):
    """All blocks present (an ordinary dense layer).

    Parameters
    ----------
    rows : int
        Number of block rows (input blocks), >= 1.
    cols : int, optional
        Number of block columns (output blocks); defaults to ``rows``.
    sparse : bool or None, optional
        Return a ``scipy.sparse.csr_matrix`` (True), a dense array (False) or decide by
        size (None, see ``SPARSE_THRESHOLD``).

    Returns
    -------
    numpy.ndarray of bool, shape (rows, cols), or scipy.sparse.csr_matrix

    Examples
    --------
    >>> int(dense(2, 3).sum())
    6
    """
    rows = _check_int("rows", rows, 1)
    cols = rows if cols is None else _check_int("cols", cols, 1)
    sparse = _check_sparse(sparse)
    params = {"rows": rows, "cols": cols}
    if _use_sparse(sparse, rows, cols):
        r, c = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
        return _finish(r, c, (rows, cols), True, "dense", params)
    return _remember(np.ones((rows, cols), dtype=bool), "dense", params)


def random(rows, cols, density, seed=None, *, sparse=None):
    """Uniformly random layout with exactly ``round(density * rows * cols)`` blocks.

    Parameters
    ----------
    rows, cols : int
        Shape of the layout in blocks, >= 1 each.
    density : float
        Fraction of blocks present, in (0, 1].  At least one block is always kept.
    seed : int or None, optional
        Random seed (non-negative int); the same seed gives the same layout.
    sparse : bool or None, optional
        See :func:`dense`.  Above 2% density the draw itself takes 8 bytes per possible
        block (``rows * cols``) for a moment, in either form.

    Returns
    -------
    numpy.ndarray of bool, shape (rows, cols), or scipy.sparse.csr_matrix
        The density reached is exact to within ``0.5 / (rows * cols)``.

    Raises
    ------
    ValueError
        If ``density`` is not in (0, 1] or a size or seed is invalid.

    Examples
    --------
    >>> int(random(10, 10, 0.25, seed=0).sum())
    25
    """
    rows = _check_int("rows", rows, 1)
    cols = _check_int("cols", cols, 1)
    density = _check_density(density)
    seed = _check_seed(seed)
    sparse = _check_sparse(sparse)
    total = rows * cols
    if total > np.iinfo(np.int64).max:
        raise ValueError(f"rows * cols = {total} blocks is more than int64 can count")
    nnz = min(total, max(1, int(round(density * total))))
    # numpy draws more than total / 50 of total without replacement by shuffling all of
    # 0 .. total - 1 (8 bytes each), also for sparse=True: kept, since another method would
    # give other layouts for the same seeds.
    lin = _rng(seed).choice(total, size=nnz, replace=False)
    r, c = np.divmod(lin.astype(np.int64), cols)
    params = {"rows": rows, "cols": cols, "density": density, "seed": seed}
    return _finish(r, c, (rows, cols), sparse, "random", params)


def balanced_random(rows, cols, density, seed=None, *, sparse=None):
    """Random layout with the same number of blocks in every column (balanced work).

    Every block column (output block) gets exactly ``d = max(1, round(density * rows))``
    blocks; the block-row counts differ by at most one (they are all equal when
    ``rows`` divides ``d * cols``).  Rows are drawn as a stream of random permutations
    of ``0 .. rows-1`` cut into columns of ``d``, with no row repeated in a column.

    Parameters
    ----------
    rows, cols : int
        Shape of the layout in blocks, >= 1 each.
    density : float
        Target fraction of blocks present, in (0, 1]; the density reached is
        ``d / rows``.
    seed : int or None, optional
        Random seed.
    sparse : bool or None, optional
        See :func:`dense`.

    Returns
    -------
    numpy.ndarray of bool, shape (rows, cols), or scipy.sparse.csr_matrix

    Raises
    ------
    ValueError
        If ``density`` is not in (0, 1] or a size or seed is invalid.

    Examples
    --------
    >>> L = balanced_random(8, 12, 0.25, seed=1)
    >>> L.sum(axis=0).tolist() == [2] * 12
    True
    """
    rows = _check_int("rows", rows, 1)
    cols = _check_int("cols", cols, 1)
    density = _check_density(density)
    seed = _check_seed(seed)
    sparse = _check_sparse(sparse)
    d = min(rows, max(1, int(round(density * rows))))
    rng = _rng(seed)
    total = d * cols
    n_perm = -(-total // rows)
    perms = rng.permuted(np.tile(np.arange(rows, dtype=np.int64), (n_perm, 1)), axis=1)
    stream = perms.ravel()[: n_perm * rows]
    if rows % d:
        # A column whose d entries straddle two permutations must not repeat a row: move
        # the rows it already took from the previous permutation to the end of the next.
        for b in range(1, n_perm):
            pos = b * rows
            start = (pos // d) * d
            if start == pos or start >= total:
                continue
            taken = stream[start:pos]
            nxt = stream[pos : pos + rows]
            clash = np.isin(nxt, taken)
            if clash[: d - (pos - start)].any():
                stream[pos : pos + rows] = np.concatenate([nxt[~clash], nxt[clash]])
    r = stream[:total]
    c = np.repeat(np.arange(cols, dtype=np.int64), d)
    params = {"rows": rows, "cols": cols, "density": density, "seed": seed}
    return _finish(r, c, (rows, cols), sparse, "balanced_random", params)


def banded(n, bandwidth, *, periodic=False, sparse=None):
    """Band layout: block ``(i, j)`` present when ``|i - j| <= bandwidth``.

    Each unit talks only to its neighbours, so information needs about
    ``n / (2 * bandwidth)`` steps to cross the layer: the slow-mixing baseline.

    Parameters
    ----------
    n : int
        Number of block rows and columns, >= 1.
    bandwidth : int
        Half-width of the band, >= 0 (0 gives the identity).
    periodic : bool, optional
        Wrap the band around (distance measured on a ring), so every row and column has
        ``min(n, 2 * bandwidth + 1)`` blocks.  This is :func:`watts_strogatz` with ``p=0``.
    sparse : bool or None, optional
        See :func:`dense`.

    Returns
    -------
    numpy.ndarray of bool, shape (n, n), or scipy.sparse.csr_matrix
        Without wrap-around it has ``n * (2b + 1) - b * (b + 1)`` blocks for
        ``b = min(bandwidth, n - 1)``.

    Examples
    --------
    >>> banded(4, 1).astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    """
    n = _check_int("n", n, 1)
    bandwidth = _check_int("bandwidth", bandwidth, 0)
    periodic = _check_bool("periodic", periodic)
    sparse = _check_sparse(sparse)
    b = min(bandwidth, n - 1)
    offsets = np.arange(-b, b + 1, dtype=np.int64)
    i = np.repeat(np.arange(n, dtype=np.int64), offsets.size)
    j = i + np.tile(offsets, n)
    if periodic:
        j %= n
    else:
        keep = (j >= 0) & (j < n)
        i, j = i[keep], j[keep]
    params = {"n": n, "bandwidth": bandwidth, "periodic": bool(periodic)}
    return _finish(i, j, (n, n), sparse, "banded", params)


# --------------------------------------------------------------------------------------
# graph generators (square, identity included)
# --------------------------------------------------------------------------------------


def _edges_array(G):
    """(E, 2) int64 array of the edges of a graph whose nodes are 0 .. n-1."""
    e = np.fromiter((x for uv in G.edges() for x in uv), dtype=np.int64)
    return e.reshape(-1, 2)


def _symmetric(edges):
    """Block coordinates of an undirected edge list, both directions."""
    return (np.concatenate([edges[:, 0], edges[:, 1]]), np.concatenate([edges[:, 1], edges[:, 0]]))


def barabasi_albert(n, m, seed=None, *, sparse=None):
    """Scale-free layout from a Barabasi-Albert preferential-attachment graph.

    Uses ``networkx.barabasi_albert_graph(n, m, seed)``: each new unit attaches to ``m``
    existing units, preferring well-connected ones, so a few early units (low indices)
    become hubs with many blocks.  The layout is the symmetric adjacency matrix plus the
    identity, with ``n + 2 * m * (n - m)`` blocks.  Block-column counts are very uneven
    (hub columns do much more work); prefer :func:`watts_strogatz` when balanced work per
    output matters.

    Parameters
    ----------
    n : int
        Number of units (block rows = block columns).
    m : int
        Edges added per new unit, ``1 <= m < n``.
    seed : int or None, optional
        Random seed, passed to networkx.
    sparse : bool or None, optional
        See :func:`dense`.

    Returns
    -------
    numpy.ndarray of bool, shape (n, n), or scipy.sparse.csr_matrix
        Symmetric, with the diagonal present.

    Raises
    ------
    ValueError
        If not ``1 <= m < n`` or the seed is invalid.

    Examples
    --------
    >>> L = barabasi_albert(32, 2, seed=0)
    >>> int(L.sum()) == 32 + 2 * 2 * (32 - 2)
    True
    """
    n = _check_int("n", n, 1)
    m = _check_int("m", m)
    if not 1 <= m < n:
        raise ValueError(f"barabasi_albert needs 1 <= m < n, got n={n}, m={m}")
    seed = _check_seed(seed)
    sparse = _check_sparse(sparse)
    G = nx.barabasi_albert_graph(n, m, seed=seed)
    r, c = _symmetric(_edges_array(G))
    params = {"n": n, "m": m, "seed": seed}
    return _finish(r, c, (n, n), sparse, "barabasi_albert", params, identity=True)


def _check_ring_k(k, n):
    k = _check_int("k", k)
    if k < 2 or k % 2:
        raise ValueError(f"k must be an even integer >= 2 (k/2 neighbours on each side), got {k}")
    if k >= n:
        raise ValueError(f"k must be smaller than n, got k={k}, n={n}")
    return k


def watts_strogatz(n, k, p, seed=None, *, sparse=None):
    """Small-world layout from a 1-D Watts-Strogatz ring (the default for recurrent layers).

    Uses ``networkx.watts_strogatz_graph(n, k, p, seed)``: units on a ring, each joined to
    its ``k`` nearest neighbours (``k/2`` per side), then each edge rewired to a random
    unit with probability ``p``.  A few long-range shortcuts make the average path length
    grow like ``log(n)`` while the layout stays local and balanced.  The layout is the
    symmetric adjacency matrix plus the identity: exactly ``n * (k + 1)`` blocks, density
    ``(k + 1) / n``; every column has about ``k + 1`` blocks.

    Parameters
    ----------
    n : int
        Number of units (block rows = block columns), >= 3.
    k : int
        Even number of ring neighbours, ``2 <= k < n``.
    p : float
        Rewiring probability in [0, 1]; 0 gives a periodic band, 1 a random graph.
        0.05 - 0.2 is the usual small-world range.
    seed : int or None, optional
        Random seed, passed to networkx.
    sparse : bool or None, optional
        See :func:`dense`.

    Returns
    -------
    numpy.ndarray of bool, shape (n, n), or scipy.sparse.csr_matrix
        Symmetric, with the diagonal present.

    Raises
    ------
    ValueError
        If ``k`` is odd, < 2 or >= n, ``p`` is outside [0, 1], or the seed is invalid.

    Examples
    --------
    >>> L = watts_strogatz(64, 6, 0.1, seed=0)
    >>> int(L.sum()) == 64 * 7 and bool(L.diagonal().all())
    True
    """
    n = _check_int("n", n, 3)
    k = _check_ring_k(k, n)
    p = _check_probability(p)
    seed = _check_seed(seed)
    sparse = _check_sparse(sparse)
    G = nx.watts_strogatz_graph(n, k, p, seed=seed)
    r, c = _symmetric(_edges_array(G))
    params = {"n": n, "k": k, "p": p, "seed": seed}
    return _finish(r, c, (n, n), sparse, "watts_strogatz", params, identity=True)


def _grid_shape(n):
    """(h, w) with h * w == n, as square as possible (h <= w)."""
    if isinstance(n, (tuple, list)):
        if len(n) != 2:
            raise ValueError(f"grid shape must be (h, w), got {n!r}")
        h = _check_int("grid height", n[0], 1)
        w = _check_int("grid width", n[1], 1)
        return h, w
    n = _check_int("n", n, 1)
    h = math.isqrt(n)
    while n % h:
        h -= 1
    return h, n // h


def _lattice_offsets(h, w, k=None):
    """Nearest torus offsets as 'half-plane' representatives (each stands for +o and -o).

    Returns the first ``k // 2`` of them, or with ``k=None`` the longest usable prefix.
    Offsets are sorted by squared length, then (dy, dx); a prefix is usable while the
    neighbours it gives a unit are all distinct and differ from the unit itself.
    """
    half = sorted(
        (dy * dy + dx * dx, dy, dx)
        for dy in range(0, h // 2 + 1)
        for dx in range(-(w // 2), w // 2 + 1)
        if dy > 0 or dx > 0
    )
    want = len(half) if k is None else k // 2
    chosen, seen = [], {(0, 0)}
    for _, dy, dx in half[:want]:
        a, b = (dy % h, dx % w), (-dy % h, -dx % w)
        if a == b or a in seen or b in seen:
            break
        seen.update((a, b))
        chosen.append((dy, dx))
    if k is not None and len(chosen) < want:
        raise ValueError(
            f"k={k} is too large for a {h}x{w} grid (at most {2 * len(_lattice_offsets(h, w))})"
        )
    return chosen


def _rewire(n, u, v, p, rng):
    """Watts-Strogatz rewiring of the undirected edges (u[i], v[i]), in order.

    Each edge is, with probability p, replaced by (u, w) for a uniformly random w that is
    neither u nor a current neighbour of u.  Returns the new edge list as an (E, 2) array.
    """
    adj = [set() for _ in range(n)]
    for a, b in zip(u.tolist(), v.tolist()):
        adj[a].add(b)
        adj[b].add(a)
    for i in np.flatnonzero(rng.random(u.size) < p).tolist():
        a, b = int(u[i]), int(v[i])
        if len(adj[a]) >= n - 1:
            continue
        w = int(rng.integers(n))
        while w == a or w in adj[a]:
            w = int(rng.integers(n))
        adj[a].discard(b)
        adj[b].discard(a)
        adj[a].add(w)
        adj[w].add(a)
    edges = [(a, b) for a in range(n) for b in adj[a] if a < b]
    return np.array(edges, dtype=np.int64).reshape(-1, 2)


def watts_strogatz_2d(n, k, p, seed=None, *, sparse=None):
    """Small-world layout from a 2-D lattice (torus) with Watts-Strogatz rewiring.

    Units sit on an ``h x w`` torus (``h * w == n``, as square as possible; pass a tuple
    to choose it).  Each unit is joined to its ``k`` nearest lattice neighbours
    (``k=4``: up/down/left/right, ``k=8``: also diagonals, ``k=12``, ``20``, ``24`` ...:
    further rings; other even ``k`` break ties in a fixed order), then every lattice edge
    is rewired to a random unit with probability ``p``.  Suits units that have a 2-D
    arrangement (image-like feature maps).  Identity included: exactly ``n * (k + 1)``
    blocks, density ``(k + 1) / n`` as for :func:`watts_strogatz`.

    Parameters
    ----------
    n : int or tuple of int
        Number of units, or the grid shape ``(h, w)``.  A prime ``n`` gives a ``1 x n``
        grid, i.e. a ring.
    k : int
        Even number of lattice neighbours, >= 2, small enough that the neighbours are
        distinct on the torus.
    p : float
        Rewiring probability in [0, 1].
    seed : int or None, optional
        Random seed.
    sparse : bool or None, optional
        See :func:`dense`.

    Returns
    -------
    numpy.ndarray of bool, shape (n, n), or scipy.sparse.csr_matrix
        Symmetric, with the diagonal present.  Unit ``(y, x)`` of the grid is block
        ``y * w + x``.

    Raises
    ------
    ValueError
        If ``k`` is odd, < 2 or too large for the grid, ``p`` is outside [0, 1], or the
        seed is invalid.

    Examples
    --------
    >>> L = watts_strogatz_2d(64, 8, 0.1, seed=0)   # 8 x 8 torus, Moore neighbourhood
    >>> int(L.sum()) == 64 * 9
    True
    """
    h, w = _grid_shape(n)
    n = h * w
    k = _check_int("k", k)
    if k < 2 or k % 2:
        raise ValueError(f"k must be an even integer >= 2 (pairs of lattice neighbours), got {k}")
    offsets = _lattice_offsets(h, w, k)
    p = _check_probability(p)
    seed = _check_seed(seed)
    sparse = _check_sparse(sparse)
    y, x = np.divmod(np.arange(n, dtype=np.int64), w)
    u = np.tile(np.arange(n, dtype=np.int64), len(offsets))
    v = np.concatenate([((y + dy) % h) * w + (x + dx) % w for dy, dx in offsets])
    edges = _rewire(n, u, v, p, _rng(seed))
    r, c = _symmetric(edges)
    params = {"n": n, "grid": [h, w], "k": k, "p": p, "seed": seed}
    return _finish(r, c, (n, n), sparse, "watts_strogatz_2d", params, identity=True)


# --------------------------------------------------------------------------------------
# rectangular layouts
# --------------------------------------------------------------------------------------


def bipartite_small_world(rows, cols, k, p, seed=None, *, sparse=None):
    """Rectangular small-world wiring for input projections (``rows != cols`` allowed).

    Input blocks and output blocks are spread evenly around the same ring; every output
    column is wired to the ``k`` input rows nearest to it, and each of those blocks is
    moved, with probability ``p``, to a random input row not yet used by that column.
    Every column has exactly ``k`` blocks (balanced work per output; density
    ``k / rows``), rows get about ``k * cols / rows`` each.  With ``rows == cols``, odd
    ``k`` and ``p = 0`` this is ``banded(n, (k - 1) // 2, periodic=True)``.

    Parameters
    ----------
    rows, cols : int
        Shape of the layout in blocks (input blocks, output blocks), >= 1 each.
    k : int
        Blocks per column, ``1 <= k <= rows``.
    p : float
        Rewiring probability in [0, 1].
    seed : int or None, optional
        Random seed.
    sparse : bool or None, optional
        See :func:`dense`.

    Returns
    -------
    numpy.ndarray of bool, shape (rows, cols), or scipy.sparse.csr_matrix

    Raises
    ------
    ValueError
        If ``k`` is not in [1, rows], ``p`` is outside [0, 1], or the seed is invalid.

    Examples
    --------
    >>> L = bipartite_small_world(128, 32, 8, 0.1, seed=0)
    >>> L.shape, bool((L.sum(axis=0) == 8).all())
    ((128, 32), True)
    """
    rows = _check_int("rows", rows, 1)
    cols = _check_int("cols", cols, 1)
    k = _check_int("k", k)
    if not 1 <= k <= rows:
        raise ValueError(f"k must be in [1, rows], got k={k}, rows={rows}")
    p = _check_probability(p)
    seed = _check_seed(seed)
    sparse = _check_sparse(sparse)
    rng = _rng(seed)
    centre = (np.arange(cols) + 0.5) * (rows / cols) - 0.5  # column position in row units
    start = np.floor(centre - (k - 1) / 2 + 0.5).astype(np.int64)
    idx = (start[:, None] + np.arange(k, dtype=np.int64)[None, :]) % rows  # (cols, k)
    if p > 0 and k < rows:
        moved = rng.random((cols, k)) < p
        for j in np.flatnonzero(moved.any(axis=1)).tolist():
            used = set(idx[j].tolist())
            for slot in np.flatnonzero(moved[j]).tolist():
                new = int(rng.integers(rows))
                while new in used:
                    new = int(rng.integers(rows))
                used.discard(int(idx[j, slot]))
                used.add(new)
                idx[j, slot] = new
    c = np.repeat(np.arange(cols, dtype=np.int64), k)
    params = {"rows": rows, "cols": cols, "k": k, "p": p, "seed": seed}
    return _finish(idx.ravel(), c, (rows, cols), sparse, "bipartite_small_world", params)


def tile(layout, rows, cols, *, sparse=None):
    """Repeat a layout to fill a ``(rows, cols)`` shape (cropping the last copies).

    Typical use: an input projection from ``2n`` input blocks to ``n`` units that reuses
    a square small-world pattern, ``tile(watts_strogatz(n, k, p), 2 * n, n)``.

    Parameters
    ----------
    layout : array_like or scipy.sparse matrix
        The 2-D pattern to repeat.
    rows, cols : int
        Shape of the result in blocks, >= 1 each.
    sparse : bool or None, optional
        Return a csr_matrix (True) or a dense array (False); default: the kind of
        ``layout``, and a csr_matrix above ``SPARSE_THRESHOLD`` blocks.

    Returns
    -------
    numpy.ndarray of bool or scipy.sparse.csr_matrix

    Raises
    ------
    ValueError
        If ``layout`` is not 2-D or a size is invalid.

    Examples
    --------
    >>> tile(banded(4, 0), 8, 6).shape
    (8, 6)
    """
    src = _check_layout(layout)
    rows = _check_int("rows", rows, 1)
    cols = _check_int("cols", cols, 1)
    sparse = _check_sparse(sparse)
    if sparse is None:
        sparse = sp.issparse(src) or _use_sparse(None, rows, cols)
    R, C = src.shape
    reps = (-(-rows // R), -(-cols // C))
    if sparse or sp.issparse(src):  # from coordinates: never a dense rows x cols detour
        coo = _to_csr(src).tocoo()
        off_r = np.repeat(np.arange(reps[0], dtype=np.int64) * R, reps[1])
        off_c = np.tile(np.arange(reps[1], dtype=np.int64) * C, reps[0])
        r = (coo.row[None, :] + off_r[:, None]).ravel()
        c = (coo.col[None, :] + off_c[:, None]).ravel()
        keep = (r < rows) & (c < cols)
        out = _finish(r[keep], c[keep], (rows, cols), sparse, "tile", {})
    else:
        out = np.ascontiguousarray(np.tile(src, reps)[:rows, :cols])
    params = {"rows": rows, "cols": cols, "source": metadata(layout) or None}
    return _remember(out, "tile", params)


def from_graph(G, rows=None, cols=None, *, identity=False, sparse=None):
    """Layout from any networkx graph: block ``(i, j)`` present for an edge ``i -> j``.

    Undirected edges give both blocks ``(i, j)`` and ``(j, i)``; directed edges only
    ``(i, j)`` (input unit ``i`` feeds output unit ``j``).  Self-loops give diagonal
    blocks; edge weights and multi-edges are ignored.

    Parameters
    ----------
    G : networkx.Graph (or DiGraph, MultiGraph, MultiDiGraph)
    rows : list of nodes, optional
        Nodes of the block rows, in order; defaults to ``list(G)``.
    cols : list of nodes, optional
        Nodes of the block columns, in order; defaults to ``rows``.  Different ``rows``
        and ``cols`` give a rectangular layout, e.g. the two sides of a bipartite graph.
    identity : bool, optional
        Also set the main diagonal ``(i, i)``, ``i < min(rows, cols)``.
    sparse : bool or None, optional
        See :func:`dense`.

    Returns
    -------
    numpy.ndarray of bool, shape (len(rows), len(cols)), or scipy.sparse.csr_matrix

    Raises
    ------
    TypeError
        If ``G`` is not a networkx graph.
    ValueError
        If the graph (or a node list) is empty, or a node list repeats a node or names a
        node not in ``G``.

    Examples
    --------
    >>> from_graph(nx.path_graph(3), identity=True).astype(int).tolist()
    [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    """
    if not isinstance(G, nx.Graph):
        raise TypeError(f"G must be a networkx graph, got {type(G).__name__}")
    identity = _check_bool("identity", identity)
    sparse = _check_sparse(sparse)
    rows = list(G) if rows is None else list(rows)
    cols = rows if cols is None else list(cols)

    def index(nodes, what):
        if not nodes:
            raise ValueError(f"from_graph needs at least one node for the {what}")
        pos = {}
        for i, node in enumerate(nodes):
            if node not in G:
                raise ValueError(f"{what} node {node!r} is not in the graph")
            if node in pos:
                raise ValueError(f"{what} node {node!r} is listed twice")
            pos[node] = i
        return pos

    ri, ci = index(rows, "row"), index(cols, "column")
    r, c = [], []
    directed = G.is_directed()
    for a, b in G.edges():
        if a in ri and b in ci:
            r.append(ri[a])
            c.append(ci[b])
        if not directed and b in ri and a in ci:
            r.append(ri[b])
            c.append(ci[a])
    params = {
        "graph": str(G.name) or type(G).__name__,
        "rows": len(rows),
        "cols": len(cols),
        "identity": bool(identity),
    }
    return _finish(r, c, (len(rows), len(cols)), sparse, "from_graph", params, identity)


# --------------------------------------------------------------------------------------
# from dense weights (magnitude pruning to blocks)
# --------------------------------------------------------------------------------------


def block_norms(W, block_size, norm="l2"):
    """Norm of every ``block_size x block_size`` block of a dense weight matrix.

    Parameters
    ----------
    W : array_like, shape (C, K)
        Dense weights (numpy array, or anything ``numpy.asarray`` accepts, such as an
        eager TensorFlow tensor).  C and K must be multiples of ``block_size``.
    block_size : int
        Block edge, >= 1.
    norm : {"l2", "max"}, optional
        Frobenius norm of the block, or its largest absolute entry.

    Returns
    -------
    numpy.ndarray of float64, shape (C // block_size, K // block_size)

    Raises
    ------
    ValueError
        If ``W`` is not 2-D or not finite, its shape is not a multiple of ``block_size``,
        or ``norm`` is unknown.

    Examples
    --------
    >>> block_norms(np.ones((4, 4)), 2).tolist()
    [[2.0, 2.0], [2.0, 2.0]]
    """
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D array (C, K), got an array of shape {W.shape}")
    if not (np.issubdtype(W.dtype, np.integer) or np.issubdtype(W.dtype, np.floating)
            or W.dtype == bool):
        raise ValueError(f"W must hold real numbers, got dtype {W.dtype}")
    block_size = _check_int("block_size", block_size, 1)
    C, K = W.shape
    if C == 0 or K == 0 or C % block_size or K % block_size:
        raise ValueError(
            f"W shape {W.shape} is not a (non-empty) multiple of block_size {block_size}"
        )
    if norm not in ("l2", "max"):
        raise ValueError(f"norm must be 'l2' or 'max', got {norm!r}")
    if not np.isfinite(W).all():
        raise ValueError("W contains NaN or infinite values")
    blocks = W.reshape(C // block_size, block_size, K // block_size, block_size)
    if norm == "l2":
        return np.sqrt(np.square(blocks, dtype=np.float64).sum(axis=(1, 3)))
    # The largest magnitude from the extremes, in float64: np.abs of int8's -128 is -128.
    return np.maximum(blocks.max(axis=(1, 3)).astype(np.float64),
                      -blocks.min(axis=(1, 3)).astype(np.float64))


def from_dense_weights(W, block_size, density=None, threshold=None, norm="l2", *, sparse=None):
    """Keep the blocks of a dense weight matrix with the largest norms.

    Magnitude pruning to blocks: turns a trained (or pruned) dense layer into a
    block-sparse layout; the kept weights are then ``W`` restricted to the layout.
    Give exactly one of ``density`` (keep the ``max(1, round(density * blocks))``
    largest blocks; ties go to the lower flat index) or ``threshold`` (keep blocks whose
    norm is > threshold, so ``threshold=0`` keeps every block that is not all zero).

    Parameters
    ----------
    W : array_like, shape (C, K)
        Dense weights; C and K multiples of ``block_size``.
    block_size : int
        Block edge, >= 1.
    density : float, optional
        Fraction of blocks to keep, in (0, 1].
    threshold : float, optional
        Keep blocks with norm strictly above this, >= 0.
    norm : {"l2", "max"}, optional
        Block norm, see :func:`block_norms`.
    sparse : bool or None, optional
        See :func:`dense`.

    Returns
    -------
    numpy.ndarray of bool, shape (C // block_size, K // block_size), or csr_matrix

    Raises
    ------
    ValueError
        If ``W`` is not 2-D, its shape is not a multiple of ``block_size``, both or
        neither of ``density``/``threshold`` are given, they are out of range, or no
        block is above ``threshold``.

    Examples
    --------
    >>> W = np.zeros((4, 4)); W[2:, :2] = 1.0
    >>> from_dense_weights(W, 2, threshold=0).astype(int).tolist()
    [[0, 0], [1, 0]]
    """
    norms = block_norms(W, block_size, norm)
    sparse = _check_sparse(sparse)
    if (density is None) == (threshold is None):
        raise ValueError("give exactly one of density or threshold")
    R, C = norms.shape
    if density is not None:
        density = _check_density(density)
        keep = min(R * C, max(1, int(round(density * R * C))))
        lin = np.argsort(-norms.ravel(), kind="stable")[:keep]
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        threshold = float(threshold)
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        lin = np.flatnonzero(norms.ravel() > threshold)
        if lin.size == 0:
            raise ValueError(
                f"no block has a {norm} norm above threshold={threshold} "
                f"(largest is {norms.max():.6g})"
            )
    r, c = np.divmod(lin.astype(np.int64), C)
    params = {
        "block_size": int(block_size),
        "density": density,
        "threshold": threshold,
        "norm": norm,
        "shape": [int(s) for s in np.shape(W)],
    }
    return _finish(r, c, (R, C), sparse, "from_dense_weights", params)


# --------------------------------------------------------------------------------------
# target density -> generator parameters
# --------------------------------------------------------------------------------------


def _closest(candidates, density_of, target):
    """Candidate whose density is closest to target (the smaller one on ties)."""
    best = min(candidates, key=lambda x: (abs(density_of(x) - target), x))
    return best, density_of(best)


def params_for_density(generator, n, density, *, cols=None, grid=None):
    """Generator parameters that come closest to a target density, and the density reached.

    Parameters
    ----------
    generator : str
        One of ``"random"``, ``"balanced_random"``, ``"banded"``, ``"barabasi_albert"``,
        ``"watts_strogatz"``, ``"watts_strogatz_2d"``, ``"bipartite_small_world"``.
    n : int
        Number of units (square generators) or of block rows (rectangular ones).
    density : float
        Target density in (0, 1].
    cols : int, optional
        Block columns for the rectangular generators (default ``n``); the square ones
        accept only ``n``.
    grid : tuple of int, optional
        Grid shape ``(h, w)`` for ``"watts_strogatz_2d"`` (default: most square).

    Returns
    -------
    params : dict
        Keyword arguments for the generator that fix its size and density (``n`` and
        ``m``, ``k``, ``bandwidth`` ... ); add ``p`` and ``seed`` where needed.
    reached : float
        The exact density the generator gives with these parameters.  It can differ
        from the target when the target is not reachable (e.g. Barabasi-Albert cannot
        go above about 0.5, Watts-Strogatz not below ``3 / n``).

    Raises
    ------
    ValueError
        If the generator is unknown, ``density`` is not in (0, 1], ``n`` is too small, or
        ``cols`` differs from ``n`` for a square generator.

    Examples
    --------
    >>> params, reached = params_for_density("watts_strogatz", 64, 0.1)
    >>> params, round(reached, 4)
    ({'n': 64, 'k': 6}, 0.1094)
    """
    density = _check_density(density)
    n = _check_int("n", n, 1)
    square = ("banded", "barabasi_albert", "watts_strogatz", "watts_strogatz_2d")
    if generator in square and cols is not None and cols != n:
        raise ValueError(f"{generator} makes square layouts (n x n); got cols={cols!r} for "
                         f"n={n}")
    if generator in ("random", "balanced_random", "bipartite_small_world"):
        cols = n if cols is None else _check_int("cols", cols, 1)
        if generator == "random":
            total = n * cols
            reached = min(total, max(1, int(round(density * total)))) / total
            return {"rows": n, "cols": cols, "density": density}, reached
        k = min(n, max(1, int(round(density * n))))
        if generator == "balanced_random":
            return {"rows": n, "cols": cols, "density": density}, k / n
        return {"rows": n, "cols": cols, "k": k}, k / n
    if generator == "banded":
        def band(b):
            return (n * (2 * b + 1) - b * (b + 1)) / n**2

        b, reached = _closest(range(n), band, density)
        return {"n": n, "bandwidth": b}, reached
    if generator == "barabasi_albert":
        if n < 2:
            raise ValueError(f"barabasi_albert needs n >= 2, got n={n}")

        def ba(m):
            return (n + 2 * m * (n - m)) / n**2

        m, reached = _closest(range(1, max(1, n // 2) + 1), ba, density)
        return {"n": n, "m": m}, reached
    if generator == "watts_strogatz":
        if n < 3:
            raise ValueError(f"watts_strogatz needs n >= 3, got n={n}")
        k, reached = _closest(range(2, n, 2), lambda k: (k + 1) / n, density)
        return {"n": n, "k": k}, reached
    if generator == "watts_strogatz_2d":
        h, w = _grid_shape(n if grid is None else grid)
        if h * w != n:
            raise ValueError(f"grid {grid} does not have n={n} units")
        kmax = 2 * len(_lattice_offsets(h, w))
        if kmax < 2:
            raise ValueError(f"a {h}x{w} grid is too small for watts_strogatz_2d")
        k, reached = _closest(range(2, kmax + 1, 2), lambda k: (k + 1) / n, density)
        return {"n": n if grid is None else (h, w), "k": k}, reached
    raise ValueError(f"unknown generator {generator!r}")


# --------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------


def _bfs_levels(A, source):
    """Number of units at distance 0, 1, 2, ... from ``source`` (directed BFS on csr A)."""
    order, pred = csgraph.breadth_first_order(A, source, directed=True, return_predecessors=True)
    if order.size == 1:
        return np.array([1], dtype=np.int64)
    pos = np.empty(A.shape[0], dtype=np.int64)
    pos[order] = np.arange(order.size)
    # BFS order is sorted by distance and parents appear in non-decreasing queue order,
    # so each level is a contiguous run: the units whose parent lies in the previous run.
    parent_pos = pos[pred[order[1:]]]
    ends = [1]
    while ends[-1] < order.size:
        ends.append(1 + int(np.searchsorted(parent_pos, ends[-1], side="left")))
    return np.diff(np.array([0] + ends, dtype=np.int64))


def describe(layout, *, sources=None, steps=None, seed=0):
    """Statistics of a layout and of the graph it induces.

    For a square layout the induced graph has one node per unit and a directed edge
    ``c -> k`` for every off-diagonal block (the diagonal, a unit keeping its own state,
    does not change distances).  Path lengths, reachability and the mixing curve follow
    edge directions (how information flows through repeated steps of a recurrent layer);
    for symmetric layouts (all graph generators) this is the usual undirected graph.

    Parameters
    ----------
    layout : array_like or scipy.sparse matrix, 2-D
    sources : int, optional
        Number of units from which distances are measured.  Default: every unit when
        there are at most 1000 units (exact), otherwise 256 units drawn at random
        (sampled estimate); path length, clustering and mixing then average over those
        units only.
    steps : int, optional
        Length of the mixing curve (``steps + 1`` values); by default it runs until no
        more units become reachable.
    seed : int, optional
        Seed for choosing sampled sources.

    Returns
    -------
    dict
        ``shape`` (rows, cols); ``blocks``; ``density``;
        ``row_blocks`` and ``col_blocks``: (min, mean, max) blocks per block row (fan-out
        of an input block) and per block column (fan-in, i.e. work per output block);
        and for square layouts (None for rectangular ones):
        ``avg_shortest_path``: mean distance over ordered pairs ``u != v`` with ``v``
        reachable from ``u`` (equals ``networkx.average_shortest_path_length`` when
        every unit reaches every other);
        ``clustering``: mean clustering coefficient (``networkx.average_clustering``;
        the directed variant for non-symmetric layouts);
        ``diameter``: largest finite distance seen;
        ``reachable``: fraction of (source, unit) pairs connected by some path;
        ``mixing``: array, ``mixing[t]`` = mean fraction of units reachable from a unit
        within ``t`` steps (``mixing[0] == 1 / n``);
        ``t90``: first ``t`` with ``mixing[t] >= 0.9`` (None if never);
        ``sources``: number of source units used (== n when exact).

    Raises
    ------
    ValueError
        If ``layout`` is not 2-D or ``sources``/``steps`` are invalid.

    Examples
    --------
    >>> d = describe(watts_strogatz(64, 6, 0.1, seed=0))
    >>> d["blocks"], d["t90"], bool(d["mixing"][0] == 1 / 64)
    (448, 4, True)
    """
    L = _to_csr(_check_layout(layout))
    R, C = L.shape
    row_counts = np.diff(L.indptr)
    col_counts = np.bincount(L.indices, minlength=C)
    out = {
        "shape": (R, C),
        "blocks": int(L.nnz),
        "density": L.nnz / (R * C),
        "row_blocks": (int(row_counts.min()), float(row_counts.mean()), int(row_counts.max())),
        "col_blocks": (int(col_counts.min()), float(col_counts.mean()), int(col_counts.max())),
        "avg_shortest_path": None,
        "clustering": None,
        "diameter": None,
        "reachable": None,
        "mixing": None,
        "t90": None,
        "sources": None,
    }
    if steps is not None:
        steps = _check_int("steps", steps, 0)
    if R != C:
        return out
    n = R
    if sources is None:
        src = np.arange(n) if n <= _EXACT_UNITS else None
        count = _SAMPLED_SOURCES
    else:
        count = _check_int("sources", sources, 1)
        src = np.arange(n) if count >= n else None
    if src is None:
        src = np.sort(_rng(_check_seed(seed)).choice(n, size=count, replace=False))

    coo = L.tocoo()
    off = coo.row != coo.col
    A = sp.csr_matrix(
        (np.ones(int(off.sum()), dtype=np.int8), (coo.row[off], coo.col[off])), shape=(n, n)
    )

    hist = np.zeros(1, dtype=np.int64)
    for s in src.tolist():
        levels = _bfs_levels(A, s)
        if levels.size > hist.size:
            hist = np.concatenate([hist, np.zeros(levels.size - hist.size, dtype=np.int64)])
        hist[: levels.size] += levels
    pairs = len(src) * n
    reached_pairs = int(hist[1:].sum())
    mixing = np.cumsum(hist) / pairs
    if steps is not None:
        mixing = np.concatenate([mixing, np.full(max(0, steps + 1 - mixing.size), mixing[-1])])
        mixing = mixing[: steps + 1]
    hit = np.flatnonzero(mixing >= 0.9 - 1e-12)

    # clustering (Fagiolo's directed form, identical to the undirected one when symmetric):
    # c_u = [(A + A^T)^3]_uu / (2 * (d_tot (d_tot - 1) - 2 d_recip))
    S = (A + A.T).tocsr().astype(np.float64)
    S_src = S[src]
    tri = np.asarray((S_src @ S).multiply(S_src).sum(axis=1)).ravel()
    d_tot = np.asarray(S_src.sum(axis=1)).ravel()
    At = A.T.tocsr()
    d_recip = np.asarray(A[src].multiply(At[src]).sum(axis=1)).ravel()
    denom = 2.0 * (d_tot * (d_tot - 1) - 2.0 * d_recip)
    with np.errstate(divide="ignore", invalid="ignore"):
        cu = np.where((tri > 0) & (denom > 0), tri / np.where(denom > 0, denom, 1.0), 0.0)

    out.update(
        avg_shortest_path=(
            float((np.arange(hist.size) * hist).sum() / reached_pairs) if reached_pairs else 0.0
        ),
        clustering=float(cu.mean()),
        diameter=int(hist.size - 1),
        reachable=float(hist.sum() / pairs),
        mixing=mixing,
        t90=int(hit[0]) if hit.size else None,
        sources=int(len(src)),
    )
    return out


# --------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=fig.get_dpi(), format="png")


def _label(layout):
    meta = metadata(layout)
    if "generator" not in meta:  # nothing recorded, or a loaded file saved without a record
        return "layout"
    params = meta.get("params", {})
    keys = [k for k in ("m", "k", "p", "bandwidth", "density") if params.get(k) is not None]
    detail = ", ".join(f"{k}={params[k]:g}" for k in keys)
    return f"{meta['generator']}({detail})" if detail else meta["generator"]


def _stats_line(d):
    line = f"{d['shape'][0]}x{d['shape'][1]} blocks, density {d['density']:.1%}"
    lo, _, hi = d["col_blocks"]
    line += f", blocks/col {lo}-{hi}"
    if d["avg_shortest_path"] is not None:
        t90 = "never" if d["t90"] is None else d["t90"]
        line += (
            f"\npath length {d['avg_shortest_path']:.2f}, clustering {d['clustering']:.2f},"
            f" 90% reached in {t90} steps"
        )
        if d["sources"] < d["shape"][0]:
            line += f" (sampled, {d['sources']} sources)"
    return line


def plot(layout, path=None, *, title=None, stats=None, ax=None):
    """Spy plot of a layout (dark = block present) with its statistics in the title.

    Layouts larger than 512 blocks along a side are drawn as an image of block counts
    per pixel (darker = more blocks), which also works for huge sparse layouts.

    Parameters
    ----------
    layout : array_like or scipy.sparse matrix, 2-D
    path : str or os.PathLike, optional
        Where to write the PNG (folders are created).
    title : str, optional
        First title line; default: the generator and parameters recorded for the layout.
    stats : dict, optional
        A :func:`describe` result to reuse instead of computing it again.
    ax : matplotlib.axes.Axes, optional
        Draw into these axes instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn (not registered with pyplot, so it needs no closing).

    Raises
    ------
    ValueError
        If ``layout`` is not 2-D.

    Examples
    --------
    >>> fig = plot(watts_strogatz(64, 6, 0.1, seed=0), "ws.png")  # doctest: +SKIP
    """
    checked = _check_layout(layout)
    d = describe(checked) if stats is None else stats
    name = _label(layout) if title is None else title
    R, C = checked.shape
    if ax is None:
        side = 5.0
        fig = _new_figure((side, side * min(2.0, max(0.5, R / C)) + 0.8))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    if max(R, C) <= _SPY_PIXELS:
        img = checked.toarray() if sp.issparse(checked) else checked
        ax.imshow(img, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    else:
        coo = _to_csr(checked).tocoo()
        bins = (min(R, _SPY_PIXELS), min(C, _SPY_PIXELS))
        img, _, _ = np.histogram2d(coo.row, coo.col, bins=bins, range=[[0, R], [0, C]])
        ax.imshow(img, cmap="Greys", interpolation="nearest", aspect="auto", extent=(0, C, R, 0))
    ax.set_xlabel("output block column k")
    ax.set_ylabel("input block row c")
    ax.set_title(f"{name}\n{_stats_line(d)}", fontsize=8)
    if path is not None:
        _save(fig, path)
    return fig


def plot_mixing(layouts, path=None, *, labels=None, steps=None, ax=None):
    """Mixing curves: fraction of units reachable within t steps, for several layouts.

    A small-world layout reaches (almost) every unit in a few steps while a banded one of
    the same density needs about ``n / (2 * bandwidth)``; this picture shows it at a glance.

    Parameters
    ----------
    layouts : dict or sequence
        ``{label: layout}`` or a list of layouts.  A value may also be a
        :func:`describe` result, to avoid computing it again.  Square layouts only.
    path : str or os.PathLike, optional
        Where to write the PNG.
    labels : list of str, optional
        Labels for a list of layouts (default: recorded generator names).
    steps : int, optional
        Number of steps on the x axis (default: until every curve is flat).
    ax : matplotlib.axes.Axes, optional
        Draw into these axes instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        If no layout is given, labels do not match, or a layout is not square.

    Examples
    --------
    >>> fig = plot_mixing({"banded": banded(64, 3),
    ...                    "small world": watts_strogatz(64, 6, 0.1, seed=0)},
    ...                   "mixing.png")  # doctest: +SKIP
    """
    if isinstance(layouts, dict):
        items = list(layouts.items())
        if labels is not None:
            raise ValueError("labels are taken from the dict keys; do not pass labels too")
    else:
        layouts = list(layouts)
        if labels is None:
            labels = [_label(x) if not isinstance(x, dict) else f"layout {i}"
                      for i, x in enumerate(layouts)]
        if len(labels) != len(layouts):
            raise ValueError(f"got {len(labels)} labels for {len(layouts)} layouts")
        items = list(zip(labels, layouts))
    if not items:
        raise ValueError("plot_mixing needs at least one layout")
    stats = []
    for label, x in items:
        d = x if isinstance(x, dict) else describe(x, steps=steps)
        if d["mixing"] is None:
            raise ValueError(f"layout {label!r} is not square; mixing needs a square layout")
        stats.append((label, d))
    longest = max(d["mixing"].size for _, d in stats) - 1
    t_max = longest if steps is None else _check_int("steps", steps, 1)
    if ax is None:
        fig = _new_figure((6.4, 4.2))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    t = np.arange(t_max + 1)
    for label, d in stats:
        m = d["mixing"]
        y = np.concatenate([m, np.full(max(0, t.size - m.size), m[-1])])[: t.size]
        ax.plot(t, y, marker="o", markersize=3,
                label=f"{label}: density {d['density']:.1%}, "
                      f"path {d['avg_shortest_path']:.2f}")
    ax.axhline(0.9, color="0.6", linewidth=0.8, linestyle="--")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlim(0, max(1, t_max))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("steps t")
    ax.set_ylabel("fraction of units reachable within t steps")
    ax.set_title("mixing: how fast information spreads", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if path is not None:
        _save(fig, path)
    return fig


# --------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------


def save(path, layout, metadata=None):
    """Write a layout to a ``.npz`` file (no pickled objects).

    The file holds the shape, the layout in compressed-sparse-row form (``indptr``,
    ``indices``), whether it was sparse, and a JSON string with the generator name and
    parameters (those recorded by the generator, updated with ``metadata``).

    Parameters
    ----------
    path : str or os.PathLike
        Target file; ``.npz`` is appended when missing.
    layout : array_like or scipy.sparse matrix, 2-D
    metadata : dict, optional
        Extra JSON-serialisable entries stored with the file (they override recorded
        ones with the same key).

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ValueError
        If ``layout`` is not 2-D or ``metadata`` is not JSON-serialisable.

    Examples
    --------
    >>> save("ws.npz", watts_strogatz(64, 6, 0.1, seed=0))  # doctest: +SKIP
    'ws.npz'
    """
    L = _check_layout(layout)
    csr = _to_csr(L)
    csr.sort_indices()
    info = {"format_version": _FORMAT_VERSION, **_recorded(layout)}
    info.update(metadata or {})
    info.update(shape=[int(s) for s in csr.shape], blocks=int(csr.nnz),
                density=csr.nnz / (csr.shape[0] * csr.shape[1]))
    try:
        text = json.dumps(info)
    except TypeError as err:
        raise ValueError(f"metadata must be JSON-serialisable: {err}") from None
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    np.savez_compressed(
        path,
        shape=np.array(csr.shape, dtype=np.int64),
        indptr=csr.indptr.astype(np.int64),
        indices=csr.indices.astype(np.int64),
        sparse=np.array(sp.issparse(L)),
        metadata=np.array(text),
    )
    return path


def _recorded(layout):
    """metadata(layout), reachable from save() whose argument shadows the name."""
    return metadata(layout)


def load(path, *, sparse=None):
    """Read a layout written by :func:`save`.

    The metadata (generator, parameters, shape, ...) is recorded for the returned object:
    ``metadata(load(path))``.

    Parameters
    ----------
    path : str or os.PathLike
        The file, or the name given to :func:`save` without its ``.npz`` suffix.
    sparse : bool or None, optional
        Return a csr_matrix (True) or a dense array (False); default: as saved.

    Returns
    -------
    numpy.ndarray of bool or scipy.sparse.csr_matrix

    Raises
    ------
    ValueError
        If the file is not a layout file.
    FileNotFoundError
        If there is no such file.

    Examples
    --------
    >>> L = load("ws.npz")  # doctest: +SKIP
    """
    sparse = _check_sparse(sparse)
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.exists(path + ".npz"):
        path += ".npz"  # the name given to save(), which appends the suffix
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        also = "" if path.endswith(".npz") else f" (nor {path}.npz)"
        raise FileNotFoundError(f"no layout file {path}{also}") from None
    except (ValueError, OSError) as err:  # not a numpy file at all (or a pickle)
        raise ValueError(f"{path} is not a layout file ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a single .npy array
        raise ValueError(f"{path} is not a layout file (a .npy array, not the "
                         "archive save() writes)")
    with archive as f:
        missing = {"shape", "indptr", "indices", "sparse", "metadata"} - set(f.files)
        if missing:
            raise ValueError(f"{path} is not a layout file (missing {sorted(missing)})")
        shape = tuple(int(s) for s in f["shape"])
        indptr, indices = f["indptr"], f["indices"]
        was_sparse = bool(f["sparse"])
        info = json.loads(str(f["metadata"]))
    csr = sp.csr_matrix((np.ones(indices.size, dtype=bool), indices, indptr), shape=shape)
    out = csr if (was_sparse if sparse is None else sparse) else csr.toarray()
    return _record(out, info)
