"""What a checkpoint's experts were trained on, and whether a resume matches it.

Each checkpoint marker records the base model (its name and a hash of its config: the
architecture and every size) and the experts' shapes (lora_r, the layers they sit on).
Experts loaded onto another base either fail deep in load_state with a size mismatch
or, on a base of the same shape, load and silently train something else. A resume is
checked against the record first and refused in one line. More experts than saved is
not a mismatch: that is growth (growth.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..errors import UserError
from ..model.inject import describe_targets

logger = logging.getLogger(__name__)
# Not part of what the model is: where it was loaded from, versions, runtime switches.
# Dropout is left out too: a random tiny base is saved with its dropout zeroed.
VOLATILE_KEYS = {"transformers_version", "torch_dtype", "dtype", "use_cache", "quantization_config",
                 "output_attentions", "output_hidden_states", "return_dict", "torchscript", "architectures",
                 "attn_implementation"}


def config_sha256(hf_config) -> str:
    values = {k: v for k, v in hf_config.to_dict().items()
              if not k.startswith("_") and k not in VOLATILE_KEYS and "dropout" not in k and "pdrop" not in k}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def names_sha256(names) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def record(base_name: str, hf_config, moe) -> dict:
    """What goes into every checkpoint marker of this run."""
    names = list(moe.experts)
    return {"base": {"name": base_name, "config_sha256": config_sha256(hf_config)},
            "experts": {"num_experts": moe.config.num_experts, "lora_r": moe.config.lora_r,
                        "targets": describe_targets(names), "targets_sha256": names_sha256(names)}}


def check_resume(checkpoint: Path, marker: dict, base_name: str, hf_config, saved_moe, lora_r: int,
                 target_names: list[str]) -> None:
    """Refuse, in one line, a resume whose base or expert shapes differ from the checkpoint's.
    saved_moe: the checkpoint's MoEConfig (its target_modules are the exact layer names)."""
    where = f"train.resume_from_checkpoint={str(checkpoint)!r}"
    saved_base = marker.get("base") or {}
    if saved_base.get("config_sha256") and saved_base["config_sha256"] != config_sha256(hf_config):
        raise UserError(f"{where}: its experts were trained on base {saved_base.get('name')!r} (config sha256 "
                        f"{saved_base['config_sha256'][:12]}), this recipe loads {base_name!r} (config sha256 "
                        f"{config_sha256(hf_config)[:12]}); resume with the base it was trained on")
    if saved_base.get("name") and saved_base["name"] != base_name:
        logger.warning("%s was trained on base %r; this recipe names %r, with the same config: resuming on it",
                       checkpoint, saved_base["name"], base_name)
    if saved_moe.lora_r != lora_r:
        raise UserError(f"moe.lora_r={lora_r}: the experts of {checkpoint} have lora_r={saved_moe.lora_r}; "
                        f"resume with --lora_r {saved_moe.lora_r}")
    saved_names = list(saved_moe.target_modules or [])
    if saved_names and sorted(saved_names) != sorted(target_names):
        leaves = sorted({n.rsplit(".", 1)[-1] for n in saved_names})
        raise UserError(f"moe.target_modules: this recipe puts experts on {describe_targets(target_names)}, those "
                        f"of {checkpoint} are on {describe_targets(saved_names)}; resume with --target_modules "
                        f"'[{', '.join(leaves)}]'")
