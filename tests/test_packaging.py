"""The wheel: tagged for this platform, holding the op library and every module, and working
once installed away from the source tree."""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "blocksparse_tf"
LIBRARY = f"{PACKAGE}/_blocksparse_ops.so"


def _source_copy(destination, with_library=True):
    """The files a wheel is built from, copied, so that building writes nothing here."""
    os.makedirs(destination)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), destination)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", *([] if with_library else ["*.so"]))
    shutil.copytree(os.path.join(ROOT, PACKAGE), os.path.join(destination, PACKAGE), ignore=ignore)
    return destination


def _build_wheel(source, out):
    return subprocess.run([sys.executable, "-m", "pip", "wheel", source, "--no-deps",
                           "--no-build-isolation", "--disable-pip-version-check", "-q", "-w", out],
                          capture_output=True, text=True)


def _package_modules():
    found = glob.glob(os.path.join(ROOT, PACKAGE, "**", "*.py"), recursive=True)
    return {os.path.relpath(path, ROOT).replace(os.sep, "/") for path in found}


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, LIBRARY)),
                    reason="the op library is not built in the package folder")
def test_wheel_is_platform_specific_complete_and_works_installed(tmp_path):
    source = _source_copy(str(tmp_path / "source"))
    built = _build_wheel(source, str(tmp_path / "dist"))
    assert built.returncode == 0, built.stderr[-3000:]
    wheels = glob.glob(str(tmp_path / "dist" / "*.whl"))
    assert len(wheels) == 1
    name = os.path.basename(wheels[0])
    # A compiled library inside: tagged for this interpreter and platform, never py3-none-any.
    assert name.endswith("-linux_x86_64.whl") and "-none-any" not in name, name
    with zipfile.ZipFile(wheels[0]) as wheel:
        contents = set(wheel.namelist())
    assert LIBRARY in contents
    missing = _package_modules() - contents
    assert not missing, f"modules left out of the wheel: {sorted(missing)}"

    site = str(tmp_path / "site")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                                "--disable-pip-version-check", "--target", site, wheels[0]],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    check = f"""
import numpy as np
import blocksparse_tf, blocksparse_tf._ops as library
from blocksparse_tf import BlocksparseMatMul
from blocksparse_tf.layers import BlockSparseDense
assert blocksparse_tf.__file__.startswith({site!r}), blocksparse_tf.__file__
rng = np.random.default_rng(0)
layout = rng.random((4, 3)) < 0.6
layout[0, 0] = True
bsmm = BlocksparseMatMul(layout, block_size=8)
x = rng.standard_normal((5, 32)).astype(np.float32)
w = rng.standard_normal(bsmm.w_shape).astype(np.float32)
y = np.asarray(bsmm(x, w))
assert library._path.startswith({site!r}), library._path
reference = x.astype(np.float64) @ bsmm.to_dense(w).astype(np.float64)
assert np.abs(y - reference).max() < 1e-4 * np.abs(reference).max()
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=site, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "-c", check], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_wheel_without_the_op_library_is_refused(tmp_path):
    source = _source_copy(str(tmp_path / "source"), with_library=False)
    built = _build_wheel(source, str(tmp_path / "dist"))
    assert built.returncode != 0
    assert "_blocksparse_ops.so is missing: build it first" in built.stdout + built.stderr
    assert not glob.glob(str(tmp_path / "dist" / "*.whl"))


def test_documented_names_are_reachable():
    """Names README.md and docs/ present as public: the submodules as attributes of the package
    (lazily imported), and the helper functions from blocksparse_tf.layers."""
    # In a fresh interpreter: once imported elsewhere, a submodule is an attribute anyway.
    probe = ("import blocksparse_tf as b; print(*(getattr(b, n).__name__ for n in "
             "('layouts', 'layers', 'convert', 'datasets')), sorted(b.__all__))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:4] == [f"{PACKAGE}.{n}" for n in ("layouts", "layers", "convert", "datasets")]
    import blocksparse_tf.convert
    import blocksparse_tf.layers as layers

    for name in ("set_kl_weight", "total_kl", "format_report", "sparsity_report",
                 "sparsity_regularizers", "bernoulli_log_prob"):
        assert callable(getattr(layers, name)) and name in layers.__all__
    assert callable(blocksparse_tf.convert.choose_layout)
    assert callable(blocksparse_tf.convert.pruned_weights)


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, LIBRARY)),
                    reason="the op library is not built in the package folder")
def test_wheel_of_a_library_older_than_bazels_is_refused(tmp_path):
    """The checkout loads the newer of the package's library and bazel-bin's: a wheel of the
    older one would ship kernels other than those tested."""
    source = _source_copy(str(tmp_path / "source"))
    bazel_copy = tmp_path / "source" / "bazel-bin" / "ops" / "_blocksparse_ops.so"
    bazel_copy.parent.mkdir(parents=True)
    bazel_copy.write_bytes(b"a newer build")
    packaged = os.path.join(source, LIBRARY)
    os.utime(packaged, (1e9, 1e9))
    built = _build_wheel(source, str(tmp_path / "dist"))
    assert built.returncode != 0
    assert "is newer than" in built.stdout + built.stderr
