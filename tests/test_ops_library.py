"""Loading the op library (blocksparse_tf/_ops.py)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each script's first use of the library happens while a tf.function is traced.
FIRST_USES = {
    "sparse_dot": """
import numpy as np
import tensorflow as tf
import blocksparse_tf
mask = tf.constant((np.random.default_rng(0).random((4, 2)) < 0.5).astype(np.float32))
f = tf.function(lambda: blocksparse_tf.sparse_dot(tf.ones((4, 64)), tf.ones((64, 64)),
                                                  in_mask=mask, out_mask=mask, block_size=32))
print(f().shape, blocksparse_tf.cpu_isa())
""",
    "BlocksparseMatMul": """
import numpy as np
import tensorflow as tf
import blocksparse_tf
x = tf.ones((4, 64))
y = tf.function(lambda: blocksparse_tf.blocksparse_matmul(
    x, tf.ones((2, 32, 32)), tf.constant([[0, 0], [1, 1]]), block_size=32, C=64, K=64))()
print(y.shape, blocksparse_tf.cpu_isa())
""",
}


@pytest.mark.parametrize("name", sorted(FIRST_USES))
def test_library_first_loaded_inside_tf_function(name, tmp_path):
    # From a file, not `python -c`: AutoGraph converts only functions whose source it can
    # read, and the loader must survive that conversion.
    script = tmp_path / "first_use.py"
    script.write_text(FIRST_USES[name])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:2] == ["(4,", "64)"]
