"""A seccomp filter that keeps a file server from handing out host privileges.

virtiofsd runs as root and does what the guest asks: guest root could ``chmod 4755`` a file,
``mknod`` a device or set a ``security.capability`` xattr in the shared host directory, and a
host user running that file would gain root. Debian 12's C virtiofsd has no option against it
(``-o modcaps=-mknod`` stops device nodes, but an owner may always set S_ISUID on its own
file), so the process gets this filter between fork and exec (``spawn_owned(child_setup=)``).
The filter is inherited by everything it forks and stacks under virtiofsd's own whitelist.

Refused with EPERM:

- ``chmod``/``fchmod``/``fchmodat``/``fchmodat2`` with S_ISUID or S_ISGID in the mode;
- ``open``/``openat`` with O_CREAT or O_TMPFILE and those bits in the mode, ``creat`` with them;
- ``mknod``/``mknodat`` of a character or block device, or with those bits;
- every ``setxattr`` (``security.capability`` is a file capability: privilege as well).

Answered ENOSYS, so a caller falls back to a checked call: ``openat2`` (its mode sits behind a
pointer a filter cannot read) and ``io_uring_setup`` (a ring performs opens without syscalls).
A syscall from another ABI (x32, i386 via ``int 0x80``) is refused: the numbers would differ.
Only the low 32 bits of an argument are compared: the kernel reads ``int``/``mode_t`` there.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import stat
import struct
from typing import Callable

from ...errors import EngineError

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

#: x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
NR = {
    "open": 2, "creat": 85, "openat": 257, "openat2": 437,
    "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
    "mknod": 133, "mknodat": 259,
    "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "setxattrat": 463,
    "io_uring_setup": 425,
}

O_CREAT = 0o100
O_TMPFILE_BIT = 0o20000000          # __O_TMPFILE (O_TMPFILE adds O_DIRECTORY)
SETID_BITS = stat.S_ISUID | stat.S_ISGID
S_IFMT_MASK = 0o170000

# classic BPF
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_AND_K = 0x54
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_NR_OFFSET, _ARCH_OFFSET = 0, 4


def _arg(i: int) -> int:
    """Offset of the low 32 bits of argument i in struct seccomp_data (little endian)."""
    return 16 + 8 * i


class _Program:
    """A forward-only cBPF assembler with labels."""

    def __init__(self) -> None:
        self.code: list[tuple] = []   # (op, jt, jf, k) with jt/jf as label names or ints
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int = 0, jt: "str | int" = 0, jf: "str | int" = 0) -> None:
        self.code.append((code, jt, jf, k))

    def assemble(self) -> bytes:
        out = b""
        for pc, (code, jt, jf, k) in enumerate(self.code):
            offsets = []
            for target in (jt, jf):
                if isinstance(target, str):
                    target = self.labels[target] - pc - 1
                if not 0 <= target <= 255:
                    raise AssertionError(f"seccomp: jump out of range at {pc}")
                offsets.append(target)
            out += struct.pack("<HBBI", code, offsets[0], offsets[1], k & 0xFFFFFFFF)
        return out


def filter_program() -> bytes:
    """The filter as packed ``struct sock_filter`` entries (x86_64)."""
    p = _Program()
    p.op(_LD_W_ABS, _ARCH_OFFSET)
    p.op(_JEQ_K, AUDIT_ARCH_X86_64, jt=0, jf="deny")
    p.op(_LD_W_ABS, _NR_OFFSET)
    p.op(_JGE_K, X32_SYSCALL_BIT, jt="deny", jf=0)
    dispatch = [
        ("open", "open_1_2"), ("openat", "open_2_3"),
        ("creat", "mode_1"), ("chmod", "mode_1"), ("fchmod", "mode_1"),
        ("fchmodat", "mode_2"), ("fchmodat2", "mode_2"),
        ("mknod", "mknod_1"), ("mknodat", "mknod_2"),
        ("setxattr", "deny"), ("lsetxattr", "deny"), ("fsetxattr", "deny"),
        ("setxattrat", "deny"), ("openat2", "enosys"), ("io_uring_setup", "enosys"),
    ]
    for name, target in dispatch:
        p.op(_JEQ_K, NR[name], jt=target, jf=0)
    p.op(_RET_K, _RET_ALLOW)
    # open-like: flags in one argument, mode in the next; the mode counts only when creating
    for flags_arg, mode_arg in ((1, 2), (2, 3)):
        p.label(f"open_{flags_arg}_{mode_arg}")
        p.op(_LD_W_ABS, _arg(flags_arg))
        p.op(_JSET_K, O_CREAT | O_TMPFILE_BIT, jt=f"mode_{mode_arg}", jf="allow")
    for mode_arg in (1, 2):
        p.label(f"mknod_{mode_arg}")
        p.op(_LD_W_ABS, _arg(mode_arg))
        p.op(_JSET_K, SETID_BITS, jt="deny", jf=0)
        p.op(_AND_K, S_IFMT_MASK)
        p.op(_JEQ_K, stat.S_IFCHR, jt="deny", jf=0)
        p.op(_JEQ_K, stat.S_IFBLK, jt="deny", jf="allow")
    for mode_arg in (1, 2, 3):
        p.label(f"mode_{mode_arg}")
        p.op(_LD_W_ABS, _arg(mode_arg))
        p.op(_JSET_K, SETID_BITS, jt="deny", jf="allow")
    p.label("allow")
    p.op(_RET_K, _RET_ALLOW)
    p.label("deny")
    p.op(_RET_K, _RET_ERRNO | errno.EPERM)
    p.label("enosys")
    p.op(_RET_K, _RET_ERRNO | errno.ENOSYS)
    return p.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def unsupported_reason() -> str | None:
    """None when this host can install the filter, else why not."""
    machine = platform.machine()
    if machine not in ("x86_64", "amd64"):
        return (f"the set-user-ID guard (a seccomp filter) knows x86_64 syscall numbers only, "
                f"and this host is {machine}")
    return None


def no_setid_installer() -> Callable[[], None]:
    """A ``child_setup`` for ``spawn_owned``: installs the filter in the forked child.

    Everything is allocated here, in the parent; the child only makes two prctl calls.
    Raises EngineError when the host cannot have the filter."""
    why = unsupported_reason()
    if why:
        raise EngineError(why)
    program = filter_program()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                      ctypes.c_ulong]
    pointer = ctypes.addressof(fprog)

    def install() -> None:
        _keep = (buffer, fprog)  # noqa: F841 - alive as long as this closure
        if prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, pointer, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")

    return install


__all__ = ["filter_program", "no_setid_installer", "unsupported_reason"]
