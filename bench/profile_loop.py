"""Where the training loop's time goes, part by part: the real `dylora-moe train` run, with
a few of its optimizer steps profiled and each part of a step labelled (the routing pass,
the LM forward, the backward, the optimizer step, the loop's own bookkeeping). It answers
what bench/profile_step.py (the bare model step) cannot: what the loop adds around it.

    python bench/profile_loop.py -- --config configs/demo.yaml --max_steps 6
    python bench/profile_loop.py --skip 3 --steps 3 -- --config configs/smollm2-135m.yaml \\
        --model.base_model DIR --model.gguf_file null --bf16 --train_batch_size 64 --max_steps 8

Everything after `--` goes to `dylora-moe train` unchanged; give it --max_steps of at
least skip + steps + 1 (the profiled steps are steps skip+2 ... skip+steps+1; the first
step of the run is step 1). Per part:
host (CPU) milliseconds per step, from entering the part to leaving it, and, on a GPU,
the device milliseconds of the kernels it launched; then the step's wall time, the time
between steps (the next micro-batches, logging), how busy the device was, and the host syncs (cudaStreamSynchronize and the like: each .item() or .tolist() of a device value)
per step, with the part they happened in. Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dylora_moe.model import moe as moe_module  # noqa: E402
from dylora_moe.train import cli as train_cli  # noqa: E402
from dylora_moe.train import monitor, step  # noqa: E402

# What blocks the host until the device is done (an .item() is a cudaMemcpyAsync, then one of these).
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def parts() -> dict[str, tuple]:
    """Label -> (owner, method name): what the loop runs in a step, outermost first."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    return {
        "routing pass (route)": (moe_module.DyLoRAMoE, "route"),
        "LM forward (_lm_forward)": (moe_module.DyLoRAMoE, "_lm_forward"),
        "backward": (Accelerator, "backward"),
        "clip grad norm": (Accelerator, "clip_grad_norm_"),
        "optimizer step": (AcceleratedOptimizer, "step"),
        "routing statistics": (monitor.RoutingStats, "add"),
        "label tokens": (step.Loop, "_global_label_tokens"),
        "after step (maturity, freezer)": (step.Loop, "_experts_after_step"),
        "logged step (_record)": (step.Loop, "_record"),
    }


def labelled(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


class StepProfiler:
    """Wraps Loop.step: times every step and steps the profiler."""

    def __init__(self, skip: int, steps: int, cuda: bool):
        self.cuda, self.walls, self.index, self.steps, self.skip = cuda, [], 0, steps, skip
        self.gaps, self.ended = [], None  # between steps: the next batches, logging, eval checks
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=skip, warmup=1, active=steps, repeat=1),
                            on_trace_ready=self.keep)
        self.result = None

    def keep(self, prof) -> None:
        self.result = self.result or prof  # the profiled steps; nothing after them

    def wrap(self, fn):
        @functools.wraps(fn)
        def wrapper(loop, *args, **kwargs):
            self.sync()
            start = time.perf_counter()
            if self.ended is not None and self.skip + 1 <= self.index < self.skip + 1 + self.steps:
                self.gaps.append(start - self.ended)
            with record_function("loop step"):
                out = fn(loop, *args, **kwargs)
            self.sync()
            if self.skip + 1 <= self.index < self.skip + 1 + self.steps:
                self.walls.append(time.perf_counter() - start)
            self.index += 1
            self.prof.step()
            self.ended = time.perf_counter()
            return out
        return wrapper

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def summarise(prof, labels: list[str], steps: int, walls: list[float], cuda: bool) -> dict:
    events = list(prof.profiler.kineto_results.events())
    host = {label: 0.0 for label in labels + ["loop step"]}
    ranges = {label: [] for label in host}
    for event in events:
        name = event.name()
        if name in host and event.device_type() == torch.autograd.DeviceType.CPU:
            host[name] += event.duration_ns() / 1e6
            ranges[name].append((event.start_ns(), event.start_ns() + event.duration_ns()))
    device, kernels_ms, syncs = {label: 0.0 for label in host}, 0.0, {}
    if cuda:
        # A kernel belongs to the part whose host range holds its launch (its correlated
        # runtime call); kineto gives each kernel's own start, so use the launch's instead.
        launches = {e.correlation_id(): e.start_ns() for e in events
                    if e.device_type() == torch.autograd.DeviceType.CPU and e.name().startswith("cuda")}
        for event in events:
            if event.device_type() != torch.autograd.DeviceType.CUDA or event.is_user_annotation():
                continue
            ms = event.duration_ns() / 1e6
            kernels_ms += ms
            at = launches.get(event.correlation_id())
            for label in device:
                if at is not None and inside(at, ranges[label]):
                    device[label] += ms
        for event in events:
            name = event.name()
            if event.device_type() == torch.autograd.DeviceType.CPU and (name.startswith(SYNCS) or name == "cudaMemcpy"):
                where = innermost(event.start_ns(), ranges, labels)
                syncs[where] = syncs.get(where, 0) + 1
    per_step = lambda d: {k: round(v / steps, 3) for k, v in d.items()}  # noqa: E731
    wall = statistics.median(walls) if walls else None
    return {
        "steps": steps, "wall_ms_per_step": None if wall is None else round(wall * 1e3, 3),
        "host_ms_per_step": per_step(host),
        "device_ms_per_step": per_step(device) if cuda else None,
        "device_busy": round(kernels_ms / steps / (wall * 1e3), 3) if cuda and wall else None,
        "host_syncs_per_step": {k: round(v / steps, 2) for k, v in sorted(syncs.items())} if cuda else None,
    }


def innermost(at: int, ranges: dict, labels: list[str]) -> str:
    """The first part (of the list, innermost-ish) whose range holds `at`."""
    for label in labels:
        if inside(at, ranges[label]):
            return label
    return "elsewhere in the step" if inside(at, ranges["loop step"]) else "outside the steps"


def inside(at: int, spans: list) -> bool:
    return any(start <= at <= end for start, end in spans)


def parse_args(argv):
    if "--" not in argv:
        raise SystemExit("usage: python bench/profile_loop.py [--skip N] [--steps N] [--out F] -- TRAIN ARGS")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", type=int, default=2, help="unprofiled steps first (warm-up)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile-loop.json"))
    return p.parse_args(argv[:split]), argv[split + 1:]


def main(argv=None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    table = parts()
    patched = []
    for label, (owner, name) in table.items():
        original = getattr(owner, name)
        patched.append((owner, name, original))
        setattr(owner, name, labelled(label, original))
    profiler = StepProfiler(args.skip, args.steps, cuda)
    patched.append((step.Loop, "step", step.Loop.step))
    step.Loop.step = profiler.wrap(step.Loop.step)
    try:
        with profiler.prof:
            code = train_cli.main(train_args)
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
    if code != 0:
        return code
    if profiler.result is None:
        raise SystemExit(f"no step was profiled: give train --max_steps >= {args.skip + args.steps + 1}")
    summary = summarise(profiler.result, list(table), args.steps, profiler.walls, cuda)
    summary["between_steps_ms"] = round(statistics.median(profiler.gaps) * 1e3, 3) if profiler.gaps else None
    summary.update(device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__,
                   train_args=train_args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
