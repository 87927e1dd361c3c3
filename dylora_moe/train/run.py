"""A training run: everything it holds (Run), built from a recipe (`build_run`), then
restored from its checkpoint or started fresh, and grown if the recipe asks for more
experts than the checkpoint has (`restore_or_grow`). The loop (loop.py) fits it."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs, set_seed

from ..checkpoint import CheckpointManager, adopt_run_assets, lineage, read_marker, resolve_resume
from ..data import build_datasets, load_examples
from ..model import DyLoRAMoE
from ..model.inject import find_targets
from ..model.portable import write_portable
from ..plan.setup import offloads_optimizer
from ..ranks import share
from ..recipe import RunConfig
from . import build, growth, identity, preflight, router_init, sharding
from .monitor import MetricsLog, flatten
from .rundir import RunLock, check_output_dir, separate_attempts
from .schedule import Schedule

logger = logging.getLogger("dylora_moe.train")


@dataclass
class TrainState:
    """Counters restored on resume (registered with accelerator.save_state)."""
    step: int = 0              # optimizer steps done
    epoch: int = 0             # current pass over the (interleaved) training stream
    batch_in_epoch: int = 0    # micro-batches of this epoch already consumed (per process)
    best_eval: float = math.inf
    evals_without_improvement: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    tokens_seen: int = 0
    phase: int = 0             # phases started by a resume with more experts (growth.py)
    phase_start: int = 0       # the step the current phase began at: its LR schedule counts from here
    novelty: dict = field(default_factory=dict)  # novel-data streaks per source (novelty.py)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def start_phase(self) -> None:
        """A resume with more experts: the step count goes on, the rest starts over."""
        self.phase += 1
        self.phase_start = self.step
        self.epoch = self.batch_in_epoch = self.evals_without_improvement = 0
        self.best_eval = math.inf
        self.novelty.clear()

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass
class Run:
    """What one training run holds. `cfg` is the recipe as trained: on a resume its moe
    section is the checkpoint's, as the run started. The model holds its own copy
    (`moe.config`), which growth changes: whatever must follow growth reads that."""
    cfg: RunConfig
    recipe: RunConfig                 # the recipe as asked, saved beside the run
    run_dir: Path
    accelerator: Accelerator
    deepspeed: bool
    backend: str                      # "zero3" / "fsdp2": the base is partitioned; "" otherwise
    cpu_offload: bool                 # ZeRO runs the optimizer on the CPU
    tokenizer: Any
    bundle: Any                       # data.DataBundle: datasets per split and source
    base: Any                         # the frozen HF model
    moe: DyLoRAMoE                    # unwrapped: what is saved, exported and inspected
    model: Any                        # prepared (DDP / DeepSpeed engine / FSDP2): what is called
    optimizer: Any                    # prepared
    raw_optimizer: Any                # our own optimizer object, which the schedule drives
    schedule: Schedule
    state: TrainState
    train_loader: Any
    eval_loaders: dict
    epoch_steps: int                  # optimizer steps in train.num_epochs passes
    resume_from: Optional[Path] = None
    marker: Optional[dict] = None     # the resumed checkpoint's marker
    grow_on_resume: int = 0           # experts the recipe adds to the checkpoint's
    total_steps: int = 0              # known once the phase is (restore_or_grow)
    metrics: Optional[MetricsLog] = None
    grower: Optional[growth.Grower] = None
    checkpoints: Optional[CheckpointManager] = None

    def write_portable(self, out_dir) -> None:
        # The recipe saved beside the experts names the mixture as it is now (grown or not).
        write_portable(self.moe, self.tokenizer, dataclasses.replace(self.cfg, moe=self.moe.config), out_dir)

    def whole_experts(self):
        """All ranks: the experts gathered whole while inside (a no-op unless the base is sharded)."""
        return sharding.full_experts(self.accelerator, self.moe)


def build_run(cfg: RunConfig, lock: RunLock) -> Run:
    """Check, read the data, build tokenizer, base, mixture, optimizer and loaders, and
    prepare them; nothing is restored yet."""
    recipe, t = cfg, cfg.train
    run_dir = Path(t.output_dir)
    accelerator, deepspeed, backend = checked_accelerator(cfg, run_dir)
    examples = load_examples(cfg.data)  # reads and validates every data file: fails before any heavy work

    set_seed(t.seed)  # identical initialisation on every rank
    resume_from, marker = open_run_dir(accelerator, cfg, run_dir, lock)
    # Built as the checkpoint holds it (so it restores exactly), grown to the recipe's count afterwards.
    grow_on_resume = 0
    if resume_from is not None:
        saved_moe = growth.saved_moe_config(resume_from)
        saved, grow_on_resume = growth.plan_resume(cfg, resume_from)
        sharding.check_growth(backend, grow_on_resume)
        cfg = dataclasses.replace(cfg, moe=saved)
    tokenizer = build.build_tokenizer(cfg, examples, run_dir, accelerator)
    bundle = build_datasets(cfg.data, tokenizer, examples)
    base = build.build_base_model(cfg, tokenizer, run_dir, accelerator)
    if resume_from is not None:
        identity.check_resume(resume_from, marker, cfg.model.base_model, base.config, saved_moe,
                              cfg.moe.lora_r, find_targets(base, cfg.moe.target_modules))
    if accelerator.is_main_process:
        record_start(recipe, run_dir, resume_from, marker)
    # The experts' initial values must not depend on whether the base was built (random
    # tiny bases draw from the RNG) or found on disk (a restart after a kill -9).
    set_seed(t.seed)
    moe = build.build_moe(cfg, base)
    sharding.prepare_model(moe, accelerator, backend)
    train_loader, eval_loaders = build.build_loaders(cfg, bundle, tokenizer)
    kmeans = resume_from is None and cfg.moe.router_init == "kmeans"
    if kmeans and backend != sharding.ZERO3:  # before prepare: the master copy starts from these rows
        router_init.init_router_from_data(moe, bundle.train, tokenizer, cfg, accelerator)

    cpu_offload = deepspeed and offloads_optimizer(
        accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}))
    raw_optimizer = build.build_optimizer(moe, cfg, cpu_offload=cpu_offload)
    if deepspeed:
        _fill_deepspeed_auto(accelerator, cfg)
    # The schedule drives our own optimizer object, which DeepSpeed steps as is.
    model, optimizer, train_loader = accelerator.prepare(moe, raw_optimizer, train_loader)
    sharding.after_prepare(model, accelerator, backend)
    if kmeans and backend == sharding.ZERO3:  # the pass needs DeepSpeed's hooks to gather the base
        router_init.init_router_from_data(moe, bundle.train, tokenizer, cfg, accelerator)
    eval_loaders = {name: accelerator.prepare_data_loader(loader) for name, loader in eval_loaders.items()}
    epoch_steps = max(1, math.floor(t.num_epochs * len(train_loader) / t.gradient_accumulation_steps))
    schedule, state = Schedule(cfg), TrainState()  # the schedule is built once the phase is known
    accelerator.register_for_checkpointing(schedule, state)
    return Run(cfg=cfg, recipe=recipe, run_dir=run_dir, accelerator=accelerator, deepspeed=deepspeed, backend=backend,
               cpu_offload=cpu_offload, tokenizer=tokenizer, bundle=bundle, base=base,
               moe=accelerator.unwrap_model(model), model=model, optimizer=optimizer, raw_optimizer=raw_optimizer,
               schedule=schedule, state=state, train_loader=train_loader, eval_loaders=eval_loaders,
               epoch_steps=epoch_steps, resume_from=resume_from, marker=marker, grow_on_resume=grow_on_resume)


def checked_accelerator(cfg: RunConfig, run_dir: Path):
    """Everything that can be checked without loading anything, before any data is read,
    and the accelerator (it creates nothing on disk). -> (accelerator, deepspeed, backend)."""
    check_output_dir(run_dir, cfg.train.resume_from_checkpoint, probe_lock=int(os.environ.get("RANK", "0")) == 0)
    preflight.check_recipe_environment(cfg)
    accelerator = make_accelerator(cfg, run_dir)
    _configure_logging(accelerator)
    if sharding.enable_fsdp_on_cpu(accelerator):
        logger.info("FSDP on CPU: Accelerate's FSDP2 path over gloo")
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    backend = sharding.kind(accelerator)
    build.check_optimizer(cfg, deepspeed)
    preflight.check_deepspeed(accelerator)
    sharding.check_supported(cfg, backend)
    return accelerator, deepspeed, backend


def restore_or_grow(run: Run) -> None:
    """The checkpoint's exact state (or a fresh start), the metrics log, a growth the
    recipe asks for on resume, the LR schedule of this phase, and the checkpoint writer."""
    acc, t, state = run.accelerator, run.cfg.train, run.state
    if run.resume_from is not None:
        # DyLoRAMoE.state_dict holds the experts and router only, so strict loading checks exactly those.
        acc.load_state(str(run.resume_from))
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", run.resume_from, state.step, state.epoch,
                    state.batch_in_epoch)
    else:
        set_seed(t.seed, device_specific=True)  # different dropout per rank from here on
    if t.log_with:
        acc.init_trackers(t.project_name, config=_flat_config(run.cfg))
    run.metrics = MetricsLog(acc, run.run_dir / "metrics.jsonl")
    if run.backend:
        run.metrics.log(sharding.sharding_record(acc, run.moe, run.backend), state.step)
    run.grower = growth.Grower(run.cfg, acc, run.deepspeed, run.cpu_offload)
    if run.grow_on_resume:
        grown = _grow_on_resume(run)
    run.total_steps = t.max_steps or state.phase_start + run.epoch_steps
    run.schedule.start(run.raw_optimizer, state.phase_start, run.total_steps, restore=not run.grow_on_resume)
    if run.grow_on_resume:
        before, reason, report = grown
        if acc.is_main_process:
            logger.info("grew %d -> %d experts (init %s) at step %d: %s. %s", before, run.moe.config.num_experts,
                        t.grow_init, state.step, growth.phase_report(run.cfg, state, run.total_steps), report)
        run.metrics.log(growth.growth_record(state.step, run.moe, "resume", reason, report,
                                             {"from": before, "phase": state.phase}), state.step)
    run.checkpoints = _checkpoint_manager(run)


def _grow_on_resume(run: Run) -> tuple[int, str, str]:
    """The experts a resume adds: a new phase (the schedule and the data stream start over)."""
    before = run.moe.config.num_experts
    reason = f"resume from {run.resume_from} with --num_experts {before + run.grow_on_resume}"
    run.model, run.optimizer, run.raw_optimizer, report = run.grower.grow(
        run.model, run.raw_optimizer, run.grow_on_resume, note={"step": run.state.step, "reason": reason})
    run.state.start_phase()
    return before, reason, report


def _checkpoint_manager(run: Run) -> CheckpointManager:
    acc = run.accelerator
    # keep_last counts this run's checkpoints, and on a restart those of the run it continues.
    run_id, owned = lineage(run.run_dir / "checkpoints", run.resume_from) if acc.is_main_process else (None, [])
    return CheckpointManager(acc, run.run_dir / "checkpoints", run.cfg.train.keep_last,
                             {"exclude_frozen_parameters": True} if run.deepspeed else {},  # belt and braces
                             run_id=run_id, owned=owned,
                             identity=lambda: identity.record(run.cfg.model.base_model, run.base.config, run.moe),
                             gather=run.whole_experts)


def open_run_dir(accelerator, cfg: RunConfig, run_dir: Path, lock: RunLock):
    """Take the run dir (one run at a time) and pick the checkpoint to resume (verified
    on the main process, shared with the others). -> (checkpoint or None, its marker)."""
    def claim() -> str:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        return ""

    share(accelerator, claim)
    found = share(accelerator, lambda: str(resolve_resume(cfg.train.resume_from_checkpoint, run_dir / "checkpoints")
                                           or ""))
    resume_from = Path(found) if found else None
    marker = read_marker(resume_from) if resume_from is not None else None
    if accelerator.is_main_process and resume_from is not None:
        for name in adopt_run_assets(resume_from, run_dir):  # other ranks read them after main_first's barrier
            logger.info("copied %s/ from the run that wrote %s", name, resume_from)
    return resume_from, marker


def record_start(cfg: RunConfig, run_dir: Path, resume_from, marker) -> None:
    """Once everything was checked (main process): the recipe, and metrics.jsonl kept to
    the history this run continues."""
    cfg.save(run_dir / ("recipe.yaml" if resume_from is None else f"recipe-resume-{int(time.time())}.yaml"))
    separate_attempts(run_dir / "metrics.jsonl", marker["step"] if marker else None)


def make_accelerator(cfg, run_dir):
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without this, DeepSpeed on CPU starts every rank as rank 0 of 1 (docs/troubleshooting.md).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        mixed_precision="bf16" if cfg.train.bf16 else "no",
        # Sync every N micro-batches by count, not at the end of each epoch: the stream
        # runs across epochs and checkpoints always fall on optimizer-step boundaries.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.gradient_accumulation_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=cfg.train.log_with or None, project_dir=str(run_dir), kwargs_handlers=handlers)


def _fill_deepspeed_auto(accelerator, cfg) -> None:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.train.max_grad_norm


def _flat_config(cfg) -> dict:
    """The recipe as trackers take hyperparameters: `section.field` -> a scalar."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(cfg.to_dict(), ".").items()}


def _configure_logging(accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "accelerate", "matplotlib", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
