"""MoEConfig: every knob of the mixture, validated at construction.

A plain dataclass so recipes (YAML/JSON) map onto it field by field and a bad value
fails here, with the field's name, before any model is touched. Recipes and saved
models that name a removed option are converted once, on load (`convert_removed`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError

logger = logging.getLogger(__name__)

ROUTER_INPUTS = ("base_hidden", "embeddings", "layer")
ROUTINGS = ("sequence", "token")
GATINGS = ("dense", "top_k", "straight_through")
ROUTER_INITS = ("normal", "kmeans")

# Attention projections found across common HF causal LMs (Llama/Gemma/Mistral/Phi:
# q/k/v/o_proj; GPT-NeoX/Falcon/Bloom: query_key_value; GPT-2: c_attn, a Conv1D;
# MPT/Phi-1: Wqkv). Matched against the last component of a module's name, as PEFT does.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "c_attn", "Wqkv")


@dataclass
class MoEConfig:
    num_experts: int = 4
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: Optional[Sequence[str]] = None  # None = auto-detect (DEFAULT_TARGET_MODULES)
    top_k: int = 1
    temperature: float = 1.0
    router_input: str = "base_hidden"
    routing: str = "sequence"
    # Weight of the Switch Transformer balance loss E * sum(f * P) (f = share of units
    # whose top expert is e, P = mean gate) in the optimised loss.
    balance_coefficient: float = 0.1
    # Chunked LM loss in training (logits never whole): tokens per chunk; None = on when
    # the vocabulary has >= 32k tokens, sized by it (loss.auto_chunk_tokens: 1048 tokens at
    # 256k), 0 = off (plain loss over full logits).
    loss_chunk_tokens: Optional[int] = None
    # Optimizer steps of its own after which an expert added by growth matures; its
    # admission ramps 0 -> 1 over the same steps (model/admission.py).
    maturity_steps: int = 100
    # How the router's probabilities p = softmax(logits / temperature) weigh the experts
    # (model/gating.py). Every mode routes inference exactly as it trains:
    # "dense": all experts, weights p. The stacked layer computes every expert whatever the
    #     gates are, so dense inference costs what top-1 costs.
    # "top_k": the top_k experts, each at its own p, not renormalised, so the router
    #     learns through them (Switch Transformer), for every top_k.
    # "straight_through": the top_k experts at weight 1/top_k each; the backward pass takes
    #     the gradient of p (straight-through estimator).
    gating: str = "dense"
    # Training only, top_k / straight_through: Gumbel noise of this scale on the logits
    # before choosing the top_k (1.0 samples the choice from p), so experts the router
    # ranks second still get data. Drawn from torch's RNG, which checkpoints restore.
    router_noise: float = 0.0
    # "normal": random rows (std 0.02). "kmeans": before the first step, each expert's row
    # points at one k-means cluster of the routing features of a sample of training units
    # (train/router_init.py), so experts start on different data, not on noise.
    router_init: str = "normal"
    router_init_scale: float = 2.0   # kmeans: logit of a unit at its centroid's mean distance
    extra: dict = field(default_factory=dict)  # free-form metadata carried through save/load

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise UserError(f"MoEConfig.{name}={getattr(self, name)!r}: expected {expected}")

        need(_is_int(self.num_experts) and self.num_experts >= 1, "num_experts", "an integer >= 1")
        need(self.num_experts <= 1024, "num_experts", "at most 1024 (every target layer stacks them all)")
        need(_is_int(self.lora_r) and self.lora_r >= 1, "lora_r", "an integer >= 1")
        need(_is_int(self.top_k) and 1 <= self.top_k <= self.num_experts, "top_k",
             f"an integer in [1, num_experts={self.num_experts}]")
        need(_is_num(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "a number > 0")
        need(_is_num(self.temperature) and self.temperature > 0, "temperature", "a number > 0")
        need(_is_num(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "a number in [0, 1)")
        need(_is_num(self.balance_coefficient) and self.balance_coefficient >= 0, "balance_coefficient",
             "a number >= 0")
        need(_is_int(self.maturity_steps) and self.maturity_steps >= 1, "maturity_steps", "an integer >= 1")
        need(self.router_input in ROUTER_INPUTS, "router_input", f"one of {ROUTER_INPUTS}")
        need(self.routing in ROUTINGS, "routing", f"one of {ROUTINGS}")
        need(self.gating in GATINGS, "gating", f"one of {GATINGS}")
        need(_is_num(self.router_noise) and math.isfinite(self.router_noise) and self.router_noise >= 0,
             "router_noise", "a finite number >= 0")
        need(self.router_noise == 0 or self.gating in ("top_k", "straight_through"), "router_noise",
             f"0 with gating={self.gating!r} (noise only chooses the experts of top_k / straight_through)")
        need(self.router_init in ROUTER_INITS, "router_init", f"one of {ROUTER_INITS}")
        need(self.router_input != "layer" or self.routing == "token", "routing",
             "'token' with router_input='layer' (each layer routes its own input tokens)")
        need(self.router_input != "layer" or self.router_init == "normal", "router_init",
             "'normal' with router_input='layer' (k-means points one router's rows at clusters)")
        need(_is_num(self.router_init_scale) and math.isfinite(self.router_init_scale) and self.router_init_scale > 0,
             "router_init_scale", "a finite number > 0")
        need(self.loss_chunk_tokens is None or (_is_int(self.loss_chunk_tokens) and self.loss_chunk_tokens >= 0),
             "loss_chunk_tokens", "None, 0 or a positive integer")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            need(len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
                 "target_modules", "None or a non-empty list of module names")
            self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "MoEConfig") -> "MoEConfig":
        data = convert_removed(data, source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{source}: unknown MoEConfig field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "MoEConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: expected a JSON MoEConfig ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
        if "gating" not in data:  # saved before the field: trained dense (and inferred top-k)
            data = {**data, "gating": "dense_train_top_k_eval"}
        return cls.from_dict(data, source=str(path))


# Options that were removed, each with what an old recipe or saved model that names it
# gets instead: field -> {old value: new value}, None meaning the field is dropped.
REMOVED = {
    # Dense in training, top-k in inference: inference was not the function that trained
    # (it lost to one LoRA by 5x, docs/benchmarks.md); such a model now infers as it trained.
    "gating": {"dense_train_top_k_eval": "dense"},
    # MSE(mean gate, 1/E) let experts die; the Switch loss is the only one left.
    "balance_loss": {"mse": None, "switch": None},
    # A base pass per expert, logits mixed: the reference the tests keep (tests/reference.py).
    "mixture": {"logits": None, "deltas": None},
    # The initial experts' maturity, which only steered the removed gating.
    "experts_mature": {True: None, False: None},
}


def convert_removed(data: dict, source: str = "MoEConfig") -> dict:
    """A MoEConfig mapping with every removed option converted (REMOVED), and one
    warning line saying what became what. A value of a removed field that no version
    accepted is left for validation to reject."""
    data, changes = dict(data), []
    for name, values in REMOVED.items():
        if name not in data or not _hashable(data[name]) or data[name] not in values:
            continue
        new = values[data[name]]
        if new is None:
            changes.append(f"{name}={data.pop(name)!r} dropped")
        else:
            changes.append(f"{name}={data[name]!r} -> {new!r}")
            data[name] = new
    if changes:
        logger.warning("%s: converted removed MoEConfig options: %s (docs/recipe.md)", source, "; ".join(changes))
    return data


def _hashable(x) -> bool:
    return isinstance(x, (str, bool, int, float))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
