"""`dylora-moe serve RUN`: the mixture behind an OpenAI-compatible HTTP endpoint.

    dylora-moe serve runs/demo                              # http://127.0.0.1:8000/v1
    dylora-moe serve runs/demo --port 8001 --max_batch 64 --name coder

The `model` field of a request picks the mixture: NAME (the router decides from the
prompt), NAME:expert-<i>, NAME:uniform, NAME:base; or NAME with `gates: [...]` in the
body. Concurrent requests are decoded together, each row with its own gates, in one
forward per step (continuous batching). SIGTERM drains: no new requests, those in flight
finish (up to --drain_timeout seconds), exit 0. docs/serving.md has the whole page.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..errors import UserError, guarded


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dylora-moe serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run dir, a checkpoint, or a portable folder (final/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model name clients ask for (default: the run directory's name)")
    p.add_argument("--base_model", help="hub id or path of the base (default: the run's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="the base's dtype (default float32)")
    p.add_argument("--max_batch", type=int, default=32, help="rows decoded together (default 32)")
    p.add_argument("--max_queue", type=int, default=256, help="requests waiting for a row before 503 (default 256)")
    p.add_argument("--max_tokens", type=int, default=2048, help="the most completion tokens a request may ask for")
    p.add_argument("--max_n", type=int, default=8, help="the most choices (n) of one request")
    p.add_argument("--context", type=int, help="prompt + completion tokens (default: the base's positions)")
    p.add_argument("--request_timeout", type=float, default=600.0, help="seconds a request may take, queue included")
    p.add_argument("--drain_timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def check(args) -> None:
    """One-line errors naming the flag, before any model loads."""
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1..65535")
    for flag in ("max_batch", "max_tokens", "max_n", "threads", "context"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: expected an integer >= 1")
    if args.max_queue < 0:
        raise UserError(f"--max_queue {args.max_queue}: expected an integer >= 0")
    for flag in ("request_timeout", "drain_timeout"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected seconds > 0")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UserError(f"serve needs the serve extra ({error.name} is missing): "
                        "pip install 'dylora-moe[serve]'") from None


def served_name(run) -> str:
    """runs/demo, runs/demo/final and runs/demo/checkpoints/checkpoint-200/portable -> 'demo'
    (a checkpoint: 'demo-checkpoint-200')."""
    path = Path(run).resolve()
    if path.name in ("final", "portable"):
        path = path.parent
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-{path.name}"
    return path.name


def build(args):
    """The Service and its app, the model loaded and moved to its device."""
    from ..eval.loading import load_run
    from .app import create_app
    from .engine import Engine
    from .metrics import Metrics
    from .scheduler import Scheduler
    from .service import Limits, Service

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    loaded = load_run(args.run, base_model=args.base_model, dtype=dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded.moe.to(device)
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    metrics = Metrics(loaded.moe.config.num_experts)
    scheduler = Scheduler(Engine(loaded.moe, pad), tok, args.max_batch, args.max_queue, metrics)
    positions = getattr(loaded.moe.base_model.config.get_text_config(), "max_position_embeddings", None) or 2048
    limits = Limits(context=args.context or positions, max_tokens=args.max_tokens, max_n=min(args.max_n, args.max_batch),
                    max_rows=args.max_batch, request_timeout=args.request_timeout)
    service = Service(args.name or served_name(args.run), loaded, scheduler, limits, metrics)
    return service, create_app(service)


def main(argv=None) -> int:
    return guarded(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv) -> int:
    args = parse_args(argv)
    check(args)
    from .server import run

    service, app = build(args)
    print(f"serving {service.name} ({service.num_experts} experts, weights sha256 {service.loaded.weights_sha256[:12]}) "
          f"on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    run(app, service, args.host, args.port, args.drain_timeout)
    return 0
