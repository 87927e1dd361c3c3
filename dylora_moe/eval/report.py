"""`dylora-moe report RUN_DIR`: what a run did, for a person: PNG plots (loss curves,
expert usage by source, router entropy over time) and a short markdown summary."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError, guarded
from .health import routing_warnings
from .plots import save_usage_heatmap


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records), the last record per step winning (a resumed run
    logs its steps again)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; expected a run dir written by dylora-moe train")
    train, evals = {}, {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if "loss" in record:
            train[record["step"]] = record
        elif "eval" in record:
            evals[record["step"]] = record
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def write_report(run_dir, out_dir=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    train, evals = read_metrics(run_dir)
    if not train:
        raise UserError(f"{run_dir / 'metrics.jsonl'}: no training steps logged yet")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [_lm_loss(r) for r in train], label="train (LM loss)")
    sources = sorted({s for e in evals for s in e["eval"]})
    for source in sources:
        points = [(e["step"], e["eval"][source]["loss"]) for e in evals if source in e["eval"]]
        ax.plot(*zip(*points), marker="o", label=f"eval {source} (routed)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["router_entropy"] for r in train])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats")
    ax.set_title("router entropy (mean gate entropy per sequence)")
    fig.tight_layout()
    fig.savefig(out / "entropy.png", dpi=100)
    plt.close(fig)

    usage = evals[-1]["eval"] if evals else None
    if usage:
        save_usage_heatmap({s: v["gate_mean"] for s, v in usage.items()}, out / "usage_by_source.png",
                           f"expert usage by source (eval, step {evals[-1]['step']})")
    (out / "report.md").write_text(_markdown(run_dir, train, evals))
    for warning in routing_warnings(evals[-1]["eval"]) if evals else []:
        print(f"warning: {warning}", file=sys.stderr)
    return out


def _lm_loss(record: dict) -> float:
    """The LM loss of a training record (`loss` is what was optimised, balance included)."""
    return record.get("lm_loss", record["loss"])


def _markdown(run_dir, train, evals) -> str:
    last = train[-1]
    lines = [f"# Run report: {run_dir}", "",
             f"- steps: {last['step']} (epoch {last['epoch']}), last train LM loss {_lm_loss(last):.4f}, "
             f"balance loss {last['balance_loss']:.2e} (optimised: {last['loss']:.4f}), lr {last['lr']:.2e}",
             f"- throughput: {last['tokens_per_s']:.0f} tokens/s, memory {last['memory_gib']:.2f} GiB",
             f"- non-finite micro-batches skipped: {last.get('nonfinite_skipped', 0)}", "",
             "![loss](loss.png)", ""]
    if evals:
        final = evals[-1]
        lines += [f"## Evaluation at step {final['step']}", "",
                  "| source | loss | perplexity | expert usage |", "|---|---|---|---|"]
        for source, v in final["eval"].items():
            usage = " ".join(f"{g:.2f}" for g in v["gate_mean"])
            lines.append(f"| {source} | {v['loss']:.4f} | {v['perplexity']:.2f} | {usage} |")
        lines += ["", "![usage](usage_by_source.png)", ""]
        lines += [f"**Warning:** {w}" for w in routing_warnings(final["eval"])] + [""]
    lines += ["## Routing over time", "",
              f"Router entropy went from {train[0]['router_entropy']:.3f} to {last['router_entropy']:.3f} nats "
              f"(uniform over {len(last['gate_mean'])} experts: {__import__('math').log(len(last['gate_mean'])):.3f}).",
              "", "![entropy](entropy.png)", "",
              "| expert | mean gate | top-1 share | grad norm |", "|---|---|---|---|"]
    norms = last.get("expert_grad_norm") or [float("nan")] * len(last["gate_mean"])
    for i, (g, u, n) in enumerate(zip(last["gate_mean"], last["usage_top1"], norms)):
        lines.append(f"| {i} | {g:.3f} | {u:.3f} | {n:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return guarded(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="dylora-moe report", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    args = p.parse_args(argv)
    out = write_report(args.run_dir, args.out)
    print(f"report: {out / 'report.md'} (+ loss.png, usage_by_source.png, entropy.png)")
    return 0
