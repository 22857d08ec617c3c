#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine: Bazel (Debian's bazel-bootstrap), a Python venv with
# the pinned TensorFlow, and the op library built into the package folder.  Offline-safe:
# everything comes from the distribution's and PyPI's package registries.
#   BLOCKSPARSE_CUDA=0  build without the CUDA kernels even when nvcc is present
#   BLOCKSPARSE_CUDA=1  fail unless they can be built (nvcc 12 or newer on PATH)
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
    # Through env: sudo's env_reset would drop the variable, and a prompt would then wait
    # unseen (its output goes to /dev/null).
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null ||
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
# library still loads and runs on machines without a GPU.  The kernels need CUDA 12 or newer
# (sm_90a): an older nvcc is passed over (BLOCKSPARSE_CUDA=1 makes that an error instead).
cuda_wanted=${BLOCKSPARSE_CUDA:-auto}
if [ "$cuda_wanted" != 0 ]; then
  nvcc_major=$( (nvcc --version 2>/dev/null || true) | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  if [ -n "$nvcc_major" ] && [ "$nvcc_major" -ge 12 ]; then
    CONFIG=(--config=cuda)
  elif [ -n "$nvcc_major" ] || [ "$cuda_wanted" = 1 ]; then
    found="no nvcc"; [ -z "$nvcc_major" ] || found="nvcc release $nvcc_major"
    echo "setup.sh: the CUDA kernels need nvcc 12 or newer; found $found" >&2
    [ "$cuda_wanted" = 1 ] && exit 1
    echo "setup.sh: building the CPU kernels only (BLOCKSPARSE_CUDA=0 says so quietly)" >&2
  fi
fi
bazel-4 build "${CONFIG[@]}" //ops:_blocksparse_ops.so
install -m 644 bazel-bin/ops/_blocksparse_ops.so blocksparse_tf/_blocksparse_ops.so
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "blocksparse_tf is built; run: .venv/bin/python examples/demo.py"
