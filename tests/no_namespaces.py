"""Run a command where no namespace can be made, as under Docker's default seccomp
profile: a seccomp filter makes unshare(), setns() and clone() with any CLONE_NEW* flag
fail with EPERM (clone3, whose flags a filter cannot read, with ENOSYS, so the C library
falls back to clone).

    python tests/no_namespaces.py COMMAND [ARG...]
"""
import ctypes
import os
import platform
import struct
import sys

# (audit arch, unshare, clone, setns, clone3) syscall numbers
ARCHES = {"x86_64": (0xC000003E, 272, 56, 308, 435), "aarch64": (0xC00000B7, 97, 220, 268, 435)}
CLONE_NEW_ANY = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
LD_ABS_W, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
EPERM, ENOSYS = 1, 38
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ARCHES


def program() -> list[tuple[int, int, int, int]]:
    """BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}."""
    arch, unshare, clone, setns, clone3 = ARCHES[platform.machine()]
    return [
        (LD_ABS_W, 0, 0, 4),             # 0: arch
        (JEQ_K, 1, 0, arch),             # 1: ours -> 3
        (RET_K, 0, 0, ALLOW),            # 2: another ABI: not ours to judge
        (LD_ABS_W, 0, 0, 0),             # 3: syscall number
        (JEQ_K, 4, 0, unshare),          # 4: -> 9
        (JEQ_K, 3, 0, clone),            # 5: -> 9
        (JEQ_K, 4, 0, setns),            # 6: -> 11
        (JEQ_K, 4, 0, clone3),           # 7: -> 12
        (RET_K, 0, 0, ALLOW),            # 8
        (LD_ABS_W, 0, 0, 16),            # 9: low half of args[0], the flags
        (JSET_K, 0, 2, CLONE_NEW_ANY),   # 10: any namespace flag -> 11, none -> 13
        (RET_K, 0, 0, ERRNO | EPERM),    # 11
        (RET_K, 0, 0, ERRNO | ENOSYS),   # 12 (clone3)
        (RET_K, 0, 0, ALLOW),            # 13
    ]


def install() -> None:
    code = program()
    raw = b"".join(struct.pack("HBBI", *ins) for ins in code)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS)")
    fprog = Prog(len(code), ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(SECCOMP)")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
