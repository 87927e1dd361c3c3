"""Linux isolation primitives for the sandbox's child processes, through libc (ctypes):
namespaces, mounts, uid maps, capabilities. Free of project imports: the sandbox child
loads this file by path, before any untrusted code runs.
"""
from __future__ import annotations

import ctypes
import os
import re

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
# Everything but the user namespace: mounts, hostname, IPC, processes, network.
PRIVATE = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 0x4000, 1 << 18, 1 << 21
# statvfs f_flag bits -> mount flags: a bind remount must repeat the flags a mount
# already has, or a user namespace gets EPERM for trying to clear a locked one.
_KEPT = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
         (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))

PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 4, 24, 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Directories every user may write on a usual Linux host; each gets a private tmpfs.
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(libc().unshare(flags), "unshare")


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def map_to(uid: int, gid: int) -> None:
    """In a user namespace just made: be its root, mapped to (uid, gid) outside. A
    process may map exactly its own ids without any privilege outside. After a setuid
    the kernel hands /proc/self to root (not dumpable): take it back first."""
    _check(libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(DUMPABLE)")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, parents first (mountinfo order)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # the kernel writes a space as \040, a tab as \011, ...
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]))
    return points


def make_read_only() -> list[str]:
    """Remount every mount of this (private) mount namespace read-only; returns those
    left writable. A mount this process cannot even reach is skipped: the program runs
    with less access than this setup, so it cannot reach it either."""
    failed = []
    for point in mount_points():
        try:
            st = os.statvfs(point)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            continue
        try:
            kept = sum(ms for st_bit, ms in _KEPT if st.f_flag & st_bit)
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except OSError:
            failed.append(point)
    return failed


def private_tmpfs(size_mb: int) -> list[str]:
    """A fresh, empty tmpfs on each world-writable directory that exists; returns them."""
    done = []
    for path in WRITABLE_DIRS:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in done:
            mount("tmpfs", real, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode=1777")
            done.append(real)
    return done


def fresh_proc() -> bool:
    """/proc of this PID namespace only, so host processes are not listed. Refused in
    some containers (a masked /proc); then the host's stays, still unsignalable."""
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return True
    except OSError:
        return False


def no_new_privs() -> None:
    """execve can never add privilege again (setuid binaries, file capabilities)."""
    _check(libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Give up every capability, also for any later execve (bounding set emptied): the
    root of a user namespace becomes a plain process of the uid it is mapped to."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 63
    for cap in range(last + 1):
        libc().prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    data = (_CapData * 2)()
    _check(libc().capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")
