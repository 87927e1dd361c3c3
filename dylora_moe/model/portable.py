"""The portable folder a run hands its user (final/, and portable/ inside each checkpoint)."""
from __future__ import annotations

from pathlib import Path


def write_portable(moe, tokenizer, cfg, out_dir) -> None:
    """What a user takes away: experts + router + config, each expert as a PEFT adapter,
    the tokenizer and the recipe. The base model is referenced, never copied."""
    out_dir = Path(out_dir)
    moe.save_pretrained(out_dir / "experts")
    for i in range(moe.config.num_experts):
        moe.export_expert(i, out_dir / f"peft_expert_{i}")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    cfg.save(out_dir / "recipe.yaml")  # any recipe object with save(path): the model layer knows no recipes
