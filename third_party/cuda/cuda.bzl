"""cuda_library: compiles .cu files with nvcc in genrules and wraps the objects in a cc_library."""

load("@local_config_cuda//:defs.bzl", "CUDA_FOUND", "NVCC")

# Ampere and Hopper cubins (sm_90a unlocks Hopper-only instructions), plus PTX for newer GPUs.
DEFAULT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]

def cuda_library(name, srcs, hdrs = [], deps = [], nvcc_flags = [], gencode = DEFAULT_GENCODE, **kwargs):
    objs = []
    if not CUDA_FOUND:
        # Fail when built, not when loaded, so CPU-only builds of the package still work.
        native.genrule(
            name = name + "_no_nvcc",
            outs = ["_cuda_objs/%s/no_nvcc.pic.o" % name],
            cmd = "echo 'cuda_library(%s): no nvcc found (set NVCC_PATH or put nvcc on PATH)' >&2; exit 1" % name,
        )
        srcs = []
        objs = ["_cuda_objs/%s/no_nvcc.pic.o" % name]
    for src in srcs:
        base = src.rsplit(".", 1)[0].replace("/", "_")
        out = "_cuda_objs/%s/%s.pic.o" % (name, base)
        native.genrule(
            name = "%s_%s_nvcc" % (name, base),
            srcs = [src] + hdrs,
            outs = [out],
            # nvcc names its temporary files after its process id, which is the same in every
            # sandboxed action (each runs in its own PID namespace), and parallel actions
            # sharing /tmp then remove each other's files: give each action its own TMPDIR.
            cmd = "export TMPDIR=$$(mktemp -d) && " + " ".join(
                [NVCC, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-I.", "-I$(GENDIR)"] +
                gencode + nvcc_flags + ["$(location %s)" % src, "-o", "$@"],
            ) + "; rc=$$?; rm -rf $$TMPDIR; exit $$rc",
            message = "nvcc %s" % src,
        )
        objs.append(out)
    native.cc_library(
        name = name,
        srcs = objs,
        hdrs = hdrs,
        linkstatic = 1,
        alwayslink = 1,
        deps = deps + ["@local_config_cuda//:cudart_static"],
        **kwargs
    )
