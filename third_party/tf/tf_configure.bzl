"""Repository rule exposing the installed TensorFlow pip package to Bazel.

It asks the Python interpreter (PYTHON_BIN_PATH, else python3 on PATH) where TensorFlow keeps
its headers and framework library, and symlinks them: nothing is copied or downloaded.
"""

_QUERY = "; ".join([
    "import json, tensorflow.sysconfig as s",
    "print(json.dumps({'inc': s.get_include(), 'lib': s.get_lib(), " +
    "'cflags': s.get_compile_flags(), 'lflags': s.get_link_flags()}))",
])

def _tf_configure_impl(rctx):
    python = rctx.os.environ.get("PYTHON_BIN_PATH") or rctx.which("python3")
    if not python:
        fail("tf_configure: no python3 found; set PYTHON_BIN_PATH to the venv's python")
    res = rctx.execute([str(python), "-c", _QUERY], environment = {"TF_CPP_MIN_LOG_LEVEL": "3"}, timeout = 300)
    if res.return_code != 0:
        fail("tf_configure: cannot import tensorflow with %s:\n%s" % (python, res.stderr))
    info = json.decode(res.stdout.strip().splitlines()[-1])
    rctx.symlink(info["inc"], "include")
    libname = [f for f in info["lflags"] if f.startswith("-l:")][0][3:]
    rctx.symlink(info["lib"] + "/" + libname, libname)
    defines = [f[2:] for f in info["cflags"] if f.startswith("-D")]
    rctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "tf_header_lib",
    hdrs = glob(["include/**"], exclude = ["include/external/llvm-project/**", "include/external/stablehlo/**"]),
    includes = ["include"],
    defines = %s,
)

cc_library(name = "libtensorflow_framework", srcs = ["%s"])
""" % (repr(defines), libname))

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = ["PYTHON_BIN_PATH"],
    local = True,
)
