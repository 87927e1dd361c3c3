"""Train from a recipe in Python: load_recipe + train, which is what `dylora-moe train` runs.

The demo recipe (a tiny random Gemma base, 4 experts, generated Python tasks) is
shortened here with the same `--field value` overrides the command line takes.
"""
import json
import tempfile
from pathlib import Path

from dylora_moe.train import load_recipe, train

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

with tempfile.TemporaryDirectory() as tmp:
    run_dir = Path(tmp) / "run"
    cfg = load_recipe(str(RECIPE), [
        "--output_dir", str(run_dir),
        "--max_steps", "6",           # optimizer steps (the recipe trains 200)
        "--demo_examples", "60",      # examples per task family (the recipe generates 600)
        "--save_every", "3",          # checkpoints at steps 3 and 6
        "--eval_every", "0",          # evaluate at the end only
        "--log_every", "3",
    ])
    print("recipe sections:", list(cfg.to_dict()))
    print(f"experts: {cfg.moe.num_experts}, learning rate: {cfg.train.learning_rate}, sources:",
          [s.label for s in cfg.data.sources])

    summary = train(cfg)  # one process; `accelerate launch -m dylora_moe.train` runs several
    print("trained steps:", summary["step"])
    print("checkpoints:", sorted(p.name for p in (run_dir / "checkpoints").iterdir()))
    print("final/:", sorted(p.name for p in Path(summary["final_dir"]).iterdir()))

    # metrics.jsonl: one record per logged step, then the eval and final records.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print("logged (step, loss):", [(r["step"], round(r["loss"], 3)) for r in records if "loss" in r])
    print("eval loss per source:", {k: round(v["loss"], 3) for r in records if "eval" in r
                                    for k, v in r["eval"].items()})
