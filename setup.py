"""setuptools entry point: everything is in pyproject.toml except the cffi build of the
native core (setuptools reads ``cffi_modules`` only from here)."""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE_BUILDER = os.path.join("native", "build_native.py")

setup(cffi_modules=[f"{NATIVE_BUILDER}:ffibuilder"]
      if os.path.exists(os.path.join(HERE, NATIVE_BUILDER)) else [])
