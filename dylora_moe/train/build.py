"""Everything the loop needs, built from a RunConfig: tokenizer, model, optimizer,
data loaders (the schedule: schedule.py). Each builder is small and testable on its own."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..data import build_demo_tokenizer
from ..data.loaders import eval_loaders, train_loader
from ..errors import UserError
from ..model import DyLoRAMoE, gguf
from ..model.quantized import quantization_config
from ..model.tiny import TINY_PREFIX, random_causal_lm, tiny_config
from ..recipe import base_dtype
from . import sharding
from .identity import config_sha256

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
    if cfg.model.tokenizer == "demo":
        # Trained on this run's training prompts, saved with the run, reused on resume.
        texts = [ex["prompt"] + ex["answer"] for splits in examples.values() for ex in splits.get("train", [])]
        path = main_first(accelerator, run_dir / "tokenizer",
                          lambda p: build_demo_tokenizer(texts).save_pretrained(p))
        return AutoTokenizer.from_pretrained(path)
    if cfg.model.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    else:
        name, files = base_location(cfg)
        tokenizer = AutoTokenizer.from_pretrained(name, **files)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels come from lengths, so EOS keeps its label
    return tokenizer


def base_location(cfg) -> tuple[str, dict]:
    """Where from_pretrained reads the base: for a GGUF base the copy dequantized on
    first use (model/gguf.py: a minute saved per load)."""
    return gguf.location(cfg.model.base_model, cfg.model.gguf_file, base_dtype(cfg))


def build_base_model(cfg, tokenizer, run_dir: Path, accelerator):
    name, files = base_location(cfg)
    kwargs = {"dtype": base_dtype(cfg), **files}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
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
    if cfg.model.gguf_file and not files:
        gguf.name_source(model, cfg.model.base_model, cfg.model.gguf_file)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but {name} only {model.get_input_embeddings().num_embeddings}")
    return model


def save_random_base(config, cfg, path: Path, accelerator) -> None:
    """The tiny random base, built and saved by the main process alone."""
    with sharding.built_by_this_process_alone(accelerator):
        random_causal_lm(config, seed=cfg.train.seed).save_pretrained(path)


def check_saved_tiny_base(path: Path, config, tiny: dict) -> None:
    """A run dir's random base is reused as saved: refuse a recipe asking for another shape."""
    if not (path / "config.json").is_file():
        return


    if config_sha256(AutoConfig.from_pretrained(path)) != config_sha256(config):
        raise UserError(f"model.tiny={tiny!r}: {path} holds a tiny base of another architecture or shape (this "
                        "run was started with other model settings); use the recipe it was started with, or "
                        "another --output_dir")


def build_moe(cfg, base) -> DyLoRAMoE:
    # The model's own copy of the moe section: growth changes the model's (num_experts,
    # extra), and the recipe object must not change under whoever else reads it.
    moe = DyLoRAMoE(base, copy.deepcopy(cfg.moe))
    if cfg.model.gradient_checkpointing:
        moe.gradient_checkpointing_enable()
    if cfg.model.compile:
        logger.info("torch.compile: %d decoder blocks (compiled on first use)", moe.compile_base())
    return moe


def check_optimizer(cfg, deepspeed: bool) -> None:
    """ZeRO partitions (and with offload, runs) the optimizer itself, in fp32: an 8-bit
    bitsandbytes optimizer cannot live there. Checked before any model is loaded."""
    if deepspeed and cfg.train.optimizer != "adamw":
        raise UserError(f"train.optimizer={cfg.train.optimizer!r} cannot run under DeepSpeed ZeRO (it shards and, "
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
            raise UserError(f"train.optimizer={t.optimizer!r} needs bitsandbytes (pip install bitsandbytes)") from None
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


def build_loaders(cfg, bundle, tokenizer):
    """The training loader and one validation loader per source."""
    t = cfg.train
    train = train_loader(bundle.train, tokenizer.pad_token_id, cfg.data, t.train_batch_size, t.seed,
                         t.dataloader_num_workers)
    return train, eval_loaders(bundle.validation, tokenizer.pad_token_id, t.eval_batch_size, t.seed)

