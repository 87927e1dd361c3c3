"""Recipes: YAML -> RunConfig (model / moe / data / train sections), validated dataclasses.

    cfg = load_recipe("configs/demo.yaml", ["--num_experts", "6", "--bf16"])

Every field of every section can be overridden on the command line as `--field value`
(or `--section.field value` where a name is ambiguous). Values parse as YAML, then are
coerced to the field's type (fieldtypes.py), so `--learning_rate 1e-4` and `--bf16` (no
value = true) both work, and `--learning_rate` alone is an error. Familiar flag names
(--bf16, --num_epochs, --num_experts, ...) are fields here. Options that contradict each other are
refused here too (`check_consistent`), before anything is read or loaded.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from .data import DataConfig
from .errors import UserError
from .fieldtypes import BARE, check_fields
from .fieldtypes import coerce as coerce_value
from .model import MoEConfig
from .model.config import convert_removed
from .model.tiny import ARCHITECTURES, TINY_PREFIX, tiny_config

SEED_RANGE = (0, 2**32 - 1)  # what numpy's seeding (accelerate.set_seed) accepts
# A tiny random base is for demos and tests: bigger is a typo, and would allocate
# (and write to the run dir) a model of that size before anything else failed.
TINY_MAX_PARAMETERS = 2 * 10**9


@dataclass
class ModelConfig:
    # A hub id or local path (e.g. google/codegemma-2b), or "tiny-random:<arch>" for a
    # random model built from `tiny` (tiny_config kwargs) - the offline default.
    base_model: str = "google/codegemma-2b"
    tokenizer: Optional[str] = None       # None = the base model's; "demo" = trained locally on the data
    # A GGUF file inside base_model (a folder or hub repo), as transformers names it:
    # transformers dequantizes it to float on load (needs the `gguf` package). The base's
    # tokenizer and chat template come from the same file.
    gguf_file: Optional[str] = None
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
        check_fields(self, "model")
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("model.load_in_4bit and model.load_in_8bit: expected at most one of them")
        if not isinstance(self.base_model, str) or not self.base_model:
            raise UserError(f"model.base_model={self.base_model!r}: expected a hub id, a path or tiny-random:<arch>")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise UserError(f"model.dtype={self.dtype!r}: expected one of ['auto', 'bfloat16', 'float32']")
        if self.tokenizer == "demo" and not self.base_model.startswith(TINY_PREFIX):
            raise UserError("model.tokenizer='demo' only fits a tiny-random base (its vocabulary is built for it)")
        check_tiny(self.base_model, self.tiny)
        if self.gguf_file is not None:
            if not isinstance(self.gguf_file, str) or not self.gguf_file.strip() or "\x00" in self.gguf_file:
                raise UserError(f"model.gguf_file={self.gguf_file!r}: expected a file name inside base_model")
            if self.base_model.startswith(TINY_PREFIX):
                raise UserError(f"model.gguf_file={self.gguf_file!r}: a tiny-random base is built, not read from a "
                                "file; remove gguf_file")
            if self.load_in_4bit or self.load_in_8bit:
                raise UserError("model.gguf_file with model.load_in_4bit/8bit: transformers loads a GGUF base "
                                "dequantized and cannot quantize it again; use one of them")


def base_files(model_cfg: ModelConfig) -> dict:
    """from_pretrained keyword arguments that say which file of base_model holds the base
    (a GGUF checkpoint); the same for the config, the weights and the tokenizer."""
    return {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {}


def tiny_fields() -> dict:
    """The `tiny` keys a recipe may set (tiny_config's size arguments) and their defaults."""
    params = inspect.signature(tiny_config).parameters
    return {name: p.default for name, p in params.items() if name not in ("arch", "vocab_size")}


def check_tiny(base_model: str, tiny: dict) -> None:
    """Keys and sizes of a tiny random base, checked before any data is read."""
    if not base_model.startswith(TINY_PREFIX):
        if tiny:
            raise UserError(f"model.tiny={tiny!r}: only used with base_model: {TINY_PREFIX}<arch> "
                            f"(this recipe loads {base_model!r}); remove it")
        return
    arch = base_model[len(TINY_PREFIX):]
    if arch not in ARCHITECTURES:
        raise UserError(f"model.base_model={base_model!r}: unknown tiny-random architecture {arch!r}; expected "
                        f"one of {[TINY_PREFIX + a for a in ARCHITECTURES]}")
    known = tiny_fields()
    unknown = sorted(map(str, set(tiny) - set(known)))
    if unknown:
        raise UserError(f"model.tiny: unknown key(s) {unknown}; expected some of {sorted(known)}")
    shape = {**known, **tiny}
    for name, value in shape.items():
        if name == "initializer_range":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise UserError(f"model.tiny.initializer_range={value!r}: expected a number > 0")
        elif not (name == "head_dim" and value is None):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.tiny.{name}={value!r}: expected an integer >= 1")
    if shape["head_dim"] is None and shape["hidden_size"] % shape["num_heads"]:
        raise UserError(f"model.tiny.hidden_size={shape['hidden_size']}: expected a multiple of "
                        f"num_heads={shape['num_heads']} (or set head_dim)")
    if shape["num_heads"] % shape["num_kv_heads"]:
        raise UserError(f"model.tiny.num_kv_heads={shape['num_kv_heads']}: expected a divisor of "
                        f"num_heads={shape['num_heads']}")
    h, inner, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    head = shape["head_dim"] or h // shape["num_heads"]
    per_layer = 2 * h * head * (shape["num_heads"] + shape["num_kv_heads"]) + 3 * h * inner
    if layers * per_layer + shape["max_positions"] * h > TINY_MAX_PARAMETERS:
        raise UserError(f"model.tiny={tiny!r}: about {layers * per_layer / 1e9:.1f}e9 parameters; a tiny random "
                        f"base is for demos and tests (at most {TINY_MAX_PARAMETERS / 1e9:.0f}e9)")


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
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with] if self.log_with else []
        check_fields(self, "train")
        if not self.output_dir.strip() or "\x00" in self.output_dir:
            raise UserError(f"train.output_dir={self.output_dir!r}: expected a directory path")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise UserError(f"train.seed={self.seed}: expected an integer in [0, 2**32 - 1]")
        positive = ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_every", "keep_last",
                    "max_consecutive_nonfinite")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"train.{name}={getattr(self, name)!r}: expected an integer >= 1")
        non_negative = ("max_steps", "warmup_steps", "eval_every", "save_every", "early_stopping_patience",
                        "cosine_restarts", "dataloader_num_workers")
        for name in non_negative:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise UserError(f"train.{name}={getattr(self, name)!r}: expected an integer >= 0")
        if not self.learning_rate > 0:
            raise UserError(f"train.learning_rate={self.learning_rate!r}: expected a number > 0")
        if self.num_epochs <= 0 and self.max_steps == 0:
            raise UserError(f"train.num_epochs={self.num_epochs!r}: expected > 0 (or set max_steps)")
        for name in ("weight_decay", "max_grad_norm", "warmup_ratio"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name}={getattr(self, name)!r}: expected a number >= 0")
        if self.warmup_ratio > 1:
            raise UserError(f"train.warmup_ratio={self.warmup_ratio!r}: expected a fraction in [0, 1]")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            raise UserError(f"train.adam_beta1/adam_beta2=({self.adam_beta1}, {self.adam_beta2}): expected in [0, 1)")
        optimizers = ("adamw", "adamw_8bit", "paged_adamw_8bit")
        if self.optimizer not in optimizers:
            raise UserError(f"train.optimizer={self.optimizer!r}: expected one of {list(optimizers)}")
        schedulers = ("cosine_with_restarts", "cosine", "linear", "constant_with_warmup", "constant")
        if self.lr_scheduler not in schedulers:
            raise UserError(f"train.lr_scheduler={self.lr_scheduler!r}: expected one of {list(schedulers)}")
        if not isinstance(self.grow_init, str) or not re.fullmatch(r"zeros|mean|copy:\d+", self.grow_init):
            raise UserError(f"train.grow_init={self.grow_init!r}: expected zeros, mean or copy:<expert index>")
        if not isinstance(self.novelty_threshold, (int, float)) or not 0 < self.novelty_threshold <= 1:
            raise UserError(f"train.novelty_threshold={self.novelty_threshold!r}: expected a number in (0, 1]")
        for name in ("novelty_window", "max_experts"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"train.{name}={getattr(self, name)!r}: expected an integer >= 1")
        if self.max_experts > 1024:
            raise UserError(f"train.max_experts={self.max_experts}: expected at most 1024 (moe.num_experts' limit)")
        if not all(isinstance(x, str) and x in ("wandb", "tensorboard") for x in self.log_with):
            raise UserError(f"train.log_with={self.log_with!r}: expected some of ['wandb', 'tensorboard']")

    def warmup_for(self, steps: int) -> int:
        """Warm-up of a schedule over `steps`: warmup_steps, else that fraction of them."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * steps)


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


def load_recipe(path: Optional[str], overrides: list[str] = (), require_base: bool = False) -> RunConfig:
    """Read a recipe, apply `--key value` overrides, validate every section.

    require_base: refuse a recipe (or none at all) that does not name model.base_model,
    instead of quietly training the default (a multi-GB hub download)."""
    raw = read_recipe(path) if path else {}
    where = path or "command line"
    sections = {}
    for name in SECTIONS:
        values = raw.get(name)
        if values is not None and not isinstance(values, dict):
            raise UserError(f"{where}: section {name!r} must be a mapping of field: value, got "
                            f"{type(values).__name__} {values!r}"[:300])
        sections[name] = dict(values or {})
    sections["moe"] = convert_removed(sections["moe"], where)
    for name, values in sections.items():
        known = {f.name for f in dataclasses.fields(SECTIONS[name])}
        bad = sorted(map(str, set(values) - known))
        if bad:
            raise UserError(f"{where}: unknown key(s) {[f'{name}.{k}' for k in bad]}")
    for key, value in parse_overrides(overrides):
        section, name = resolve_key(key)
        sections[section][name] = value
    if require_base and "base_model" not in sections["model"]:
        raise UserError(f"{'recipe ' + path if path else 'no --config given'}: model.base_model is not set, and "
                        "its default means downloading google/codegemma-2b; pass a recipe "
                        "(--config configs/demo.yaml is the offline demo) or name the base "
                        "(--base_model google/codegemma-2b)")
    built = {}
    for name, cls in SECTIONS.items():
        values = {k: coerce(cls, k, v, f"{name}.{k}") for k, v in sections[name].items()}
        built[name] = cls(**values)
    cfg = RunConfig(**built)
    check_consistent(cfg)
    return cfg


def read_recipe(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a directory; expected a recipe YAML file")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: recipe not found")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{p}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save the recipe as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{p}: invalid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise UserError(f"{p}: invalid YAML (nested too deeply)") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}")
    unknown = sorted(map(str, set(raw) - set(SECTIONS)))
    if unknown:
        raise UserError(f"{p}: unknown section(s) {unknown}; expected {list(SECTIONS)}")
    return raw


def check_consistent(cfg: RunConfig) -> None:
    """Options that are each valid but cannot work together."""
    t, moe, data = cfg.train, cfg.moe, cfg.data
    if t.grow_on_novelty and t.max_experts < moe.num_experts:
        raise UserError(f"train.max_experts={t.max_experts} is below moe.num_experts={moe.num_experts}: novelty "
                        "growth could never add an expert; raise max_experts or turn grow_on_novelty off")
    if t.grow_init.startswith("copy:") and int(t.grow_init[5:]) >= moe.num_experts:
        raise UserError(f"train.grow_init={t.grow_init!r}: expected copy:<i> with i < moe.num_experts="
                        f"{moe.num_experts}")
    if t.early_stopping_patience and not t.eval_every:
        raise UserError(f"train.early_stopping_patience={t.early_stopping_patience} needs train.eval_every > 0 "
                        "(with eval_every 0 the run evaluates only at its end, so it never stops early)")
    if cfg.model.base_model == TINY_PREFIX + "gpt2":  # learned positions: a longer row is an IndexError
        positions = {**tiny_fields(), **cfg.model.tiny}["max_positions"]
        if data.max_seq_length > positions:
            raise UserError(f"data.max_seq_length={data.max_seq_length} exceeds the tiny base's positions "
                            f"(model.tiny.max_positions={positions}); raise max_positions or lower max_seq_length")


# Why not OmegaConf or jsonargparse for these overrides: both were weighed. OmegaConf's
# dotlist takes `section.field=value` only, so the flags users already type (`--bf16`
# bare, `--num_experts 6` without its section, `--seed` meaning the training seed) would
# need this same layer on top; its structured configs check types but not ranges or
# cross-field rules, which the dataclasses' __post_init__ and check_consistent do with
# messages naming the field. jsonargparse would own argv (a second CLI beside argparse's)
# and reports errors in its own words. What is left here is short: split argv into
# (key, value) pairs, find the section a bare key belongs to, and let fieldtypes coerce.
def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """["--lr", "1e-4", "--bf16", "--x=3"] -> [("lr", "1e-4"), ("bf16", BARE), ("x", "3")]."""
    out, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 1
        else:
            value = BARE  # a flag without a value: true for a bool field, an error for any other
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def resolve_key(key: str) -> tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        if section in SECTIONS and name in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            return section, name
        raise UserError(f"command line: unknown option --{key}")
    owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if not owners:
        raise UserError(f"command line: unknown option --{key}")
    if len(owners) > 1 and "train" in owners:
        return "train", key  # e.g. --seed is the training seed; --data.seed the split seed
    if len(owners) > 1:
        raise UserError(f"command line: --{key} is ambiguous; use one of {[f'--{s}.{key}' for s in owners]}")
    return owners[0], key


def coerce(cls, name: str, value, where: str):
    """A command-line or YAML value to the field's declared type (fieldtypes.coerce)."""
    return coerce_value(typing.get_type_hints(cls)[name], value, where)


def base_dtype(cfg: RunConfig) -> torch.dtype:
    """The frozen base's dtype: model.dtype, or with `auto` what the run computes in."""
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if cfg.train.bf16 else torch.float32
    return getattr(torch, cfg.model.dtype)
