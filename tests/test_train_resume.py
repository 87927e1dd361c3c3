"""Preemption and exact resume with real processes: DDP, ZeRO-2, ZeRO-2 + CPU offload."""
import pytest
from dylora_moe.recipe import load_recipe
from trainrun import SMALL, explain, final_record, losses, records, run, run_and_interrupt

STEPS = 16  # the resumed part still crosses a scheduled save and eval (every 8)


# The demo recipe routes dense; one DDP case trains with the sparse straight-through
# gating, Gumbel noise (drawn from the RNG a resume restores per rank) and a k-means init.
NOISY = ["--gating", "straight_through", "--router_noise", "1.0", "--router_init", "kmeans"]


# DDP runs only with NOISY: the same save / restore path as plain DDP, with more state to restore.
@pytest.mark.parametrize("mode,extra", [("zero2_2", []), ("offload_1", []), ("offload_2", []), ("ddp2", NOISY)],
                         ids=["zero2_2", "offload_1", "offload_2", "ddp2-noisy-kmeans"])
def test_sigterm_then_auto_resume_matches_an_uninterrupted_run_bitwise(mode, extra, tmp_path):
    args = SMALL + ["--max_steps", str(STEPS), "--eval_every", "8", "--save_every", "8", *extra]
    straight = tmp_path / "straight"
    done = run(mode, args + ["--output_dir", str(straight)], tmp_path)
    assert done.returncode == 0, explain(done)

    resumed = tmp_path / "resumed"
    stopped, at = run_and_interrupt(mode, args + ["--output_dir", str(resumed)], tmp_path, resumed, after_step=3)
    assert stopped.returncode != 0, explain(stopped)
    interrupted_at = max(losses(resumed))
    assert interrupted_at < STEPS, "the run finished before the signal: nothing was tested"
    again = run(mode, args + ["--output_dir", str(resumed), "--resume_from_checkpoint", "auto"], tmp_path)
    assert again.returncode == 0, explain(again)

    want, got = losses(straight), losses(resumed)
    assert sorted(want) == list(range(1, STEPS + 1)) == sorted(got)
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # bitwise, every step
    assert final_record(resumed)["weights_sha256_per_rank"] == final_record(straight)["weights_sha256_per_rank"]
    ranks = 2 if mode.endswith("2") else 1
    assert len(set(final_record(resumed)["weights_sha256_per_rank"])) == 1
    assert len(final_record(resumed)["weights_sha256_per_rank"]) == ranks
    lrs = lambda d: [r["lr"] for r in records(d) if "lr" in r]
    assert lrs(resumed)[-STEPS + interrupted_at:] == lrs(straight)[interrupted_at:]


def test_zero2_offload_checkpoint_is_sharded_and_holds_no_frozen_base(tmp_path):
    import torch

    out = tmp_path / "run"
    done = run("offload_2", SMALL + ["--max_steps", "4", "--save_every", "2", "--output_dir", str(out)], tmp_path)
    assert done.returncode == 0, explain(done)
    ckpt = out / "checkpoints" / "checkpoint-4" / "pytorch_model"
    assert (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k or k.startswith("router.") for k in module), sorted(module)[:5]
    assert any(k.endswith("lora_A") for k in module)


def test_lr_schedule_is_the_same_at_one_and_two_processes(tmp_path):
    """Accelerate steps a prepared scheduler once per process: ours is stepped once per
    optimizer step, so 2 processes follow the same curve as 1."""
    args = SMALL + ["--max_steps", "12", "--warmup_steps", "3", "--output_dir"]
    one, two = tmp_path / "one", tmp_path / "two"
    for mode, out in (("single", one), ("ddp2", two)):
        done = run(mode, args + [str(out)], tmp_path)
        assert done.returncode == 0, explain(done)
    lrs = lambda d: [r["lr"] for r in records(d) if "lr" in r]
    assert lrs(one) == lrs(two) and len(lrs(one)) == 12
    peak = load_recipe(SMALL[1], []).train.learning_rate
    assert lrs(one)[0] == 0.0 and max(lrs(one)) == pytest.approx(peak)


def test_8bit_optimizer_under_zero2_offload_is_a_clear_error(tmp_path):
    done = run("offload_1", SMALL + ["--max_steps", "2", "--optimizer", "adamw_8bit", "--output_dir",
                                     str(tmp_path / "run")], tmp_path)
    assert done.returncode != 0
    assert "train.optimizer='adamw_8bit' cannot run under DeepSpeed ZeRO" in done.stderr
    assert not (tmp_path / "run" / "base_model").exists()  # refused before any model was built


def test_offload_config_that_would_swap_the_optimizer_is_refused_up_front(tmp_path):
    """zero_force_ds_cpu_optimizer: true with optimizer offload would let DeepSpeed swap
    in its own optimizer (the LR schedule would stop driving it): refused before any
    data is read or model built."""
    import json
    import subprocess

    from trainrun import ROOT, VENV_BIN, env, free_port

    ds = json.loads((ROOT / "ds_configs" / "zero2_offload.json").read_text())
    (tmp_path / "ds.json").write_text(json.dumps({**ds, "zero_force_ds_cpu_optimizer": True}))
    accelerate_yaml = (ROOT / "accelerate_configs" / "zero2_offload.yaml").read_text()
    (tmp_path / "acc.yaml").write_text(accelerate_yaml.replace("ds_configs/zero2_offload.json", str(tmp_path / "ds.json")))
    out = tmp_path / "run"
    done = subprocess.run([str(VENV_BIN / "accelerate"), "launch", "--config_file", str(tmp_path / "acc.yaml"),
                           "--num_processes", "1", "--main_process_port", str(free_port()), "-m", "dylora_moe.train",
                           *SMALL, "--max_steps", "2", "--output_dir", str(out)],
                          cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ['error: DeepSpeed config: optimizer offload needs "zero_force_ds_cpu_optimizer": false '
                      "(otherwise DeepSpeed swaps in its own optimizer and the LR schedule stops driving it: the LR "
                      "freezes after a resume); see ds_configs/zero2_offload.json"], done.stderr[-3000:]
    assert not out.exists()  # refused before anything was written
