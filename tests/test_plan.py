"""`dylora-moe plan`: the estimate against the measured peak of real training steps, and
the command's output on the shipped recipes (offline, structured --json)."""
import json

import pytest
import torch

from dylora_moe import DyLoRAMoE, plan
from dylora_moe.model.tiny import random_causal_lm, tiny_config
from dylora_moe.recipe import load_recipe

RECIPE = "configs/codegemma-2b.yaml"
# Small enough for a CPU, shaped so that activations and logits dominate the peak.
SHAPE = dict(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)
BATCH, SEQ = 8, 256


def padded_batch(vocab: int, prompt: int = 16) -> dict:
    """Rows of SEQ tokens, some right-padded, labels -100 on the prompt and padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for i in range(BATCH):
        if (i * 7) % 24:
            mask[i, -((i * 7) % 24):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def train_steps(hf_config, cfg, batch, steps: int = 2) -> None:
    """What the loop does on one CPU process: build, then forward + backward + AdamW
    step, twice (the second step runs with the optimizer states in memory). The output
    stays alive through the backward, as in the loop."""
    torch.manual_seed(0)
    moe = DyLoRAMoE(random_causal_lm(hf_config), cfg.moe)
    if cfg.model.gradient_checkpointing:
        moe.gradient_checkpointing_enable()
    moe.train()
    optimizer = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-3)
    for _ in range(steps):
        out = moe(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out


@pytest.mark.parametrize("arch,kv_heads,overrides", [
    ("gemma", 1, ["--loss_chunk_tokens", "0"]),
    ("gemma", 1, ["--loss_chunk_tokens", "256"]),
    ("gemma", 1, ["--loss_chunk_tokens", "0", "--gradient_checkpointing"]),
    ("gemma", 1, ["--loss_chunk_tokens", "256", "--gradient_checkpointing"]),
    # grouped KV (k/v repeated), no dropout (inputs shared by q/k/v), token routing, MLP targets
    ("llama", 2, ["--loss_chunk_tokens", "0", "--lora_dropout", "0", "--routing", "token",
                  "--target_modules", "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]),
])
def test_estimate_matches_measured_peak_of_a_training_step(arch, kv_heads, overrides):
    cfg = load_recipe(None, ["--base_model", f"tiny-random:{arch}", "--num_experts", "4", "--lora_r", "8",
                             "--lora_dropout", "0.05", "--train_batch_size", str(BATCH),
                             "--max_seq_length", str(SEQ)] + overrides)
    hf_config = tiny_config(arch, num_kv_heads=kv_heads, **SHAPE)
    shape = plan.model_shape(hf_config, cfg.moe)
    estimate = plan.estimate(shape, plan.step_of(cfg, device="cpu"), plan.Strategy("cpu", "single"))

    measured = plan.measured_cpu_peak(lambda: train_steps(hf_config, cfg, padded_batch(SHAPE["vocab_size"])))

    dynamic = sum(c.bytes for c in estimate.components if c.in_peak and c.key in ("activations", "logits", "backward"))
    assert dynamic > 0.8 * estimate.peak_bytes  # the formulas under test carry the peak
    ratio = estimate.peak_bytes / measured
    print(f"{arch} {overrides}: measured {measured / 2**20:.1f} MiB, estimated {estimate.peak_bytes / 2**20:.1f} "
          f"MiB ({ratio:.3f})")
    assert 0.75 <= ratio <= 1.25, (measured, {c.key: c.bytes for c in estimate.components})


def run_plan(capsys, *args) -> dict:
    assert plan.main(["--config", RECIPE, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_codegemma_recipe_plans_offline(capsys):
    report = run_plan(capsys)
    assert report["model"]["base_model"] == "google/codegemma-2b"
    assert report["model"]["num_layers"] == 18 and report["model"]["vocab"] == 256000
    assert 2.4e9 < report["model"]["base_params"] < 2.6e9  # tied embeddings counted once
    assert report["step"]["batch"] == 2 and report["step"]["seq"] == 1024
    configs = report["configs"]
    assert set(configs) == set(plan.SHIPPED)
    # offload moves the optimizer states to the CPU; ZeRO adds its reduce buckets
    assert configs["zero2_offload"]["components"]["optimizer"]["where"] == "cpu"
    assert configs["zero2"]["components"]["optimizer"]["where"] == "gpu"
    assert configs["zero2_offload"]["cpu_gib"] > 0 == configs["zero2"]["cpu_gib"]
    assert configs["zero2_offload"]["gpu_peak_gib"] < configs["zero2"]["gpu_peak_gib"]
    for name, config in configs.items():
        in_peak = sum(c["gib"] for c in config["components"].values() if c["in_peak"] and c["where"] == "gpu")
        assert config["gpu_peak_gib"] == pytest.approx(in_peak, abs=0.01)
    for gpu in report["gpus"].values():
        for name, verdict in gpu["configs"].items():
            assert verdict["fits"] == (configs[name]["gpu_peak_gib"] <= gpu["total_gib"] + 0.01)
            assert verdict["fits"] == (verdict["max_micro_batch"] >= report["step"]["batch"])


def test_plan_follows_the_recipe(capsys):
    bf16 = run_plan(capsys)["configs"]["single_gpu"]
    nf4 = run_plan(capsys, "--load_in_4bit")["configs"]["single_gpu"]
    assert nf4["components"]["base"]["gib"] < 0.5 * bf16["components"]["base"]["gib"]
    assert nf4["gpu_peak_gib"] < bf16["gpu_peak_gib"]
    checkpointed = run_plan(capsys, "--gradient_checkpointing")["configs"]["single_gpu"]
    assert checkpointed["components"]["activations"]["gib"] < 0.2 * bf16["components"]["activations"]["gib"]
    plain = run_plan(capsys, "--loss_chunk_tokens", "0")["configs"]["single_gpu"]
    assert plain["components"]["logits"]["gib"] > bf16["components"]["logits"]["gib"]
    from dylora_moe.recipe import TrainConfig

    if hasattr(TrainConfig, "grow_on_novelty"):  # a growing run is planned at its largest
        grown = run_plan(capsys, "--grow_on_novelty", "--max_experts", "12")
        assert grown["step"]["num_experts"] == 12
        assert grown["model"]["expert_params"] == pytest.approx(3 * run_plan(capsys)["model"]["expert_params"])
    sharded = run_plan(capsys, "--num_processes", "8")["configs"]["zero2"]
    single = run_plan(capsys)["configs"]["zero2"]
    assert sharded["components"]["optimizer"]["gib"] == pytest.approx(single["components"]["optimizer"]["gib"] / 8,
                                                                      rel=0.05)


def test_4bit_eight_experts_on_an_l4(capsys):
    report = run_plan(capsys, "--load_in_4bit", "--num_experts", "8", "--gpu", "L4")
    assert list(report["gpus"]) == ["L4-24GB"]
    assert report["step"]["quant"] == "4bit" and report["step"]["num_experts"] == 8
    l4 = report["gpus"]["L4-24GB"]
    for name, verdict in l4["configs"].items():
        peak = report["configs"][name]["gpu_peak_gib"]
        assert verdict["fits"] == (peak <= l4["total_gib"])
        assert verdict["headroom_gib"] == pytest.approx(l4["total_gib"] - peak, abs=0.02)
    # a micro-batch far beyond the largest that fits does not fit
    biggest = l4["configs"]["single_gpu"]["max_micro_batch"]
    assert biggest >= 1
    over = run_plan(capsys, "--load_in_4bit", "--num_experts", "8", "--gpu", "L4",
                    "--train_batch_size", str(biggest + 1))
    assert over["gpus"]["L4-24GB"]["configs"]["single_gpu"]["fits"] is False


def test_text_output(capsys):
    assert plan.main(["--config", RECIPE, "--gpu", "H100"]) == 0
    text = capsys.readouterr().out
    assert "activations saved for backward" in text and "H100-80GB" in text and "A100-40GB" not in text
    assert "zero2_offload" in text and "peak" in text


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/nope.yaml"], "configs/nope.yaml"),
    (["--config", RECIPE, "--num_experts", "0"], "num_experts"),
    (["--config", RECIPE, "--no_such_field", "1"], "--no_such_field"),
    (["--config", RECIPE, "--gpu", "V100"], "--gpu"),
    (["--config", RECIPE, "--base_model", "tiny-random:nope"], "tiny-random"),
])
def test_bad_input_is_a_one_line_error(args, message, capsys):
    assert plan.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_warnings_before_launch(monkeypatch, caplog):
    cfg = load_recipe(RECIPE, ["--train_batch_size", "64"])
    single = plan.strategy_named("single_gpu")
    assert plan.fit_warning(cfg, 1000 * 2**30, "big GPU", single) is None
    warning = plan.fit_warning(cfg, 24 * 2**30, "small GPU", single)
    assert "small GPU" in warning and "--train_batch_size" in warning and "\n" not in warning

    # what `accelerate launch` sets tells the training process its strategy
    offload = plan.strategy_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "8",
                                      "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(plan.ROOT / "ds_configs/zero2_offload.json")})
    assert (offload.kind, offload.offload, offload.processes, offload.buckets) == ("zero2", True, 8, 2)
    assert plan.strategy_from_env({}).name == "single_gpu"
    assert plan.strategy_from_env({"WORLD_SIZE": "2"}).kind == "ddp"

    # the training CLI plans only where there is a GPU
    from dylora_moe.train import cli as train_cli

    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=24 * 2**30, name="a 24 GiB GPU"))
    with caplog.at_level("WARNING", logger="dylora_moe.train"):
        train_cli.warn_if_plan_exceeds_gpu(cfg)
    assert "a 24 GiB GPU" in caplog.text and "single_gpu" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(plan, "fit_warning", lambda *a: pytest.fail("planned on a CPU-only run"))
    train_cli.warn_if_plan_exceeds_gpu(cfg)


def test_vertex_dry_run_warns_when_the_plan_does_not_fit(capsys):
    from dylora_moe.vertex import submit

    args = ["--project", "p", "--region", "us-central1", "--image", "us-central1-docker.pkg.dev/p/r/i:1",
            "--base_output_dir", "gs://b/run", "--machine", "a2-highgpu-1g", "--dry-run", "--config", RECIPE]
    assert submit.main(args) == 0
    captured = capsys.readouterr()
    assert "memory plan" not in captured.err
    assert submit.main(args + ["--", "--train_batch_size", "64", "--loss_chunk_tokens", "0"]) == 0
    captured = capsys.readouterr()
    assert "warning: memory plan" in captured.err and "A100-40GB" in captured.err
    json.loads(captured.out)  # stdout is still the job spec alone


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_weights_match_bitsandbytes(bits, tmp_path):
    """The base component against a base really loaded through bitsandbytes: every
    parameter, buffer and quantization state (absmax, codes, scales) it holds."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from dylora_moe.model.quantized import quantization_config

    hf_config = tiny_config("llama", vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=1024)
    random_causal_lm(hf_config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                quantization_config=quantization_config(bits, torch.bfloat16))
    held = {}

    def add(t):
        if torch.is_tensor(t):
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*base.parameters(), *base.buffers()]:
        add(t)
    for module in base.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, *((state.state2.absmax, state.state2.code) if state.state2 else ())):
                add(t)
        add(getattr(weight, "SCB", None))
    cfg = load_recipe(None, [f"--load_in_{bits}bit", "--bf16"])
    estimated = plan.base_weights(plan.model_shape(hf_config, cfg.moe), plan.step_of(cfg)).bytes
    assert estimated == pytest.approx(sum(held.values()), rel=0.05)


# ---------------------------------------------------------------------------- a sharded base
def test_estimate_matches_measured_peak_of_a_sharded_step(tmp_path):
    """FSDP2 on 2 CPU processes (gloo): what rank 0 holds of the model before two real
    training steps plus their measured peak, against the plan's fsdp2 estimate (its base
    shard, the gathered root and blocks, sharded expert states, activations, logits).
    The same run generates with the base still sharded (tests/sharded_worker.py)."""
    import subprocess

    from trainrun import ROOT, VENV_BIN, env, explain, free_port

    config = ROOT / "accelerate_configs" / "fsdp2.yaml"
    e = {**env(tmp_path), "ACCELERATE_USE_CPU": "true", "DYLORA_TEST_ACCELERATE_CONFIG": str(config)}
    done = subprocess.run([str(VENV_BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes",
                           "2", "--main_process_port", str(free_port()), str(ROOT / "tests" / "sharded_worker.py"),
                           "--out", str(tmp_path)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, explain(done)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["backend"] == "fsdp2" and result["held"] == pytest.approx(result["total"] / 2, rel=0.01)
    measured = result["resident_bytes"] + result["measured"]
    estimate, parts = result["estimate"], result["components"]
    assert parts["base"] + parts["gathered"] > 0.3 * estimate  # the sharded terms carry a good part of it
    ratio = estimate / measured
    print(f"fsdp2, 2 processes: measured {measured / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB ({ratio:.3f})")
    assert 0.75 <= ratio <= 1.25, (measured, parts)
    assert result["generated"] == result["reference"]  # generation with the base sharded


def plan_of(capsys, recipe, *args) -> dict:
    assert plan.main(["--config", recipe, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_sharded_configs_divide_the_base_and_the_recipes_fit_their_machines(capsys):
    report = plan_of(capsys, "configs/codegemma-7b.yaml", "--num_processes", "8")
    configs = report["configs"]
    whole = configs["multi_gpu"]["components"]["base"]["gib"]
    for name in ("zero3", "fsdp2", "zero3_offload"):
        parts = configs[name]["components"]
        assert parts["base"]["gib"] == pytest.approx(whole / 8, rel=0.02), name  # norms stay whole under ZeRO-3
        assert 0 < parts["gathered"]["gib"] < whole / 4, name  # a few blocks and the embeddings, not the base
    assert configs["zero3_offload"]["components"]["base"]["where"] == "cpu"
    # CodeGemma-7B, 4 x 1024 without checkpointing: only a sharded base fits an A100 40 GB
    a100 = report["gpus"]["A100-40GB"]
    assert a100["recommended"] == "zero3"
    assert not any(a100["configs"][n]["fits"] for n in ("single_gpu", "multi_gpu", "zero2", "zero2_offload"))
    # StarCoder2-15B at 4 bits on 2 x L4: sharded by FSDP2 (the recipe's config), not replicated
    report = plan_of(capsys, "configs/starcoder2-15b-qlora.yaml", "--num_processes", "2", "--gpu", "L4")
    l4 = report["gpus"]["L4-24GB"]["configs"]
    assert l4["fsdp2"]["fits"] and not l4["multi_gpu"]["fits"] and not l4["zero2"]["fits"]
    assert report["configs"]["fsdp2"]["components"]["base"]["label"].startswith("base weights, 1/2 partition (NF4")
    # CodeLlama-34B: the base alone (63 GiB in bf16) is past an A100 40 GB unless sharded
    report = plan_of(capsys, "configs/codegemma-7b.yaml", "--base_model", "codellama/CodeLlama-34b-hf",
                     "--gradient_checkpointing", "--num_processes", "8")
    assert report["configs"]["multi_gpu"]["components"]["base"]["gib"] > 60
    a100 = report["gpus"]["A100-40GB"]
    assert a100["recommended"] == "zero3" and not a100["configs"]["multi_gpu"]["fits"]


def test_zero3_keeps_the_experts_whole_and_partitions_every_base_linear():
    """The shipped stage3_param_persistence_threshold sits between the largest expert
    tensor of the shipped recipes' mixtures (up to 8 experts of rank 16) and the smallest
    Linear weight of the 7B-34B bases: experts stay whole on every GPU, no base Linear does."""
    from dylora_moe.model.config import MoEConfig
    from dylora_moe.model.hub_configs import known_configs

    for config_file in ("zero3.json", "zero3_offload.json"):
        zero = json.loads((plan.ROOT / "ds_configs" / config_file).read_text())["zero_optimization"]
        threshold = zero["stage3_param_persistence_threshold"]
        for name in ("google/codegemma-7b", "bigcode/starcoder2-15b", "codellama/CodeLlama-34b-hf"):
            shape = plan.model_shape(known_configs()[name](), MoEConfig(num_experts=8, lora_r=16), name)
            linears = [l.in_features * l.out_features for l in shape.layer_linears]
            assert max(shape.expert_param_sizes) <= threshold < min(linears), (config_file, name)


def test_the_running_job_knows_its_sharded_strategy():
    zero3 = plan.strategy_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "4",
                                    "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(plan.ROOT / "ds_configs/zero3_offload.json")})
    assert (zero3.name, zero3.kind, zero3.offload, zero3.offload_params, zero3.processes) == \
        ("zero3_offload", "zero3", True, True, 4)
    fsdp = plan.strategy_from_env({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"})
    assert (fsdp.kind, fsdp.processes, fsdp.sharded) == ("fsdp2", 2, True)
