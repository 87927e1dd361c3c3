"""Which sandbox isolation this machine allows, measured once by running a probe program
in each mode, strongest first; and one loud warning naming whatever is not isolated.

  namespaces  root with CAP_SYS_ADMIN (a VM, CI, a privileged container)
  userns      root without CAP_SYS_ADMIN (Docker's default capabilities, where its
              seccomp profile allows user namespaces), or any user where unprivileged
              user namespaces are allowed: the same isolation from inside one
  none        no namespaces at all (e.g. Docker's default seccomp profile): programs
              still run, with the same pass/fail results, but not isolated

The probe runs in the real sandbox, so a mode is used only if a program can pass in it:
a broken mode is skipped, never scored as "everything failed".
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from functools import lru_cache

logger = logging.getLogger(__name__)

# What the probe reports from inside the sandbox.
PROBE = """
import json, os, socket
pids = [p for p in os.listdir('/proc') if p.isdigit()]
print(json.dumps({"pid": os.getpid(), "pids_visible": len(pids),
                  "interfaces": sorted(name for _, name in socket.if_nameindex()),
                  "root_read_only": bool(os.statvfs('/').f_flag & os.ST_RDONLY),
                  "tmp": sorted(os.listdir('/tmp')), "uid": os.getuid()}))
"""


@dataclass(frozen=True)
class Isolation:
    mode: str                 # namespaces | userns | none
    missing: tuple = ()       # what programs are NOT isolated from, in words
    tried: tuple = ()         # (mode, why it was not used) for the stronger modes

    def describe(self) -> dict:
        return {"mode": self.mode, "not_isolated": list(self.missing),
                "unavailable": {mode: why for mode, why in self.tried}}


@lru_cache(maxsize=1)
def detect() -> Isolation:
    """The strongest mode that works here (cached: probed once per process)."""
    from .sandbox import Limits, run_program

    tried = []
    for mode in candidates():
        result = run_program(PROBE, Limits(timeout_s=30, isolation=mode))
        report = _report(result.stdout) if result.passed else None
        if report is None:
            tried.append((mode, _why(result)))
            continue
        found = Isolation(mode=mode, missing=tuple(missing(mode, report, result.stderr)), tried=tuple(tried))
        if found.missing:
            logger.warning("sandbox: model-written programs are NOT isolated from %s. Isolation mode %r (%s); "
                           "pass/fail results are the same in every mode", "; ".join(found.missing), mode,
                           "; ".join(f"{m}: {why}" for m, why in tried) or "no stronger mode applies")
        return found
    raise RuntimeError("sandbox: no isolation mode can run a program here: " +
                       "; ".join(f"{m}: {why}" for m, why in tried))


def candidates() -> list[str]:
    if sys.platform != "linux":
        return ["none"]
    return (["namespaces"] if os.geteuid() == 0 else []) + ["userns", "none"]


def missing(mode: str, report: dict, notes: str = "") -> list[str]:
    """What the probe could reach from inside (and what the setup said it could not
    lock, in `notes`), in words a user can act on."""
    from .sandbox import interpreter

    root = os.geteuid() == 0
    out = []
    if set(report["interfaces"]) - {"lo"}:
        out.append("the network (it can connect anywhere this machine can)")
    if report["pids_visible"] > 3 or report["pid"] > 3:
        out.append("the process table (it can list host processes in /proc)")
    if not report["root_read_only"] or report["tmp"] != ["work"]:
        out.append("the filesystem (it can write " + (
            "every world-writable dir; what it leaves in /tmp, /var/tmp, /dev/shm and /run/lock is removed "
            "afterwards, elsewhere it stays)" if root else "anywhere you can)"))
    for line in notes.splitlines():
        if line.startswith("sandbox: still writable:"):
            out.append("mounts it could not make read-only (" + line.split(":", 2)[2].strip() + ")")
    if mode == "none" and not root:
        out.append("your processes (it runs as you: it can signal them and other samples, and a daemon it "
                   "starts outlives the sample)")
    if root and not interpreter()[1]:
        out.append("root's files (no Python that every user may run was found, so programs keep root's uid)")
    return out


def _report(stdout: str):
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None


def _why(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("sandbox:")]
    if lines:
        return lines[-1][len("sandbox:"):].strip()
    return result.error or "the probe program did not report"
