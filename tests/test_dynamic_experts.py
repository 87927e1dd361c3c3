"""Dynamic experts with real training processes: 4 experts trained on one demo task
family, then grown to 6 on a family they never saw (DDP, 2 processes), the novelty
trigger (DDP), a growth resume under ZeRO-2, and pruning the grown run."""
import json

import pytest
import torch
from safetensors.torch import load_file
from trainrun import SMALL, explain, final_record, records, run

NUMBERS = ["--sources", "[{name: demo, family: numbers}]"]
STRINGS = ["--sources", "[{name: demo, family: strings}]"]
BOTH = ["--sources", "[{name: demo, family: numbers}, {name: demo, family: strings}]"]
PHASE_1 = 16  # steps on numbers with 4 experts


@pytest.fixture(scope="module")
def numbers_run(tmp_path_factory):
    # grow_on_novelty keeps the experts' library (what the novelty run compares with);
    # max_experts 4 means this phase never grows.
    tmp = tmp_path_factory.mktemp("numbers")
    out = tmp / "run"
    done = run("ddp2", SMALL + NUMBERS + ["--max_steps", str(PHASE_1), "--output_dir", str(out),
                                          "--grow_on_novelty", "--max_experts", "4"], tmp)
    assert done.returncode == 0, explain(done)
    return out / "checkpoints" / f"checkpoint-{PHASE_1}"


@pytest.fixture(scope="module")
def grown_run(numbers_run, tmp_path_factory):
    """4 -> 6 experts on the strings family; the 4 are mature and frozen."""
    tmp = tmp_path_factory.mktemp("grown")
    out = tmp / "run"
    done = run("ddp2", SMALL + STRINGS + ["--max_steps", str(PHASE_1 + 16), "--output_dir", str(out),
                                          "--resume_from_checkpoint", str(numbers_run), "--num_experts", "6",
                                          "--freeze_mature_experts", "--maturity_steps", "12"], tmp)
    assert done.returncode == 0, explain(done)
    return out, done


def experts(path):
    return load_file(str(path / "experts.safetensors"))


def old_slices_equal(before: dict, after: dict) -> bool:
    """The first 4 experts' A and B slices of every layer, bitwise."""
    checked = 0
    for key, value in before.items():
        if key.endswith("lora_A"):
            same = torch.equal(after[key][: value.shape[0]], value)
        elif key.endswith("lora_B"):
            same = torch.equal(after[key][:, : value.shape[1]], value)
        else:
            continue
        checked += 1
        if not same:
            return False
    return checked > 0


def test_grow_4_to_6_under_ddp(numbers_run, grown_run):
    out, done = grown_run
    assert "grew 4 -> 6 experts" in done.stderr and "a new phase, not an exact resume" in done.stderr
    assert "AdamW moments (exp_avg, exp_avg_sq) of the 4 old experts and the router carried" in done.stderr
    growth = [r["growth"] for r in records(out) if "growth" in r]
    assert len(growth) == 1 and growth[0]["from"] == 4 and growth[0]["num_experts"] == 6
    config = json.loads((out / "final" / "experts" / "moe_config.json").read_text())
    assert [e["expert"] for e in config["extra"]["expert_history"]] == [4, 5]

    # The old experts are carried exactly, and (mature + frozen) stay so to the end
    before = experts(numbers_run / "portable" / "experts")
    after = experts(out / "final" / "experts")
    assert old_slices_equal(before, after)
    assert all(after[k][:, 4 * 8:].abs().sum() > 0 for k in after if k.endswith("lora_B"))  # the new ones learnt

    # Maturity counters live in the checkpoints: the new experts matured after 12 steps of their own
    saved = load_file(str(out / "checkpoints" / f"checkpoint-{PHASE_1 + 16}" / "model.safetensors"))
    assert saved["router.expert_steps"].tolist() == [PHASE_1] * 4 + [12, 12]
    assert saved["router.expert_maturity"].all()

    # The new family is routed to the new experts (top-1 in eval, once all are mature)
    usage = [r for r in records(out) if "eval" in r][-1]["eval"]["demo:strings"]["gate_mean"]
    print(f"strings usage after growth: {[round(u, 3) for u in usage]}")
    assert sum(usage[4:]) > 0.2
    sha = final_record(out)["weights_sha256_per_rank"]
    assert len(sha) == 2 and len(set(sha)) == 1


def test_novelty_trigger_under_ddp(numbers_run, tmp_path):
    out = tmp_path / "run"
    done = run("ddp2", SMALL + BOTH + ["--max_steps", str(PHASE_1 + 7), "--output_dir", str(out),
                                       "--resume_from_checkpoint", str(numbers_run), "--grow_on_novelty",
                                       "--novelty_window", "3", "--max_experts", "6"], tmp_path)
    assert done.returncode == 0, explain(done)
    growth = [r for r in records(out) if "growth" in r]
    assert len(growth) == 1, growth  # once for the new family, never for more of the same
    assert growth[0]["step"] == PHASE_1 + 3 and growth[0]["growth"]["source"] == "demo:strings"
    assert "added expert 4" in done.stderr and "stayed below novelty_threshold=0.75 for 3 steps" in done.stderr
    steps = [r for r in records(out) if "loss" in r]
    numbers = [r["novelty_similarity"]["demo:numbers"] for r in steps if "demo:numbers" in r["novelty_similarity"]]
    strings = [r["novelty_similarity"]["demo:strings"] for r in steps[:3]]
    print(f"novelty similarity: numbers {min(numbers):.3f}..{max(numbers):.3f}, strings before growth "
          f"{min(strings):.3f}..{max(strings):.3f}")
    assert min(numbers) >= 0.75 and max(strings) < 0.75
    assert steps[-1]["num_experts"] == 5
    assert len(set(final_record(out)["weights_sha256_per_rank"])) == 1


def test_prune_the_grown_run_and_load_it(grown_run, tmp_path):
    from dylora_moe.cli import main
    from dylora_moe.eval.loading import load_run

    out, _ = grown_run
    target = tmp_path / "pruned"
    # the experts this short run hardly uses (their share depends on the recipe's rate; measured 0.02-0.03)
    assert main(["prune", str(out), "--threshold", "0.05", "--output", str(target)]) == 0
    summary = json.loads((target / "prune.json").read_text())
    assert summary["pruned"] and len(summary["kept"]) == summary["num_experts"] < 6
    assert all(summary["usage"][i] < 0.05 for i in summary["pruned"])
    loaded = load_run(target)
    assert loaded.moe.config.num_experts == summary["num_experts"]
    original = experts(out / "final" / "experts")
    for key, value in experts(target / "experts").items():  # the kept experts, unchanged, in order
        if key.endswith("lora_A"):
            kept = torch.cat([original[key][i * 8:(i + 1) * 8] for i in summary["kept"]])
            assert torch.equal(value, kept)
    assert main(["prune", str(out), "--threshold", "0.02", "--output", str(target)]) == 2  # never overwrites


def test_grow_on_resume_under_zero2_resets_the_optimizer_and_says_so(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    done = run("zero2_2", SMALL + NUMBERS + ["--max_steps", "2", "--output_dir", str(first)], tmp_path)
    assert done.returncode == 0, explain(done)
    done = run("zero2_2", SMALL + STRINGS + ["--max_steps", "5", "--output_dir", str(second), "--num_experts", "5",
                                             "--resume_from_checkpoint", str(first / "checkpoints" / "checkpoint-2"),
                                             "--freeze_mature_experts"], tmp_path)
    assert done.returncode == 0, explain(done)
    assert "optimizer RESET: DeepSpeed ZeRO" in done.stderr and "step count is 0" in done.stderr
    assert old_slices_equal(experts(first / "final" / "experts"), experts(second / "final" / "experts"))
    assert len(set(final_record(second)["weights_sha256_per_rank"])) == 1
