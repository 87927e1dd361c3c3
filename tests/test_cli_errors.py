"""One error path for every command: an error the user can fix is one line and exit 2,
Ctrl-C is exit 130, and a bug keeps its traceback (it is a bug report)."""
import errno
import os
import subprocess
import sys

import pytest
from trainrun import ROOT, env

from dylora_moe.cli import COMMANDS, main
from dylora_moe.errors import UserError, guarded, one_line


def raising(error):
    def command(argv):
        raise error
    return command


@pytest.mark.parametrize("error,message", [
    (UserError("train.seed=1.5: expected an integer"), "error: train.seed=1.5: expected an integer"),
    (FileNotFoundError("x.yaml: recipe not found"), "error: x.yaml: recipe not found"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl"),
     "error: /runs/a/metrics.jsonl: No space left on device (the disk is full: free space"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/a"),
     "error: /runs/a: Permission denied (no permission: choose a path you can write"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"),
     "error: /mnt/ro/run: Read-only file system (a read-only filesystem"),
    (FloatingPointError("non-finite loss in 3 micro-batches in a row"), "error: non-finite loss in 3 micro-batches"),
    (MemoryError(), "error: out of memory (MemoryError)"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 4000000000000 bytes"), "error: out of memory ([enforce fail"),
])
def test_known_errors_are_one_line_and_exit_2(error, message, capsys):
    assert guarded(raising(error), []) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_the_error_line_is_one_write(monkeypatch):
    # every process of a launch prints its error into one shared pipe: text and newline
    # in two writes let another process's log line land between them (seen in CI)
    class Stream:
        writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Stream())
    assert guarded(raising(UserError("x: bad")), []) == 2
    assert guarded(raising(KeyboardInterrupt()), []) == 130
    assert Stream.writes == ["error: x: bad\n", "error: interrupted\n"]


def test_cuda_out_of_memory_is_known():
    import torch

    assert one_line(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")).startswith(
        "out of memory (CUDA out of memory.")


@pytest.mark.parametrize("error", [RuntimeError("shape mismatch in a kernel"), TypeError("unsupported operand"),
                                   KeyError("state"), AssertionError("invariant"),
                                   ValueError("gates (2, 3) do not match 4 experts")])
def test_a_bug_keeps_its_traceback(error):
    with pytest.raises(type(error)):
        guarded(raising(error), [])


def test_an_internal_value_error_in_a_command_shows_its_traceback(tmp_path):
    """A plain ValueError is an invariant of ours that broke, not the user's mistake: the
    command exits with Python's 1 and the traceback, never the one line and exit 2."""
    script = ("import sys, dylora_moe.eval.report as report\n"
              "def main(argv):\n"
              "    raise ValueError('router: gates (2, 3) for 4 experts')\n"
              "report.main = main\n"
              "from dylora_moe.cli import main as cli\n"
              "sys.exit(cli(['report', 'RUN']))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode not in (0, 2), done.stderr
    assert "Traceback (most recent call last)" in done.stderr, done.stderr
    assert "ValueError: router: gates (2, 3) for 4 experts" in done.stderr and "error: " not in done.stderr


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    assert guarded(raising(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_traceback_on_request(capsys, monkeypatch):
    monkeypatch.setenv("DYLORA_TRACEBACK", "1")
    assert guarded(raising(UserError("x: bad")), []) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("error: x: bad\n")


def test_every_command_goes_through_the_one_error_path(monkeypatch, capsys):
    import importlib

    for name, (words, target, _) in COMMANDS.items():
        module, _, function = target.partition(":")
        monkeypatch.setattr(importlib.import_module(module), function,
                            raising(OSError(errno.EACCES, "Permission denied", f"/out/{name}")))
        assert main([*words, "--anything"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: /out/{name}: Permission denied") and err.count("\n") == 1, (name, err)


@pytest.mark.parametrize("argv,message", [
    (["generate", "NOWHERE", "--prompt", "x"], "NOWHERE: no trained experts found"),
    (["eval", "NOWHERE"], "NOWHERE: no trained experts found"),
    (["prune", "NOWHERE"], "NOWHERE: no trained experts found"),
    (["eval", "NOTOKENIZER"], "NOTOKENIZER/tokenizer: no such folder; a portable folder holds experts/, tokenizer/"),
    (["report", "NOWHERE"], "NOWHERE/metrics.jsonl: no metrics"),
    (["report", "RUN", "--out", "AFILE/x"], "AFILE/x: Not a directory"),
    (["plan", "--config", "EMPTY"], "model.base_model is not set"),
    (["plan", "--config", "DEMO", "--num_experts", "0"], "MoEConfig.num_experts=0"),
    (["train", "--config", "DEMO", "--seed", "1.5"], "train.seed=1.5: expected an integer"),
])
def test_subcommands_report_bad_input_in_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    (tmp_path / "portable" / "experts").mkdir(parents=True)  # experts without their tokenizer/
    (tmp_path / "portable" / "experts" / "moe_config.json").write_text("{}")
    names = {"NOWHERE": str(tmp_path / "nowhere"), "AFILE/x": str(tmp_path / "afile" / "x"),
             "NOTOKENIZER": str(tmp_path / "portable"),
             "RUN": str(tmp_path / "run"), "EMPTY": str(tmp_path / "empty.yaml"),
             "DEMO": str(ROOT / "configs" / "demo.yaml")}
    assert main([names.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    for placeholder in ("NOWHERE", "AFILE/x", "NOTOKENIZER"):
        message = message.replace(placeholder, names[placeholder])
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("module", ["dylora_moe.train", "dylora_moe.plan", "dylora_moe.cli"])
def test_python_m_entry_points_share_it(module, tmp_path):
    """`accelerate launch -m dylora_moe.train` and `python -m dylora_moe.plan` too."""
    args = ["train"] if module == "dylora_moe.cli" else []
    done = subprocess.run([sys.executable, "-m", module, *args, "--config", str(tmp_path / "missing.yaml")],
                          cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "real_accelerator" not in line]  # DeepSpeed's banner
    assert lines == [f"error: {tmp_path / 'missing.yaml'}: recipe not found"], done.stderr


def test_launch_entry_points_share_it(tmp_path):
    e = {**env(tmp_path), "DYLORA_SECRET_REFS": "{not json"}
    e.pop("CLUSTER_SPEC", None)
    done = subprocess.run([sys.executable, "-m", "dylora_moe.vertex.entrypoint", "--config", "x"], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: DYLORA_SECRET_REFS: not valid JSON"), done.stderr
    assert done.stderr.count("\n") == 1
    assert os.environ.get("DYLORA_SECRET_REFS") is None


def test_a_damaged_safetensors_file_is_named(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path / "experts.safetensors"
    save_file({"w": torch.zeros(100)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    assert guarded(lambda argv: load_file(str(path)), []) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: a damaged or cut-short .safetensors file (") and err.count("\n") == 1
