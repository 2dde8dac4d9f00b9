"""The C ABI: one header that is the whole interface and the cffi cdef."""

from __future__ import annotations

import subprocess

from cffi import FFI

from .conftest import NATIVE


def _build_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_native", NATIVE / "build_native.py")
    mod = importlib.util.module_from_spec(spec)
    import os
    old = os.environ.get("SUPERMACHINE_SKIP_PROBES")
    os.environ["SUPERMACHINE_SKIP_PROBES"] = "1"
    try:
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            os.environ.pop("SUPERMACHINE_SKIP_PROBES")
        else:
            os.environ["SUPERMACHINE_SKIP_PROBES"] = old
    return mod


def test_header_is_the_cdef():
    cdef = _build_module().read_cdef()
    assert "#" not in "".join(line for line in cdef.splitlines() if line.lstrip().startswith("#"))
    ffi = FFI()
    ffi.cdef(cdef)                      # parses without any preprocessor
    assert ffi.sizeof("sm_exit_info") > 0 and ffi.sizeof("sm_vm_config") > 0


def test_header_compiles_standalone_pedantic(tmp_path):
    src = tmp_path / "t.c"
    src.write_text('#include "supermachine.h"\nint main(void) { return sm_version() == 0; }\n')
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror", "-fsyntax-only",
                    "-I", str(NATIVE / "include"), str(src)], check=True)


def test_every_code_has_a_name(native):
    ffi, lib = native.library()
    for code in range(0, -15, -1):
        assert ffi.string(lib.sm_status_name(code)).decode().startswith("SM_")
        assert ffi.string(lib.sm_status_name(code)).decode() != "SM_ERR_UNKNOWN"
    for reason in range(12):
        assert ffi.string(lib.sm_exit_reason_name(reason)).decode() != "unknown"
    assert ffi.string(lib.sm_version()).decode() == "0.1.1"
