"""Wheel settings that pyproject.toml cannot express (everything else is there).

The package carries a compiled op library, built for one platform and against one TensorFlow
(see requirements.txt), so its wheel must say so in its tags instead of claiming to run
anywhere, and a wheel built before the library would install a package that cannot load its
ops: that build stops with the command that makes the library.
"""

import filecmp
import os

from setuptools import setup
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools before 70.1 builds wheels through the wheel package's command
    from wheel.bdist_wheel import bdist_wheel

ROOT = os.path.dirname(os.path.abspath(__file__))
LIBRARY = os.path.join(ROOT, "blocksparse_tf", "_blocksparse_ops.so")
BAZEL_LIBRARY = os.path.join(ROOT, "bazel-bin", "ops", "_blocksparse_ops.so")


class WithCompiledLibrary(Distribution):
    """A distribution whose wheel is tagged for this Python and platform."""

    def has_ext_modules(self):
        return True


class WheelWithLibrary(bdist_wheel):
    """bdist_wheel that refuses to package a missing op library."""

    def run(self):
        if not os.path.exists(LIBRARY):
            raise SystemExit("blocksparse_tf/_blocksparse_ops.so is missing: build it first "
                             "with `bash tools/setup.sh` (see README.md)")
        # The checkout loads the newer of the two builds (blocksparse_tf/_ops.py); a wheel of
        # the older one would ship other kernels than those tested.
        if (os.path.exists(BAZEL_LIBRARY) and os.path.getmtime(BAZEL_LIBRARY) >
                os.path.getmtime(LIBRARY) and not filecmp.cmp(BAZEL_LIBRARY, LIBRARY, False)):
            raise SystemExit(f"{BAZEL_LIBRARY} is newer than {LIBRARY}: copy it there first "
                             f"(install -m 644 {BAZEL_LIBRARY} {LIBRARY}) or run "
                             "`bash tools/setup.sh`")
        super().run()


setup(distclass=WithCompiledLibrary, cmdclass={"bdist_wheel": WheelWithLibrary})
