import contextlib
import os
import subprocess
import sys
from pathlib import Path

# Tests never touch the network: make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# One ninja for every DeepSpeed op build, in this process and every child: the venv's
# (pip's ninja, 1.13) and the system's (1.11) hash commands differently in .ninja_log, so
# each took the other's build for a changed command and compiled the ops again.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

import pytest
import torch

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.tiny import random_causal_lm, tiny_config

# Under two workers each takes one core: OpenMP threads of two processes sharing 2 cores
# spin against each other (a 40 s in-process run took 210 s). The subprocess runs already
# get OMP_NUM_THREADS=1 (trainrun.env).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


ARCHS = ["gemma", "llama", "gpt2", "gpt_neox"]
VOCAB = 256


def make_base(arch="gemma", seed=0, **shape):
    return random_causal_lm(tiny_config(arch, vocab_size=VOCAB, **shape), seed=seed)


def make_moe(arch="gemma", seed=0, **cfg):
    cfg.setdefault("lora_dropout", 0.0)
    torch.manual_seed(seed + 1)
    return DyLoRAMoE(make_base(arch, seed), MoEConfig(**cfg))


def make_batch(batch=3, prompt_lens=(4, 6, 5), answer_lens=(5, 3, 4), seed=0):
    """Right-padded prompt+answer rows with labels -100 on prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    total = max(p + a for p, a in zip(prompt_lens, answer_lens))
    ids = torch.zeros(batch, total, dtype=torch.long)
    mask = torch.zeros(batch, total, dtype=torch.long)
    labels = torch.full((batch, total), -100)
    prompt = torch.zeros(batch, total, dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompt_lens[:batch], answer_lens[:batch])):
        row = torch.randint(3, VOCAB, (p + a,), generator=g)
        ids[i, : p + a] = row
        mask[i, : p + a] = 1
        labels[i, p : p + a] = row[p:]
        prompt[i, :p] = True
    return dict(input_ids=ids, attention_mask=mask, labels=labels), prompt


def randomize_experts(moe, seed=0, scale=0.2):
    """Give every expert a non-zero B (a fresh mixture has B = 0, i.e. equals the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moe.experts.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture
def shared_file():
    """A real reference file (MBPP, Code Alpaca) from $DYLORA_DATA_DIR, which CI sets
    (.ci/run). Unset: the test is skipped, saying why (pytest -ra lists it). Set but the
    file is not there: the test fails, so a broken CI setup cannot pass by skipping."""
    from pathlib import Path

    def find(name):
        root = os.environ.get("DYLORA_DATA_DIR")
        if not root:
            pytest.skip(f"reference data {name}: set DYLORA_DATA_DIR to the folder holding it")
        path = Path(root) / name
        if not path.is_file():
            pytest.fail(f"reference data {name}: not in DYLORA_DATA_DIR={root}")
        return path

    return find


@pytest.fixture
def fresh_accelerate(monkeypatch, tmp_path):
    """An in-process training run: the environment the launched runs get, and Accelerate's
    process-wide state reset afterwards (the next run builds its own Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from trainrun import env

    for key, value in env(tmp_path).items():
        monkeypatch.setenv(key, value)
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@contextlib.contextmanager
def small_tmpfs(path, size: str):
    """A tmpfs of `size` mounted at `path` for the block (a real full disk); skips the test
    where mounting needs root or is not allowed."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory):
    """A tiny trained run whose experts differ, for the serving tests (tests/serverun.py)."""
    from serverun import tiny_run

    return tiny_run(tmp_path_factory.mktemp("serve-run"))
