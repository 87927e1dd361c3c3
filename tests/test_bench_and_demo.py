"""The benchmark and the demo keep running (no timings asserted: those live in bench/)."""
import json
import subprocess
import sys
from pathlib import Path

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


def test_demo_trains_and_routes_the_two_families_apart(tmp_path):
    from dylora_moe.demo import run

    report = run(steps=150, num_experts=4, seed=0, output_dir=str(tmp_path / "demo"))
    numbers, strings = report["demo:numbers"], report["demo:strings"]
    for r in (numbers, strings):
        assert abs(float(r["usage"].sum()) - 1) < 1e-5
        assert r["dense_loss"] < 3.0  # from ~7.8 (ln 1024 = 6.9) at step 1
    # the families are routed differently (total variation distance of expert usage)
    assert 0.5 * (numbers["usage"] - strings["usage"]).abs().sum() > 0.3
    assert (tmp_path / "demo" / "experts" / "experts.safetensors").is_file()
    assert (tmp_path / "demo" / "tokenizer" / "tokenizer.json").is_file()


def test_cli_demo_prints_loss_and_routing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dylora_moe.cli", "demo", "--steps", "3", "--output_dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "loss" in done.stdout and "demo:numbers [" in done.stdout and "expert usage" in done.stdout
