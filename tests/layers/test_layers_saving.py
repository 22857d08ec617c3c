"""Save/load round trips: .keras files, get_config/from_config, SavedModel in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf.layers import BlockSparseDense, BlockSparseLSTM, BlockSparseLSTMCell

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model():
    """Every layer and option that changes the saved state: layouts, LN, gates, sparse input."""
    inputs = keras.Input((5, 32))
    h = BlockSparseDense(32, block_size=8, layout={"generator": "random", "density": 0.4,
                                                   "seed": None}, gate=True)(inputs)
    h = BlockSparseLSTM(64, block_size=8, layer_norm=True, sparse_input=True,
                        return_sequences=True)(h)
    h = keras.layers.RNN(BlockSparseLSTMCell(32, block_size=16, layout="barabasi_albert"))(h)
    outputs = BlockSparseDense(16, block_size=8, activation="tanh")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    model.set_weights([0.2 * rng.standard_normal(w.shape).astype(np.float32)
                       for w in model.get_weights()])
    return model


def _x():
    return np.random.default_rng(1).standard_normal((4, 5, 32)).astype(np.float32)


def test_keras_file_round_trip(tmp_path):
    model = _model()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: the layers are registered
    np.testing.assert_array_equal(loaded.predict(_x(), verbose=0), model.predict(_x(), verbose=0))
    for a, b in zip(model.layers, loaded.layers):
        if isinstance(a, BlockSparseDense):
            np.testing.assert_array_equal(a.bsmm.layout, b.bsmm.layout)


def test_config_round_trip_is_json_and_keeps_layout():
    layer = BlockSparseDense(64, block_size=16, layout={"generator": "random", "density": 0.3,
                                                        "seed": None})
    layer.build((None, 128))
    config = json.loads(json.dumps(layer.get_config()))  # plain JSON, no pickle
    clone = BlockSparseDense.from_config(config)
    clone.build((None, 128))
    np.testing.assert_array_equal(clone.bsmm.layout, layer.bsmm.layout)
    lstm = BlockSparseLSTM(64, block_size=16, layer_norm=True, return_state=True, fused=False)
    lstm.build((None, None, 8))
    config = json.loads(json.dumps(lstm.get_config()))
    clone = BlockSparseLSTM.from_config(config)
    assert clone.get_config() == config
    clone.build((None, None, 8))
    np.testing.assert_array_equal(clone.cell.recurrent_bsmm.layout, lstm.cell.recurrent_bsmm.layout)


def test_saved_model_serves_in_fresh_process(tmp_path):
    model = _model()
    x = _x()
    expected = model.predict(x, verbose=0)
    export = str(tmp_path / "saved")
    serve = tf.function(lambda t: model(t, training=False),
                        input_signature=[tf.TensorSpec((None, 5, 32), tf.float32)])
    module = tf.Module()
    module.model = model
    module.serve = serve
    tf.saved_model.save(module, export, signatures={"serving_default": serve})
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        import blocksparse_tf.layers  # registers the ops
        loaded = tf.saved_model.load({export!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        np.save({str(tmp_path / "y.npy")!r}, loaded.serve(tf.constant(x)).numpy())
        out = loaded.signatures["serving_default"](tf.constant(x))
        np.save({str(tmp_path / "y_sig.npy")!r}, list(out.values())[0].numpy())
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "y_sig.npy"), expected, rtol=1e-6, atol=1e-6)


def test_initial_weights_of_the_matmul_class_save_as_their_recipe(tmp_path):
    """identity_init / ortho_init arrays given as initializers: the layers save (their configs
    hold how the arrays were made, not the values), load, and rebuild the same weights from
    the config alone; an array derived from one cannot be saved that way and says so."""
    from blocksparse_tf import BlocksparseMatMul
    layout = np.eye(4, dtype=int) | np.eye(4, k=1, dtype=int)
    bsmm = BlocksparseMatMul(layout, block_size=8)
    inits = {"ortho": bsmm.ortho_init(seed=3), "identity": bsmm.identity_init(0.5)}
    for name, init in inits.items():
        model = keras.Sequential([keras.Input((32,)),
                                  BlockSparseDense(32, block_size=8, layout=layout,
                                                   kernel_initializer=init)])
        np.testing.assert_array_equal(model.layers[0].kernel.numpy(), init)
        path = tmp_path / f"{name}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        for a, b in zip(model.get_weights(), loaded.get_weights()):
            np.testing.assert_array_equal(a, b)
        config = json.loads(json.dumps(model.layers[0].get_config()))
        fresh = BlockSparseDense.from_config(config)
        fresh.build((None, 32))
        np.testing.assert_array_equal(fresh.kernel.numpy(), init)
    derived = inits["ortho"] * 2
    layer = BlockSparseDense(32, block_size=8, layout=layout, kernel_initializer=derived)
    with pytest.raises(ValueError, match="only as returned by BlocksparseMatMul.identity_init"):
        layer.get_config()


def test_initial_weights_made_for_another_layout_raise():
    """identity_init / ortho_init arrays know their layout: given to a layer of another layout
    (even one with as many blocks) they raise when the layer builds, saved or loaded."""
    from blocksparse_tf import BlocksparseMatMul
    mine = np.eye(2, 4, dtype=int)
    other_positions = BlocksparseMatMul(np.array([[0, 1, 0, 0], [1, 0, 0, 0]]), block_size=16)
    other_grid = BlocksparseMatMul(np.eye(4, 4, dtype=int)[:2], block_size=16)  # 2 x 4 too
    other_size = BlocksparseMatMul(np.eye(4, 8, dtype=int), block_size=8)
    for made_for, match in [(other_positions, "blocks at other positions"),
                            (other_size, "grid of blocks of 8, not 2 x 4 of 16")]:
        for init in (made_for.identity_init(), made_for.ortho_init(seed=1)):
            layer = BlockSparseDense(64, block_size=16, layout=mine, kernel_initializer=init)
            with pytest.raises(ValueError, match=match):
                layer.build((None, 32))
    ok = BlockSparseDense(64, block_size=16, layout=mine,
                          kernel_initializer=other_grid.identity_init())  # the same layout
    ok.build((None, 32))
    np.testing.assert_array_equal(ok.kernel.numpy(), other_grid.identity_init())
    # The same check where the initializer comes as a config (from_config, or the serialized
    # dict passed to the constructor): the recipe is read from the dict too.
    init = other_positions.identity_init()
    config = BlockSparseDense(64, block_size=16, layout=other_positions.layout,
                              kernel_initializer=init).get_config()
    config["layout"] = {"shape": [2, 4], "coords": [[0, 0], [1, 1]]}
    with pytest.raises(ValueError, match="blocks at other positions"):
        BlockSparseDense.from_config(config).build((None, 32))


def _saved_weights_of(make, seed, path, x):
    model = make(seed)
    model(x)
    model.save_weights(path)
    return model


@pytest.mark.parametrize("kind", ["dense", "conv", "lstm"])
def test_weights_of_another_layout_do_not_load(kind, tmp_path):
    """Saved weights record the block layout: loading them into a layer of another layout
    with as many blocks (whose kernel has the same shape) raises, and into a layer of the
    same layout gives the same outputs."""
    from blocksparse_tf.layers import BlockSparseConv2D
    rng = np.random.default_rng(5)
    if kind == "dense":
        x = rng.standard_normal((3, 64)).astype(np.float32)
        make = lambda seed: keras.Sequential([keras.Input((64,)), BlockSparseDense(
            64, block_size=16, layout={"generator": "random", "density": 0.5, "seed": seed})])
    elif kind == "conv":
        x = rng.standard_normal((2, 5, 5, 32)).astype(np.float32)
        make = lambda seed: keras.Sequential([keras.Input((5, 5, 32)), BlockSparseConv2D(
            32, 3, block_size=8, padding="same",
            layout={"generator": "random", "density": 0.5, "seed": seed})])
    else:
        x = rng.standard_normal((2, 4, 32)).astype(np.float32)
        make = lambda seed: keras.Sequential([keras.Input((4, 32)), BlockSparseLSTM(
            32, block_size=8, layout={"generator": "watts_strogatz", "density": 0.5,
                                      "seed": seed})])
    path = str(tmp_path / "a.weights.h5")
    saved = _saved_weights_of(make, 1, path, x)
    other = make(2)
    other(x)
    ours, theirs = saved.layers[0], other.layers[0]
    ours, theirs = getattr(ours, "cell", ours), getattr(theirs, "cell", theirs)
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    layout_of = lambda layer: (layer.bsmm if hasattr(layer, "bsmm") else layer.recurrent_bsmm)
    assert not np.array_equal(layout_of(ours).coords, layout_of(theirs).coords)
    with pytest.raises(ValueError, match="saved by a layer of another block layout"):
        other.load_weights(path)
    same = make(1)
    same(x)
    same.load_weights(path)
    np.testing.assert_array_equal(same(x).numpy(), saved(x).numpy())


def test_weights_saved_without_a_layout_record_still_load(tmp_path):
    """Files written before the record (the variables only) load as before."""
    model = keras.Sequential([keras.Input((32,)), BlockSparseDense(32, block_size=8)])
    layer = model.layers[0]
    store = {}
    keras.layers.Layer.save_own_variables(layer, store)  # what earlier versions wrote
    fresh = keras.Sequential([keras.Input((32,)), BlockSparseDense(32, block_size=8)])
    fresh.layers[0].load_own_variables(store)
    for a, b in zip(layer.get_weights(), fresh.layers[0].get_weights()):
        np.testing.assert_array_equal(a, b)


def test_get_config_returns_a_copy_of_the_layout():
    layer = BlockSparseDense(16, block_size=8, layout=np.array([[1, 0], [0, 1]]))
    config = layer.get_config()
    config["layout"]["coords"].append([0, 1])
    assert layer.get_config()["layout"]["coords"] == [[0, 0], [1, 1]]
    assert layer.density == 0.5


def test_unbuilt_model_saves_and_loads(tmp_path):
    # Saving read the layout of a layer not built yet (AttributeError on None).
    path = str(tmp_path / "unbuilt.keras")
    keras.Sequential([BlockSparseDense(16, block_size=8)]).save(path)
    loaded = keras.models.load_model(path)
    assert loaded(np.ones((2, 16), np.float32)).shape == (2, 16)
