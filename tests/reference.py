"""The per-expert reference the stacked mixture is checked against: one full pass of the
base per expert, with that expert alone (a one-hot gate), the logits weighted by the
router's gates. What a mixture of LoRAs costs without stacking (docs/design.md: time and
memory linear in E); the tests keep it as the definition the one-pass mixture must meet
where the two agree (one-hot gates per sequence)."""
import torch
import torch.nn.functional as F

from dylora_moe.model.routing import routing_mask


def reference_forward(moe, input_ids, attention_mask=None, labels=None, prompt_mask=None):
    """(mixed logits (B, T, V) in fp32, the router's gates) for an unpacked batch. Trains
    too (bench/bench_moe.py times it); no gradient checkpointing, since each recomputed
    pass would see the last expert's gates."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    units = routing_mask(moe.config.routing, attention_mask, labels, prompt_mask)
    gates = moe.route(input_ids, attention_mask, units)
    num_experts = moe.config.num_experts
    mixed = None
    for e in range(num_experts):
        moe.set_gates(F.one_hot(torch.tensor([e], device=input_ids.device), num_experts).float().view(1, 1, -1))
        logits = moe.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        term = gates[..., e : e + 1] * logits.float()
        mixed = term if mixed is None else mixed + term
    return mixed, gates


class PerExpertLoop(torch.nn.Module):
    """The reference as a model: forward(**batch).loss, for a training step."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, input_ids, attention_mask=None, labels=None):
        from dylora_moe.model.balance import balance_loss
        from dylora_moe.model.loss import causal_lm_loss

        logits, gates = reference_forward(self.moe, input_ids, attention_mask, labels)
        lm_loss, _ = causal_lm_loss(logits, labels)
        loss = lm_loss + self.moe.config.balance_coefficient * balance_loss(gates, None)
        return type("Output", (), {"loss": loss, "logits": logits})()
