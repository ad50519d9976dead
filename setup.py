"""Build mcproxy's optional compiled module (mcproxy/wire/_frames.pyx).

Everything else is declared in setup.cfg. The module is an acceleration
only: where Cython or a C compiler is missing, or the build fails, mcproxy
installs without it and runs its pure-Python framing (the same replies,
the same tests).
"""

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler: distutils' errors, OSError, ...
            self.warn(f"mcproxy's compiled framing not built ({e}); using pure Python")

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
    return cythonize(["mcproxy/wire/_frames.pyx"], quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
