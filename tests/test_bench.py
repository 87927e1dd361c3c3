"""The benchmark keeps running (no timings asserted: those live in bench/)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_every_variant_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_moe.py"), "--shape", "tiny", "--steps", "1",
                    "--warmup", "0", "--rounds", "1", "--experts", "1,2", "--out", str(out)], check=True, cwd=ROOT,
                   capture_output=True, text=True)
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["peft-lora (floor)", "deltas/embeddings E=1", "deltas/base_hidden E=1", "logits/embeddings E=1",
                     "deltas/embeddings E=2", "deltas/base_hidden E=2", "logits/embeddings E=2"]
    assert all(row["tokens_per_s"] > 0 and row["saved_act_mib"] > 0 for row in result["rows"])
    assert {"deltas_embeddings_max_step_vs_floor"} <= set(result["targets"])


def test_memory_bench_runs_every_setting_and_checkpointing_saves_memory(tmp_path):
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--shape", "tiny", "--steps", "1",
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    settings = {(r["base"], r["experts"], r["checkpointing"], r["chunked_loss"]) for r in rows}
    assert settings == {(b, e, c, l) for b in ("full", "4bit") for e in (4, 8) for c in (False, True)
                        for l in (False, True)}
    by = {(r["base"], r["experts"], r["checkpointing"], r["chunked_loss"]): r for r in rows}
    for b in ("full", "4bit"):
        for e in (4, 8):
            # On CPU the bench reports the bytes saved for backward: checkpointing and the
            # chunked loss (chunks of a quarter of the batch at this tiny vocabulary) cut them.
            assert by[b, e, True, True]["peak_gib"] < by[b, e, False, True]["peak_gib"]
            assert by[b, e, False, True]["peak_gib"] < by[b, e, False, False]["peak_gib"]


def test_loss_bench_runs_and_the_fused_chunked_loss_holds_the_least(tmp_path):
    out = tmp_path / "loss.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_loss.py"), "--shape", "tiny", "--rounds", "1",
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True, text=True)
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    plain, before, fused = rows["plain"], rows["chunked, checkpointed (before)"], rows["chunked, fused (now)"]
    # Same loss and gradients; the fused variant never holds more than one chunk's logits.
    assert abs(fused["loss"] - plain["loss"]) < 1e-5 and fused["max_grad_diff"] < 1e-6
    assert fused["peak_mib"] < before["peak_mib"] < plain["peak_mib"]


def test_routing_bench_runs_and_packed_rows_route_on_their_prompts_only(tmp_path):
    out = tmp_path / "routing.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_routing.py"), "--shape", "tiny", "--rounds", "1",
                    "--steps", "1", "--out", str(out)], check=True, cwd=ROOT, capture_output=True, text=True)
    result = json.loads(out.read_text())
    rows = {(r["rows"], r["router_input"], r["routing_pass_whole_rows"]): r for r in result["rows"]}
    assert len(rows) == 5 and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["padded", "embeddings", False]["routing_pass_tokens"] == 0
    # the prompts-only pass sees more than the prompts (its rows end at their longest
    # prefix) but less than whole rows
    prompts = result["meta"]["prompt_fraction"] * result["meta"]["real_tokens"]
    now, before = rows["packed", "base_hidden", False], rows["packed", "base_hidden", True]
    assert prompts * 0.9 <= now["routing_pass_tokens"] < before["routing_pass_tokens"]


def test_loop_profile_labels_each_part_of_the_real_training_step(tmp_path):
    out = tmp_path / "loop.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "profile_loop.py"), "--skip", "1", "--steps", "2",
                    "--out", str(out), "--", "--config", str(ROOT / "configs" / "demo.yaml"), "--max_steps", "4",
                    "--output_dir", str(tmp_path / "run"), "--eval_every", "0"],
                   check=True, cwd=ROOT, capture_output=True, text=True)
    result = json.loads(out.read_text())
    host = result["host_ms_per_step"]
    assert result["steps"] == 2 and result["device_ms_per_step"] is None  # CPU: host times only
    parts = ["routing pass (route)", "LM forward (_lm_forward)", "backward", "optimizer step"]
    assert all(host[part] > 0 for part in parts)
    # the parts run one after another inside the step, which the wall clock brackets
    assert sum(host[part] for part in parts) <= host["loop step"] <= result["wall_ms_per_step"] * 1.01


def test_gpu_session_script_runs_every_step(tmp_path):
    """bench/gpu_session.sh is what a lent GPU's few minutes run: every step of it runs
    here at the tiny shape (compile switched off: inductor needs a minute on CPU), so a
    typo cannot waste them. Its step profile accounts for the time by group."""
    env = dict(os.environ, GPU_SESSION_SHAPE="tiny", TORCH_COMPILE_DISABLE="1")  # python: the venv's (conftest)
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), str(tmp_path), "300"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("   exit 0 after") == 7, run.stdout
    results = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(results) == {"profile", "loss", "profile-compiled", "profile-compiled-b16", "routing", "moe", "memory"}
    profile = results["profile"]
    assert profile["tokens_per_s"] > 0 and 0 < profile["busy_fraction"] <= 1.0
    assert abs(sum(profile["groups"].values()) - profile["busy_s_per_step"]) < 1e-9
    assert profile["groups"]["matmul"] > 0 and profile["groups"]["optimizer"] > 0
    assert results["profile-compiled-b16"]["meta"]["batch"] == 16
    assert any(row["compile"] for row in results["memory"]["rows"])
    assert [r["name"] for r in results["loss"]["rows"]][-1] == "chunked, fused, compiled"


def test_mfu_counts_the_routing_pass_only_when_there_is_one():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_memory import mfu, routed_fraction
        from bench_moe import make_batch
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from conftest import make_moe

    batch = make_batch(256, 2, 16, torch.device("cpu"))  # first half of each row is the prompt
    assert routed_fraction(make_moe(router_input="base_hidden"), batch) == 0.5
    assert routed_fraction(make_moe(router_input="embeddings"), batch) == 0.0
    assert mfu(1000, 2e9, 0.5) / mfu(1000, 2e9) == 1.25  # 4N + 2N per routed token


def test_executed_flops_count_the_routing_pass():
    """profile_step's FLOP count: 4N per token plus, with router_input=base_hidden, the
    routing pass's 2 x (N minus the embeddings) over the prompt half."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_moe import make_batch
        from profile_step import executed_flops
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from conftest import make_moe

    batch = make_batch(256, 2, 16, torch.device("cpu"))
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    counts = {}
    for router_input in ("embeddings", "base_hidden"):
        moe = make_moe(router_input=router_input, num_experts=4)
        counts[router_input] = sum(executed_flops(moe, batch, no_autocast).values())
    base = moe.base_model
    n = sum(p.numel() for p in base.parameters() if not p.requires_grad)  # the frozen base, no experts
    body = n - base.get_input_embeddings().weight.numel()
    tokens = batch["input_ids"].numel()
    assert counts["embeddings"] > 0.9 * 4 * n * tokens  # the base's 4N, plus experts that are large at this size
    extra = counts["base_hidden"] - counts["embeddings"]
    assert abs(extra / (2 * body * tokens / 2) - 1) < 0.05
