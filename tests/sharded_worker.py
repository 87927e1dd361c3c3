"""Launched by tests/test_sharding.py under `accelerate launch` (2 CPU processes, ZeRO-3 or
FSDP2): a tiny base sharded for real, two training steps (their peak memory measured),
then generation with the base still partitioned. Rank 0 also generates with an unsharded
copy (the same base and the experts as exported) to compare. Writes OUT/rank<r>.json."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

SHAPE = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
BATCH, SEQ = 2, 64
PROMPT = [[5, 17, 99, 3, 250, 41, 7, 12]]


def batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :16] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def resident_bytes(model) -> int:
    """What this process holds of the model before the steps: local shards (FSDP2), or
    the partition plus whatever DeepSpeed keeps whole (ZeRO-3), or everything."""
    from dylora_moe.train.sharding import is_dtensor

    total = 0
    for p in model.parameters():
        if is_dtensor(p):
            local = p.to_local()
        elif hasattr(p, "ds_tensor"):
            local = p.ds_tensor
        else:
            local = p
        total += local.numel() * local.element_size()
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from transformers import AutoModelForCausalLM

    from dylora_moe import DyLoRAMoE, plan
    from dylora_moe.model.config import MoEConfig
    from dylora_moe.model.tiny import random_causal_lm, tiny_config
    from dylora_moe.train import sharding
    from dylora_moe.recipe import load_recipe

    hf_config = tiny_config("llama", num_kv_heads=2, **SHAPE)
    # The plan first: its meta model must not be built inside ZeRO-3's zero.Init (the
    # training CLI plans before the accelerator exists, too).
    cfg = load_recipe(None, ["--base_model", "tiny-random:llama", "--num_experts", "4", "--lora_r", "8",
                             "--lora_dropout", "0", "--loss_chunk_tokens", "0", "--train_batch_size", str(BATCH),
                             "--max_seq_length", str(SEQ)])
    shape = plan.model_shape(hf_config, cfg.moe)
    config_file = Path(os.environ["DYLORA_TEST_ACCELERATE_CONFIG"])
    strategy = plan.strategy_of_config(config_file, processes=int(os.environ["WORLD_SIZE"]))
    estimate = plan.estimate(shape, plan.step_of(cfg, device="cpu"), strategy)

    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    sharding.enable_fsdp_on_cpu(acc)
    backend = sharding.kind(acc)
    if acc.is_main_process:
        with sharding.built_by_this_process_alone(acc):
            random_causal_lm(hf_config, seed=0).save_pretrained(out / "base")
    acc.wait_for_everyone()
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)  # ZeRO-3: partitioned as it loads
    moe_cfg = MoEConfig(num_experts=4, lora_r=8, lora_alpha=16, lora_dropout=0.0, loss_chunk_tokens=0)
    torch.manual_seed(0)
    moe = DyLoRAMoE(base, moe_cfg)
    sharding.prepare_model(moe, acc, backend)
    optimizer = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-2)
    if backend == sharding.ZERO3:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=BATCH, gradient_accumulation_steps=1, gradient_clipping=1.0)
        ds["train_batch_size"] = BATCH * acc.num_processes
    model, optimizer = acc.prepare(moe, optimizer)
    model.train()
    held, total = sharding.held_base_bytes(moe)
    resident = resident_bytes(moe)

    data = batch(SHAPE["vocab_size"])

    def steps():
        for _ in range(2):
            out_ = model(**data)
            acc.backward(out_.loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del out_

    measured = plan.measured_cpu_peak(steps) if backend == sharding.FSDP2 else None
    if measured is None:
        steps()

    with sharding.full_experts(acc, moe):
        if acc.is_main_process:
            moe.save_pretrained(out / "experts")
    acc.wait_for_everyone()
    model.eval()
    prompt = torch.tensor(PROMPT)
    with sharding.generation(acc, model):
        generated = moe.generate(prompt, max_new_tokens=6, do_sample=False, synced_gpus=True).tolist()
    result = {"backend": backend, "held": held, "total": total, "resident_bytes": resident, "measured": measured,
              "estimate": estimate.peak_bytes, "components": {c.key: c.bytes for c in estimate.components},
              "generated": generated}
    if acc.is_main_process:
        with sharding.built_by_this_process_alone(acc):  # and generate alone: no synced_gpus
            plain = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
            reference = DyLoRAMoE.from_pretrained(plain, out / "experts")
            result["reference"] = reference.generate(prompt, max_new_tokens=6, do_sample=False,
                                                     synced_gpus=False).tolist()
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    from dylora_moe.train.cli import exit_process

    main()
    exit_process(0)  # as `python -m dylora_moe.train` ends: gloo's threads can abort a plain teardown
