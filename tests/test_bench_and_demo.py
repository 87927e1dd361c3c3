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


def test_demo_trains_and_routes_the_two_families_apart():
    from dylora_moe.demo import run

    result = run(steps=200, num_experts=4, seed=0)
    count, mirror = result["usage"]["count"], result["usage"]["mirror"]
    assert abs(float(count.sum()) - 1) < 1e-5 and abs(float(mirror.sum()) - 1) < 1e-5
    assert int(count.argmax()) != int(mirror.argmax())  # each family has its own favourite expert


def test_cli_demo_prints_loss_and_routing():
    done = subprocess.run([sys.executable, "-m", "dylora_moe.cli", "demo", "--steps", "3"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert "loss" in done.stdout and "gates [" in done.stdout and "expert usage" in done.stdout
