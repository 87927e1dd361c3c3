"""Faults around a run's output dir, in one process: the dir checked before anything
runs, the lock that keeps a second run out (and never a dead one), a failed checkpoint
write that leaves everything as it was, and metrics.jsonl kept to one history.
(Whole runs that are killed, interrupted or fill the disk: tests/test_train_checkpoints.py.)"""
import errno
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import small_tmpfs

from dylora_moe.checkpoint import MARKER, CheckpointManager, CheckpointWriteError, lineage, verified_latest, verify
from dylora_moe.errors import one_line
from dylora_moe.train.cli import main as train_main
from dylora_moe.train.rundir import LOCK_FILE, RunLock, lock_holder, separate_attempts

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


@contextmanager
def read_only(path: Path):
    """`path` read-only for this process: chmod for a normal user; for root (whom chmod
    does not stop) a read-only bind mount, else the immutable attribute."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    for on, off in ((["mount", "--bind", str(path), str(path)], ["umount", str(path)]),
                    (["chattr", "+i", str(path)], ["chattr", "-i", str(path)])):
        if subprocess.run(on, capture_output=True).returncode != 0:
            continue
        if on[0] == "mount" and subprocess.run(["mount", "-o", "remount,bind,ro", str(path)],
                                               capture_output=True).returncode != 0:
            subprocess.run(off, capture_output=True)
            continue
        try:
            yield
        finally:
            subprocess.run(off, capture_output=True)
        return
    pytest.skip("cannot make a directory read-only for root here (no mount, no chattr)")


@contextmanager
def held_lock(run_dir: Path, text: str):
    """Another process holding the run dir's lock, as a running training would."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(run_dir / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            f"os.ftruncate(fd, 0); os.write(fd, {text!r}.encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def snapshot(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case,message", [
    ("output_dir_is_a_file", "is a file; expected a directory"),
    ("parent_is_a_file", "is a file, so no directory can be created under it"),
    ("checkpoints_is_a_file", "checkpoints is a file; expected a directory (move it away)"),
    ("plots_is_a_file", "plots is a file; expected a directory"),
    ("metrics_is_a_directory", "metrics.jsonl is a directory; expected a file"),
    ("read_only", "cannot write in"),
    ("locked", "in use by another training run (pid 4242 on host elsewhere since"),
])
def test_output_dir_problems_are_refused_before_anything_runs(case, message, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", DEMO, "--output_dir", str(out), "--max_steps", "1"]
    if case == "output_dir_is_a_file":
        out.write_text("not a dir")
    elif case == "parent_is_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
        args[3] = str(out)
    elif case in ("checkpoints_is_a_file", "plots_is_a_file"):
        out.mkdir()
        (out / case.split("_")[0]).write_text("")
    elif case == "metrics_is_a_directory":
        (out / "metrics.jsonl").mkdir(parents=True)
    else:
        out.mkdir()
    before = snapshot(tmp_path)
    if case == "read_only":
        with read_only(out):
            code = train_main(args)
    elif case == "locked":
        with held_lock(out, "pid 4242 on host elsewhere since 2026-01-01T00:00:00"):
            before = snapshot(tmp_path)
            code = train_main(args)
    else:
        code = train_main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: train.output_dir=") and message in err and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before  # nothing read or written: no tokenizer, no base, no recipe.yaml


def test_the_lock_names_its_holder_and_a_dead_holder_never_blocks(tmp_path):
    run_dir = tmp_path / "run"
    with held_lock(run_dir, "pid 777 on host h1 since then") as child:
        assert lock_holder(run_dir) == "pid 777 on host h1 since then"
        with pytest.raises(ValueError, match=r"in use by another training run \(pid 777 on host h1 since then\)"):
            RunLock(run_dir).acquire()
        child.kill()  # SIGKILL: no cleanup, the lock file and its text stay behind
        child.wait()
    assert (run_dir / LOCK_FILE).read_text() == "pid 777 on host h1 since then"
    assert lock_holder(run_dir) is None
    lock = RunLock(run_dir).acquire()
    assert (run_dir / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on host ")
    with pytest.raises(ValueError, match=rf"pid {os.getpid()} on host"):
        RunLock(run_dir).acquire()  # a second run, even from this process
    lock.release()
    RunLock(run_dir).acquire().release()


class FakeAccelerator:
    """What CheckpointManager asks of Accelerate, on one process; save_state writes `size` bytes."""
    is_main_process, num_processes = True, 1

    def __init__(self, size=1000):
        self.size, self.error = size, None

    def wait_for_everyone(self):
        pass

    def save_state(self, path, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(os.urandom(self.size))
        (Path(path) / "random_states_0.pkl").write_bytes(b"rng" * 100)
        if self.error is not None:
            raise self.error


def portable(folder):
    folder.mkdir()
    (folder / "moe_config.json").write_text("{}")


@pytest.mark.parametrize("error,reason", [
    (OSError(errno.ENOSPC, "No space left on device", "x/model.safetensors"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), "No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "x/optimizer.bin"), "Permission denied"),
])
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_is_one_line(error, reason, tmp_path):
    acc = FakeAccelerator()
    manager = CheckpointManager(acc, tmp_path / "checkpoints", keep_last=1, save_kwargs={})
    first = manager.save(2, portable, {})
    before = snapshot(tmp_path)
    acc.error = error
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(4, portable, {})
    assert snapshot(tmp_path) == before  # no checkpoint-4(.tmp), checkpoint-2 untouched (not rotated)
    assert verify(first) is None and manager.written == [first]
    message = one_line(info.value)
    assert f"{reason} while saving checkpoint-4 (nothing of it kept; checkpoint-2 is intact)" in message
    assert "\n" not in message


def test_a_bug_during_a_checkpoint_write_is_not_disguised(tmp_path):
    acc = FakeAccelerator()
    acc.error = TypeError("a bug")
    with pytest.raises(TypeError, match="a bug"):
        CheckpointManager(acc, tmp_path / "checkpoints", keep_last=1, save_kwargs={}).save(2, portable, {})


def test_a_really_full_disk(tmp_path):
    """A 1 MiB tmpfs: the second checkpoint cannot fit (needs root to mount, else skipped)."""
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        acc = FakeAccelerator(size=300_000)
        manager = CheckpointManager(acc, disk / "checkpoints", keep_last=5, save_kwargs={})
        first = manager.save(2, portable, {})
        acc.size = 900_000
        with pytest.raises(CheckpointWriteError, match=r"No space left on device while saving checkpoint-4 "
                                                       r"\(nothing of it kept; checkpoint-2 is intact\)"):
            manager.save(4, portable, {})
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["checkpoint-2"]
        assert verify(first) is None
        acc.size = 300_000  # the space a failed write took is given back
        assert verify(manager.save(4, portable, {})) is None


def write_checkpoint(root: Path, step: int, run: str, name=None):
    path = root / (name or f"checkpoint-{step}")
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 10)
    (path / MARKER).write_text(json.dumps({"step": step, "written_at": step, "run": run}))
    return path


def test_lineage_owns_the_checkpoints_of_the_run_it_continues(tmp_path):
    root = tmp_path / "checkpoints"
    a2, a4 = write_checkpoint(root, 2, "A"), write_checkpoint(root, 4, "A")
    b3 = write_checkpoint(root, 3, "B")
    run_id, owned = lineage(root, a4)  # the newest: a continuation
    assert run_id == "A" and owned == [a2, a4]
    run_id, owned = lineage(root, a2)  # a branch off an older one: owns nothing
    assert run_id != "A" and owned == []
    run_id, owned = lineage(root, None)
    assert run_id not in ("A", "B") and owned == []
    assert lineage(tmp_path / "elsewhere", b3)[1] == []  # another run dir's checkpoint


def test_auto_refuses_to_start_over_when_every_checkpoint_is_broken(tmp_path):
    root = tmp_path / "checkpoints"
    (write_checkpoint(root, 2, "A") / MARKER).write_text("{not json")
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be resumed \(checkpoint-2: COMPLETE marker "
                                         r"unreadable \(not valid JSON\)\); move them away to start over"):
        verified_latest(root)
    (root / "checkpoint-2" / MARKER).unlink()  # an interrupted save is not a checkpoint: a fresh start
    assert verified_latest(root) is None


def test_metrics_of_an_abandoned_attempt_are_moved_aside_not_mixed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 12)] + ['{"step": 12, "lo']
    path.write_text("\n".join(lines) + "\n")
    aside = separate_attempts(path, resumed_step=8)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == list(range(1, 9))
    assert aside.read_text().splitlines() == lines[8:]  # steps 9-11 and the cut line: kept, not lost
    assert separate_attempts(path, resumed_step=8) is None  # nothing more to move
    aside = separate_attempts(path, resumed_step=None)  # a fresh start: the whole file goes
    assert not path.exists() and len(aside.read_text().splitlines()) == 8


def test_resume_path_errors_say_what_the_path_is(tmp_path):
    from dylora_moe.checkpoint import resolve_resume

    root = tmp_path / "checkpoints"
    write_checkpoint(root, 2, "A")
    with pytest.raises(ValueError, match=r"a folder of checkpoints, not one; name one of them, or use auto"):
        resolve_resume(str(root), root)
    with pytest.raises(ValueError, match=r"no such checkpoint folder"):
        resolve_resume(str(root / "checkpoint-3"), root)
    assert resolve_resume(str(root / "checkpoint-2"), root) == root / "checkpoint-2"  # a marker without file list
