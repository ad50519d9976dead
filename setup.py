"""Build mcproxy's optional compiled modules (mcproxy.compiled.MODULES):
mcproxy/wire/_frames.pyx and mcproxy/routing/_keyloops.pyx, and
mcproxy/server/protocol.py, mcproxy/writes.py, mcproxy/units.py,
mcproxy/backends/latency.py, mcproxy/backends/connection.py,
mcproxy/routing/runs.py and mcproxy/wire/reader.py themselves, each typed by the
.pxd beside it.

Everything else is declared in setup.cfg. The modules are an acceleration
only: where Cython or a C compiler is missing, or a build fails, mcproxy
installs without them and runs their pure-Python code (the same replies,
the same tests).
"""

import os

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing, and builds the modules side
    by side on every core (a clean install, and the test suite's wheel,
    each compile them all)."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler: distutils' errors, OSError, ...
            self.warn(f"mcproxy's compiled modules not built ({e}); using pure Python")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self.warn(f"{ext.name} not built ({e}); using pure Python")


def extensions() -> list:
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    # Annotations are documentation here, never C types: protocol.pxd types.
    sources = ["mcproxy/wire/_frames.pyx", "mcproxy/routing/_keyloops.pyx",
               "mcproxy/server/protocol.py", "mcproxy/writes.py",
               "mcproxy/units.py", "mcproxy/backends/latency.py", "mcproxy/backends/connection.py",
               "mcproxy/routing/runs.py", "mcproxy/wire/reader.py"]
    modules = cythonize(sources, quiet=True,
                        compiler_directives={"language_level": 3, "annotation_typing": False})
    if os.name == "posix":
        # No debug information (a third of gcc's time; perf names the
        # functions from the symbol table all the same).
        for module in modules:
            module.extra_compile_args.append("-g0")
    return modules


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
