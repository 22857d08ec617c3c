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


def _run(script, tmp_path):
    path = tmp_path / "script.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True)


@pytest.mark.skipif(subprocess.run(["which", "g++"], capture_output=True).returncode != 0,
                    reason="needs g++ to build a library with an unresolved symbol")
def test_library_built_against_another_tensorflow_says_so(tmp_path):
    """A library that needs a TensorFlow symbol this TensorFlow lacks (what a build against
    another version gives): an ImportError naming the version and the rebuild command."""
    source = tmp_path / "stale.cc"
    source.write_text("namespace tensorflow { void FunctionOfAnotherVersion(); }\n"
                      "struct Init { Init() { tensorflow::FunctionOfAnotherVersion(); } } init;\n")
    library = tmp_path / "stale.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    result = _run(f"""
from blocksparse_tf import _ops
try:
    _ops._load({str(library)!r})
except ImportError as err:
    print("ImportError", err)
""", tmp_path)
    assert "ImportError" in result.stdout, result.stderr[-3000:]
    assert "built against another TensorFlow" in result.stdout
    assert "bash tools/setup.sh" in result.stdout


def test_second_copy_of_the_library_is_refused_with_a_reason(tmp_path):
    """TensorFlow gives back a module without ops for a second copy of the library: an
    ImportError that says why, not an AttributeError at the first op."""
    result = _run(f"""
import shutil
from blocksparse_tf import _ops
_ops.ops()
copy = shutil.copy(_ops._path, {str(tmp_path / "copy.so")!r})
try:
    _ops._load(copy)
except ImportError as err:
    print("ImportError", err)
""", tmp_path)
    assert "ImportError" in result.stdout, result.stderr[-3000:]
    assert "another copy of _blocksparse_ops.so was loaded" in result.stdout
