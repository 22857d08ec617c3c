"""Repository rule locating nvcc and the CUDA toolkit (headers + static cudart).

nvcc comes from $NVCC_PATH, else from PATH.  NVCC_PATH=none behaves as if there were no CUDA,
so CPU-only builds never depend on a toolkit.
"""

def _cuda_configure_impl(rctx):
    nvcc = rctx.os.environ.get("NVCC_PATH", "")
    if nvcc == "none":
        nvcc = None
    elif not nvcc:
        nvcc = rctx.which("nvcc")
    top = None
    version = ""
    if nvcc:
        # The nvcc on PATH may be a wrapper script; its dry run names the real toolkit root.
        res = rctx.execute([str(nvcc), "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"])
        for line in (res.stdout + res.stderr).splitlines():
            if "#$ TOP=" in line:
                top = line.split("TOP=", 1)[1].strip()
        ver = rctx.execute([str(nvcc), "--version"])
        for line in ver.stdout.splitlines():
            if "release" in line:
                version = line.split("release", 1)[1].split(",")[0].strip()
    if nvcc and top:
        rctx.symlink(top + "/include", "include")
        rctx.symlink(top + "/lib64" if rctx.path(top + "/lib64").exists else top + "/lib", "lib64")
        rctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

cc_library(name = "cuda_headers", hdrs = glob(["include/**"]), includes = ["include"])

cc_import(name = "cudart_static_lib", static_library = "lib64/libcudart_static.a")

cc_library(name = "cudart_static", deps = [":cudart_static_lib"], linkopts = ["-ldl", "-lrt", "-lpthread"])
""")
        rctx.file("defs.bzl", "CUDA_FOUND = True\nNVCC = %r\nNVCC_VERSION = %r\n" % (str(nvcc), version))
    else:
        rctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

cc_library(name = "cuda_headers")

cc_library(name = "cudart_static")
""")
        rctx.file("defs.bzl", "CUDA_FOUND = False\nNVCC = ''\nNVCC_VERSION = ''\n")

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["NVCC_PATH"],
    local = True,
)
