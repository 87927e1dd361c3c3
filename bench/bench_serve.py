"""`dylora-moe serve` under load: requests/s, tokens/s, p50/p99 latency and time to first
token at 1, 4, 16 and 64 concurrent clients (closed loop: each client sends its next
request when the last one ends), for three servers of the same base, one at a time:

- mixed: the mixture, each request a random variant (routed, expert-i, uniform, base),
  rows of different mixtures decoded together (--max_batch 64); and the same without the
  routed variant ("fixed gates only": no routing pass at prefill);
- one at a time: the same server and requests with --max_batch 1;
- plain LoRA: the same base with ONE PEFT LoRA adapter (the mixture exported at uniform
  gates: rank E*r, the same matmuls) through the same scheduler and HTTP stack. Same
  scheduler on purpose: what is compared is the cost of per-row gates, not two servers.

    python bench/bench_serve.py                      # the table (~10 min on 2 cores)
    python bench/bench_serve.py --soak 600           # 16 clients for 600 s: failures counted
    python bench/bench_serve.py --levels 1,4 --requests 4 --max_tokens 8   # a smoke run

Every request streams (TTFT is its first text chunk), greedy, ignore_eos, so all servers
make the same number of tokens. Servers listen on 127.0.0.1 only. JSON in bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(arch="llama", hidden_size=384, num_layers=4, num_heads=6, num_kv_heads=2, intermediate_size=1024,
             max_positions=1024)
VOCAB, EXPERTS, RANK = 4096, 4, 8
PROMPTS = ["Write a function add_3(xs) that returns a new list with 3 added to every element.",
           "Write a function reverse_text(s) that returns s reversed.", "def count_vowels(s):",
           "Return the largest of three numbers, and explain how the comparison works step by step.",
           "Write a class Stack with push, pop and peek methods, each with a docstring."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,4,16,64", help="concurrent clients")
    p.add_argument("--requests", type=int, default=2, help="requests per client and round (at least 8 in all)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the modes at each level")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--soak", type=float, help="seconds of 16 clients against the mixed server, then stop")
    p.add_argument("--dir", default=str(ROOT / "bench" / "results" / "serve-model"), help="where the model is built")
    p.add_argument("--out", help="JSON path (default bench/results/serve[-soak].json)")
    p.add_argument("--peft_server", nargs=3, metavar=("DIR", "ADAPTER", "PORT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- the model
def build_model(out: Path) -> Path:
    """A tiny llama (hidden 384, 4 layers, vocab 4096) with 4 experts of rank 8 that
    differ, saved as a portable folder; and the mixture at uniform gates as a PEFT adapter."""
    from dylora_moe import DyLoRAMoE, MoEConfig
    from dylora_moe.data.demo_tasks import demo_rows
    from dylora_moe.data.tokenize import build_demo_tokenizer
    from dylora_moe.model.tiny import random_causal_lm, tiny_config

    if (out / "adapter" / "adapter_config.json").is_file():
        return out
    texts = [r["instruction"] + "\n" + r["output"] for f in ("numbers", "strings") for r in demo_rows(f, 400, 0)]
    tokenizer = build_demo_tokenizer(texts + PROMPTS, vocab_size=VOCAB)
    base = random_causal_lm(tiny_config(vocab_size=len(tokenizer), **SHAPE), seed=0)
    base.save_pretrained(out / "base_model")
    torch.manual_seed(0)
    moe = DyLoRAMoE(base, MoEConfig(num_experts=EXPERTS, lora_r=RANK, lora_alpha=16, lora_dropout=0.0,
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]))
    with torch.no_grad():
        for layer in moe.experts.values():
            layer.lora_B.normal_(0, 0.05)
        moe.router.gate.weight.normal_(0, 0.3)
    moe.save_pretrained(out / "final" / "experts")
    tokenizer.save_pretrained(out / "final" / "tokenizer")
    moe.export_mixture([1.0 / EXPERTS] * EXPERTS, out / "adapter")
    return out


def peft_server(folder: str, adapter: str, port: int) -> None:
    """The plain-LoRA baseline: a PeftModel behind the same engine, scheduler and app."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dylora_moe.serve.app import create_app
    from dylora_moe.serve.engine import Engine
    from dylora_moe.serve.metrics import Metrics
    from dylora_moe.serve.scheduler import Scheduler
    from dylora_moe.serve.server import run
    from dylora_moe.serve.service import Limits, Service

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(Path(folder) / "final" / "tokenizer")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(Path(folder) / "base_model"), adapter)
    plain = PlainLoRA(model.eval())
    loaded = SimpleNamespace(moe=plain, tokenizer=tok, weights_sha256="plain-peft-lora")
    metrics = Metrics(1)
    scheduler = Scheduler(Engine(plain, tok.pad_token_id), tok, 64, 256, metrics)
    service = Service("plain", loaded, scheduler, Limits(1024, 2048, 8, 64, 600.0), metrics)
    run(create_app(service), service, "127.0.0.1", port, 30.0)


class _Forward(torch.nn.Module):
    """The PeftModel's forward under the signature the engine expects (`cache`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          use_cache=use_cache, logits_to_keep=logits_to_keep)


class PlainLoRA(torch.nn.Module):
    """What the engine needs of a mixture, for one plain adapter: one 'expert', no gates."""

    def __init__(self, model):
        super().__init__()
        self.base_model = _Forward(model)
        self.config = SimpleNamespace(num_experts=1, routing="sequence")

    def set_gates(self, gates):
        pass

    def route(self, ids, mask, units, positions):
        return torch.ones(ids.shape[0], 1, 1)


# ---------------------------------------------------------------------------- servers and load
def start(command: list, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready: see {log}")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(120)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client, url, body) -> dict:
    start, first, tokens, done = time.perf_counter(), None, 0, False
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code}
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "status": chunk["error"].get("code")}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and any(c.get("text") for c in chunk["choices"]):
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ok": done, "latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


def bodies(models: list, max_tokens: int, seed: int, varied: bool = False):
    """Requests for one client. `varied` (the soak): sampling with seeds, n of 1 or 2, stop
    strings, gates of the client's own, lengths from 1 to 2 x max_tokens."""
    rng = random.Random(seed)
    while True:
        body = {"model": rng.choice(models), "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        if varied:
            body.update(max_tokens=rng.randint(1, 2 * max_tokens), ignore_eos=rng.random() < 0.5,
                        temperature=rng.choice([0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1000),
                        n=rng.choice([1, 1, 2]), stop=rng.choice([None, ["\n\n"], ["return"]]))
            if rng.random() < 0.2:
                body.update(model=models[0], gates=[rng.random() + 0.01 for _ in range(EXPERTS)])
        yield body


async def closed_loop(port: int, models: list, clients: int, per_client: int, max_tokens: int,
                      seconds: float | None = None, raw: bool = False, varied: bool = False):
    url = f"http://127.0.0.1:{port}/v1/completions"
    results, stop_at = [], (time.monotonic() + seconds) if seconds else None
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(index: int):
            requests = bodies(models, max_tokens, index, varied)
            count = 0
            while (stop_at and time.monotonic() < stop_at) or (not stop_at and count < per_client):
                try:
                    results.append(await one_request(client, url, next(requests)))
                except httpx.HTTPError as error:
                    results.append({"ok": False, "status": type(error).__name__})
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return (results, wall) if raw else summary(results, wall, clients)


def summary(results: list, wall: float, clients: int) -> dict:
    ok = [r for r in results if r["ok"]]
    latency = sorted(r["latency"] for r in ok) or [float("nan")]
    ttft = sorted(r["ttft"] for r in ok) or [float("nan")]

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50_s": statistics.median(latency), "latency_p99_s": pct(latency, 0.99),
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
            "failures": sorted({str(r["status"]) for r in results if not r["ok"]})}


def mixture_models(name: str) -> list:
    return [name, *(f"{name}:expert-{i}" for i in range(EXPERTS)), f"{name}:uniform", f"{name}:base"]


SERVERS = {
    # server -> the command after `python`
    "mixed": lambda d, p: ["-m", "dylora_moe.cli", "serve", str(d), "--port", str(p), "--threads", "1",
                           "--max_batch", "64", "--name", "mix"],
    "one at a time": lambda d, p: ["-m", "dylora_moe.cli", "serve", str(d), "--port", str(p), "--threads", "1",
                                   "--max_batch", "1", "--name", "mix"],
    "plain LoRA": lambda d, p: [str(Path(__file__).resolve()), "--peft_server", str(d), str(d / "adapter"), str(p)],
}
# row label -> (server, the models its clients ask for, at random)
MODES = {
    "mixed": ("mixed", mixture_models("mix")),
    "mixed, fixed gates only": ("mixed", mixture_models("mix")[1:]),
    "one at a time": ("one at a time", mixture_models("mix")),
    "plain LoRA": ("plain LoRA", ["plain:expert-0"]),
}


def run_table(args, folder: Path) -> list:
    """Every server up at once (idle ones cost nothing), and the modes interleaved over
    rounds at each level, so that load from elsewhere on the machine hits them alike."""
    levels = [int(x) for x in args.levels.split(",")]
    ports = {name: free_port() for name in SERVERS}
    procs = {}
    try:
        for name, command in SERVERS.items():
            procs[name] = start([sys.executable, *command(folder, ports[name])], ports[name],
                                folder / f"server-{name.replace(' ', '-')}.log")
        for mode, (server, models) in MODES.items():  # warm-up: first calls are not steady state
            asyncio.run(closed_loop(ports[server], models, 2, 1, args.max_tokens))
        rows = []
        for clients in levels:
            pooled = {mode: ([], 0.0) for mode in MODES}
            for _ in range(args.rounds):
                for mode, (server, models) in MODES.items():
                    results, wall = asyncio.run(closed_loop(ports[server], models, clients,
                                                            max(args.requests, -(-8 // clients)), args.max_tokens,
                                                            raw=True))
                    pooled[mode] = (pooled[mode][0] + results, pooled[mode][1] + wall)
            for mode, (results, wall) in pooled.items():
                row = {"server": mode, **summary(results, wall, clients)}
                rows.append(row)
                print(f"{mode:>24} x{clients:<3} {row['requests_per_s']:7.2f} req/s {row['tokens_per_s']:8.1f} tok/s "
                      f"p50 {row['latency_p50_s']:.3f}s p99 {row['latency_p99_s']:.3f}s ttft p50 "
                      f"{row['ttft_p50_s']:.3f}s failed {row['failed']}", flush=True)
        return rows
    finally:
        for proc in procs.values():
            stop(proc)


def markdown(rows: list) -> str:
    lines = ["| server | clients | req/s | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} | {r['ttft_p50_s']:.3f} | "
                     f"{r['ttft_p99_s']:.3f} | {r['failed']} |")
    by = {(r["server"], r["clients"]): r["tokens_per_s"] for r in rows}
    for clients in sorted({r["clients"] for r in rows}):
        mixed, fixed = by.get(("mixed", clients)), by.get(("mixed, fixed gates only", clients))
        if mixed and fixed and by.get(("one at a time", clients)) and by.get(("plain LoRA", clients)):
            lines.append(f"\nx{clients}: mixed / one at a time {mixed / by[('one at a time', clients)]:.2f}x, "
                         f"mixed / plain LoRA {mixed / by[('plain LoRA', clients)]:.2f}x, "
                         f"fixed gates only / plain LoRA {fixed / by[('plain LoRA', clients)]:.2f}x")
    return "\n".join(lines)


def soak(args, folder: Path) -> dict:
    port = free_port()
    proc = start([sys.executable, *SERVERS["mixed"](folder, port)], port, folder / "server-soak.log")
    models = MODES["mixed"][1]
    try:
        result = asyncio.run(closed_loop(port, models, 16, 0, args.max_tokens, seconds=args.soak, varied=True))
    finally:
        result["exit_code"] = stop(proc)
    print(f"soak {args.soak:.0f}s x16: {result['requests']} requests, {result['failed']} failed "
          f"{result['failures']}, {result['requests_per_s']:.2f} req/s, server exit {result['exit_code']}")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.peft_server:
        folder, adapter, port = args.peft_server
        peft_server(folder, adapter, int(port))
        return {}
    torch.set_num_threads(1)
    folder = build_model(Path(args.dir))
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "shape": {**SHAPE, "vocab": VOCAB},
            "experts": EXPERTS, "lora_r": RANK, "max_tokens": args.max_tokens}
    if args.soak:
        out = {**meta, "soak": soak(args, folder)}
    else:
        rows = run_table(args, folder)
        print(markdown(rows))
        out = {**meta, "rows": rows}
    path = Path(args.out or ROOT / "bench" / "results" / ("serve-soak.json" if args.soak else "serve.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
