"""A sharded base with real processes on CPU (2 x gloo): DeepSpeed ZeRO-3 (DeepSpeed's CPU
accelerator), ZeRO-3 with parameter + optimizer offload, and FSDP2 (torch's fully_shard
through Accelerate's FSDP2 path, switched on over gloo by train/sharding.py).

What is checked, against the same recipe on one process or an uninterrupted run: losses,
the fraction of the base each rank holds (measured on the tensors), the portable export
(against the backend's own checkpoint), exact resume after SIGTERM, growth, freezing and
the novelty trigger, generation, a 4-bit base, and the refusals."""
import json
import math
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from trainrun import (ROOT, SMALL, VENV_BIN, env, explain, final_record, free_port, losses, records, register_mode,
                      run, run_and_interrupt)

# Same data per optimizer step at 1 x 8 rows and 2 x 4 rows; no dropout and no balance
# loss, whose value depends on how a step's rows are split over processes.
NUMBERS = ["--sources", "[{name: demo, family: numbers}]"]
EQUAL = ["--lora_dropout", "0", "--balance_coefficient", "0", "--max_steps", "4", "--save_every", "4",
         "--eval_every", "4", "--loss_chunk_tokens", "32"] + NUMBERS
BOTH = ["--sources", "[{name: demo, family: numbers}, {name: demo, family: strings}]"]
# Experts small enough to stay whole under the threshold below, every base Linear larger.
ATTENTION = ["--target_modules", "[q_proj,k_proj,v_proj,o_proj]", "--lora_r", "4"]


def ds_variant(tmp, name: str, source: str, **zero) -> str:
    """A launch mode for a shipped ZeRO-3 config with other zero_optimization values."""
    ds = json.loads((ROOT / "ds_configs" / source).read_text())
    ds["zero_optimization"].update(zero)
    (tmp / f"{name}.json").write_text(json.dumps(ds))
    yaml = (ROOT / "accelerate_configs" / source.replace(".json", ".yaml")).read_text()
    (tmp / f"{name}.yaml").write_text(yaml.replace(f"ds_configs/{source}", str(tmp / f"{name}.json")))
    return register_mode(name, tmp / f"{name}.yaml")


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("configs")
    return {
        # everything partitioned, the experts too: every gather path is exercised
        "zero3": ds_variant(tmp, "zero3_all", "zero3.json", stage3_param_persistence_threshold=0),
        "zero3_offload": ds_variant(tmp, "zero3_offload_all", "zero3_offload.json",
                                    stage3_param_persistence_threshold=0),
        # the shipped layout at the demo's size: experts whole, the base partitioned
        "zero3_whole": ds_variant(tmp, "zero3_whole", "zero3.json", stage3_param_persistence_threshold=3000),
        "fsdp2": "fsdp2_2",
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "run"
    done = run("single", SMALL + EQUAL + ["--train_batch_size", "8", "--output_dir", str(out)], tmp)
    assert done.returncode == 0, explain(done)
    return out


@pytest.fixture(scope="module")
def sharded_runs(modes, tmp_path_factory):
    """ZeRO-3 here with the base's partitions and the optimizer offloaded to the CPU."""
    out = {}
    for backend, mode in (("zero3", modes["zero3_offload"]), ("fsdp2", modes["fsdp2"])):
        tmp = tmp_path_factory.mktemp(backend)
        done = run(mode, SMALL + EQUAL + ["--output_dir", str(tmp / "run")], tmp, timeout=300)
        assert done.returncode == 0, explain(done)
        out[backend] = tmp / "run"
    return out


def sharding_record(run_dir) -> dict:
    return next(r["sharding"] for r in records(run_dir) if "sharding" in r)


def experts(path) -> dict:
    return load_file(str(path / "experts.safetensors"))


def checkpoint_experts(checkpoint, backend: str) -> dict:
    """The backend's own checkpoint of the experts, consolidated: ZeRO-3's fp32 partitions
    (DeepSpeed's zero_to_fp32) or FSDP2's distributed checkpoint (DCP)."""
    if backend == "zero3":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
        return {k.removeprefix("base_model."): v for k, v in state.items()}
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parents[2] / f"{checkpoint.name}-consolidated.pt"  # beside the run dir, not in it
    dcp_to_torch_save(str(checkpoint / "pytorch_model_fsdp_0"), str(target))
    state = torch.load(target, weights_only=False)["model"]
    return {k.removeprefix("base_model."): v for k, v in state.items()}


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_sharded_base_trains_as_one_process_and_exports_its_experts(backend, one_process, sharded_runs):
    sharded = sharded_runs[backend]
    want, got = losses(one_process), losses(sharded)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:  # float tolerance: the same sums, reduced in another order
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])

    # each rank really holds half of the frozen base (measured on its tensors, in bytes)
    record = sharding_record(sharded)
    print(f"{backend}: base held per rank {record['fraction_per_rank']}, loss gap "
          f"{max(abs(got[s] - want[s]) / want[s] for s in want):.1e}")
    assert record["backend"] == backend
    assert all(0.49 < f < 0.51 for f in record["fraction_per_rank"]), record
    assert sum(record["held_bytes_per_rank"]) == pytest.approx(record["base_bytes"], rel=0.01)

    # the portable export (written from gathered experts) is the unsharded model's experts
    mine, single = experts(sharded / "final" / "experts"), experts(one_process / "final" / "experts")
    assert mine.keys() == single.keys()
    for key in single:
        # four Adam steps on gradients summed in another order: a few ulps, amplified where a moment is ~0
        torch.testing.assert_close(mine[key], single[key], rtol=1e-4, atol=1e-5)
    # ... and exactly what the backend checkpointed, which holds the mixture and nothing of the base
    checkpoint = sharded / "checkpoints" / "checkpoint-4"
    saved = checkpoint_experts(checkpoint, backend)
    portable = experts(checkpoint / "portable" / "experts")
    assert {k for k in saved if "lora_" in k or k.startswith("router.gate")} == \
        {k for k in portable if "lora_" in k or k.startswith("router.gate")}
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith("router.") for k in saved), sorted(saved)[:5]
    for key in portable:
        if key in saved:
            assert torch.equal(saved[key].float(), portable[key].float()), key
    adapter = load_file(str(checkpoint / "portable" / "peft_expert_1" / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    r = 8
    assert torch.equal(adapter[f"base_model.model.{name}.lora_A.weight"], portable[f"{name}.lora_A"][r:2 * r])


@pytest.mark.parametrize("backend", ["zero3_whole", "fsdp2"])
def test_sigterm_then_auto_resume_matches_an_uninterrupted_run_bitwise(backend, modes, tmp_path):
    mode, steps = modes[backend], 8
    args = SMALL + (ATTENTION if backend == "zero3_whole" else []) + [
        "--max_steps", str(steps), "--eval_every", "4", "--save_every", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = run(mode, args + ["--output_dir", str(straight)], tmp_path, timeout=300)
    assert done.returncode == 0, explain(done)
    stopped, _ = run_and_interrupt(mode, args + ["--output_dir", str(resumed)], tmp_path, resumed, after_step=3,
                                   timeout=300)
    assert stopped.returncode != 0, explain(stopped)
    assert max(losses(resumed)) < steps, "the run finished before the signal: nothing was tested"
    again = run(mode, args + ["--output_dir", str(resumed), "--resume_from_checkpoint", "auto"], tmp_path, timeout=300)
    assert again.returncode == 0, explain(again)
    want, got = losses(straight), losses(resumed)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # bitwise, every step
    sha = final_record(resumed)["weights_sha256_per_rank"]
    assert sha == final_record(straight)["weights_sha256_per_rank"] and len(set(sha)) == 1 and len(sha) == 2
    record = sharding_record(straight)
    print(f"{backend}: base held per rank {record['fraction_per_rank']}, experts whole {record['experts_whole']}")
    assert all(0.49 < f < 0.51 for f in record["fraction_per_rank"]), record
    # ZeRO-3 keeps the small experts whole (persistence threshold), the base partitioned
    assert record["experts_whole"] is (backend == "zero3_whole")


def old_experts_unchanged(before: dict, after: dict) -> int:
    """How many A/B stacks keep the first experts' slices bitwise (asserts each one does)."""
    checked = 0
    for key, value in before.items():
        if key.endswith("lora_A"):
            assert torch.equal(after[key][: value.shape[0]], value), key
        elif key.endswith("lora_B"):
            assert torch.equal(after[key][:, : value.shape[1]], value), key
        else:
            continue
        checked += 1
    return checked


def test_zero3_growth_and_freezing(modes, sharded_runs, tmp_path):
    """4 experts trained on one family (the ZeRO-3 run above); then a resume that adds
    one (a new phase) and freezes the 4 mature ones, under ZeRO-3 (offload) with every
    expert partitioned. (Novelty growth is tested under DDP in test_dynamic_experts: a run
    resumed from a checkpoint without a novelty library takes its first data as familiar.)"""
    first, second = sharded_runs["zero3"], tmp_path / "second"
    done = run(modes["zero3_offload"], SMALL + BOTH + [
        "--max_steps", "12", "--output_dir", str(second), "--resume_from_checkpoint",
        str(first / "checkpoints" / "checkpoint-4"), "--num_experts", "5", "--freeze_mature_experts"],
        tmp_path, timeout=300)
    assert done.returncode == 0, explain(done)
    assert "grew 4 -> 5 experts" in done.stderr and "optimizer RESET: DeepSpeed ZeRO" in done.stderr
    growth = [r["growth"] for r in records(second) if "growth" in r]
    assert [g["event"] for g in growth] == ["resume"]
    after = experts(second / "final" / "experts")
    assert after["router.gate.weight"].shape[0] == 5
    assert old_experts_unchanged(experts(first / "final" / "experts"), after) == 28  # frozen: bitwise
    assert all(after[k][:, 4 * 8:].abs().sum() > 0 for k in after if k.endswith("lora_B"))  # the new one learnt
    last = [r for r in records(second) if "loss" in r][-1]
    assert last["expert_frozen"][:4] == [True] * 4 and last["expert_grad_norm"][:4] == [0.0] * 4
    assert last["expert_grad_norm"][4] > 0
    assert len(set(final_record(second)["weights_sha256_per_rank"])) == 1


def test_fsdp2_freezing_in_bf16_and_what_it_refuses(sharded_runs, tmp_path):
    checkpoint = sharded_runs["fsdp2"] / "checkpoints" / "checkpoint-4"
    out = tmp_path / "frozen"
    # bf16 as a GPU recipe runs it: autocast, fp32 experts (train/sharding.py after_prepare)
    done = run("fsdp2_2", SMALL + ["--max_steps", "7", "--output_dir", str(out), "--resume_from_checkpoint",
                                   str(checkpoint), "--freeze_mature_experts", "--bf16"], tmp_path, timeout=300)
    assert done.returncode == 0, explain(done)
    before, after = experts(checkpoint / "portable" / "experts"), experts(out / "final" / "experts")
    assert old_experts_unchanged(before, after) == 28  # every expert mature, frozen: bitwise
    assert not torch.equal(before["router.gate.weight"], after["router.gate.weight"])  # the router learns
    assert [r for r in records(out) if "loss" in r][-1]["expert_grad_norm"] == [0.0] * 4

    # a resume that adds an expert: refused in one line once the checkpoint's count is known
    target = tmp_path / "grow"
    done = run("fsdp2_2", SMALL + ["--resume_from_checkpoint", str(checkpoint), "--num_experts", "5", "--max_steps",
                                   "8", "--output_dir", str(target)], tmp_path, timeout=300)
    errors = {line for line in done.stderr.splitlines() if line.startswith("error:")}
    assert done.returncode != 0 and len(errors) == 1, explain(done)
    assert "moe.num_experts: a resume that adds 1 expert(s) cannot run under FSDP2" in errors.pop()
    assert not (target / "metrics.jsonl").exists() and not (target / "checkpoints").exists()
    # started without ACCELERATE_USE_CPU, Accelerate would run each process alone: refused
    e = env(tmp_path)
    e.pop("ACCELERATE_USE_CPU", None)
    done = subprocess.run([str(VENV_BIN / "accelerate"), "launch", "--config_file",
                           str(ROOT / "accelerate_configs" / "fsdp2.yaml"), "--num_processes", "2",
                           "--main_process_port", str(free_port()), "-m", "dylora_moe.train", *SMALL,
                           "--output_dir", str(tmp_path / "alone")], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "ACCELERATE_USE_CPU=true" in done.stderr, explain(done)
    assert not (tmp_path / "alone").exists()


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_a_nonfinite_micro_batch(backend, modes, tmp_path):
    """Skipped and counted, every rank agreeing: ZeRO-3 keeps that micro-batch out of the
    backward (DeepSpeed applies whatever reached its partitions); FSDP2 drops its whole
    window's update at the optimizer step (the loss went through FSDP2's reduce-scatter
    like any other: nothing bypasses it)."""
    from trainrun import CPU_MODES, MODES

    mode, out = modes[backend], tmp_path / "run"
    e = {**env(tmp_path), "PYTHONPATH": str(ROOT)}
    if mode in CPU_MODES:
        e["ACCELERATE_USE_CPU"] = "true"
    done = subprocess.run([str(VENV_BIN / "accelerate"), "launch", *MODES[mode], "--main_process_port",
                           str(free_port()), str(ROOT / "tests" / "poisoned_train.py"), *SMALL, "--max_steps", "3",
                           "--output_dir", str(out)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, explain(done)
    steps = [r for r in records(out) if "loss" in r]
    assert steps[-1]["nonfinite_skipped"] == 1 and all(math.isfinite(r["lm_loss"]) for r in steps)


@pytest.mark.parametrize("backend,overrides,message", [
    ("fsdp2", ["--grow_on_novelty", "--max_experts", "6"], "train.grow_on_novelty cannot run under FSDP2"),
    ("fsdp2", ["--optimizer", "adamw_8bit"], "train.optimizer='adamw_8bit' cannot run under FSDP2"),
    ("zero3", ["--load_in_8bit"], "model.load_in_8bit cannot be sharded under zero3"),
    ("fsdp2", ["--load_in_8bit"], "model.load_in_8bit cannot be sharded under fsdp2"),
    ("fsdp1", [], "fsdp_version 1 is not supported"),
])
def test_what_a_sharded_base_refuses_is_one_line(backend, overrides, message):
    """The checks the loop makes before any data is read (train/sharding.py)."""
    from dylora_moe.train import sharding
    from dylora_moe.recipe import load_recipe

    cfg = load_recipe(str(ROOT / "configs" / "demo.yaml"), overrides)
    with pytest.raises(ValueError) as refused:
        sharding.check_supported(cfg, backend)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    sharding.check_supported(load_recipe(str(ROOT / "configs" / "demo.yaml"), []), backend.replace("1", "2"))
    with pytest.raises(ValueError, match="cannot run under FSDP2"):
        sharding.check_growth("fsdp2", 1)
    sharding.check_growth("zero3", 1)


KMEANS = EQUAL + ["--router_init", "kmeans", "--max_steps", "2", "--save_every", "2", "--eval_every", "2"]


def kmeans_start(done) -> str:
    found = re.findall(r"router initialised from k-means of (\d+ routing units .*cluster sizes \[[^]]*\])",
                       done.stderr)
    assert len(found) == 1, explain(done)
    return found[0]


@pytest.fixture(scope="module")
def kmeans_one_process(tmp_path_factory):
    """The k-means-started run on one process, 1 x 8 rows: (its output, its run dir)."""
    tmp = tmp_path_factory.mktemp("kmeans-single")
    done = run("single", SMALL + KMEANS + ["--train_batch_size", "8", "--output_dir", str(tmp / "one")], tmp)
    assert done.returncode == 0, explain(done)
    return done, tmp / "one"


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_a_kmeans_router_start_under_a_sharded_base_is_the_one_process_start(backend, modes, kmeans_one_process,
                                                                              tmp_path):
    """ZeRO-3 clusters after prepare (its base is only partitions before) and writes the
    rows into the module and the optimizer's master copy; FSDP2 clusters before sharding.
    Both must train from the router one process starts from: a row left in the module
    alone would be overwritten by the master copy at the first step."""
    single, one = kmeans_one_process
    sharded = run(modes[backend], SMALL + KMEANS + ["--output_dir", str(tmp_path / "run")], tmp_path, timeout=300)
    assert sharded.returncode == 0, explain(sharded)
    assert kmeans_start(sharded) == kmeans_start(single)
    want, got = losses(one), losses(tmp_path / "run")
    assert sorted(got) == [1, 2] and all(got[s] == pytest.approx(want[s], rel=1e-5) for s in want)
    mine, reference = experts(tmp_path / "run" / "final" / "experts"), experts(one / "final" / "experts")
    router = [k for k in reference if k.startswith("router.")]
    assert "router.gate.weight" in router
    for key in router:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def quantized_runs(modes, tmp_path_factory):
    """QLoRA with the base split over the processes (NF4 stored in the compute dtype)."""
    out = {}
    for backend in ("zero3", "fsdp2"):
        tmp = tmp_path_factory.mktemp(f"{backend}-4bit")
        args = SMALL + EQUAL + ["--load_in_4bit", "--max_steps", "2", "--save_every", "2", "--eval_every", "2"]
        done = run(modes[backend], args + ["--output_dir", str(tmp / "run")], tmp, timeout=300)
        assert done.returncode == 0, explain(done)
        out[backend] = tmp / "run"
    return out


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_a_4bit_base_is_sharded(backend, quantized_runs, sharded_runs):
    run_dir = quantized_runs[backend]
    record = sharding_record(run_dir)
    assert all(0.49 < f < 0.51 for f in record["fraction_per_rank"]), record
    assert record["base_bytes"] < 0.5 * sharding_record(sharded_runs[backend])["base_bytes"]  # packed 4-bit Linears
    got, full = losses(run_dir), losses(sharded_runs[backend])
    assert got[1] != full[1] and abs(got[1] - full[1]) < 0.05  # a quantized base, close to the full one
    other = losses(quantized_runs["fsdp2" if backend == "zero3" else "zero3"])
    assert all(got[s] == pytest.approx(other[s], rel=1e-5) for s in got)  # both backends: the same training


def test_generation_with_the_base_partitioned_equals_the_unsharded_model(modes, tmp_path):
    """ZeRO-3, every parameter partitioned: both ranks generate in step (synced) and give
    what one process generates with the same base and the exported experts."""
    from trainrun import MODES

    yaml = MODES[modes["zero3"]][1]
    e = env(tmp_path)
    e["DYLORA_TEST_ACCELERATE_CONFIG"] = yaml
    done = subprocess.run([str(VENV_BIN / "accelerate"), "launch", "--config_file", yaml, "--num_processes", "2",
                           "--main_process_port", str(free_port()), str(ROOT / "tests" / "sharded_worker.py"),
                           "--out", str(tmp_path)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, explain(done)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["backend"] == "zero3"
    assert ranks[0]["generated"] == ranks[1]["generated"] == ranks[0]["reference"]
    assert len(ranks[0]["generated"][0]) == 8 + 6
    assert all(r["held"] == pytest.approx(r["total"] / 2, rel=0.01) for r in ranks)
