"""A real pretrained base end to end: SmolLM2-135M-Instruct from its GGUF file (what
`dylora-moe fetch smollm2-135m` caches), loaded, trained two steps, resumed, exported
and generating real code.

Needs the fetched file: .ci/run fetches it and sets DYLORA_SMOLLM2_DIR. Unset, these tests
are skipped saying why; set but missing, they fail (a broken CI cannot pass by skipping).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainrun import ROOT, env

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    folder = os.environ.get("DYLORA_SMOLLM2_DIR")
    if folder is None:  # set but empty (a failed fetch in `export X=$(...)`) fails below
        pytest.skip("SmolLM2 GGUF: run `dylora-moe fetch smollm2-135m` and set DYLORA_SMOLLM2_DIR to the folder "
                    "it prints with --print folder")
    if not (Path(folder) / GGUF).is_file():
        pytest.fail(f"DYLORA_SMOLLM2_DIR={folder} holds no {GGUF}")
    return Path(folder)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    root = os.environ.get("DYLORA_DATA_DIR")
    if not root:
        pytest.skip("reference data: set DYLORA_DATA_DIR")
    return Path(root)


def recipe_args(smollm2: Path, data_dir: Path, out: Path, steps: int) -> list[str]:
    sources = (f"[{{name: code_alpaca, path: '{data_dir / 'code_alpaca_2k.json'}'}}, "
               f"{{name: mbpp, path: '{data_dir / 'mbpp.jsonl'}'}}]")
    return ["--config", str(ROOT / "configs" / "smollm2-135m.yaml"), "--base_model", str(smollm2),
            "--gguf_file", GGUF, "--sources", sources, "--output_dir", str(out), "--max_steps", str(steps),
            "--train_batch_size", "2", "--max_seq_length", "96", "--overlong", "drop", "--training_subset", "5",
            "--eval_subset", "2", "--eval_batch_size", "4", "--save_every", "1", "--log_every", "1",
            "--warmup_steps", "0"]


def cli(*args, tmp: Path, timeout=900) -> subprocess.CompletedProcess:
    # the GGUF file's dequantized copy goes to tmp's cache: converted once here, whatever is cached elsewhere
    return subprocess.run([sys.executable, "-m", "dylora_moe.cli", *map(str, args)], cwd=ROOT,
                          env={**env(tmp), "DYLORA_CACHE": str(tmp / "cache")}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(smollm2, data_dir, tmp_path_factory):
    """Two steps, then a third from the resumed checkpoint, as separate processes."""
    tmp = tmp_path_factory.mktemp("smollm2")
    out = tmp / "run"
    first = cli("train", *recipe_args(smollm2, data_dir, out, 2), tmp=tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli("train", *recipe_args(smollm2, data_dir, out, 3), tmp=tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, first, resumed, tmp


def test_gguf_base_trains_and_resumes(trained):
    out, first, resumed, _ = trained
    assert "resumed from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    # the first run dequantized the GGUF file once; the resumed one read that copy
    assert "dequantizing once" in first.stderr and "dequantizing once" not in resumed.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3]
    assert all(0 < r["loss"] < 10 for r in records if "loss" in r)  # a pretrained model: far below ln(49152) = 10.8
    saved = (out / "final" / "recipe.yaml").read_text()
    assert f"gguf_file: {GGUF}" in saved
    moe_config = json.loads((out / "final" / "experts" / "moe_config.json").read_text())
    assert moe_config["extra"]["base_gguf_file"] == GGUF


def test_exported_expert_names_its_gguf_base_and_matches_peft(trained, smollm2, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dylora_moe.eval.loading import load_run

    out, _, _, tmp = trained
    monkeypatch.setenv("DYLORA_CACHE", str(tmp / "cache"))
    [copy_dir] = [p for p in (tmp / "cache" / "gguf").iterdir() if p.is_dir()]
    adapter = out / "final" / "peft_expert_1"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2)
    assert GGUF in (adapter / "README.md").read_text()

    loaded = load_run(out)
    ids = loaded.tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    one_hot = torch.nn.functional.one_hot(torch.tensor(1), loaded.moe.config.num_experts).float()
    with torch.no_grad(), loaded.moe.override_gates(one_hot):
        forced = loaded.moe(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(smollm2, gguf_file=GGUF, dtype=torch.float32)
    # the dequantized copy the runs loaded holds what transformers makes of the GGUF file, bitwise
    direct = base.state_dict()
    copied = AutoModelForCausalLM.from_pretrained(copy_dir, dtype=torch.float32).state_dict()
    assert direct.keys() == copied.keys() and all(torch.equal(direct[k], copied[k]) for k in direct)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        exported = peft_model(input_ids=ids).logits
    assert torch.allclose(forced, exported, atol=1e-4), (forced - exported).abs().max()


def test_generate_writes_real_code(trained):
    out, _, _, tmp = trained
    done = cli("generate", out, "--prompt", "Write a Python function sum_list(xs) that returns the sum of a list.",
               "--max_new_tokens", "48", tmp=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "def sum_list(" in done.stdout
    assert "sha256" in done.stderr  # the log names the experts it loaded


def test_a_file_that_is_not_gguf_is_one_line(smollm2, data_dir, tmp_path):
    fake = tmp_path / "base"
    fake.mkdir()
    (fake / GGUF).write_bytes(b"PK\x03\x04 not a gguf file")
    done = cli("train", *recipe_args(fake, data_dir, tmp_path / "run", 1), tmp=tmp_path, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: model.gguf_file:")
    assert "is not a GGUF file" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_benchmarks_lora_has_the_compared_mixtures_budget_and_scale(smollm2, data_dir, monkeypatch):
    """bench_real_base.py's claim "one LoRA of the same trainable parameters, at the mixture's
    alpha / r": its rank is the smallest whose parameters reach the mixture asked for, one rank
    less falls short, and its scale is the mixture's, whatever alpha the mixture is given."""
    from dylora_moe.recipe import load_recipe

    monkeypatch.setenv("DYLORA_DATA_DIR", str(data_dir))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_real_base as bench

    common = ["--base_model", str(smollm2), "--gguf_file", GGUF, *bench.data_overrides()]
    ranks = {}
    for mixture, alpha in (("mixture", []), ("mixture-token", ["--lora_alpha", "8"])):
        budget = bench.trainable_parameters(common + alpha + bench.VARIANTS[mixture])
        lora = common + alpha + bench.VARIANTS["lora"]
        rank, lora_alpha = bench.lora_shape(common + alpha, mixture)
        ranks[mixture] = rank
        assert bench.trainable_parameters(lora + ["--lora_r", str(rank)]) >= budget
        assert bench.trainable_parameters(lora + ["--lora_r", str(rank - 1)]) < budget
        ours, theirs = (load_recipe(str(bench.RECIPE), args).moe for args in (
            lora + ["--lora_r", str(rank), "--lora_alpha", str(lora_alpha)], common + alpha + bench.VARIANTS[mixture]))
        assert ours.num_experts == 1 and ours.scaling == pytest.approx(theirs.scaling)
    # the recipe's one router per sequence holds fewer parameters than one in every layer: a smaller LoRA
    assert ranks["mixture"] < ranks["mixture-token"]


def test_the_benchmarks_paired_pass_test_is_exact_mcnemar(monkeypatch):
    """The benchmark's "within chance" for pass@1: the exact two-sided binomial test on the
    tasks only one side solves, which a brute-force count over every split must equal."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_real_base as bench

    def brute(only_a: int, only_b: int) -> float:
        n = only_a + only_b  # under the null each discordant task is a fair coin
        as_uneven = [k for k in range(n + 1) if abs(2 * k - n) >= abs(2 * only_a - n)]
        return min(1.0, sum(math.comb(n, k) for k in as_uneven) / 2 ** n)

    for only_a, only_b in ((0, 5), (10, 13), (9, 9), (3, 0), (1, 12)):
        ours = [f"t{i}" for i in range(only_a)] + ["both"]
        lora = [f"u{i}" for i in range(only_b)] + ["both"]
        split = bench.paired(ours, lora)
        assert (split["only_this"], split["only_lora"]) == (only_a, only_b)
        assert split["mcnemar_p"] == pytest.approx(brute(only_a, only_b))
    assert bench.paired(["a"], ["a"])["mcnemar_p"] == 1.0
    assert bench.paired([], [f"u{i}" for i in range(8)])["mcnemar_p"] < 0.01  # 0 of 8 is no coin


def test_the_random_base_has_the_real_shape(smollm2, tmp_path, monkeypatch):
    """bench/random_base.py's claim, that GPU timings on its folder are SmolLM2's: the folder
    holds the GGUF base's parameters, name for name and shape for shape, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import random_base

    random_base.skeleton(tmp_path, str(smollm2), GGUF)
    random_base.weights(tmp_path)
    shaped = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.device("meta"):
        real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2, gguf_file=GGUF))
    assert {n: p.shape for n, p in shaped.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert shaped.config.tie_word_embeddings == real.config.tie_word_embeddings
    text = "def sum_list(xs):\n    return sum(xs)  # <|im_end|>"
    assert (AutoTokenizer.from_pretrained(tmp_path)(text).input_ids
            == AutoTokenizer.from_pretrained(smollm2, gguf_file=GGUF)(text).input_ids)
