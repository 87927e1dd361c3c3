"""Recipes: YAML -> RunConfig (model / moe / data / train sections), validated dataclasses.

    cfg = load_recipe("configs/demo.yaml", ["--num_experts", "6", "--bf16"])

Every field of every section can be overridden on the command line as `--field value`
(or `--section.field value` where a name is ambiguous). Values parse as YAML, then are
coerced to the field's type, so `--learning_rate 1e-4` and `--bf16` (no value = true)
both work. The seed project's flag names are fields here and keep their meaning.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..data import DataConfig
from ..model import MoEConfig


@dataclass
class ModelConfig:
    # A hub id or local path (e.g. google/codegemma-2b), or "tiny-random:<arch>" for a
    # random model built from `tiny` (tiny_config kwargs) - the offline default.
    base_model: str = "google/codegemma-2b"
    tokenizer: Optional[str] = None       # None = the base model's; "demo" = trained locally on the data
    dtype: str = "auto"                   # auto | bfloat16 | float32 (weights of the frozen base)
    attn_implementation: Optional[str] = None
    tiny: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False
    # QLoRA-style frozen base through transformers' BitsAndBytesConfig (bitsandbytes):
    # 4-bit NF4 with double quantization, or LLM.int8(). The experts stay in full precision
    # and wrap the quantized Linear4bit / Linear8bitLt layers as they are.
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    compile: bool = False                 # torch.compile each decoder layer of the base (off by default)

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.load_in_4bit and model.load_in_8bit: expected at most one of them")
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"model.base_model={self.base_model!r}: expected a hub id, a path or tiny-random:<arch>")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"model.dtype={self.dtype!r}: expected one of ['auto', 'bfloat16', 'float32']")
        if self.tokenizer == "demo" and not self.base_model.startswith("tiny-random:"):
            raise ValueError("model.tokenizer='demo' only fits a tiny-random base (its vocabulary is built for it)")


@dataclass
class TrainConfig:
    output_dir: str = "runs/dylora-moe"
    seed: int = 42
    bf16: bool = False
    num_epochs: float = 1.0
    max_steps: int = 0                    # optimizer steps; > 0 overrides num_epochs
    train_batch_size: int = 2             # per process (micro-batch)
    eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw"              # adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes; not under DeepSpeed)
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0            # 0 = no clipping
    lr_scheduler: str = "cosine_with_restarts"
    cosine_restarts: int = 0              # hard restarts after the first cycle (cycles = restarts + 1)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0             # used when warmup_steps == 0
    eval_every: int = 0                   # optimizer steps; 0 = only at the end
    save_every: int = 0                   # optimizer steps; 0 = only at the end (and on SIGTERM)
    keep_last: int = 2                    # checkpoints this run keeps (it never deletes others')
    log_every: int = 1
    early_stopping_patience: int = 0      # evals without improvement before stopping; 0 = off
    max_consecutive_nonfinite: int = 3    # non-finite loss steps in a row before giving up
    resume_from_checkpoint: Optional[str] = None  # a checkpoint path, or "auto"
    log_with: list = field(default_factory=list)  # Accelerate trackers: wandb, tensorboard
    project_name: str = "dylora-moe"
    dataloader_num_workers: int = 0
    # Dynamic experts (README "Dynamic experts"). More experts on resume: --num_experts.
    freeze_mature_experts: bool = False   # mature experts stop changing: new data trains new experts + router
    grow_init: str = "zeros"              # a new expert's weights: zeros | mean | copy:i (model/growth.py)
    grow_on_novelty: bool = False         # add an expert when a data source looks new (train/novelty.py)
    novelty_threshold: float = 0.75       # cosine to the nearest expert's centroid below which data is novel
    novelty_window: int = 10              # novel optimizer steps in a row before an expert is added
    max_experts: int = 8                  # novelty growth stops at this many experts

    def __post_init__(self):
        positive = ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_every", "keep_last",
                    "max_consecutive_nonfinite")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: expected an integer >= 1")
        non_negative = ("max_steps", "warmup_steps", "eval_every", "save_every", "early_stopping_patience",
                        "cosine_restarts", "dataloader_num_workers")
        for name in non_negative:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: expected an integer >= 0")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate={self.learning_rate!r}: expected a number > 0")
        if self.num_epochs <= 0 and self.max_steps == 0:
            raise ValueError(f"train.num_epochs={self.num_epochs!r}: expected > 0 (or set max_steps)")
        for name in ("weight_decay", "max_grad_norm", "warmup_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: expected a number >= 0")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"train.adam_beta1/adam_beta2=({self.adam_beta1}, {self.adam_beta2}): expected in [0, 1)")
        optimizers = ("adamw", "adamw_8bit", "paged_adamw_8bit")
        if self.optimizer not in optimizers:
            raise ValueError(f"train.optimizer={self.optimizer!r}: expected one of {list(optimizers)}")
        schedulers = ("cosine_with_restarts", "cosine", "linear", "constant_with_warmup", "constant")
        if self.lr_scheduler not in schedulers:
            raise ValueError(f"train.lr_scheduler={self.lr_scheduler!r}: expected one of {list(schedulers)}")
        if not isinstance(self.grow_init, str) or not re.fullmatch(r"zeros|mean|copy:\d+", self.grow_init):
            raise ValueError(f"train.grow_init={self.grow_init!r}: expected zeros, mean or copy:<expert index>")
        if not isinstance(self.novelty_threshold, (int, float)) or not 0 < self.novelty_threshold <= 1:
            raise ValueError(f"train.novelty_threshold={self.novelty_threshold!r}: expected a number in (0, 1]")
        for name in ("novelty_window", "max_experts"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: expected an integer >= 1")
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with] if self.log_with else []
        unknown = sorted(set(self.log_with) - {"wandb", "tensorboard"})
        if unknown:
            raise ValueError(f"train.log_with={self.log_with!r}: expected some of ['wandb', 'tensorboard']")


SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def save(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_recipe(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    """Read a recipe, apply `--key value` overrides, validate every section."""
    raw = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: recipe not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: invalid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: expected a mapping of sections {list(SECTIONS)}")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{p}: unknown section(s) {unknown}; expected {list(SECTIONS)}")
    sections = {name: dict(raw.get(name) or {}) for name in SECTIONS}
    for name, values in sections.items():
        known = {f.name for f in dataclasses.fields(SECTIONS[name])}
        bad = sorted(set(values) - known)
        if bad:
            raise ValueError(f"{path}: unknown key(s) {[f'{name}.{k}' for k in bad]}")
    for key, value in parse_overrides(overrides):
        section, name = resolve_key(key)
        sections[section][name] = value
    built = {}
    for name, cls in SECTIONS.items():
        values = {k: coerce(cls, k, v, f"{name}.{k}") for k, v in sections[name].items()}
        built[name] = cls(**values)
    return RunConfig(**built)


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """["--lr", "1e-4", "--bf16", "--x=3"] -> [("lr", "1e-4"), ("bf16", True), ("x", "3")]."""
    out, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 1
        else:
            value = True  # a bare flag
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def resolve_key(key: str) -> tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        if section in SECTIONS and name in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            return section, name
        raise ValueError(f"command line: unknown option --{key}")
    owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if not owners:
        raise ValueError(f"command line: unknown option --{key}")
    if len(owners) > 1 and "train" in owners:
        return "train", key  # e.g. --seed is the training seed; --data.seed the split seed
    if len(owners) > 1:
        raise ValueError(f"command line: --{key} is ambiguous; use one of {[f'--{s}.{key}' for s in owners]}")
    return owners[0], key


def coerce(cls, name: str, value, where: str):
    """A command-line or YAML value to the field's declared type (YAML reads 1e-4 as a
    string, the command line gives strings for everything)."""
    hint = typing.get_type_hints(cls)[name]
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = args[0]
    if isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"{where}={value!r}: not a valid value") from None
    try:
        if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, str):
            return int(value)
        if hint is bool and isinstance(value, str):
            return {"true": True, "false": False}[value.lower()]
    except (ValueError, KeyError):
        raise ValueError(f"{where}={value!r}: expected {getattr(hint, '__name__', hint)}") from None
    if hint is list and isinstance(value, (str, int, float)) and name != "sources":
        return [value]
    return value
