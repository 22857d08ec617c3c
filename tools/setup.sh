#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine: Bazel (Debian's bazel-bootstrap), a Python venv with
# the pinned TensorFlow, and the op library built into the package folder.  Offline-safe:
# everything comes from the distribution's and PyPI's package registries.
#   BLOCKSPARSE_CUDA=0  build without the CUDA kernels even when nvcc is present
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's bazel-bootstrap, python3-venv where `python3 -m venv` lacks ensurepip (stock
# Debian and Ubuntu), and LIBXSMM's headers: an independent implementation of the CPU
# micro-kernels' products that tests/test_benchmarks.py checks them against (optional: that
# comparison is skipped without it).
packages=()
command -v bazel-4 >/dev/null 2>&1 || packages+=(bazel-bootstrap)
[ -x .venv/bin/python ] || python3 -c "import ensurepip" 2>/dev/null || packages+=(python3-venv)
[ -e /usr/include/libxsmm.h ] || packages+=(libxsmm-dev)
if [ ${#packages[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  for package in "${packages[@]}"; do
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$package" >/dev/null ||
      [ "$package" = libxsmm-dev ] || exit 1
  done
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt

# Bazel finds TensorFlow through this interpreter (third_party/tf/tf_configure.bzl).
echo "build --repo_env=PYTHON_BIN_PATH=$PWD/.venv/bin/python" > .bazelrc.user
# bazelisk users: point it at the local Bazel (it would otherwise try to download one).
echo "USE_BAZEL_VERSION=$(command -v bazel-4)" > .bazeliskrc

CONFIG=()
# With nvcc present the CUDA kernels are compiled too (a compile error fails the build); the
# library still loads and runs on machines without a GPU.
if [ "${BLOCKSPARSE_CUDA:-auto}" != 0 ] && command -v nvcc >/dev/null 2>&1; then
  CONFIG=(--config=cuda)
fi
bazel-4 build "${CONFIG[@]}" //ops:_blocksparse_ops.so
install -m 644 bazel-bin/ops/_blocksparse_ops.so blocksparse_tf/_blocksparse_ops.so
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "blocksparse_tf is built; run: .venv/bin/python examples/demo.py"
