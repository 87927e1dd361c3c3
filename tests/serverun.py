"""Helpers for the serving tests: a tiny trained run whose experts differ, and a real
`dylora-moe serve` subprocess on a free loopback port."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from trainrun import SMALL, env, explain, free_port, run

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(tmp: Path) -> Path:
    """Two training steps of the demo recipe (its tokenizer, base, recipe and folder
    layout), then experts and router made to differ: a fresh mixture is nearly the base,
    which would let a test pass whatever gates a row got."""
    from dylora_moe.eval.loading import load_run
    from dylora_moe.model.portable import write_portable

    out = tmp / "run"
    done = run("single", SMALL + ["--max_steps", "2", "--gradient_accumulation_steps", "1", "--eval_every", "2",
                                  "--save_every", "2", "--output_dir", str(out)], tmp)
    assert done.returncode == 0, explain(done)
    loaded = load_run(out)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in loaded.moe.experts.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
        loaded.moe.router.gate.weight.normal_(0, 0.3, generator=generator)
    write_portable(loaded.moe, loaded.tokenizer, loaded.recipe, out / "final")
    return out


class Server:
    """`dylora-moe serve RUN` on 127.0.0.1:<free port>; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, run_dir: Path, tmp: Path, *args: str, ready_s: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"serve-{self.port}.log", "w+")
        e = env(tmp)
        self.proc = subprocess.Popen([sys.executable, "-m", "dylora_moe.cli", "serve", str(run_dir), "--port",
                                      str(self.port), "--threads", "1", *args], cwd=ROOT, env=e,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(ready_s)

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server not ready in {seconds}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (a drain), and the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
