"""Checks a run makes before any heavy work: the base model can be found, the packages
its options need are installed, and the DeepSpeed config does not contradict the recipe. Each failure is one line naming the field.
(The recipe's own values are checked when it is read: config.py; the output dir by
rundir.py.)
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig

from ..errors import UserError
from ..model.tiny import TINY_PREFIX
from ..plan.setup import offloads_optimizer
from ..recipe import base_files

PATH_PREFIXES = ("/", "./", "../", "~")
# Architectures with a table of learned absolute positions: a row longer than it fails
# with an IndexError in the middle of training.
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "gpt_neo", "opt")


def check_recipe_environment(cfg) -> None:
    """All of the checks that need no accelerator: run on every rank, before data is read."""
    check_workers(cfg.train.dataloader_num_workers)
    check_packages(cfg)
    check_model_name("model.tokenizer", cfg.model.tokenizer)
    check_base_model(cfg)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_workers(workers: int) -> None:
    """Each DataLoader worker is a process holding a copy of the dataset. More than this
    process may run on buys no speed, and an absurd count (10000 was tried) forks until
    the kernel's out-of-memory killer takes down processes, other users' too: checked
    here, on the machine that runs, not when a recipe is read (plan or submit run elsewhere)."""
    cpus = usable_cpus()
    if workers > cpus:
        raise UserError(f"train.dataloader_num_workers={workers}: expected at most {cpus} (the CPUs this process "
                        "may use; each worker is a process with its own copy of the data)")


def check_packages(cfg) -> None:
    needs = []
    if cfg.model.load_in_4bit or cfg.model.load_in_8bit or cfg.train.optimizer != "adamw":
        field = "model.load_in_4bit/8bit" if cfg.model.load_in_4bit or cfg.model.load_in_8bit else "train.optimizer"
        needs.append((field, "bitsandbytes", "bitsandbytes"))
    for tracker in cfg.train.log_with:
        needs.append((f"train.log_with={tracker}", tracker, "dylora-moe[trackers]"))
    for field, module, package in needs:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{field} needs the {module} package, which is not installed (pip install {package})")


def check_model_name(field: str, name: Optional[str]) -> None:
    """A local path must exist; anything else must at least be a valid hub id."""
    if not name or name == "demo" or name.startswith(TINY_PREFIX):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{field}={name!r}: is a file; expected a model directory or a hub id")
        return
    if name.startswith(PATH_PREFIXES) or name.count("/") > 1:
        raise UserError(f"{field}={name!r}: no such directory (and not a hub id like google/codegemma-2b)")

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(f"{field}={name!r}: neither a local directory nor a valid hub id "
                        "(like google/codegemma-2b)") from None


def check_base_model(cfg) -> None:
    """The base's config can be read (locally, or from the hub when online), so a missing
    model fails now and not after the data is tokenized; and max_seq_length fits its
    positions."""
    name = cfg.model.base_model
    if name.startswith(TINY_PREFIX):
        return  # built from model.tiny, checked with the recipe
    check_model_name("model.base_model", name)
    check_gguf(cfg.model)
    config = read_base_config(name, base_files(cfg.model))
    if getattr(config, "model_type", None) not in LEARNED_POSITIONS:
        return  # rotary / ALiBi positions: longer rows run (if less well)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and cfg.data.max_seq_length > positions:
        raise UserError(f"data.max_seq_length={cfg.data.max_seq_length} exceeds the {positions} positions of "
                        f"{name} (learned position embeddings); lower max_seq_length")


def check_gguf(model_cfg) -> None:
    """A GGUF base needs the gguf package, and a local one a real GGUF file (its magic
    bytes), before anything is tokenized."""
    if not model_cfg.gguf_file:
        return
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"model.gguf_file={model_cfg.gguf_file!r} needs the gguf package, which is not installed "
                        "(pip install gguf)")
    folder = Path(model_cfg.base_model).expanduser()
    if not folder.is_dir():
        return  # a hub repo: transformers downloads the file
    path = folder / model_cfg.gguf_file
    if not path.is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))[:5]
        raise UserError(f"model.gguf_file={model_cfg.gguf_file!r}: no such file in {folder} (GGUF files there: "
                        f"{present or 'none'})")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"model.gguf_file: {path} is not a GGUF file (it starts with {magic!r}, expected b'GGUF')")


def read_base_config(name: str, files: Optional[dict] = None):
    files = files or {}
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, **files)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"model.base_model={name!r}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is "
                        "set (downloads are off)")
    try:
        return AutoConfig.from_pretrained(name, **files)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.base_model={name!r}: cannot read its config ({first})") from None


def check_deepspeed(accelerator) -> None:
    """The accelerate/DeepSpeed config's own contradictions: refused before any model loads."""
    if accelerator.distributed_type.value != "DEEPSPEED":
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    if offloads_optimizer(zero) and ds.get("zero_force_ds_cpu_optimizer", True):
        raise UserError("DeepSpeed config: optimizer offload needs \"zero_force_ds_cpu_optimizer\": false "
                        "(otherwise DeepSpeed swaps in its own optimizer and the LR schedule stops driving it: "
                        "the LR freezes after a resume); see ds_configs/zero2_offload.json")
