"""A GGUF base, dequantized once and kept as a plain checkpoint.

transformers reads a GGUF file anew on every `from_pretrained`: it parses the whole file
(its tokenizer's tens of thousands of strings included) for the config, again for the
tokenizer and again for the weights, then dequantizes every tensor. For SmolLM2-135M that
is about a minute per command on 2 CPU cores (config 10 s, tokenizer 13 s, weights 39 s,
measured), paid by every train, resume, eval, generate and serve. So the first load
writes what transformers produced (the weights at the dtype asked for, as safetensors,
the config and the tokenizer) under the cache, and later loads read that copy in under a
second: the same tensors, bitwise (tests/test_real_base.py).

The copy is keyed by the file's sha256, the dtype and the transformers version (whose
conversion code made it), so a changed file or library converts again. It is written by a
separate process (outside any ZeRO-3 or FSDP context, which would partition the weights
being saved), into a temporary folder renamed into place, under a lock, so concurrent
ranks convert once and a failed conversion leaves nothing half-written. Where the cache
cannot be written, the GGUF file is loaded directly, as transformers does.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
import transformers

from .offline import cache_root

logger = logging.getLogger(__name__)
DONE = "COMPLETE"


def plain_copy(base_model: str, gguf_file: str, dtype: torch.dtype) -> Optional[Path]:
    """The folder of the dequantized copy of `gguf_file` in `base_model` (a folder or a
    hub repository), converted on first use; None where it cannot be made (the caller
    then loads the GGUF file itself)."""
    from filelock import FileLock

    try:
        source = gguf_path(base_model, gguf_file)
        target = cache_root() / "gguf" / copy_key(source, dtype)
        if (target / DONE).is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / DONE).is_file():
                convert_in_subprocess(source, dtype, target)
        return target
    except (OSError, subprocess.CalledProcessError) as e:
        said = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or [type(e).__name__]
        logger.warning("%s: no dequantized copy (%s); reading the GGUF file directly", gguf_file, said[-1])
        return None


def location(base_model: str, gguf_file: Optional[str], dtype: torch.dtype) -> tuple[str, dict]:
    """(what from_pretrained reads, its file keyword): the copy where there is one, else
    `base_model` itself, with `gguf_file=` when it is a GGUF base."""
    copy_dir = plain_copy(base_model, gguf_file, dtype) if gguf_file else None
    if copy_dir is not None:
        return str(copy_dir), {}
    return base_model, ({"gguf_file": gguf_file} if gguf_file else {})


def gguf_path(base_model: str, gguf_file: str) -> Path:
    if Path(base_model).is_dir():
        return Path(base_model) / gguf_file
    from huggingface_hub import hf_hub_download  # the hub's own cache; offline if it holds the file

    return Path(hf_hub_download(base_model, gguf_file))


def copy_key(source: Path, dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    what = f"{digest.hexdigest()}|{str(dtype).removeprefix('torch.')}|transformers {transformers.__version__}"
    return hashlib.sha256(what.encode()).hexdigest()[:24]


def convert_in_subprocess(source: Path, dtype: torch.dtype, target: Path) -> None:
    logger.info("%s: dequantizing once into %s (later loads read that copy)", source.name, target)
    command = [sys.executable, "-m", __name__, str(source), str(dtype).removeprefix("torch."), str(target)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)


def convert(source: Path, dtype: str, target: Path) -> None:
    """What transformers makes of the GGUF file, saved as a plain checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers refuses to save a model that came from GGUF; its weights are plain tensors by now
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".partial-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / DONE).write_text(f"{source}\n")
        if target.exists():  # an earlier conversion that died before its marker
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def name_source(model, base_model: str, gguf_file: str):
    """A model loaded from the copy names its GGUF source as one loaded from the file does
    (`_name_or_path` and the quantization_config transformers records), so exported
    adapters and saved mixtures say which base they need."""
    model.config._name_or_path = str(base_model)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file}
    return model


if __name__ == "__main__":
    convert(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
