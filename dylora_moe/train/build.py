"""Everything the loop needs, built from a RunConfig: tokenizer, model, optimizer,
schedule, data loaders. Each builder is small and testable on its own."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import DataCollator, PackingCollator, build_demo_tokenizer
from ..model import DyLoRAMoE
from ..model.quantized import quantization_config
from ..model.tiny import TINY_PREFIX, random_causal_lm, tiny_config
from . import sharding

logger = logging.getLogger(__name__)


def main_first(accelerator, path: Path, create) -> Path:
    """The main process creates `path` (if missing), then every rank may read it."""
    if accelerator.is_main_process and not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        create(tmp)
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return path


def build_tokenizer(cfg, examples, run_dir: Path, accelerator):
    from transformers import AutoTokenizer

    if cfg.model.tokenizer == "demo":
        # Trained on this run's training prompts, saved with the run, reused on resume.
        texts = [ex["prompt"] + ex["answer"] for splits in examples.values() for ex in splits.get("train", [])]
        path = main_first(accelerator, run_dir / "tokenizer",
                          lambda p: build_demo_tokenizer(texts).save_pretrained(p))
        return AutoTokenizer.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels come from lengths, so EOS keeps its label
    return tokenizer


def base_dtype(cfg) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if cfg.train.bf16 else torch.float32
    return getattr(torch, cfg.model.dtype)


def build_base_model(cfg, tokenizer, run_dir: Path, accelerator):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": base_dtype(cfg)}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    name = cfg.model.base_model
    if name.startswith(TINY_PREFIX):
        # A random base is saved in the run so a resumed or evaluated run sees the same one.
        arch = name[len(TINY_PREFIX):]
        config = tiny_config(arch, vocab_size=len(tokenizer), **cfg.model.tiny)
        check_saved_tiny_base(run_dir / "base_model", config, cfg.model.tiny)
        name = str(main_first(accelerator, run_dir / "base_model", lambda p: save_random_base(config, cfg, p, accelerator)))
    bits = 4 if cfg.model.load_in_4bit else 8 if cfg.model.load_in_8bit else 0
    if bits:
        sharded = sharding.zero3_enabled() or sharding.fsdp_requested()
        # Replicated (DDP, ZeRO-2): each process holds the whole quantized base. Sharded:
        # the NF4 weights are stored in the compute dtype, so that ZeRO-3 / FSDP2 can flatten
        # and split them like any other weight (bitsandbytes' quant_storage).
        kwargs["quantization_config"] = quantization_config(
            bits, compute_dtype=kwargs["dtype"], quant_storage=kwargs["dtype"] if sharded else None)
        if not sharding.zero3_enabled():  # transformers refuses a device_map under ZeRO-3
            kwargs["device_map"] = {"": accelerator.device}
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but {name} only {model.get_input_embeddings().num_embeddings}")
    return model


def save_random_base(config, cfg, path: Path, accelerator) -> None:
    """The tiny random base, built and saved by the main process alone."""
    with sharding.built_by_this_process_alone(accelerator):
        random_causal_lm(config, seed=cfg.train.seed).save_pretrained(path)


def check_saved_tiny_base(path: Path, config, tiny: dict) -> None:
    """A run dir's random base is reused as saved: refuse a recipe asking for another shape."""
    if not (path / "config.json").is_file():
        return
    from transformers import AutoConfig

    from .identity import config_sha256

    if config_sha256(AutoConfig.from_pretrained(path)) != config_sha256(config):
        raise ValueError(f"model.tiny={tiny!r}: {path} holds a tiny base of another architecture or shape (this "
                         "run was started with other model settings); use the recipe it was started with, or "
                         "another --output_dir")


def build_moe(cfg, base) -> DyLoRAMoE:
    moe = DyLoRAMoE(base, cfg.moe)
    if cfg.model.gradient_checkpointing:
        moe.gradient_checkpointing_enable()
    if cfg.model.compile:
        logger.info("torch.compile: %d decoder blocks (compiled on first use)", moe.compile_base())
    return moe


def check_optimizer(cfg, deepspeed: bool) -> None:
    """ZeRO partitions (and with offload, runs) the optimizer itself, in fp32: an 8-bit
    bitsandbytes optimizer cannot live there. Checked before any model is loaded."""
    if deepspeed and cfg.train.optimizer != "adamw":
        raise ValueError(f"train.optimizer={cfg.train.optimizer!r} cannot run under DeepSpeed ZeRO (it shards and, "
                         "with offload, runs the optimizer itself); use adamw there, or an accelerate config "
                         "without DeepSpeed (single_gpu, multi_gpu) for 8-bit optimizers")


def build_optimizer(moe, cfg, cpu_offload: bool):
    params = moe.trainable_parameters()
    t = cfg.train
    if t.optimizer != "adamw":
        # bitsandbytes keeps the Adam moments in 8 bits (about a quarter of the memory);
        # the paged variant can spill them to CPU memory under GPU memory pressure.
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(f"train.optimizer={t.optimizer!r} needs bitsandbytes (pip install bitsandbytes)") from None
        cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    if cpu_offload:
        # ZeRO offload runs the update on the CPU: DeepSpeed's vectorised CPU Adam. We
        # create it ourselves (zero_force_ds_cpu_optimizer: false in the DS json) so our
        # LR scheduler drives the optimizer DeepSpeed really steps (the frozen-LR trap).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                             weight_decay=t.weight_decay)


def build_scheduler(optimizer, cfg, total_steps: int):
    """transformers' schedules, stepped by the loop once per optimizer step (not handed
    to accelerator.prepare, which steps once per process and so decays N times faster)."""
    from transformers import get_scheduler

    t = cfg.train
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total_steps)
    specific = {"num_cycles": t.cosine_restarts + 1} if t.lr_scheduler == "cosine_with_restarts" else {}
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=specific)


def build_loaders(cfg, bundle, tokenizer):
    """Train loader (shuffled, with its own seeded generator: creating an iterator must
    not draw from the global RNG, or dropout masks shift after a resume) and one eval
    loader per source."""
    t, d = cfg.train, cfg.data
    # Evaluation scores the answers only, whatever the training objective (losses stay
    # comparable across recipes); data.train_on_prompt decides the training labels.
    collate = DataCollator(tokenizer.pad_token_id)
    train_collate = (PackingCollator(tokenizer.pad_token_id, d.max_seq_length, train_on_prompt=d.train_on_prompt)
                     if d.packing else DataCollator(tokenizer.pad_token_id, train_on_prompt=d.train_on_prompt))
    columns = ["input_ids", "prompt_len", "source_id"]
    train = DataLoader(bundle.train.select_columns(columns), batch_size=t.train_batch_size, shuffle=True,
                       collate_fn=train_collate, num_workers=t.dataloader_num_workers,
                       generator=torch.Generator().manual_seed(t.seed))
    evals = {name: DataLoader(ds.select_columns(columns), batch_size=t.eval_batch_size, collate_fn=collate,
                              generator=torch.Generator().manual_seed(t.seed))
             for name, ds in bundle.validation.items()}
    return train, evals

