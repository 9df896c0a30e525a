"""Build hook for keysteward's one C extension; all other metadata lives in pyproject.toml.

``cffi_modules`` compiles ``keysteward.crypto._xts_native`` (the AES-XTS fast path, see
src/keysteward/crypto/_xts_build.py) against the system crypto library. The extension is optional:
on a machine without a C compiler or the library's headers keysteward still installs, and
keysteward.crypto.xts falls back to pyca/cryptography (the unit tests fail loudly if that happens
on a machine that should have the fast path).
"""

from __future__ import annotations

from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def pre_run(self, ext: Any, ffi: Any) -> None:
        """cffi's documented hook, called before it writes the extension's C source."""
        ext.optional = True


setup(
    cmdclass={"build_ext": OptionalBuildExt},
    cffi_modules=["src/keysteward/crypto/_xts_build.py:ffibuilder"],
)
