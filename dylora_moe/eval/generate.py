"""`dylora-moe generate RUN_OR_CHECKPOINT --prompt ...`: routed generation from a trained run.

Routes from the prompt (sparse top-k, eval mode) and decodes with the KV cache; or forces
one expert (--expert i), an equal mix (--uniform) or the plain base (--base). Prints the
gates it used.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dylora-moe generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run dir, a checkpoint, or a portable folder (final/)")
    p.add_argument("--prompt", required=True, help="the request; wrapped in the training prompt template "
                   "unless --raw")
    p.add_argument("--raw", action="store_true", help="use --prompt exactly as given")
    p.add_argument("--base_model", help="hub id or path of the base (default: the run's)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--expert", type=int, help="use this expert only")
    mode.add_argument("--uniform", action="store_true", help="mix all experts equally")
    mode.add_argument("--base", action="store_true", help="the base model alone, no experts")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def gate_context(moe, expert=None, uniform=False, base=False):
    """The routing a user asked for, as a context manager around generation."""
    n = moe.config.num_experts
    if expert is not None:
        if not 0 <= expert < n:
            raise ValueError(f"--expert {expert}: expected 0..{n - 1}")
        return moe.override_gates(torch.nn.functional.one_hot(torch.tensor(expert), n).float())
    if uniform:
        return moe.override_gates(torch.full((n,), 1.0 / n))
    if base:
        return moe.experts_disabled()
    return contextlib.nullcontext()


def generate_text(loaded, prompt: str, max_new_tokens=256, temperature=0.0, top_p=1.0, stop=(), expert=None,
                  uniform=False, base=False) -> tuple[str, list[float] | None]:
    """(completion, gates used for the prompt; None for --base)."""
    tok, moe = loaded.tokenizer, loaded.moe
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    if tok.bos_token_id is not None:
        bos = torch.tensor([[tok.bos_token_id]])
        ids = {"input_ids": torch.cat([bos, ids["input_ids"]], 1),
               "attention_mask": torch.cat([torch.ones_like(bos), ids["attention_mask"]], 1)}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with gate_context(moe, expert, uniform, base):
        gates = None
        if not base:
            with torch.no_grad():
                moe.eval()
                gates = moe(**ids).routing_weights[0].mean(dim=0).tolist()
        out = moe.generate(ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=max_new_tokens,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           stop_strings=list(stop) or None, tokenizer=tok if stop else None, **sampling)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    for s in stop:  # generate stops after the stop string; cut it off
        text = text.split(s, 1)[0]
    return text, gates


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from ..data.formatting import alpaca_prompt
    from .loading import load_run

    try:
        loaded = load_run(args.run, base_model=args.base_model)
        torch.manual_seed(args.seed)
        prompt = args.prompt if args.raw else alpaca_prompt(args.prompt)
        text, gates = generate_text(loaded, prompt, args.max_new_tokens, args.temperature, args.top_p, args.stop,
                                    args.expert, args.uniform, args.base)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    label = "base" if args.base else "uniform" if args.uniform else f"expert {args.expert}" if args.expert is not None \
        else f"routed (top-{loaded.moe.config.top_k})"
    gates_text = "-" if gates is None else "[" + " ".join(f"{g:.2f}" for g in gates) + "]"
    print(f"# {label}; gates {gates_text}; experts {loaded.source} sha256 {loaded.weights_sha256[:12]}", file=sys.stderr)
    print(text)
    return 0
