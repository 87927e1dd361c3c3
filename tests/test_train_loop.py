"""The loop's guards and reports, in-process on one CPU process."""
import json
import math

import pytest
import torch
from trainrun import SMALL

from dylora_moe.model import DyLoRAMoE
from dylora_moe.recipe import load_recipe


def recipe(tmp_path, *extra):
    return load_recipe(SMALL[1], SMALL[2:] + ["--output_dir", str(tmp_path / "run"), *extra])


def records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def poison(monkeypatch, calls_to_poison):
    """Make the given forward calls (1-based) return a NaN loss."""
    original, count = DyLoRAMoE.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        count["n"] += 1
        if self.training and count["n"] in calls_to_poison:
            out.lm_loss = out.lm_loss * float("nan")
        return out

    monkeypatch.setattr(DyLoRAMoE, "forward", forward)


def test_a_nonfinite_batch_is_skipped_and_counted(tmp_path, monkeypatch, fresh_accelerate):
    """Decided once per optimizer step: the window holding the NaN (step 2, micro-batches
    3 and 4) makes no update, its finite micro-batch dropped with it; the run goes on."""
    from dylora_moe.train.loop import train

    updates = {"n": 0}
    original_step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        updates["n"] += 1
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    poison(monkeypatch, {3})
    summary = train(recipe(tmp_path, "--max_steps", "4"))
    assert summary["step"] == 4 and updates["n"] == 3
    steps = [r for r in records(tmp_path) if "loss" in r]
    assert steps[-1]["nonfinite_skipped"] == 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["lm_loss"]) for r in steps)


def test_too_many_nonfinite_batches_in_a_row_stop_with_a_clear_error(tmp_path, monkeypatch, fresh_accelerate):
    from dylora_moe.train.loop import train

    poison(monkeypatch, set(range(1, 100)))
    with pytest.raises(FloatingPointError, match="max_consecutive_nonfinite=3"):
        train(recipe(tmp_path, "--max_steps", "4"))


def test_early_stopping_after_patience(tmp_path, monkeypatch, fresh_accelerate):
    import dylora_moe.train.loop as loop

    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    monkeypatch.setattr(loop, "evaluate_losses", lambda *a, **k: {"demo:numbers": {
        "loss": next(losses), "perplexity": 1.0, "tokens": 1, "gate_mean": [0.25] * 4}})
    summary = loop.train(recipe(tmp_path, "--max_steps", "20", "--eval_every", "1", "--early_stopping_patience", "2"))
    assert summary["step"] == 4  # evals at 1 (1.0), 2 (0.5 best), 3, 4: two without improvement
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-4").is_dir()


def test_metrics_trackers_and_heatmap(tmp_path, fresh_accelerate):
    from dylora_moe.train.loop import train

    train(recipe(tmp_path, "--max_steps", "4", "--eval_every", "2", "--log_with", "[tensorboard, wandb]"))
    run = tmp_path / "run"
    step = [r for r in records(tmp_path) if "loss" in r][-1]
    for key in ("loss", "lm_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "memory_gib", "router_entropy"):
        assert isinstance(step[key], float) and math.isfinite(step[key]), key
    assert len(step["expert_grad_norm"]) == 4 and all(g > 0 for g in step["expert_grad_norm"])
    assert len(step["usage_top1"]) == 4 and abs(sum(step["gate_mean"]) - 1) < 1e-6
    assert set(step["gate_mean_by_source"]) == {"demo:numbers", "demo:strings"}
    evals = [r for r in records(tmp_path) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert set(evals[-1]["eval"]) == {"demo:numbers", "demo:strings"}
    assert all(v["tokens"] > 0 and v["perplexity"] == pytest.approx(math.exp(v["loss"]))
               for v in evals[-1]["eval"].values())
    assert (run / "plots" / "usage-step2.png").is_file() and (run / "plots" / "usage-step4.png").is_file()
    assert list(run.rglob("events.out.tfevents.*")), "tensorboard wrote nothing"
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb (offline) wrote nothing"


def test_expert_grad_norms_match_the_full_gradient(tmp_path):
    """Per-expert norms split the stacked gradients correctly: squares add up to the total."""
    from conftest import make_batch, make_moe, randomize_experts

    from dylora_moe.train.monitor import expert_grad_norms

    moe = make_moe(num_experts=3)
    randomize_experts(moe)
    moe(**make_batch()[0]).loss.backward()
    norms = torch.tensor(expert_grad_norms(moe, 3, is_deepspeed=False), dtype=torch.float64)
    total = torch.sqrt(sum((l.lora_A.grad.double() ** 2).sum() + (l.lora_B.grad.double() ** 2).sum()
                           for l in moe.experts.values()))
    assert torch.allclose(norms.pow(2).sum().sqrt(), total, rtol=1e-9)
    layer = next(iter(moe.experts.values()))
    layer.lora_A.grad[layer.r:2 * layer.r] = 0  # expert 1's A gradient in one layer
    assert expert_grad_norms(moe, 3, is_deepspeed=False)[1] < norms[1]


def test_demo_recipe_trains_and_reports(tmp_path, fresh_accelerate, capsys):
    """The README's main job, shortened: loss falls, eval reports every source (top-k and
    dense), and the run says where its outputs are. (Whether the families end up on
    different experts depends on seed and balance coefficient: measured, not asserted.)"""
    from dylora_moe.train.loop import train

    cfg = load_recipe(SMALL[1], ["--output_dir", str(tmp_path / "run"), "--max_steps", "120", "--eval_every", "120"])
    train(cfg)
    assert "outputs in" in capsys.readouterr().out
    steps = [r for r in records(tmp_path) if "loss" in r]
    assert steps[-1]["lm_loss"] < 0.5 * steps[0]["lm_loss"]
    final = [r for r in records(tmp_path) if "eval" in r][-1]["eval"]
    assert set(final) == {"demo:numbers", "demo:strings"}
    assert all(v["loss"] > 0 and abs(sum(v["gate_mean"]) - 1) < 1e-6 for v in final.values())


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_train(name, tmp_path, fresh_accelerate):
    from dylora_moe.train.loop import train

    train(recipe(tmp_path, "--max_steps", "12", "--optimizer", name, "--learning_rate", "0.01"))
    steps = [r["lm_loss"] for r in records(tmp_path) if "loss" in r]
    assert len(steps) == 12 and steps[-1] < steps[0]


def test_diverged_weights_are_never_saved(tmp_path, monkeypatch, fresh_accelerate):
    """A NaN in the experts (here put there after step 2) stops the run before a
    checkpoint or final/ could hold it, naming the last good checkpoint."""
    import dylora_moe.train.loop as loop

    original = loop.Loop.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.state.step == 3:
            with torch.no_grad():
                next(iter(self.moe.experts.values())).lora_A[0, 0] = float("nan")
        return out

    monkeypatch.setattr(loop.Loop, "step", step)
    with pytest.raises(FloatingPointError, match=r"expert weights are not finite at step 4 \(1 tensor\(s\), e\.g\. "
                                                 r".*lora_A\); nothing saved, checkpoint-2 is the last good checkpoint"):
        loop.train(recipe(tmp_path, "--max_steps", "6", "--save_every", "2"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("growth", [False, True])
def test_the_novelty_library_is_kept_only_with_growth_on(growth, tmp_path, fresh_accelerate):
    """With grow_on_novelty off none of the novelty bookkeeping runs: the experts' library
    (router buffers) stays empty; on (max_experts = num_experts: it never grows), it fills."""
    from safetensors.torch import load_file

    from dylora_moe.train.loop import train

    train(recipe(tmp_path, "--max_steps", "2", *(["--grow_on_novelty", "--max_experts", "4"] if growth else [])))
    saved = load_file(str(tmp_path / "run" / "final" / "experts" / "experts.safetensors"))
    assert (int(saved["router.centroid_counts"].sum()) > 0) == growth


def test_no_dataloader_worker_outlives_a_run_that_fails(tmp_path, monkeypatch, fresh_accelerate):
    """Workers are processes with a copy of the data: a run that stops mid-epoch (here on
    non-finite losses, an exception) ends them on its way out, not at garbage collection."""
    import multiprocessing
    import os

    from dylora_moe.train.loop import train

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs for 2 workers")
    seen = []
    original = DyLoRAMoE.forward

    def forward(self, *args, **kwargs):
        seen.append(len(multiprocessing.active_children()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DyLoRAMoE, "forward", forward)
    poison(monkeypatch, set(range(1, 100)))
    try:
        train(recipe(tmp_path, "--max_steps", "4", "--dataloader_num_workers", "2"))
    except FloatingPointError as error:  # its traceback still holds every frame of the run
        left = multiprocessing.active_children()
        assert "max_consecutive_nonfinite" in str(error)
    else:
        raise AssertionError("the run did not stop")
    assert max(seen) == 2  # the workers ran...
    assert left == []  # ...and ended with the run, not with its garbage


def test_dataloader_workers_are_bounded_by_the_cpus(tmp_path, capsys):
    import os

    from dylora_moe.train.cli import main

    cpus = len(os.sched_getaffinity(0))
    assert main(recipe_args(tmp_path) + ["--dataloader_num_workers", "10000"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: train.dataloader_num_workers=10000: expected at most {cpus} (the CPUs this process may "
                   "use; each worker is a process with its own copy of the data)\n")
    assert not (tmp_path / "run").exists()


def recipe_args(tmp_path):
    return SMALL[:] + ["--output_dir", str(tmp_path / "run")]
