"""The benchmark keeps running (no timings asserted: those live in bench/)."""
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
