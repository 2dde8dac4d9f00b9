"""setuptools entry point: everything is in pyproject.toml except the cffi build of the
native core (setuptools reads ``cffi_modules`` only from here) and the Jupyter data files
(computed: the prebuilt labextension's file names carry content hashes)."""

import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE_BUILDER = os.path.join("native", "build_native.py")

# -- Jupyter data files -------------------------------------------------------------------------
# The server extension is enabled by a config file in etc/jupyter/jupyter_server_config.d/;
# the prebuilt JupyterLab extension goes to share/jupyter/labextensions/supermachine-jupyter/.
LABEXTENSION_NAME = "supermachine-jupyter"
LABEXTENSION_SRC = "labextension"                                   # TypeScript sources
LABEXTENSION_BUILT = os.path.join("supermachine_jupyter", "labextension")   # build output
SKIP_LABEXTENSION_ENV = "SUPERMACHINE_SKIP_LABEXTENSION"


def _editable_install() -> bool:
    # pip's PEP 660 editable install runs `editable_wheel`; the old one `develop`. Those get the
    # labextension as a symlink (`jupyter labextension develop`, run by the Makefile) instead of
    # copies, so that pip never records files that live inside the source tree.
    return bool({"editable_wheel", "develop"} & set(sys.argv))


def _build_labextension() -> None:
    """Build the labextension when a wheel is made from a tree that lacks the built output."""
    jlpm = shutil.which("jlpm")
    if shutil.which("node") is None or jlpm is None:
        raise SystemExit(
            f"{LABEXTENSION_BUILT}/ (the prebuilt JupyterLab extension) is missing and cannot be "
            "built here: that needs Node.js and JupyterLab's jlpm (pip install jupyterlab). "
            "Run `make setup` first (it builds it), or set "
            f"{SKIP_LABEXTENSION_ENV}=1 to build a wheel without the sidebar.")
    src = os.path.join(HERE, LABEXTENSION_SRC)
    # pip's isolated build env hides other site-packages through PYTHONPATH; jlpm and
    # `jupyter labextension build` need the environment that JupyterLab is installed in.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    subprocess.check_call([jlpm, "install"], cwd=src, env=env)
    subprocess.check_call([jlpm, "build"], cwd=src, env=env)


def jupyter_data_files() -> list:
    files = [("etc/jupyter/jupyter_server_config.d",
              ["jupyter-config/jupyter_server_config.d/supermachine_jupyter.json"])]
    if _editable_install() or os.environ.get(SKIP_LABEXTENSION_ENV):
        return files
    if not os.path.exists(os.path.join(HERE, LABEXTENSION_BUILT, "package.json")) \
            and {"bdist_wheel", "install"} & set(sys.argv):
        _build_labextension()
    dest_root = f"share/jupyter/labextensions/{LABEXTENSION_NAME}"
    for dirpath, _dirs, names in sorted(os.walk(os.path.join(HERE, LABEXTENSION_BUILT))):
        rel_dir = os.path.relpath(dirpath, HERE)
        sub = os.path.relpath(dirpath, os.path.join(HERE, LABEXTENSION_BUILT))
        dest = dest_root if sub == "." else f"{dest_root}/{sub}"
        if names:
            files.append((dest, sorted(os.path.join(rel_dir, n) for n in names)))
    return files


setup(cffi_modules=[f"{NATIVE_BUILDER}:ffibuilder"]
      if os.path.exists(os.path.join(HERE, NATIVE_BUILDER)) else [],
      data_files=jupyter_data_files())
