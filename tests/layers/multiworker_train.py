"""Worker of test_layers_distribute: trains a block-sparse model, saves the final weights.

Usage: python multiworker_train.py OUT.npz [multi]; with "multi", TF_CONFIG must be set and
the model trains under MultiWorkerMirroredStrategy on its share of every global batch.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from blocksparse_tf.layers import BlockSparseDense, BlockSparseLSTM  # noqa: E402

GLOBAL_BATCH, STEPS, T, D = 8, 3, 5, 16


def main(out, multi):
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if multi
                else tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((GLOBAL_BATCH * STEPS, T, D)).astype(np.float32)
    y = rng.standard_normal((GLOBAL_BATCH * STEPS, 16)).astype(np.float32)
    with strategy.scope():
        model = keras.Sequential([keras.Input((T, D)),
                                  BlockSparseLSTM(32, block_size=8, layer_norm=True),
                                  BlockSparseDense(16, block_size=8)])
        model.set_weights([0.3 * rng.standard_normal(w.shape).astype(np.float32)
                           for w in model.get_weights()])
        optimizer = keras.optimizers.SGD(0.5)
        optimizer.build(model.trainable_variables)
    # A custom loop, not model.fit: Keras 3.15's fit fails under MultiWorkerMirroredStrategy
    # before the first step (it reduces the per-replica input batch in _maybe_symbolic_build).
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # Every worker gets its half of each global batch.
    dist = strategy.experimental_distribute_dataset(data.with_options(options))

    @tf.function
    def step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean(tf.square(model(xb, training=True) - yb), axis=-1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(replica_step, args=batch)

    for batch in dist:
        step(batch)
    np.savez(out, *model.get_weights())


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "multi")
