"""Tests of blocksparse_tf.layouts (no TensorFlow needed)."""

import json
import os
import sys

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from blocksparse_tf import layouts as L
from tests.example_scripts import assert_refused, example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> factory(seed); square layouts of 64 units at about 10 % density
SEEDED = {
    "random": lambda s: L.random(64, 48, 0.1, seed=s),
    "balanced_random": lambda s: L.balanced_random(64, 48, 0.1, seed=s),
    "barabasi_albert": lambda s: L.barabasi_albert(64, 3, seed=s),
    "watts_strogatz": lambda s: L.watts_strogatz(64, 6, 0.2, seed=s),
    "watts_strogatz_2d": lambda s: L.watts_strogatz_2d(64, 8, 0.2, seed=s),
    "bipartite_small_world": lambda s: L.bipartite_small_world(96, 32, 8, 0.2, seed=s),
}


def digraph(layout):
    """networkx DiGraph of a square layout, self-loops dropped (describe()'s convention)."""
    dense = layout.toarray() if sp.issparse(layout) else np.asarray(layout)
    G = nx.DiGraph()
    G.add_nodes_from(range(dense.shape[0]))
    G.add_edges_from((int(a), int(b)) for a, b in zip(*np.nonzero(dense)) if a != b)
    return G


# ---------------------------------------------------------------------------- basics


def test_no_tensorflow_import():
    code = "import sys, blocksparse_tf.layouts; print('tensorflow' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_determinism_by_seed(name):
    a, b, c = SEEDED[name](3), SEEDED[name](3), SEEDED[name](4)
    assert isinstance(a, np.ndarray) and a.dtype == bool and a.ndim == 2
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_dense_and_sparse_outputs_agree(name):
    seed = 11
    dense = SEEDED[name](seed)
    factory = {
        "random": lambda: L.random(64, 48, 0.1, seed=seed, sparse=True),
        "balanced_random": lambda: L.balanced_random(64, 48, 0.1, seed=seed, sparse=True),
        "barabasi_albert": lambda: L.barabasi_albert(64, 3, seed=seed, sparse=True),
        "watts_strogatz": lambda: L.watts_strogatz(64, 6, 0.2, seed=seed, sparse=True),
        "watts_strogatz_2d": lambda: L.watts_strogatz_2d(64, 8, 0.2, seed=seed, sparse=True),
        "bipartite_small_world": lambda: L.bipartite_small_world(96, 32, 8, 0.2, seed=seed,
                                                                 sparse=True),
    }[name]
    sparse = factory()
    assert isinstance(sparse, sp.csr_matrix) and sparse.dtype == bool
    assert np.array_equal(sparse.toarray(), dense)


# ---------------------------------------------------------------------------- densities


@pytest.mark.parametrize("rows,cols,density", [(64, 64, 0.1), (10, 30, 0.33), (7, 3, 1.0),
                                               (5, 5, 0.001)])
def test_random_density_exact(rows, cols, density):
    layout = L.random(rows, cols, density, seed=0)
    assert layout.shape == (rows, cols)
    assert layout.sum() == max(1, round(density * rows * cols))
    assert abs(layout.mean() - density) <= max(0.5, 1 - density * rows * cols) / (rows * cols)


@pytest.mark.parametrize("rows,cols,density", [(64, 64, 0.1), (7, 13, 0.4), (10, 10, 0.35),
                                               (5, 50, 0.6), (3, 1000, 0.67), (16, 8, 1.0)])
def test_balanced_random_counts(rows, cols, density):
    for seed in range(5):
        layout = L.balanced_random(rows, cols, density, seed=seed)
        d = max(1, round(density * rows))
        assert (layout.sum(axis=0) == d).all()          # every column: same work
        per_row = layout.sum(axis=1)
        assert per_row.max() - per_row.min() <= 1       # rows as even as possible
        assert abs(layout.mean() - density) <= 0.5 / rows + 1e-12


def test_watts_strogatz_blocks_and_identity():
    for n, k, p in [(64, 6, 0.1), (50, 4, 0.0), (33, 10, 1.0)]:
        layout = L.watts_strogatz(n, k, p, seed=1)
        assert layout.shape == (n, n)
        assert layout.sum() == n * (k + 1)               # density (k + 1) / n exactly
        assert layout.diagonal().all()
        assert np.array_equal(layout, layout.T)


def test_watts_strogatz_p0_is_periodic_band():
    assert np.array_equal(L.watts_strogatz(40, 6, 0.0), L.banded(40, 3, periodic=True))


def test_watts_strogatz_2d_blocks_identity_and_lattice():
    layout = L.watts_strogatz_2d(64, 8, 0.1, seed=2)
    assert layout.sum() == 64 * 9 and layout.diagonal().all()
    assert np.array_equal(layout, layout.T)
    # p = 0: k=4 is the von Neumann neighbourhood on a torus
    lattice = L.watts_strogatz_2d((4, 5), 4, 0.0)
    G = nx.grid_2d_graph(4, 5, periodic=True)
    expected = L.from_graph(G, rows=[(y, x) for y in range(4) for x in range(5)],
                            identity=True)
    assert np.array_equal(lattice, expected)
    assert L.metadata(L.watts_strogatz_2d(12, 4, 0.0))["params"]["grid"] == [3, 4]


def test_barabasi_albert_blocks_and_identity():
    for n, m in [(64, 3), (10, 1), (20, 19)]:
        layout = L.barabasi_albert(n, m, seed=5)
        assert layout.sum() == n + 2 * m * (n - m)
        assert layout.diagonal().all()
        assert np.array_equal(layout, layout.T)
    G = nx.barabasi_albert_graph(64, 3, seed=5)
    expected = nx.to_numpy_array(G, nodelist=range(64)).astype(bool) | np.eye(64, dtype=bool)
    assert np.array_equal(L.barabasi_albert(64, 3, seed=5), expected)


def test_banded_and_dense():
    b = L.banded(10, 2)
    i, j = np.indices((10, 10))
    assert np.array_equal(b, abs(i - j) <= 2)
    assert b.sum() == 10 * 5 - 2 * 3
    assert np.array_equal(L.banded(5, 0), np.eye(5, dtype=bool))
    assert L.banded(6, 2, periodic=True).sum(axis=0).tolist() == [5] * 6
    assert L.dense(3, 5).all() and L.dense(3, 5).shape == (3, 5)
    assert L.dense(4).shape == (4, 4)
    assert L.dense(3, 5, sparse=True).nnz == 15


def test_params_for_density_reaches_target():
    n, target = 64, 0.1
    cases = {
        "watts_strogatz": lambda q: L.watts_strogatz(**q, p=0.1, seed=0),
        "watts_strogatz_2d": lambda q: L.watts_strogatz_2d(**q, p=0.1, seed=0),
        "barabasi_albert": lambda q: L.barabasi_albert(**q, seed=0),
        "banded": lambda q: L.banded(**q),
        "random": lambda q: L.random(**q, seed=0),
        "balanced_random": lambda q: L.balanced_random(**q, seed=0),
        "bipartite_small_world": lambda q: L.bipartite_small_world(**q, p=0.1, seed=0),
    }
    for name, make in cases.items():
        params, reached = L.params_for_density(name, n, target)
        assert abs(reached - target) < 0.02, name
        assert make(params).mean() == pytest.approx(reached), name
    assert L.params_for_density("watts_strogatz", 64, 0.1)[0] == {"n": 64, "k": 6}
    assert L.params_for_density("barabasi_albert", 64, 0.1)[0] == {"n": 64, "m": 3}
    for name in ("watts_strogatz", "watts_strogatz_2d", "barabasi_albert", "banded"):
        with pytest.raises(ValueError, match=f"{name} makes square layouts"):
            L.params_for_density(name, 16, 0.3, cols=5)
        assert L.params_for_density(name, 16, 0.3, cols=16) == L.params_for_density(name, 16, 0.3)
    params, reached = L.params_for_density("bipartite_small_world", 128, 0.25, cols=32)
    assert params == {"rows": 128, "cols": 32, "k": 32} and reached == 0.25
    # unreachable target: closest reachable value is reported
    params, reached = L.params_for_density("barabasi_albert", 64, 0.9)
    assert reached < 0.6 and L.barabasi_albert(**params, seed=0).mean() == pytest.approx(reached)


# ---------------------------------------------------------------------------- rectangular


def test_rectangular_layouts():
    b = L.bipartite_small_world(128, 32, 8, 0.1, seed=0)
    assert b.shape == (128, 32) and (b.sum(axis=0) == 8).all()
    w = L.bipartite_small_world(16, 64, 3, 0.0)
    assert w.shape == (16, 64) and (w.sum(axis=0) == 3).all() and (w.sum(axis=1) == 12).all()
    assert np.array_equal(L.bipartite_small_world(20, 20, 5, 0.0),
                          L.banded(20, 2, periodic=True))
    base = L.watts_strogatz(16, 4, 0.1, seed=0)
    t = L.tile(base, 40, 16)
    assert t.shape == (40, 16)
    assert np.array_equal(t[:16], base) and np.array_equal(t[32:], base[:8])
    ts = L.tile(sp.csr_matrix(base), 40, 20)
    assert sp.issparse(ts) and np.array_equal(ts.toarray(), np.tile(base, (3, 2))[:40, :20])
    forced = L.tile(base, 40, 20, sparse=True)           # either kind on request
    assert sp.issparse(forced) and np.array_equal(forced.toarray(), ts.toarray())
    assert np.array_equal(L.tile(sp.csr_matrix(base), 40, 20, sparse=False), ts.toarray())
    big = L.tile(L.banded(4, 0), 4100, 4100)            # past SPARSE_THRESHOLD: sparse
    assert sp.issparse(big) and big.nnz == 1025 * 1025 * 4  # 4 blocks in each 4 x 4 copy
    assert L.metadata(t)["params"]["source"]["generator"] == "watts_strogatz"
    assert L.random(8, 24, 0.5, seed=0).shape == (8, 24)
    assert L.balanced_random(24, 8, 0.5, seed=0).shape == (24, 8)


def test_from_graph():
    G = nx.path_graph(4)
    assert np.array_equal(L.from_graph(G), nx.to_numpy_array(G).astype(bool))
    assert L.from_graph(G, identity=True).diagonal().all()
    D = nx.DiGraph([(0, 1), (1, 2)])
    d = L.from_graph(D)
    assert d[0, 1] and d[1, 2] and not d[1, 0]
    # node order and rectangular (bipartite) layouts
    B = nx.Graph([("a", "x"), ("b", "x"), ("b", "y")])
    r = L.from_graph(B, rows=["a", "b"], cols=["x", "y"])
    assert r.tolist() == [[True, False], [True, True]]
    assert np.array_equal(L.from_graph(G, rows=[3, 2, 1, 0]), nx.to_numpy_array(
        G, nodelist=[3, 2, 1, 0]).astype(bool))
    assert L.from_graph(nx.complete_graph(5), sparse=True).nnz == 20


def test_from_dense_weights():
    rng = np.random.default_rng(0)
    W = rng.normal(scale=0.01, size=(32, 48))
    planted = [(0, 1), (3, 5), (7, 0), (2, 2)]
    for c, k in planted:
        W[c * 4:(c + 1) * 4, k * 4:(k + 1) * 4] += 1.0
    layout = L.from_dense_weights(W, 4, density=4 / 96)
    assert layout.shape == (8, 12) and layout.sum() == 4
    assert set(zip(*np.nonzero(layout))) == set(planted)
    assert np.array_equal(L.from_dense_weights(W, 4, threshold=1.0), layout)
    # l2 and max norms differ: one big entry vs. many medium ones
    V = np.zeros((4, 4))
    V[0, 0] = 3.0             # block (0, 0): l2 3, max 3
    V[2:, 2:] = 2.0           # block (1, 1): l2 4, max 2
    assert L.from_dense_weights(V, 2, density=0.25, norm="l2")[1, 1]
    assert L.from_dense_weights(V, 2, density=0.25, norm="max")[0, 0]
    assert np.allclose(L.block_norms(V, 2), [[3, 0], [0, 4]])
    assert L.from_dense_weights(V, 2, threshold=0).sum() == 2
    assert L.from_dense_weights(V, 2, density=1.0).all()


# ---------------------------------------------------------------------------- describe


@pytest.mark.parametrize("make", [
    lambda: L.watts_strogatz(48, 4, 0.2, seed=1),
    lambda: L.barabasi_albert(48, 2, seed=1),
    lambda: L.banded(30, 2),
    lambda: L.random(40, 40, 0.15, seed=3),          # directed, not symmetric
    lambda: L.watts_strogatz_2d(36, 8, 0.1, seed=2),
])
def test_describe_matches_networkx(make):
    layout = make()
    d = L.describe(layout)
    G = digraph(layout)
    n = layout.shape[0]
    assert d["shape"] == (n, n) and d["blocks"] == layout.sum()
    assert d["density"] == pytest.approx(layout.mean())
    assert d["row_blocks"] == (layout.sum(1).min(), pytest.approx(layout.sum(1).mean()),
                               layout.sum(1).max())
    assert d["col_blocks"] == (layout.sum(0).min(), pytest.approx(layout.sum(0).mean()),
                               layout.sum(0).max())
    assert nx.is_strongly_connected(G)
    assert d["avg_shortest_path"] == pytest.approx(nx.average_shortest_path_length(G))
    assert d["clustering"] == pytest.approx(nx.average_clustering(G))
    if np.array_equal(layout, layout.T):
        assert d["clustering"] == pytest.approx(nx.average_clustering(G.to_undirected()))
    assert d["diameter"] == nx.diameter(G)
    # mixing curve against networkx BFS distances
    lengths = dict(nx.all_pairs_shortest_path_length(G))
    for t in range(d["diameter"] + 1):
        within = np.mean([sum(1 for v in lengths[u].values() if v <= t) / n for u in range(n)])
        assert d["mixing"][t] == pytest.approx(within)
    assert d["mixing"][0] == pytest.approx(1 / n) and d["mixing"][-1] == pytest.approx(1.0)
    assert d["reachable"] == pytest.approx(1.0) and d["sources"] == n


def test_describe_disconnected_and_rectangular():
    layout = np.zeros((6, 6), dtype=bool)
    layout[0, 1] = layout[1, 2] = layout[4, 5] = True
    d = L.describe(layout)
    # reachable ordered pairs u != v: 0->1, 0->2, 1->2, 4->5 at distances 1, 2, 1, 1
    assert d["avg_shortest_path"] == pytest.approx(5 / 4)
    assert d["reachable"] == pytest.approx((6 + 4) / 36)
    assert d["t90"] is None
    assert len(L.describe(layout, steps=5)["mixing"]) == 6
    r = L.describe(L.bipartite_small_world(40, 10, 4, 0.0))
    assert r["shape"] == (40, 10) and r["col_blocks"] == (4, 4.0, 4)
    assert r["mixing"] is None and r["avg_shortest_path"] is None


def test_small_world_mixes_faster_than_banded():
    n = 256
    band, band_density = L.params_for_density("banded", n, 0.03)
    ws, ws_density = L.params_for_density("watts_strogatz", n, 0.03)
    assert abs(band_density - ws_density) < 0.005
    d_band = L.describe(L.banded(**band))
    d_ws = L.describe(L.watts_strogatz(**ws, p=0.1, seed=0))
    assert d_ws["avg_shortest_path"] < d_band["avg_shortest_path"] / 3
    assert d_ws["t90"] < d_band["t90"] / 3


# ---------------------------------------------------------------------------- large / sparse


def test_large_layouts_stay_sparse():
    n = 100_000
    r = L.random(n, n, 1e-5, seed=0)                 # above SPARSE_THRESHOLD: automatic
    assert isinstance(r, sp.csr_matrix) and r.shape == (n, n) and r.nnz == 100_000
    b = L.balanced_random(n, n // 2, 3e-5, seed=0)
    assert isinstance(b, sp.csr_matrix) and (np.bincount(b.indices) == 3).all()
    w = L.watts_strogatz(20_000, 4, 0.1, seed=0, sparse=True)
    assert w.nnz == 20_000 * 5 and w.diagonal().all()
    d = L.describe(w, sources=16)
    assert d["sources"] == 16 and d["mixing"][-1] == pytest.approx(1.0)
    assert 5 < d["avg_shortest_path"] < 20
    assert d["row_blocks"][1] == pytest.approx(5.0)


# ---------------------------------------------------------------------------- pictures


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_and_plot_mixing(tmp_path):
    ws = L.watts_strogatz(32, 4, 0.1, seed=0)
    fig = L.plot(ws, tmp_path / "sub" / "ws.png")
    assert _is_png(tmp_path / "sub" / "ws.png")
    assert "watts_strogatz" in fig.axes[0].get_title() and "density" in fig.axes[0].get_title()
    L.plot(L.random(700, 900, 0.01, seed=0, sparse=True), tmp_path / "big.png")  # binned
    assert _is_png(tmp_path / "big.png")
    fig = L.plot_mixing({"banded": L.banded(32, 2), "small world": ws}, tmp_path / "mix.png")
    assert _is_png(tmp_path / "mix.png")
    assert len(fig.axes[0].get_lines()) == 2 + 1     # two curves and the 90 % line
    L.plot_mixing([ws, L.describe(L.banded(32, 2))], tmp_path / "mix2.png", steps=4)
    assert _is_png(tmp_path / "mix2.png")




def test_example_script_runs(tmp_path, capsys):
    written = example("plot_layouts").main(["--n", "32", "--density", "0.15",
                                            "--out", str(tmp_path)])
    names = {os.path.basename(p) for p in written}
    assert {"mixing.png", "overview.png", "banded.png", "watts_strogatz.png"} <= names
    assert all(_is_png(p) for p in written)
    out = capsys.readouterr().out
    assert "watts_strogatz" in out and "t90" in out


@pytest.mark.parametrize("argv, message", [
    (["--n", "2"], "argument --n: must be >= 3; got 2"),
    (["--n", "-1"], "argument --n: must be >= 3; got -1"),
    (["--n", "8.5"], "argument --n: invalid int value: '8.5'"),
    (["--density", "0"], "argument --density: must be in (0, 1]; got 0"),
    (["--density", "1.5"], "argument --density: must be in (0, 1]; got 1.5"),
    (["--density", "nan"], "argument --density: must be in (0, 1]; got nan"),
    (["--p", "-0.1"], "argument --p: must be in [0, 1]; got -0.1"),
    (["--p", "2"], "argument --p: must be in [0, 1]; got 2"),
    (["--seed", "-1"], "argument --seed: must be in [0, 2**32); got -1"),
])
def test_example_script_refuses_bad_arguments(argv, message, tmp_path, capsys):
    assert_refused(example("plot_layouts").main, argv + ["--out", str(tmp_path / "out")], message, capsys)
    assert not (tmp_path / "out").exists()


def test_example_script_checks_its_output_folder_first(tmp_path, capsys, monkeypatch):
    module = example("plot_layouts")
    built = []
    monkeypatch.setattr(module, "build", lambda *a: built.append(a))  # must not be reached
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file" / "plots")
    with pytest.raises(SystemExit) as exc:
        module.main(["--out", out])
    assert exc.value.code == 2 and not built
    assert f"--out {out!r}: cannot create the folder" in capsys.readouterr().err
    args = module.parse_args(["--out", str(tmp_path / "new" / "plots")])  # made up front
    assert os.path.isdir(args.out)


# ---------------------------------------------------------------------------- storage


def test_save_load_round_trip(tmp_path):
    ws = L.watts_strogatz(64, 6, 0.1, seed=7)
    path = L.save(tmp_path / "ws", ws)
    assert path.endswith(".npz")
    back = L.load(path)
    assert isinstance(back, np.ndarray) and back.dtype == bool and np.array_equal(back, ws)
    meta = L.metadata(back)
    assert meta["generator"] == "watts_strogatz"
    assert meta["params"] == {"n": 64, "k": 6, "p": 0.1, "seed": 7}
    assert meta["shape"] == [64, 64] and meta["blocks"] == int(ws.sum())
    with np.load(path, allow_pickle=False) as f:         # no pickled objects inside
        assert json.loads(str(f["metadata"]))["generator"] == "watts_strogatz"
        assert f["shape"].tolist() == [64, 64]

    big = L.random(5000, 3000, 0.001, seed=1, sparse=True)
    path = L.save(str(tmp_path / "big.npz"), big, metadata={"note": "input projection"})
    back = L.load(path)
    assert sp.issparse(back) and (back != big).nnz == 0
    assert L.metadata(back)["note"] == "input projection"
    assert L.load(path, sparse=False).shape == (5000, 3000)

    plain = np.eye(3, dtype=int)                         # not from a generator
    back = L.load(L.save(tmp_path / "eye.npz", plain))
    assert np.array_equal(back, plain.astype(bool)) and "generator" not in L.metadata(back)
    assert L.metadata(plain) == {}

    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    np.save(tmp_path / "array.npy", np.eye(3))
    (tmp_path / "text.npz").write_text("not numpy at all")
    for name in ("other.npz", "array.npy", "text.npz"):
        with pytest.raises(ValueError, match="is not a layout file"):
            L.load(tmp_path / name)


# ---------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", None])
def test_bad_density(density):
    message = r"density must be (in|a number in) \(0, 1\]"
    with pytest.raises(ValueError, match=message):
        L.random(8, 8, density, seed=0)
    with pytest.raises(ValueError, match=message):
        L.balanced_random(8, 8, density, seed=0)
    with pytest.raises(ValueError, match=message):
        L.params_for_density("watts_strogatz", 64, density)


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match=r"barabasi_albert needs 1 <= m < n, got n=3, m=5"):
        L.barabasi_albert(3, 5)
    with pytest.raises(ValueError, match=r"1 <= m < n, got n=4, m=4"):
        L.barabasi_albert(4, 4)
    with pytest.raises(ValueError, match=r"1 <= m < n, got n=10, m=0"):
        L.barabasi_albert(10, 0)
    with pytest.raises(ValueError, match="k must be an even integer >= 2"):
        L.watts_strogatz(20, 5, 0.1)
    with pytest.raises(ValueError, match="k must be smaller than n, got k=20, n=20"):
        L.watts_strogatz(20, 20, 0.1)
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
        L.watts_strogatz(20, 4, 1.5)
    with pytest.raises(ValueError, match="k=12 is too large for a 3x3 grid"):
        L.watts_strogatz_2d(9, 12, 0.1)
    with pytest.raises(ValueError, match=r"k must be in \[1, rows\], got k=9, rows=8"):
        L.bipartite_small_world(8, 4, 9, 0.1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer or None"):
        L.random(8, 8, 0.5, seed=-1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer or None"):
        L.watts_strogatz(20, 4, 0.1, seed=1.5)
    with pytest.raises(ValueError, match="rows must be >= 1, got 0"):
        L.random(0, 8, 0.5)
    with pytest.raises(ValueError, match="n must be an integer, got 4.0"):
        L.banded(4.0, 1)
    with pytest.raises(ValueError, match="bandwidth must be >= 0, got -1"):
        L.banded(4, -1)
    with pytest.raises(ValueError, match="sparse must be None, True or False"):
        L.dense(4, sparse="yes")
    with pytest.raises(ValueError, match="unknown generator 'ring'"):
        L.params_for_density("ring", 64, 0.1)
    with pytest.raises(TypeError, match="G must be a networkx graph"):
        L.from_graph(np.eye(3))
    with pytest.raises(ValueError, match="row node 7 is not in the graph"):
        L.from_graph(nx.path_graph(3), rows=[0, 7])
    with pytest.raises(ValueError, match="needs at least one node"):
        L.from_graph(nx.Graph())


def test_non_2d_arrays_rejected(tmp_path):
    for bad in (np.ones(4, dtype=bool), np.ones((2, 2, 2), dtype=bool), np.array(True)):
        with pytest.raises(ValueError, match="layout must be a 2-D array"):
            L.describe(bad)
        with pytest.raises(ValueError, match="layout must be a 2-D array"):
            L.save(tmp_path / "x.npz", bad)
        with pytest.raises(ValueError, match="layout must be a 2-D array"):
            L.tile(bad, 4, 4)
        with pytest.raises(ValueError, match="layout must be a 2-D array"):
            L.plot(bad, tmp_path / "x.png")
        with pytest.raises(ValueError, match=r"W must be a 2-D array \(C, K\)"):
            L.from_dense_weights(bad.astype(float), 1, density=0.5)
    with pytest.raises(ValueError, match="must have at least one row and one column"):
        L.describe(np.zeros((0, 3), dtype=bool))


def test_bad_dense_weight_arguments():
    W = np.ones((8, 12))
    message = r"W shape \(8, 12\) is not a \(non-empty\) multiple of block_size 5"
    with pytest.raises(ValueError, match=message):
        L.from_dense_weights(W, 5, density=0.5)
    with pytest.raises(ValueError, match="give exactly one of density or threshold"):
        L.from_dense_weights(W, 4)
    with pytest.raises(ValueError, match="give exactly one of density or threshold"):
        L.from_dense_weights(W, 4, density=0.5, threshold=1.0)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 2.0"):
        L.from_dense_weights(W, 4, density=2.0)
    with pytest.raises(ValueError, match="threshold must be >= 0, got -1.0"):
        L.from_dense_weights(W, 4, threshold=-1.0)
    with pytest.raises(ValueError, match="no block has a l2 norm above threshold=100.0"):
        L.from_dense_weights(W, 4, threshold=100.0)
    with pytest.raises(ValueError, match="norm must be 'l2' or 'max', got 'l1'"):
        L.from_dense_weights(W, 4, density=0.5, norm="l1")
    W[0, 0] = np.nan
    with pytest.raises(ValueError, match="W contains NaN or infinite values"):
        L.from_dense_weights(W, 4, density=0.5)


def test_docstring_examples():
    import doctest

    result = doctest.testmod(L, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 15 and result.failed == 0


def test_layouts_feed_the_op_directly():
    """Generated layouts (dense arrays and large csr matrices) are accepted by BlocksparseMatMul."""
    import tensorflow as tf

    from blocksparse_tf import BlocksparseMatMul

    for layout, bs in [(L.watts_strogatz(16, 4, 0.2, seed=0), 8),
                       (L.bipartite_small_world(6, 10, 2, 0.1, seed=0), 16),
                       (L.random(20000, 20000, 2e-4, seed=0, sparse=True), 1)]:
        bsmm = BlocksparseMatMul(layout, block_size=bs)
        assert bsmm.blocks == layout.sum()
        x = np.random.default_rng(0).standard_normal((2, bsmm.C)).astype(np.float32)
        w = np.random.default_rng(1).standard_normal(bsmm.w_shape).astype(np.float32)
        y = bsmm(tf.constant(x), tf.constant(w)).numpy()
        if bs > 1:
            y_ref = bsmm.fprop_test(x, w)
        else:  # never densify 20000 x 20000
            W = sp.csr_matrix((w.ravel(), (bsmm.coords[:, 0], bsmm.coords[:, 1])), shape=(bsmm.C, bsmm.K))
            y_ref = (W.T @ x.astype(np.float64).T).T
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)


def test_sparse_layouts_passed_in_are_left_as_they_were(tmp_path):
    """describe, save, tile and the checks copy a scipy matrix's index arrays before changing
    them in place: the caller's matrix (an explicit zero, unsorted indices) is not rewritten."""
    def caller_matrices():
        with_zero = sp.csr_matrix((np.array([1.0, 0.0, 1.0]), np.array([0, 1, 2]),
                                   np.array([0, 2, 3])), shape=(2, 3))
        unsorted = sp.csr_matrix((np.array([5.0, 7.0]), np.array([1, 0]), np.array([0, 2])),
                                 shape=(1, 2))
        return with_zero, unsorted

    for use in (L.describe, lambda m: L.save(tmp_path / "kept", m),
                lambda m: L.tile(m, 4, 6, sparse=True)):
        for matrix in caller_matrices():
            before = matrix.toarray().copy()
            use(matrix)
            np.testing.assert_array_equal(matrix.toarray(), before)
    with_zero, _ = caller_matrices()
    assert L.describe(with_zero)["blocks"] == 2
    assert L.describe(with_zero)["blocks"] == 2  # again: the first call changed nothing


def test_loaded_layout_without_a_generator_record_plots_and_loads_by_its_save_name(tmp_path):
    path = L.save(tmp_path / "plain", np.eye(4, dtype=bool))
    loaded = L.load(tmp_path / "plain")  # the name save() was given, no suffix
    assert path.endswith(".npz") and L.metadata(loaded)["blocks"] == 4
    assert L._label(loaded) == "layout"
    with pytest.raises(FileNotFoundError, match="no layout file"):
        L.load(tmp_path / "missing")


def test_block_norms_max_of_signed_integers():
    W = np.zeros((4, 4), np.int8)
    W[:2, :2] = -128
    W[2:, 2:] = 1
    assert L.block_norms(W, 2, "max").tolist() == [[128.0, 0.0], [0.0, 1.0]]
    assert L.from_dense_weights(W, 2, density=0.25, norm="max").tolist() == [[True, False],
                                                                            [False, False]]
    with pytest.raises(ValueError, match="real numbers"):
        L.block_norms(np.ones((2, 2), complex), 1)


@pytest.mark.parametrize("call, message", [
    (lambda: L.banded(8, 2, periodic="no"), "periodic must be True or False"),
    (lambda: L.banded(8, 2, periodic=1), "periodic must be True or False"),
    (lambda: L.dense(4, sparse=1), "sparse must be None, True or False"),
    (lambda: L.from_graph(nx.path_graph(3), identity="yes"), "identity must be True or False"),
    (lambda: L.random(2**40, 2**24, 1e-19), "more than int64 can count"),
])
def test_flags_and_sizes_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()
