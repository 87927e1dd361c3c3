"""Dynamic experts, in one process: growth keeps the outputs, maturity ramps, the
optimizer state carries over, frozen experts stay put, pruning round-trips."""
import pytest
import torch
from conftest import make_base, make_batch, make_moe, randomize_experts

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.train.growth import widen_optimizer_state
from dylora_moe.train.maturity import ExpertFreezer

INITS = ["zeros", "copy:1", "mean"]


def slices(moe, experts):
    """Every learned tensor restricted to `experts`, in a fixed order."""
    from dylora_moe.model.growth import expert_axes

    return [a.select(a.get().detach(), experts).clone() for a in expert_axes(moe) if a.fresh is not None]


@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("init", INITS)
def test_growth_leaves_logits_unchanged(init, routing):
    moe = make_moe(num_experts=3, routing=routing)
    randomize_experts(moe)
    moe.train()  # dense routing; lora_dropout is 0 in make_moe
    batch, prompt = make_batch()
    with torch.no_grad():
        before = moe(**batch, prompt_mask=prompt)
        assert moe.add_expert(init) == 3
        after = moe(**batch, prompt_mask=prompt)
    assert after.routing_weights.shape[-1] == 4 and moe.config.num_experts == 4
    torch.testing.assert_close(after.logits, before.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(after.routing_weights[..., :3], before.routing_weights, atol=1e-7, rtol=0)
    assert (after.routing_weights[..., 3] == 0).all()  # admitted at 0: exactly no share yet
    assert not bool(moe.router.expert_maturity[3]) and moe.router.expert_maturity[:3].all()


@pytest.mark.parametrize("gating", ["dense", "top_k", "straight_through"])
def test_eval_logits_unchanged_by_growth(gating):
    """Eval routes as training does: an expert admitted at 0 changes nothing under any gating."""
    moe = make_moe(num_experts=3, gating=gating, top_k=2)
    randomize_experts(moe)
    moe.eval()
    batch, _ = make_batch()
    with torch.no_grad():
        before = moe(**batch).logits
        moe.add_expert("mean")
        torch.testing.assert_close(moe(**batch).logits, before, atol=1e-6, rtol=0)


def test_new_expert_weights_follow_the_init():
    moe = make_moe(num_experts=3)
    randomize_experts(moe)
    moe.eval()
    ids = torch.randint(3, 200, (2, 9))
    one_hot = lambda i: torch.eye(moe.config.num_experts)[i]

    moe.add_expert("copy:1")
    with torch.no_grad(), moe.override_gates(one_hot(3)):
        copy = moe(input_ids=ids).logits
    with torch.no_grad(), moe.override_gates(one_hot(1)):
        torch.testing.assert_close(copy, moe(input_ids=ids).logits, atol=0, rtol=0)

    moe.add_expert("zeros")  # B = 0: the base model
    with torch.no_grad(), moe.override_gates(one_hot(4)):
        fresh = moe(input_ids=ids).logits
    with torch.no_grad(), moe.experts_disabled():
        torch.testing.assert_close(fresh, moe(input_ids=ids).logits, atol=1e-6, rtol=0)

    moe.add_expert("mean")
    for new, old in zip(slices(moe, [5]), slices(moe, [0, 1, 2, 3, 4])):
        axis = 0 if new.shape[0] != old.shape[0] else 1
        mean = old.unflatten(axis, (5, -1)).mean(dim=axis)
        torch.testing.assert_close(new, mean)
    assert [e["init"] for e in moe.config.extra["expert_history"]] == ["copy:1", "zeros", "mean"]


def test_admission_ramps_and_the_expert_matures_after_its_own_steps():
    moe = make_moe(num_experts=2, maturity_steps=4, top_k=1, gating="top_k")
    moe.add_expert("zeros")
    batch, _ = make_batch()
    moe.eval()
    with torch.no_grad():
        assert (moe(**batch).routing_weights[..., 2] == 0).all()  # admitted at 0: never chosen yet
    admissions = []
    for step in range(4):
        # a frozen expert's step does not count: expert 0 never trains here
        matured = moe.advance_maturity([False, True, True])
        admissions.append(float(moe.router.expert_admission[2]))
        assert matured == ([2] if step == 3 else [])
    assert admissions == [0.25, 0.5, 0.75, 1.0]
    assert moe.router.expert_steps.tolist() == [0, 4, 4] and moe.router.expert_maturity.all()
    with torch.no_grad():
        assert ((moe(**batch).routing_weights > 0).sum(-1) == 1).all()  # top-1, the new expert included


def train_step(moe, optimizer, seed):
    batch, prompt = make_batch(seed=seed)
    optimizer.zero_grad()
    moe(**batch, prompt_mask=prompt).loss.backward()
    optimizer.step()


def test_adamw_state_carries_over_growth():
    """After growth the old experts take exactly the step they would have taken without
    it: their moments and step count are carried, and the new expert (admission 0) adds
    nothing to their gradients. Balance loss off: its target 1/E changes with E."""
    twins = [make_moe(num_experts=3, balance_coefficient=0.0) for _ in range(2)]
    optimizers = [torch.optim.AdamW(m.trainable_parameters(), lr=1e-2, weight_decay=0.01) for m in twins]
    for moe, opt in zip(twins, optimizers):
        moe.train()
        for seed in range(3):
            train_step(moe, opt, seed)
    grown, plain = twins[1], twins[0]
    state = optimizers[1].state_dict()
    grown.add_expert("zeros")
    optimizer = torch.optim.AdamW(grown.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    optimizer.load_state_dict(widen_optimizer_state(state, grown, old_count=3))
    carried = optimizer.state_dict()["state"]
    layer = next(iter(grown.experts.values()))
    index = [id(p) for p in grown.trainable_parameters()].index(id(layer.lora_A))
    old_rows = 3 * layer.r
    assert torch.equal(carried[index]["exp_avg"][:old_rows], state["state"][index]["exp_avg"])
    assert (carried[index]["exp_avg"][old_rows:] == 0).all() and carried[index]["step"] == state["state"][index]["step"]

    new_expert = slices(grown, [3])
    train_step(grown, optimizer, seed=3)
    train_step(plain, optimizers[0], seed=3)
    for after, expected in zip(slices(grown, [0, 1, 2]), slices(plain, [0, 1, 2])):
        torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)
    for after, before in zip(slices(grown, [3]), new_expert):  # no share yet: no gradient, only weight decay
        torch.testing.assert_close(after, before * (1 - 1e-2 * 0.01), atol=1e-8, rtol=0)


def test_frozen_mature_experts_do_not_change():
    """Even with Adam momentum from earlier steps and decoupled weight decay."""
    moe = make_moe(num_experts=3)
    moe.router.expert_maturity.fill_(False)  # as experts added by growth start
    randomize_experts(moe)
    moe.train()
    optimizer = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    freezer = ExpertFreezer(moe, enabled=True)
    train_step(moe, optimizer, 0)  # moments for every expert
    moe.mark_mature(0)
    moe.mark_mature(2)
    assert freezer.update() == [0, 2] and freezer.trained.tolist() == [False, True, False]
    frozen, router, trained = slices(moe, [0, 2]), moe.router.gate.weight.detach().clone(), slices(moe, [1])
    lora = [s for s in frozen if s.shape != router[[0, 2]].shape]
    for seed in range(1, 4):
        batch, prompt = make_batch(seed=seed)
        optimizer.zero_grad()
        moe(**batch, prompt_mask=prompt).loss.backward()
        layer = next(iter(moe.experts.values()))
        r = layer.r
        assert (layer.lora_B.grad[:, :r] == 0).all() and (layer.lora_B.grad[:, r:2 * r] != 0).any()
        optimizer.step()
        freezer.restore()
    now = [s for s in slices(moe, [0, 2]) if s.shape != router[[0, 2]].shape]
    assert all(torch.equal(a, b) for a, b in zip(now, lora))
    assert not torch.equal(moe.router.gate.weight, router)  # the router keeps learning, every row
    assert all(not torch.equal(a, b) for a, b in zip(slices(moe, [1]), trained))  # the immature expert trains


def test_prune_then_save_and_load_round_trips(tmp_path):
    moe = make_moe(num_experts=4, routing="token")
    randomize_experts(moe)
    moe.advance_maturity()
    before = slices(moe, [0, 2, 3])
    rows = moe.router.gate.weight.detach()[[0, 2, 3]].clone()
    moe.prune_expert(1)
    assert moe.config.num_experts == 3 and moe.router.gate.weight.shape[0] == 3
    assert all(torch.equal(a, b) for a, b in zip(slices(moe, [0, 1, 2]), before))
    assert torch.equal(moe.router.gate.weight, rows)
    moe.save_pretrained(tmp_path / "pruned")
    loaded = DyLoRAMoE.from_pretrained(make_base(), tmp_path / "pruned")
    assert loaded.config.extra["expert_history"][-1]["event"] == "prune"
    assert loaded.router.expert_steps.tolist() == [1, 1, 1]
    moe.eval(), loaded.eval()
    batch, _ = make_batch(seed=4)
    with torch.no_grad():
        assert torch.equal(moe(**batch).logits, loaded(**batch).logits)
    with pytest.raises(ValueError, match="top_k=2"):
        make_moe(num_experts=2, top_k=2).prune_expert(0)


def test_grown_model_saves_its_maturity_and_library(tmp_path):
    moe = make_moe(num_experts=2, maturity_steps=10)
    moe.add_expert("copy:0")
    moe.advance_maturity()
    moe.router.expert_centroids[1] = 0.5
    moe.router.centroid_counts[1] = 7
    moe.save_pretrained(tmp_path / "grown")
    loaded = DyLoRAMoE.from_pretrained(make_base(), tmp_path / "grown")
    for name in ("expert_maturity", "expert_steps", "expert_admission", "expert_centroids", "centroid_counts"):
        assert torch.equal(getattr(loaded.router, name), getattr(moe.router, name)), name
    assert loaded.config.num_experts == 3 and loaded.config.maturity_steps == 10


def test_a_model_saved_before_dynamic_experts_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    moe = make_moe(num_experts=2)
    randomize_experts(moe)
    moe.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "experts.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items()
               if k.split(".")[-1] not in ("expert_steps", "expert_admission", "expert_centroids", "centroid_counts")}
    save_file(tensors, str(path))
    loaded = DyLoRAMoE.from_pretrained(make_base(), tmp_path / "old")
    assert loaded.router.expert_admission.tolist() == [1.0, 1.0]
    loaded.load_state_dict({k: v for k, v in moe.state_dict().items() if "centroid" not in k})  # strict, still fine


def test_bad_growth_arguments_are_clear_errors():
    moe = make_moe(num_experts=2)
    with pytest.raises(ValueError, match=r"copy:i.*0\.\.1"):
        moe.add_expert("copy:5")
    with pytest.raises(ValueError, match="MoEConfig.maturity_steps=0"):
        MoEConfig(maturity_steps=0)


@pytest.mark.parametrize("option, value, message", [
    ("--grow_init", "copy", "train.grow_init='copy': expected zeros, mean or copy:<expert index>"),
    ("--novelty_threshold", "0", "train.novelty_threshold=0.0: expected a number in (0, 1]"),
    ("--novelty_window", "0", "train.novelty_window=0: expected an integer >= 1"),
    ("--max_experts", "0", "train.max_experts=0: expected an integer >= 1"),
])
def test_bad_growth_options_name_the_field(option, value, message):
    from dylora_moe.recipe import load_recipe

    with pytest.raises(ValueError) as error:
        load_recipe(None, [option, value])
    assert str(error.value) == message
    assert load_recipe(None, ["--grow_init", "copy:3", "--grow_on_novelty", "--freeze_mature_experts"]).train.grow_on_novelty
