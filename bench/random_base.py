"""A base model's folder with random weights at its real shape, for timing runs where the
real weights cannot go: a borrowed GPU takes 64 MiB per call, SmolLM2's GGUF is 98 MB.
Seconds per step, tokens per second and memory depend on the shape only; losses and
pass@1 of such a base mean nothing.

    python bench/random_base.py skeleton DIR    # here: config + tokenizer of the fetched GGUF (~3 MB)
    python bench/random_base.py weights DIR     # there: random bf16 weights added to DIR
    python bench/bench_real_base.py --base_dir DIR --extra --bf16 ...
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def skeleton(out: Path, folder: str | None = None, gguf: str | None = None) -> None:
    """The config and tokenizer of a GGUF base (by default the fetched SmolLM2) into out."""
    from transformers import AutoConfig, AutoTokenizer

    if folder is None:
        folder, gguf = fetched_gguf()
    AutoConfig.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)


def weights(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(out)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)


def fetched_gguf() -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-m", "dylora_moe.cli", "fetch", "smollm2-135m"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: dylora-moe fetch smollm2-135m failed: {done.stderr.strip()[-500:]}")
    flags = done.stdout.split()  # --base_model FOLDER --gguf_file NAME
    return flags[flags.index("--base_model") + 1], flags[flags.index("--gguf_file") + 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["skeleton", "weights"])
    p.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    (skeleton if args.part == "skeleton" else weights)(args.dir)
    print(f"{args.part}: {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
