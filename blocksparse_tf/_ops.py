"""Loads the compiled op library once, from the package folder or from Bazel's output tree."""

import ctypes
import os

import tensorflow as tf

_LIBRARY_NAME = "_blocksparse_ops.so"
_ops = None
_path = None
_isa = None

# BLOCKSPARSE_TF_CPU_ISA selects the CPU kernels of a narrower instruction set than the
# processor's best (to test or compare them); unset, the best one runs.
ISA_VARIABLE = "BLOCKSPARSE_TF_CPU_ISA"
ISA_NAMES = ("amx", "avx512", "avx2", "generic")


def _candidate_paths():
    package_dir = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(package_dir, _LIBRARY_NAME)
    yield os.path.join(os.path.dirname(package_dir), "bazel-bin", "ops", _LIBRARY_NAME)


def _load(path):
    """The op module of the library at path, or an ImportError that says what to do."""
    try:
        module = tf.load_op_library(path)
    except tf.errors.NotFoundError as err:  # unresolved symbols, most often
        raise ImportError(
            f"{path} does not load into TensorFlow {tf.__version__} ({err}); it was probably "
            "built against another TensorFlow: rebuild it with `bash tools/setup.sh`") from err
    if not hasattr(module, "blocksparse_matmul"):
        # TensorFlow hands back a module without ops when another copy of the library (from
        # another path) registered them first in this process.
        raise ImportError(
            f"{path} registered no ops: another copy of {_LIBRARY_NAME} was loaded in this "
            "process before; start a new Python process")
    return module


# Neither loader is converted by AutoGraph when first reached inside a tf.function: converted
# code does not see this module's globals as plain Python does.
@tf.autograph.experimental.do_not_convert
def ops():
    """Returns the loaded op module (raw ops ``blocksparse_matmul`` and ``blocksparse_matmul_grad_w``)."""
    global _ops, _path
    if _ops is None:
        requested = os.environ.get(ISA_VARIABLE, "")
        if requested and requested not in ISA_NAMES:
            raise ValueError(f"{ISA_VARIABLE}={requested!r} is not one of {', '.join(ISA_NAMES)}")
        # The newest build wins, so a fresh `bazel build` is used without reinstalling.
        found = sorted((p for p in _candidate_paths() if os.path.exists(p)), key=os.path.getmtime)
        if found:
            _ops = _load(found[-1])
            _path = found[-1]
            cpu_isa()  # the kernels' instruction set is chosen now, from the checked variable
        else:
            raise ImportError(
                f"{_LIBRARY_NAME} was not found next to the blocksparse_tf package or in "
                "bazel-bin/ops/; build it first with `bash tools/setup.sh` (see README.md)")
    return _ops


@tf.autograph.experimental.do_not_convert
def cpu_isa():
    """Name of the instruction set whose CPU kernels run: "amx", "avx512", "avx2" or "generic".

    "amx" is the AVX-512 kernels with Intel AMX tiles for bfloat16 products (bs 16, 32 and
    64, either feature axis); BLOCKSPARSE_TF_CPU_ISA=avx512 turns the tiles off.

    The best the processor supports, unless the environment variable BLOCKSPARSE_TF_CPU_ISA
    named a narrower one when the library was loaded (the first use of any op)."""
    global _isa
    if _isa is None:
        ops()
        library = ctypes.CDLL(_path)
        library.blocksparse_tf_cpu_isa.restype = ctypes.c_char_p
        _isa = library.blocksparse_tf_cpu_isa().decode()
    return _isa
