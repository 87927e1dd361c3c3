"""Helpers for tests that run real training processes (1 or 2, DDP or DeepSpeed) on CPU."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# A small, fast version of the demo recipe; dropout ON so resume must restore the RNG.
SMALL = ["--config", str(ROOT / "configs" / "demo.yaml"), "--demo_examples", "120", "--max_seq_length", "128",
         "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--lora_dropout", "0.1",
         "--log_every", "1", "--eval_batch_size", "16"]

MODES = {
    "single": [],
    "ddp2": ["--multi_gpu", "--num_processes", "2"],
    "zero2_1": ["--config_file", str(ROOT / "accelerate_configs" / "zero2.yaml"), "--num_processes", "1"],
    "zero2_2": ["--config_file", str(ROOT / "accelerate_configs" / "zero2.yaml"), "--num_processes", "2"],
    "offload_1": ["--config_file", str(ROOT / "accelerate_configs" / "zero2_offload.yaml"), "--num_processes", "1"],
    "offload_2": ["--config_file", str(ROOT / "accelerate_configs" / "zero2_offload.yaml"), "--num_processes", "2"],
    "fsdp2_2": ["--config_file", str(ROOT / "accelerate_configs" / "fsdp2.yaml"), "--num_processes", "2"],
}
# Modes whose processes must be started on the CPU explicitly: DDP over gloo, and FSDP
# (Accelerate would otherwise start each process alone; train/sharding.py).
CPU_MODES = {"ddp2", "fsdp2_2"}


def register_mode(name: str, config_file: Path, processes: int = 2, cpu: bool = False) -> str:
    """A launch mode for an accelerate config written by a test (another DeepSpeed JSON...)."""
    MODES[name] = ["--config_file", str(config_file), "--num_processes", str(processes)]
    if cpu:
        CPU_MODES.add(name)
    return name


def extensions_dir() -> Path:
    """The folder .ci/run gives this checkout: one per checkout, as a build names its venv's paths."""
    key = hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "dylora-moe" / "torch_extensions" / key


def env(tmp: Path) -> dict:
    e = dict(os.environ)
    e.update({
        "TMPDIR": str(tmp),  # torchelastic leaves folders there
        "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_CACHE_DIR": str(tmp), "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        # DeepSpeed's CPU ops compile once into a stable cache shared by all tests and runs (.ci/run's folder)
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(extensions_dir())),
    })
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(mode: str, args: list[str]) -> list[str]:
    if mode == "single":
        return [sys.executable, "-m", "dylora_moe.train", *args]
    return [str(VENV_BIN / "accelerate"), "launch", *MODES[mode], "--main_process_port", str(free_port()),
            "-m", "dylora_moe.train", *args]


def run(mode: str, args: list[str], tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    e = env(tmp)
    if mode in CPU_MODES:
        # --multi_gpu on CPU = DDP over gloo (a MULTI_CPU config starts one process); FSDP over gloo
        e["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run(command(mode, args), cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def run_and_interrupt(mode: str, args: list[str], tmp: Path, run_dir: Path, after_step: int,
                      timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
    """Start a run, SIGTERM its whole process group once metrics show `after_step`
    (as a spot VM's shutdown does), wait for it to save and exit."""
    e = env(tmp)
    if mode in CPU_MODES:
        e["ACCELERATE_USE_CPU"] = "true"
    proc = subprocess.Popen(command(mode, args), cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if max(steps(run_dir), default=0) >= after_step:
            os.killpg(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), max(steps(run_dir), default=0)


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if "loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step (the last record wins: a resumed run rewrites its steps)."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def final_record(run_dir: Path) -> dict:
    return [r for r in records(run_dir) if r.get("final")][-1]


def explain(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"
