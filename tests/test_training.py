"""Every expert learns, the base does not; checkpointing keeps gradients; save/load exact."""
import pytest
import torch
from conftest import make_base, make_batch, make_moe, randomize_experts

from dylora_moe import DyLoRAMoE


def snapshot(moe):
    experts = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in moe.experts.items()}
    base = {n: p.detach().clone() for n, p in moe.base_model.named_parameters() if not p.requires_grad}
    return experts, moe.router.gate.weight.detach().clone(), base


def changed_experts(moe, before, which):
    """Set of (layer, expert) whose A (which=0) or B (which=1) slice changed."""
    out = set()
    for name, layer in moe.experts.items():
        for e in range(moe.config.num_experts):
            now = layer.expert_weights(e)[which]
            old = before[name][which][e * layer.r : (e + 1) * layer.r] if which == 0 else \
                before[name][which][:, e * layer.r : (e + 1) * layer.r]
            if not torch.equal(now, old):
                out.add((name, e))
    return out


def step(moe, opt, batch, prompt):
    opt.zero_grad()
    moe(**batch, prompt_mask=prompt).loss.backward()
    opt.step()


@pytest.mark.parametrize("num_experts", [2, 4])
@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
def test_one_step_updates_every_expert_and_router_not_base(num_experts, router_input):
    moe = make_moe(num_experts=num_experts, router_input=router_input)
    randomize_experts(moe)  # a mixture mid-training (B != 0), so A gets gradient too
    moe.train()
    opt = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    before = snapshot(moe)
    step(moe, opt, *make_batch())
    every = {(n, e) for n in moe.experts for e in range(num_experts)}
    assert changed_experts(moe, before[0], 0) == every
    assert changed_experts(moe, before[0], 1) == every
    assert not torch.equal(moe.router.gate.weight, before[1])
    assert all(torch.equal(p, before[2][n]) for n, p in moe.base_model.named_parameters() if n in before[2])


def test_fresh_mixture_trains_every_expert_from_zero_b():
    """From PEFT-style init (B = 0): step 1 moves every B and the router (through the
    balance loss), step 2 every A (its gradient is B-weighted)."""
    moe = make_moe(num_experts=4)
    moe.train()
    opt = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    every = {(n, e) for n in moe.experts for e in range(4)}
    before = snapshot(moe)
    step(moe, opt, *make_batch())
    assert changed_experts(moe, before[0], 1) == every
    assert not torch.equal(moe.router.gate.weight, before[1])
    step(moe, opt, *make_batch(seed=1))
    assert changed_experts(moe, before[0], 0) == every


def test_loss_decreases_on_a_fixed_batch():
    moe = make_moe(num_experts=4)
    moe.train()
    opt = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-2)
    batch, prompt = make_batch()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        out = moe(**batch, prompt_mask=prompt)
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.5  # 5.6 -> ~4.6 (random tiny base, attention-only LoRA)


@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_gradient_checkpointing_gives_the_same_gradients(router_input, routing):
    grads = []
    for checkpointing in (False, True):
        moe = make_moe(num_experts=3, router_input=router_input, routing=routing)
        randomize_experts(moe)
        moe.train()
        if checkpointing:
            moe.gradient_checkpointing_enable()
        calls = []
        next(iter(moe.experts.values())).register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
        batch, prompt = make_batch()
        loss = moe(**batch, prompt_mask=prompt).loss
        in_forward = calls.count(True)
        loss.backward()
        # with checkpointing the layer really is re-run during backward
        assert calls.count(True) == in_forward + (1 if checkpointing else 0)
        grads.append({n: p.grad.clone() for n, p in moe.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma", "gpt2"])
def test_save_pretrained_round_trips_exactly(arch, tmp_path):
    moe = make_moe(arch, num_experts=3, routing="token")
    moe.train()
    opt = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-2)
    for seed in range(3):
        step(moe, opt, *make_batch(seed=seed))
    moe.router.expert_maturity[2] = False
    moe.save_pretrained(tmp_path / "run")
    loaded = DyLoRAMoE.from_pretrained(make_base(arch), tmp_path / "run")
    assert loaded.config.num_experts == 3 and loaded.config.routing == "token"
    assert torch.equal(loaded.router.expert_maturity, moe.router.expert_maturity)
    moe.eval(), loaded.eval()
    batch, _ = make_batch(seed=7)
    with torch.no_grad():
        a, b = moe(**batch), loaded(**batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.routing_weights, b.routing_weights)
    assert not (tmp_path / "run" / "model.safetensors").exists()  # the base is never saved


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="moe_config.json"):
        DyLoRAMoE.from_pretrained(make_base(), tmp_path)
    make_moe(num_experts=2).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match=r"experts\.safetensors.*shape"):
        DyLoRAMoE.from_pretrained(make_base(hidden_size=32, num_heads=2), tmp_path / "two")


def test_state_dict_is_the_mixture_only_even_with_tied_weights():
    moe = make_moe("gemma", num_experts=2)  # Gemma ties lm_head to the embeddings
    keys = set(moe.state_dict())
    assert len(keys) == len(moe.expert_state_dict())
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith("router.") for k in keys)
    assert not any("embed" in k or "lm_head" in k for k in keys)
    wrapped = torch.nn.Module()
    wrapped.module = moe
    assert set(wrapped.state_dict()) == {f"module.{k}" for k in keys}  # as DDP sees it
    other = make_moe("gemma", num_experts=2, seed=3)
    other.load_state_dict(moe.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), moe.state_dict().values()))
    with pytest.raises(RuntimeError, match="missing"):
        other.load_state_dict({k: v for k, v in moe.state_dict().items() if "router" not in k})
