"""Load a trained mixture from what training wrote: a run dir, one of its checkpoints,
or a portable folder (final/, checkpoint-N/portable/)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import UserError
from ..model import DyLoRAMoE, gguf
from ..model.quantized import quantization_config
from ..recipe import base_files, load_recipe


@dataclass
class Loaded:
    moe: DyLoRAMoE
    tokenizer: object
    source: Path          # the portable folder the experts came from
    weights_sha256: str   # hash of exactly the expert + router weights loaded
    recipe: Optional[object] = None  # the RunConfig saved with the experts (None if the folder has none)


def portable_dir(path) -> Path:
    """run dir -> run/final (else its latest checkpoint); checkpoint -> its portable/."""
    path = Path(path)
    candidates = [path, path / "portable", path / "final"]
    if (path / "checkpoints").is_dir():
        from ..checkpoint import latest_checkpoint

        latest = latest_checkpoint(path / "checkpoints")
        if latest is not None:
            candidates.append(latest / "portable")
    for c in candidates:
        if (c / "experts" / "moe_config.json").is_file():
            return c
    raise FileNotFoundError(f"{path}: no trained experts found (expected a run dir, a checkpoint, or a folder "
                            "with experts/moe_config.json)")


def load_run(path, base_model=None, dtype=None) -> Loaded:
    """The base comes from `base_model` (an object or a hub id/path), else from the run:
    a tiny random base saved in the run dir, or the recipe's model.base_model."""
    src = portable_dir(path)
    if not (src / "tokenizer").is_dir():  # before any base is loaded; transformers would blame a "repo id"
        raise FileNotFoundError(f"{src / 'tokenizer'}: no such folder; a portable folder holds experts/, tokenizer/ "
                                "and recipe.yaml as training wrote them (copy the run's tokenizer/ there)")
    recipe = load_recipe(str(src / "recipe.yaml")) if (src / "recipe.yaml").is_file() else None
    if base_model is None or isinstance(base_model, (str, Path)):
        name = base_model or _base_from_run(src, recipe)
        # The run's GGUF file, unless another base was named.
        files = base_files(recipe.model) if recipe is not None and base_model is None else {}
        where, kwargs = gguf.location(name, files.get("gguf_file"), dtype or torch.float32)
        base_model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, **kwargs,
                                                          **_quantization_kwargs(recipe, dtype or torch.float32))
        if files and not kwargs:
            gguf.name_source(base_model, name, files["gguf_file"])
    moe = DyLoRAMoE.from_pretrained(base_model, src / "experts")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src / "tokenizer")
    except (OSError, ValueError) as e:  # an empty or damaged folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{src / 'tokenizer'}: not a readable tokenizer ({first})") from None
    return Loaded(moe=moe.eval(), tokenizer=tokenizer, source=src, weights_sha256=weights_hash(moe), recipe=recipe)


def _quantization_kwargs(recipe, compute_dtype) -> dict:
    """A run trained on a 4/8-bit base is evaluated on the same quantized base: its
    experts learned to correct exactly those weights."""
    if recipe is None or not (recipe.model.load_in_4bit or recipe.model.load_in_8bit):
        return {}


    bits = 4 if recipe.model.load_in_4bit else 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization_config(bits, compute_dtype), "device_map": {"": device}}


def local_base(src: Path):
    """The tiny random base a run saved beside its outputs (base_model/), or None."""
    for parent in (src, *src.parents):
        if (parent / "base_model" / "config.json").is_file():
            return parent / "base_model"
    return None


def _base_from_run(src: Path, recipe) -> str:
    base = local_base(src)
    if base is not None:
        return str(base)
    if recipe is None or recipe.model.base_model.startswith("tiny-random:"):
        raise FileNotFoundError(f"{src}: cannot find the base model; pass --base_model")
    return recipe.model.base_model


def weights_hash(moe: DyLoRAMoE) -> str:
    """sha256 over the expert and router tensors (names and bytes), in a fixed order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(moe.expert_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
