"""DyLoRAMoE: a frozen causal LM, E stacked LoRA experts and a router.

    moe = DyLoRAMoE(base_model, MoEConfig(num_experts=4))
    out = moe(input_ids=..., attention_mask=..., labels=...)   # out.loss, out.routing_weights
    moe.generate(input_ids, max_new_tokens=64)

One forward = (optionally) a no-grad routing pass with the experts off, the router, and
ONE base forward in which every stacked layer applies all experts at once (docs/design.md).
What the router routes on is model/routing.py; generation model/generation.py; saving
and loading model/persistence.py; growth model/growth.py and model/admission.py.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers.utils import ModelOutput

from . import admission, blocks, generation, growth, persistence, routing
from .balance import balance_loss
from .config import MoEConfig
from .inject import inject_experts
from .layer import GateSlot
from .loss import auto_chunk_tokens, causal_lm_loss, chunked_causal_lm_loss, compiled_chunk_loss
from .packing import expand_segments, segment_validity
from .peft_io import export_expert, export_mixture
from .quantized import keep_trainable_through
from .router import LinearRouter


@dataclass
class MoEOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None          # lm_loss + balance_coefficient * balance_loss
    # logits: None in a training forward with the chunked loss (they are never built whole)
    lm_loss: Optional[torch.Tensor] = None       # token-mean cross-entropy over label tokens
    balance_loss: Optional[torch.Tensor] = None  # unscaled load-balancing loss
    logits: Optional[torch.Tensor] = None
    routing_weights: Optional[torch.Tensor] = None  # (B, 1, E) per sequence or (B, T, E) per token
    num_label_tokens: Optional[torch.Tensor] = None


class DyLoRAMoE(nn.Module):
    def __init__(self, base_model: nn.Module, config: Optional[MoEConfig] = None):
        super().__init__()
        self.config = config if config is not None else MoEConfig()
        base_model.requires_grad_(False)  # frozen, shared, never copied
        keep_trainable_through(base_model)  # a bitsandbytes base must pass gradients (quantized.py)
        self.base_model = base_model
        self._slot = GateSlot()
        # A plain dict on purpose: the layers already live inside base_model, registering
        # them again would list every expert parameter twice.
        self.experts = inject_experts(base_model, self.config, self._slot)
        hidden = base_model.config.get_text_config().hidden_size
        self.router = LinearRouter(hidden, self.config.num_experts, self.config.top_k, self.config.temperature,
                                   gating=self.config.gating, noise=self.config.router_noise)
        self.router.to(next(iter(self.experts.values())).lora_A.device)
        self._slot.router = self.router.forward  # the layers' own routers (router_input="layer") use its gating
        if self.config.router_input == "layer":
            self.router.gate.weight.requires_grad_(False)  # unused: each layer holds its own rows
        self._lora_r = self.config.lora_r
        self._gate_override: Optional[torch.Tensor] = None
        self._last_routed: Optional[torch.Tensor] = None
        self._chunk_loss_fn = None  # the chunked loss's per-chunk softmax; compiled by compile_base()

    # ------------------------------------------------------------------ parameters and state
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The mixture's own state only: stacked experts, router, its buffers. The frozen
        base is not ours and never saved, so accelerator.save_state, DeepSpeed (whose
        exclude_frozen_parameters misses tied weights like lm_head) and DDP all write
        checkpoints of the experts alone."""
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        out = destination if destination is not None else OrderedDict()
        for key, value in full.items():
            if persistence.is_expert_key(key[len(prefix):]):
                out[key] = value
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads the mixture's state; `strict` checks exactly those keys (the base is left as is)."""
        own = set(self.state_dict())
        missing = sorted(k for k in own - set(state_dict) if not persistence.is_optional_key(k))
        unexpected = sorted(set(state_dict) - own)
        if strict and (missing or unexpected):
            raise RuntimeError(f"DyLoRAMoE.load_state_dict: missing {missing[:3]} ({len(missing)}), "
                               f"unexpected {unexpected[:3]} ({len(unexpected)})")
        super().load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)

    def expert_state_dict(self) -> dict[str, torch.Tensor]:
        return persistence.expert_state_dict(self)

    def load_expert_state(self, tensors: dict[str, torch.Tensor], source: str = "state") -> None:
        persistence.load_expert_state(self, tensors, source)

    def save_pretrained(self, save_directory) -> Path:
        """Experts, router and config; never the base model (it is not ours to copy)."""
        return persistence.save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, load_directory) -> "DyLoRAMoE":
        src = Path(load_directory)
        persistence.check_folder(src)
        moe = cls(base_model, MoEConfig.load(src / persistence.CONFIG_FILE))
        weights = src / persistence.WEIGHTS_FILE
        moe.load_expert_state(load_file(str(weights)), source=str(weights))
        return moe

    # ------------------------------------------------------------------ dynamic experts
    def add_expert(self, init: str = "zeros", note: Optional[dict] = None) -> int:
        """Widen every stacked layer and the router by one expert; returns its index.
        It joins immature, with admission 0, so the outputs are unchanged at this moment
        for any `init` ("zeros" | "copy:i" | "mean"; see model/growth.py). The event is
        recorded in config.extra["expert_history"] (saved with the model), with `note`."""
        index = growth.add_expert(self, init)
        self._record("add", index, init=init, **(note or {}))
        return index

    def prune_expert(self, index: int, note: Optional[dict] = None) -> None:
        """Remove expert `index` and its router row; later experts move down by one."""
        growth.prune_expert(self, index)
        self._record("prune", index, **(note or {}))

    def mark_mature(self, index: int) -> None:
        """Mature and fully admitted now (model/admission.py)."""
        admission.mark_mature(self.router, index)

    def advance_maturity(self, trained=None) -> list[int]:
        """Count one optimizer step for the experts that trained (bool per expert; default
        all); returns those that matured with it (model/admission.py)."""
        count = self.config.num_experts
        trained = torch.ones(count, dtype=torch.bool) if trained is None else torch.as_tensor(trained).bool()
        return admission.advance(self.router, trained, self.config.maturity_steps)

    def _record(self, event: str, index: int, **fields) -> None:
        history = self.config.extra.setdefault("expert_history", [])
        history.append({"event": event, "expert": index, "num_experts": self.config.num_experts, **fields})

    # ------------------------------------------------------------------ gates
    @contextlib.contextmanager
    def experts_disabled(self):
        """Run the plain base model (used for the routing pass and `--base` generation)."""
        previous, self._slot.enabled = self._slot.enabled, False
        try:
            yield
        finally:
            self._slot.enabled = previous

    def set_gates(self, gates: Optional[torch.Tensor]) -> None:
        """Gates (B, 1|T, E) for the next base forwards, or None to switch experts off."""
        if gates is None:
            self._slot.expanded = None
            return
        dtype = self.experts_dtype(gates.device.type)
        self._slot.in_layers = False
        self._slot.expanded = (gates.repeat_interleave(self._lora_r, dim=-1) * self.gate_scale()).to(dtype)

    def gate_scale(self) -> torch.Tensor:
        """What every gate is multiplied by: alpha / r times the number of admitted
        experts, so that gates summing to 1 give each expert its LoRA scale alpha / r
        when the mix is uniform, and a uniform mixture of E experts of rank r is exactly
        one LoRA of rank E*r at the same alpha / r. Without the count each expert would
        move 1/E as fast as a LoRA at the same learning rate (with Adam, a scale is a
        learning rate), and recipes would need E times the rate. An expert just added
        (admission 0) does not count, so growth leaves the outputs as they were."""
        return self.config.scaling * self.router.expert_admission.float().sum()

    def experts_dtype(self, device_type: str) -> torch.dtype:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return next(iter(self.experts.values())).lora_A.dtype

    @contextlib.contextmanager
    def override_gates(self, weights):
        """Route every unit with fixed expert weights (E,), bypassing the router: one-hot
        to use a single expert, uniform to mix all equally. Used by tests, benchmarks and
        `generate --expert/--uniform`."""
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (self.config.num_experts,):
            raise ValueError(f"gate override: expected {self.config.num_experts} weights, got {tuple(weights.shape)}")
        previous, self._gate_override = self._gate_override, weights
        try:
            yield
        finally:
            self._gate_override = previous

    def route(self, input_ids, attention_mask, unit_mask, position_ids=None, cache=None,
              segment_ids=None) -> torch.Tensor:
        """Gates for this batch, fp32: (B, 1, E) per sequence, (B, S, E) per packed
        segment, (B, T, E) per token. `cache`: the routing pass's own KV cache, during
        token-routed generation."""
        units = routing.unit_count(self.config.routing, input_ids, segment_ids)
        if self._gate_override is not None:
            return self._gate_override.to(input_ids.device).expand(input_ids.shape[0], units, -1)
        features = routing.unit_features(self, input_ids, attention_mask, unit_mask, units, position_ids, cache,
                                         segment_ids)
        gates = self.router(features)
        self._last_routed = gates.detach()
        return gates

    def last_routing(self) -> Optional[torch.Tensor]:
        """The router's gates of the latest pass, (B, 1|S|T, E): with routers in the
        layers, their mean over the layers. What generation reports as the gates it used."""
        if self._slot.in_layers and self._slot.recorded:
            return torch.stack([g.detach() for g in self._slot.recorded]).mean(dim=0)
        return self._last_routed

    @property
    def routes_in_layers(self) -> bool:
        """Every layer routes its own input (router_input="layer"), unless gates are forced."""
        return self.config.router_input == "layer" and self._gate_override is None

    def route_in_layers(self, routed_rows: Optional[torch.Tensor] = None) -> None:
        """Arm the layers to route their own inputs in the next forward passes: every row,
        or only the rows where `routed_rows` (B,) is True (the others keep the gates
        set_gates gave them)."""
        slot = self._slot
        rows = None if routed_rows is None else routed_rows.view(-1, 1, 1).bool()
        slot.in_layers, slot.routed_rows, slot.recorded = True, rows, []
        slot.scale = self.gate_scale()
        if rows is None:  # only its dtype and width matter: every row is routed in the layers
            slot.expanded = torch.zeros(1, 1, self.config.num_experts * self._lora_r, dtype=self.experts_dtype(
                slot.scale.device.type), device=slot.scale.device)

    def set_row_gates(self, gates: torch.Tensor, routed: Optional[torch.Tensor] = None) -> None:
        """Serving: each row's own fixed gates (B, E); rows where `routed` (B,) is True are
        routed instead, which a model with routers in the layers does inside the pass
        (any other model's routed rows must come with the router's gates already)."""
        self.set_gates(gates[:, None, :])
        if routed is not None and bool(routed.any()) and self.config.router_input == "layer":
            self.route_in_layers(routed)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, prompt_mask: Optional[torch.Tensor] = None,
                num_items_in_batch: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
                source_id: Optional[torch.Tensor] = None, **base_kwargs) -> MoEOutput:
        """`num_items_in_batch`: label tokens over the whole accumulation window, so the
        loss is normalised by valid tokens, not averaged per micro-batch.
        `segment_ids` (B, T; -1 on padding): packed rows, several examples per row, with
        `position_ids` restarting at each; each example is routed on its own prompt and
        attends only to itself. `source_id` is for analytics and not used here."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        packed = segment_ids is not None
        if packed and base_kwargs.get("position_ids") is None:
            raise ValueError("segment_ids (packed rows) need position_ids restarting at every example")
        # Packed rows: no 2D mask, so transformers builds a block-diagonal causal mask
        # from the restarting position_ids (no attention across packed examples).
        base_mask = None if packed else attention_mask
        # No KV cache in a training/scoring forward: it only costs memory, and transformers
        # ignores packing (restarting position_ids) when a cache is present.
        base_kwargs.setdefault("use_cache", False)
        units = routing.routing_mask(self.config.routing, attention_mask, labels, prompt_mask)
        if self.routes_in_layers:
            self.route_in_layers()  # each layer routes its own input tokens during the pass
        else:
            gates = self.route(input_ids, base_mask, units, base_kwargs.get("position_ids"), segment_ids=segment_ids)
            token_gates, balance_mask = gates, units
            if packed and self.config.routing == "sequence":
                token_gates = expand_segments(gates, segment_ids)
                balance_mask = segment_validity(segment_ids, gates.shape[1])
            self.set_gates(token_gates)
        out = self._lm_forward(input_ids, base_mask, labels, num_items_in_batch, base_kwargs)
        if self.routes_in_layers:
            gates, balance = self.layer_routing_result(units)
        else:
            balance = balance_loss(gates, balance_mask)
        out.balance_loss, out.routing_weights = balance, gates
        if labels is not None:
            out.loss = out.lm_loss + self.config.balance_coefficient * balance
        return out

    def _lm_forward(self, input_ids, base_mask, labels, num_items_in_batch, base_kwargs) -> MoEOutput:
        """The one base pass with the gates set: logits, or in training the LM loss straight
        from the hidden states (the chunked loss, logits never whole)."""
        out = MoEOutput()
        chunk = self.loss_chunk_tokens() if labels is not None and self.training else 0
        if chunk:
            hidden = self.decoder(input_ids=input_ids, attention_mask=base_mask, **base_kwargs).last_hidden_state
            out.lm_loss, out.num_label_tokens = chunked_causal_lm_loss(
                hidden, self.base_model.get_output_embeddings().weight, labels, num_items_in_batch, chunk,
                getattr(self.base_model.config.get_text_config(), "final_logit_softcapping", None),
                chunk_fn=self._chunk_loss_fn)
            return out
        out.logits = self.base_model(input_ids=input_ids, attention_mask=base_mask, **base_kwargs).logits
        if labels is not None:
            out.lm_loss, out.num_label_tokens = causal_lm_loss(out.logits, labels, num_items_in_batch)
        return out

    def layer_routing_result(self, units: torch.Tensor):
        """(the layers' mean gates (B, T, E), the mean of their balance losses) after a
        forward that routed in the layers."""
        recorded = self._slot.recorded
        if not recorded and not self._slot.enabled:  # the plain base: no layer routed, no expert used
            zeros = torch.zeros((*units.shape[:2], self.config.num_experts), device=units.device)
            return zeros, zeros.sum()
        if not recorded:
            raise RuntimeError("router_input='layer': no layer routed in this forward (no target layer ran)")
        balance = torch.stack([balance_loss(g, units) for g in recorded]).mean()
        return torch.stack([g.detach() for g in recorded]).mean(dim=0), balance

    def loss_chunk_tokens(self) -> int:
        """Tokens per loss chunk, or 0 for the plain loss. The chunked path computes
        hidden @ head.T itself, so it is used only where that is all the LM head does."""
        setting = self.config.loss_chunk_tokens
        if setting == 0:
            return 0
        head = self.base_model.get_output_embeddings()
        text = self.base_model.config.get_text_config()
        plain_head = isinstance(head, nn.Linear) and head.bias is None and not any(
            getattr(text, name, None) not in (None, 1, 1.0) for name in ("logit_scale", "logits_scaling"))
        if not plain_head:
            return 0
        if setting is None:
            return auto_chunk_tokens(head.out_features)
        return setting

    @property
    def decoder(self) -> nn.Module:
        """The base model without its LM head (no 256k-vocab logits for the routing pass)."""
        return getattr(self.base_model, self.base_model.base_model_prefix)

    # ------------------------------------------------------------------ using the model
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **gen_kwargs):
        """HF `generate` on the base model with the KV cache, routed as inference routes
        (model/generation.py)."""
        return generation.generate(self, input_ids, attention_mask, **gen_kwargs)

    def export_expert(self, index: int, save_directory) -> Path:
        """Expert `index` as a standard PEFT LoRA adapter (PeftModel.from_pretrained loads it)."""
        if not 0 <= index < self.config.num_experts:
            raise ValueError(f"expert index {index}: expected 0..{self.config.num_experts - 1}")
        return export_expert(self.base_model, self.experts, index, save_directory, float(self.gate_scale()),
                             self.config.lora_dropout, self._base_reference())

    def export_mixture(self, gates, save_directory) -> Path:
        """The mixture at fixed gates (E,) as ONE standard PEFT LoRA adapter of rank E*r
        (model/peft_io.py): vLLM, SGLang or PeftModel serve it as a plain LoRA."""
        return export_mixture(self.base_model, self.experts, gates, save_directory, float(self.gate_scale()),
                              self._base_reference())

    def _base_reference(self) -> tuple:
        """(name or path, GGUF file or None): which base an exported adapter needs."""
        return persistence.base_name(self.base_model), persistence.gguf_file_of(self.base_model)

    def unload(self) -> nn.Module:
        """Take the experts out again and return the untouched base model."""
        for name, layer in self.experts.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, leaf, layer.base_layer)
        self.experts = {}
        return self.base_model

    def compile_base(self, compile_loss: Optional[bool] = None, **compile_kwargs) -> int:
        """torch.compile each decoder block of the base in place (model/blocks.py).

        `compile_loss` also compiles the chunked loss's per-chunk softmax (model/loss.py).
        Default: only on a GPU. On CPU the compiled softmax measured 18% slower than the
        in-place eager one, with twice its memory in fp32 (bench/bench_loss.py --compile);
        on a GPU, where inductor fuses it into two bandwidth-bound kernels, it is expected
        to win, and bench/gpu_session.sh measures it. Returns the number of blocks compiled."""
        compile_kwargs.setdefault("dynamic", True)
        count = blocks.compile_blocks(self.base_model, **compile_kwargs)
        if compile_loss is None:
            compile_loss = next(iter(self.experts.values())).lora_A.is_cuda
        self._chunk_loss_fn = compiled_chunk_loss(**compile_kwargs) if compile_loss else None
        return count

    def gradient_checkpointing_enable(self) -> None:
        blocks.enable_checkpointing(self.base_model)
