"""Build script: the optional compiled extension ``fastjac._C`` from ``csrc/``.

The package installs without it (pure-Python fallback, reported by ``fastjac.info()``).
Metadata lives in pyproject.toml.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csrc.build import BuildExtension, extension_modules  # noqa: E402

setup(ext_modules=extension_modules(), cmdclass={"build_ext": BuildExtension})
