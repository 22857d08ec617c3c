"""From trained sparse / dense Keras layers to BlockSparseDense (blocksparse_tf.convert)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from blocksparse_tf.convert import (PadFeatures, SliceFeatures, convert_model, pad_features,
                                    to_block_sparse, to_dense_model)
from blocksparse_tf.layers import BlockSparseDense
from blocksparse_tf.layers.sparse_vd import SparseVDConv2D, SparseVDDense


def _block_sparse_log_alpha(rng, C, K, bs, keep_blocks=0.25, keep_inside=0.5):
    """log_alpha whose surviving weights (< 3) lie in a random quarter of the blocks."""
    blocks = rng.random((-(-C // bs), -(-K // bs))) < keep_blocks
    blocks[0, 0] = True
    mask = np.kron(blocks, np.ones((bs, bs)))[:C, :K].astype(bool)
    mask &= rng.random((C, K)) < keep_inside
    return np.where(mask, rng.uniform(-4, 2.9, (C, K)), rng.uniform(3, 8, (C, K)))


def _set_log_alpha(layer, log_alpha):
    theta = keras.ops.convert_to_numpy(layer.theta)
    layer.log_sigma2.assign((log_alpha + np.log(theta ** 2 + 1e-8)).astype(np.float32))


def _np(t):
    return keras.ops.convert_to_numpy(t)


def test_sparse_vd_layer_converts_exactly_and_keeps_only_surviving_blocks():
    rng = np.random.default_rng(0)
    layer = SparseVDDense(32, activation="relu")
    x = rng.normal(size=(16, 64)).astype(np.float32)
    layer(x)
    _set_log_alpha(layer, _block_sparse_log_alpha(rng, 64, 32, 8))
    layer.bias.assign(rng.normal(size=32).astype(np.float32))
    bsd, rep = to_block_sparse(layer, 8, inputs=x, repeats=2)
    assert isinstance(bsd, BlockSparseDense)
    W = layer.pruned_kernel()
    expected = np.abs(W).reshape(8, 8, 4, 8).sum(axis=(1, 3)) > 0
    assert np.array_equal(bsd.bsmm.layout, expected)
    assert np.allclose(_np(bsd(x)), _np(layer(x)), atol=1e-5)
    assert np.allclose(bsd.dense_kernel(), W)
    assert rep["kept_fraction"] == 1.0 and rep["blocks"] == expected.sum()
    assert rep["max_abs_diff"] < 1e-5 and rep["speedup"] > 0


def test_dense_layer_at_target_density_keeps_largest_blocks():
    rng = np.random.default_rng(1)
    dense = keras.layers.Dense(16, activation="tanh")
    x = rng.normal(size=(5, 32)).astype(np.float32)
    dense(x)
    W = _np(dense.kernel)
    W[:8, 8:] *= 100.0  # the (0, 1) block has by far the largest norm
    dense.kernel.assign(W)
    bsd, rep = to_block_sparse(dense, 8, density=0.125)  # 1 of the 8 blocks
    layout = np.zeros((4, 2), bool)
    layout[0, 1] = True
    assert np.array_equal(bsd.bsmm.layout, layout)
    Wk = W * np.kron(layout, np.ones((8, 8)))
    assert np.allclose(_np(bsd(x)), np.tanh(x @ Wk + _np(dense.bias)), atol=1e-5)
    assert rep["density"] == 0.125 and rep["kept_fraction"] == pytest.approx(64 / W.size)


def test_padding_of_sizes_not_multiple_of_block_size():
    rng = np.random.default_rng(2)
    W = rng.normal(size=(20, 12)).astype(np.float32)
    b = rng.normal(size=12).astype(np.float32)
    with pytest.raises(ValueError, match="pad=True"):
        to_block_sparse(W, 8, bias=b)
    bsd, rep = to_block_sparse(W, 8, bias=b, activation="relu", pad=True)
    assert rep["padded_shape"] == (24, 16)
    x = rng.normal(size=(3, 20)).astype(np.float32)
    y = _np(bsd(pad_features(x, 4)))
    assert np.allclose(y[:, :12], np.maximum(x @ W + b, 0), atol=1e-5)
    assert np.all(y[:, 12:] == 0)
    for mixing in ("softmax", "log_softmax", "sparsemax", "glu", lambda z: z - z[:, :1]):
        with pytest.raises(ValueError, match="element-wise"):
            to_block_sparse(W, 8, activation=mixing, pad=True)
    for elementwise in ("tanh", "gelu", "leaky_relu"):  # padded, then sliced: the same values
        bsd, _ = to_block_sparse(W, 8, bias=b, activation=elementwise, pad=True)
        want = keras.activations.get(elementwise)(x @ W + b)
        np.testing.assert_allclose(_np(bsd(pad_features(x, 4)))[:, :12], want, atol=1e-5)


def _random_biases(model, rng):
    """Nonzero biases in every layer that has one (nested models too): a conversion that
    dropped or misplaced a bias would otherwise compute the same outputs."""
    for layer in model._flatten_layers(include_self=False):
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.assign(rng.normal(size=bias.shape).astype(np.float32))
    return model


def _lenet(rng, n_in=64):
    model = keras.Sequential([
        keras.Input((n_in,)),
        SparseVDDense(300, activation="relu"),
        SparseVDDense(100, activation="relu"),
        SparseVDDense(10, activation="softmax"),
    ])
    for layer in model.layers:
        C, K = layer.theta.shape
        _set_log_alpha(layer, _block_sparse_log_alpha(rng, C, K, 16))
    return _random_biases(model, rng)


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_convert_model_matches_pruned_dense_model(block_size):
    rng = np.random.default_rng(3)
    model = _lenet(rng)
    x = rng.normal(size=(64, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=64)
    new, rep = convert_model(model, block_size, x=x, y=y, repeats=2)
    assert np.allclose(_np(new(x)), _np(model(x)), atol=1e-5)
    assert rep["max_abs_diff"] < 1e-5 and rep["error_change"] == 0.0
    assert all(r["kept_fraction"] == 1.0 for r in rep["layers"])
    assert len(rep["layers"]) == 3 and rep["speedup"] > 0
    dense = to_dense_model(model)
    assert all(type(l) is keras.layers.Dense for l in dense.layers)
    assert np.allclose(_np(dense(x)), _np(model(x)), atol=1e-5)


def test_convert_functional_model_with_conv_and_plain_dense(tmp_path):
    rng = np.random.default_rng(4)
    inp = keras.Input((8, 8, 1))
    h = SparseVDConv2D(4, 3, activation="relu")(inp)
    h = keras.layers.Flatten()(h)  # 6 * 6 * 4 = 144 features
    h = keras.layers.Dense(32, activation="relu")(h)
    out = SparseVDDense(16)(h)
    model = keras.Model(inp, out)
    _set_log_alpha(model.layers[1], rng.uniform(-2, 6, size=(3, 3, 1, 4)))
    _random_biases(model, rng)
    x = rng.normal(size=(6, 8, 8, 1)).astype(np.float32)
    new, rep = convert_model(model, 16)
    assert type(new.layers[1]) is keras.layers.Conv2D
    assert isinstance(new.layers[3], BlockSparseDense) and isinstance(new.layers[4],
                                                                     BlockSparseDense)
    assert np.allclose(_np(new(x)), _np(model(x)), atol=1e-4)
    path = str(tmp_path / "converted.keras")
    new.save(path)
    loaded = keras.models.load_model(path)
    assert np.allclose(_np(loaded(x)), _np(new(x)), atol=1e-6)


def test_branching_functional_model():
    rng = np.random.default_rng(6)
    inp = keras.Input((16,))
    a = keras.layers.Dense(24, activation="relu")(inp)
    b = SparseVDDense(24)(inp)
    out = keras.layers.Dense(8)(keras.layers.Add()([a, b]))
    model = _random_biases(keras.Model(inp, out), rng)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    new, rep = convert_model(model, 8)
    assert len(rep["layers"]) == 3
    assert np.allclose(_np(new(x)), _np(model(x)), atol=1e-5)


def test_layers_of_nested_models_convert_too():
    """A Sequential used as a layer: its SparseVD layer is converted and reported (it was
    copied unconverted), and the converted model gives the pruned model's outputs."""
    rng = np.random.default_rng(8)
    inner_vd = SparseVDDense(16, activation="relu", name="inner_vd")
    inner = keras.Sequential([keras.Input((16,)), inner_vd], name="inner")
    model = keras.Sequential([keras.Input((16,)), inner, SparseVDDense(12, name="outer_vd")])
    _set_log_alpha(inner_vd, _block_sparse_log_alpha(rng, 16, 16, 8))
    _random_biases(model, rng)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    new, rep = convert_model(model, 8)
    assert [r["name"] for r in rep["layers"]] == ["inner_vd", "outer_vd"]
    assert [type(layer).__name__ for layer in new.layers[0].layers] == ["BlockSparseDense"]
    assert [type(layer).__name__ for layer in to_dense_model(model).layers[0].layers] == ["Dense"]
    np.testing.assert_allclose(_np(new(x)), _np(model(x)), atol=1e-5)


def test_padded_model_saves_and_loads(tmp_path):
    rng = np.random.default_rng(5)
    model = _lenet(rng)
    new, _ = convert_model(model, 32)
    path = str(tmp_path / "lenet_bs.keras")
    new.save(path)
    loaded = keras.models.load_model(path)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    assert np.allclose(_np(loaded(x)), _np(model(x)), atol=1e-5)
    # A fresh process that imports only blocksparse_tf.layers (as docs/layers.md says is
    # enough) loads it too: the padding layers register with them.
    x_path = str(tmp_path / "x.npy")
    np.save(x_path, x)
    script = ("import json, sys, keras, numpy as np; import blocksparse_tf.layers; "
              "m = keras.models.load_model(sys.argv[1]); "
              "print(json.dumps(np.asarray(m(np.load(sys.argv[2]))).tolist()))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script, path, x_path], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.array(json.loads(result.stdout.strip().splitlines()[-1])),
                               _np(loaded(x)), rtol=1e-6, atol=1e-6)


def test_convert_model_rejects_3d_inputs_and_no_pad():
    inp = keras.Input((4, 8))
    model = keras.Model(inp, keras.layers.Dense(8)(inp))
    with pytest.raises(ValueError, match="2-D"):
        convert_model(model, 8)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(8)])
    with pytest.raises(ValueError, match="pad=True"):
        convert_model(model, 8, pad=False)


@pytest.mark.parametrize("kwargs,message", [
    ({"block_size": 3}, r"block_size must be one of \(1, 8, 16, 32, 64\); got 3"),
    ({"block_size": 8, "density": 0.0}, r"density must be None or a number in \(0, 1\]; got 0\.0"),
    ({"block_size": 8, "density": 1.5}, r"density must be None or a number in \(0, 1\]; got 1\.5"),
    ({"block_size": 8, "norm": "l1"}, r"norm must be 'l2' or 'max'; got 'l1'"),
])
def test_bad_arguments_raise(kwargs, message):
    W = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match=message):
        to_block_sparse(W, **kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D"):
        to_block_sparse(np.ones(16), 8)
    with pytest.raises(ValueError, match="bias"):
        to_block_sparse(np.ones((16, 16)), 8, bias=np.ones(3))
    with pytest.raises(ValueError, match="not built"):
        to_block_sparse(keras.layers.Dense(8), 8)
    with pytest.raises(ValueError, match="Conv2D"):
        to_block_sparse(keras.layers.Conv2D(8, 3), 8)
    with pytest.raises(ValueError, match="keras.Model"):
        convert_model("model", 8)
    with pytest.raises(ValueError, match="inputs"):
        to_block_sparse(np.ones((16, 16), np.float32), 8, inputs=np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"pad must be an integer >= 0; got -1"):
        PadFeatures(-1)
    with pytest.raises(ValueError, match=r"units must be a positive integer; got 0"):
        SliceFeatures(0)
    with pytest.raises(ValueError, match="pad must be True or False, got 'no'"):
        to_block_sparse(np.ones((12, 12)), 8, pad="no")  # a truthy string padded
    with pytest.raises(ValueError, match="pad must be True or False"):
        convert_model(_dense_model(keras.layers.Dense(8)), 8, pad=0)
    with pytest.raises(ValueError, match="norm must be 'l2' or 'max'; got 'l1'"):
        convert_model(_dense_model(keras.layers.Dense(12), width=12), 8, norm="l1")  # padded
    dense = keras.layers.Dense(8)
    dense.build((None, 16))
    with pytest.raises(ValueError, match="bias and activation are for a bare kernel"):
        to_block_sparse(dense, 8, activation="relu")  # was ignored
    with pytest.raises(ValueError, match="real array"):
        to_block_sparse(np.ones((16, 16)) * 1j, 8)  # the imaginary part was dropped


def test_all_zero_kernel_keeps_one_zero_block():
    bsd, rep = to_block_sparse(np.zeros((16, 16), np.float32), 8)
    assert rep["blocks"] == 1 and not np.any(bsd.dense_kernel())


def _dense_model(*layers, width=16):
    return keras.Sequential([keras.Input((width,)), *layers])


def test_quantized_dense_is_refused():
    # Its kernel holds int8 codes, not weights: converted, they gave outputs 300x too large.
    model = _dense_model(keras.layers.Dense(16))
    model.quantize("int8")
    with pytest.raises(ValueError, match="'dense.*' is quantized \\(int8\\): convert the float"):
        convert_model(model, 8)


def test_dense_subclass_is_copied_not_replaced():
    """A subclass of Dense may compute something else in its call: it is copied with its
    weights (it was replaced by a plain BlockSparseDense, dropping its call), and
    to_block_sparse refuses it."""

    class Scaled(keras.layers.Dense):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    model = _dense_model(Scaled(16, name="scaled"), keras.layers.Dense(8, name="plain"))
    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    new, rep = convert_model(model, 8)
    assert [r["name"] for r in rep["layers"]] == ["plain"]
    assert type(new.get_layer("scaled")) is Scaled
    np.testing.assert_allclose(_np(new(x)), _np(model(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="got a Scaled"):
        to_block_sparse(model.get_layer("scaled"), 8)


def test_layer_shared_by_nested_and_outer_model_stays_shared():
    shared = keras.layers.Dense(16, name="shared")
    inner = keras.Sequential([keras.Input((16,)), shared], name="inner")
    inputs = keras.Input((16,))
    model = keras.Model(inputs, shared(inner(inputs)))
    new, rep = convert_model(model, 8)
    assert [r["name"] for r in rep["layers"]] == ["shared"]
    assert new.get_layer("inner").get_layer("shared") is new.get_layer("shared")
    assert new.count_params() == model.count_params() == 16 * 16 + 16
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    np.testing.assert_allclose(_np(new(x)), _np(model(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [16, 12])  # 12: padded (a Sequential of the same name)
def test_trainable_flags_and_dtype_policies_carry_over(width):
    model = _dense_model(keras.layers.Dense(16, trainable=False, dtype="mixed_float16", name="a"),
                         keras.layers.Dense(8, dtype="bfloat16", name="b"), width=width)
    new, _ = convert_model(model, 8)
    assert [new.get_layer(n).trainable for n in "ab"] == [False, True]
    assert len(new.trainable_weights) == 2  # b's blocks and bias
    bs_layers = [layer for layer in new._flatten_layers() if isinstance(layer, BlockSparseDense)]
    assert [layer.dtype_policy.name for layer in bs_layers] == ["mixed_float16", "bfloat16"]
    x = np.ones((2, width), np.float32)
    assert new(x).dtype == model(x).dtype == "bfloat16"


def test_measuring_needs_one_input_and_one_output():
    a, b = keras.Input((16,)), keras.Input((16,))
    model = keras.Model([a, b], keras.layers.Dense(8)(keras.layers.Add()([a, b])))
    x = np.ones((2, 16), np.float32)
    with pytest.raises(ValueError, match="one input and one output; this one has 2 and 1"):
        convert_model(model, 8, x=[x, x])
    assert len(convert_model(model, 8)[1]["layers"]) == 1  # without x it converts


def test_layer_called_on_inputs_of_other_ranks_is_refused():
    dense = keras.layers.Dense(5)
    a, b = keras.Input((7,)), keras.Input((3, 7))
    with pytest.raises(ValueError, match=r"called on inputs of shapes \(None, 7\) and \(None, 3, 7\)"):
        convert_model(keras.Model([a, b], [dense(a), dense(b)]), 8)
