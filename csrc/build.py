"""What setup.py compiles. Nothing yet: the extension sources arrive with the csrc issue;
until then the package is pure Python and ``extension_modules()`` is empty."""
from setuptools.command.build_ext import build_ext as BuildExtension


def extension_modules():
    return []
