"""`dylora-moe export RUN --gates ... | --source NAME --out DIR`: the mixture at fixed gates
as ONE standard PEFT LoRA adapter, for servers that take LoRA adapters (vLLM, SGLang, PEFT).

    dylora-moe export runs/demo --gates 0.5,0.5,0,0 --out exports/demo-mix
    dylora-moe export runs/demo --source demo/strings --out exports/demo-strings

The adapter has rank E*r (A stacked by rows, B side by side, each expert's columns of B
times its gate): its logits equal the mixture's at those gates. `--source` takes the mean
gates the router gives that data source's validation rows (the run's recipe data). What a
fixed adapter cannot do is route: every request gets the same mixture (docs/serving.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError, guarded
from ..eval.variants import custom
from ..model.persistence import base_name


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dylora-moe export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run dir, a checkpoint, or a portable folder (final/)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--gates", help="E comma-separated weights >= 0 (normalised to sum 1), e.g. 0.7,0.3,0,0")
    which.add_argument("--source", help="a data source of the run's recipe: its validation rows' mean gates")
    p.add_argument("--out", required=True, help="the adapter folder to write (must not exist)")
    p.add_argument("--base_model", help="hub id or path of the base (default: the run's)")
    return p.parse_args(argv)


def parse_gates(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--gates {text}: expected comma-separated numbers, e.g. 0.5,0.5,0,0") from None


def source_gates(loaded, source: str) -> list[float]:
    from ..eval.usage import expert_usage

    if loaded.recipe is None:
        raise FileNotFoundError(f"{loaded.source / 'recipe.yaml'}: missing; --source reads the run's recipe data")
    _, by_source = expert_usage(loaded.moe, loaded.recipe, loaded.tokenizer)
    if source not in by_source:
        raise UserError(f"--source {source}: not a data source of this run; expected one of {', '.join(by_source)}")
    return by_source[source]


def export(run, out, gates=None, source=None, base_model=None) -> dict:
    """Write the adapter; returns what mixture.json records."""
    from ..eval.loading import load_run

    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out}: already exists; export never overwrites")
    wanted = parse_gates(gates) if gates is not None else None
    loaded = load_run(run, base_model=base_model)
    num_experts = loaded.moe.config.num_experts
    if wanted is not None:
        chosen = custom(wanted, num_experts, name="--gates").gates
    else:
        chosen = tuple(source_gates(loaded, source))
    loaded.moe.export_mixture(list(chosen), out)
    record = {"gates": list(chosen), "source": source, "experts": str(loaded.source),
              "weights_sha256": loaded.weights_sha256, "num_experts": num_experts,
              "rank": num_experts * loaded.moe.config.lora_r, "base_model": base_name(loaded.moe.base_model)}
    gguf = loaded.recipe.model.gguf_file if loaded.recipe is not None else None
    (out / "mixture.json").write_text(json.dumps({**record, "gguf_file": gguf}, indent=2) + "\n")
    (out / "README.md").write_text(readme(record, gguf))
    return record


def readme(record: dict, gguf) -> str:
    rank = record["rank"]
    accepted = [r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank]
    base = f"`{record['base_model']}`" + (f", the GGUF file `{gguf}` of that repository" if gguf else "")
    gates = ", ".join(f"{g:.4f}" for g in record["gates"])
    return (f"# DyLoRA-MoE mixture at fixed gates\n\nA standard PEFT LoRA adapter of rank {rank} "
            f"({record['num_experts']} experts x rank {rank // record['num_experts']}), the gates folded into B.\n\n"
            f"- base model: {base}\n- gates: [{gates}]" + (f" (mean routing of `{record['source']}`)" if record["source"] else "")
            + f"\n- experts: sha256 {record['weights_sha256']}\n\n"
            f"vLLM: `--enable-lora --max-lora-rank {accepted[0] if accepted else rank}` (at least {rank}) and "
            f"`--lora-modules NAME=PATH`. SGLang: `--enable-lora --max-lora-rank {rank} --lora-paths NAME=PATH`.\n"
            "Every request gets these gates: per-request routing is what `dylora-moe serve` adds.\n")


def main(argv=None) -> int:
    return guarded(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv) -> int:
    args = parse_args(argv)
    record = export(args.run, args.out, args.gates, args.source, args.base_model)
    gates = " ".join(f"{g:.3f}" for g in record["gates"])
    print(f"wrote {args.out}: one PEFT LoRA adapter of rank {record['rank']}, gates [{gates}], experts sha256 "
          f"{record['weights_sha256'][:12]}, base {record['base_model']}", file=sys.stderr)
    return 0
