"""setuptools entry point: everything is in pyproject.toml except the cffi build of the
native core (setuptools reads ``cffi_modules`` only from here), the Jupyter data files
(computed: the prebuilt labextension's file names carry content hashes) and the prebuilt
guest a wheel carries (``build_py`` builds it by the recipe of ``supermachine_jupyter/guest/
assets.py``, reusing the kernel cached in ~/.cache/supermachine-jupyter).

A wheel is byte-reproducible: its timestamps come from ``SOURCE_DATE_EPOCH`` (the builder's;
else the one an sdist recorded; else the last git commit's), the C objects carry no build
directory, and the guest is built reproducibly (``assets.py``).
"""

import importlib
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE_BUILDER = os.path.join("native", "build_native.py")
PACKAGE = "supermachine_jupyter"

# -- Reproducibility ----------------------------------------------------------------------------
EPOCH_ENV = "SOURCE_DATE_EPOCH"
EPOCH_FILE = "SOURCE_DATE_EPOCH"     # written into the sdist, so it builds the same wheel


def _default_source_date_epoch() -> str | None:
    recorded = os.path.join(HERE, EPOCH_FILE)
    if os.path.isfile(recorded):
        with open(recorded) as f:
            return f.read().strip()
    try:
        return subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=HERE, check=True,
                              capture_output=True, text=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


if not os.environ.get(EPOCH_ENV):
    epoch = _default_source_date_epoch()
    if epoch:
        os.environ[EPOCH_ENV] = epoch
# Debug info names the directory it was built in (a temporary one for an sdist): map it away.
os.environ["CFLAGS"] = f"{os.environ.get('CFLAGS', '')} -ffile-prefix-map={HERE}=.".strip()


class sdist_with_epoch(sdist):
    """Record the build's SOURCE_DATE_EPOCH in the sdist (see _default_source_date_epoch)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        if os.environ.get(EPOCH_ENV):
            with open(os.path.join(base_dir, EPOCH_FILE), "w") as f:
                f.write(os.environ[EPOCH_ENV] + "\n")


# -- The prebuilt guest -------------------------------------------------------------------------
def _guest_recipe():
    """``supermachine_jupyter/guest/assets.py``, loaded without the package's ``__init__``
    (which needs the runtime dependencies, absent from the build environment)."""
    names = [PACKAGE, f"{PACKAGE}.guest", f"{PACKAGE}.errors", f"{PACKAGE}.guest.assets"]
    saved = {name: sys.modules.get(name) for name in names}
    for name in names[:2]:
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(HERE, *name.split("."))]
        sys.modules[name] = package
    try:
        return importlib.import_module(f"{PACKAGE}.guest.assets")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class build_py_with_guest(build_py):
    """Also put into the built package the guest (kernel and initramfs, in ``_guest/``) and
    the guest sources (``guest_src/``, for ``assets --build``). Not for an editable install:
    a clone builds its guest into the cache on first use."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        recipe = _guest_recipe()
        built = Path(self.build_lib) / PACKAGE
        for stale in (built / "guest_src", built / "_guest"):
            shutil.rmtree(stale, ignore_errors=True)
        recipe.copy_guest_sources(built / "guest_src")
        manifest = recipe.package_guest(
            built / "_guest", progress=lambda line: print(f"[guest] {line}", flush=True))
        for name, entry in manifest["files"].items():
            print(f"[guest] {name}: {entry['size'] // 1024} KiB", flush=True)


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


setup(cmdclass={"build_py": build_py_with_guest, "sdist": sdist_with_epoch},
      cffi_modules=[f"{NATIVE_BUILDER}:ffibuilder"]
      if os.path.exists(os.path.join(HERE, NATIVE_BUILDER)) else [],
      data_files=jupyter_data_files(),
      # The native core is built against the stable ABI (cffi's _native.abi3.so): one wheel
      # for every CPython from 3.11 on.
      options={"bdist_wheel": {"py_limited_api": "cp311"}})
