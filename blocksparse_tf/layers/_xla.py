"""The layers' opt-out of XLA compilation."""


def run_without_xla(layer):
    """Marks ``layer`` as one that Keras must not compile with XLA.

    The package's ops are custom TensorFlow ops without XLA kernels, so a model holding such a
    layer cannot run under XLA.  Keras' ``compile(jit_compile="auto")`` (the default) turns XLA
    on wherever TensorFlow sees a GPU unless some layer says otherwise; with this mark it
    compiles without XLA, and ``jit_compile=True`` falls back to it with a warning.
    """
    layer.supports_jit = False
