"""Models holding the package's layers compile without XLA, whose kernels the custom ops lack."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from blocksparse_tf.layers import (BlockSparseConv2D, BlockSparseDense, BlockSparseLSTM,
                                   CondNetModel)

RNG = np.random.default_rng(11)


def _dense_model():
    return keras.Sequential([keras.Input((16,)), BlockSparseDense(16, block_size=8)])


def _conv_model():
    return keras.Sequential([keras.Input((6, 6, 8)), BlockSparseConv2D(8, 3, block_size=8)])


def _lstm_model(fused):
    return keras.Sequential([keras.Input((3, 8)), BlockSparseLSTM(16, block_size=8, fused=fused)])


def _condnet_model():
    return CondNetModel([16], 3, block_size=8, seed=0)


MODELS = {"dense": _dense_model, "conv": _conv_model, "lstm": lambda: _lstm_model(False),
          "lstm_fused": lambda: _lstm_model(True), "condnet": _condnet_model}


def _data(model):
    return RNG.standard_normal((4,) + tuple(model.input_shape[1:])).astype(np.float32)


def _pretend_a_gpu_is_there(monkeypatch):
    """Keras' jit_compile="auto" asks TensorFlow for non-CPU devices; answer with one GPU."""
    real = tf.config.list_physical_devices

    def devices(device_type=None):
        if device_type in (None, "GPU"):
            gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
            return [d for d in real(device_type) if d.device_type != "GPU"] + [gpu]
        return real(device_type)

    monkeypatch.setattr(tf.config, "list_physical_devices", devices)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_auto_jit_compile_leaves_xla_off_where_a_gpu_is(kind, monkeypatch):
    model = MODELS[kind]()
    _pretend_a_gpu_is_there(monkeypatch)
    model.compile(optimizer="sgd", loss="mse")
    assert model.jit_compile is False


def test_auto_jit_compile_would_pick_xla_for_a_plain_model(monkeypatch):
    # The control: without the package's layers the same question turns XLA on, so the test
    # above can tell a layer that opts out from one that does not.
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16)])
    _pretend_a_gpu_is_there(monkeypatch)
    model.compile(optimizer="sgd", loss="mse")
    assert model.jit_compile is True


@pytest.mark.parametrize("kind", ["dense", "lstm_fused"])
def test_jit_compile_true_falls_back_with_a_warning_and_trains(kind):
    model = MODELS[kind]()
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile is False
    x = _data(model)
    y = np.asarray(model(x))
    history = model.fit(x, RNG.standard_normal(y.shape).astype(np.float32), epochs=1,
                        verbose=0)
    assert np.isfinite(history.history["loss"][0])
