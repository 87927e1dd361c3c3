"""Gating modes (MoEConfig.gating): inference routes as training does, the router learns
at top-1, noise is training-only and reproducible, k-means starts experts on clusters."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_base, make_batch, make_moe, randomize_experts

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.errors import UserError
from dylora_moe.model.gating import gate_weights
from dylora_moe.model.kmeans import rows_from_clusters, spherical_kmeans

SAME_IN_BOTH = ["dense", "top_k", "straight_through"]


def logits(seed=0, rows=6, experts=4):
    return torch.randn(rows, 1, experts, generator=torch.Generator().manual_seed(seed))


def test_dense_is_the_softmax():
    z = logits()
    torch.testing.assert_close(gate_weights(z, "dense", 1), z.softmax(-1))


def test_top1_keeps_p_unrenormalised_and_passes_gradient_to_the_router():
    z = logits().requires_grad_()
    g = gate_weights(z, "top_k", 1)
    p = z.softmax(-1)
    assert ((g > 0).sum(-1) == 1).all()
    top = z.argmax(-1, keepdim=True)
    torch.testing.assert_close(g.gather(-1, top), p.gather(-1, top))  # Switch: the weight is p_i itself
    g.sum().backward()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_is_one_algorithm_for_every_k_p_on_the_kept_not_renormalised(k):
    z = logits()
    g = gate_weights(z, "top_k", k)
    assert ((g > 0).sum(-1) == k).all()
    kept = torch.zeros_like(z).scatter(-1, z.topk(k, dim=-1).indices, 1.0)
    assert torch.equal(g, z.softmax(-1) * kept)


def test_an_unknown_gating_is_refused_in_one_line_naming_the_field():
    with pytest.raises(UserError, match=r"^MoEConfig\.gating='top_k_renormalised': expected one of \('dense', 'top_k', "
                                        r"'straight_through'\)$"):
        gate_weights(logits(), "top_k_renormalised", 2)


def test_straight_through_is_exactly_hard_forward_and_softmax_backward():
    z = logits().requires_grad_()
    g = gate_weights(z, "straight_through", 1)
    assert torch.equal(g.detach(), F.one_hot(z.argmax(-1), 4).float())
    upstream = torch.randn(6, 1, 4, generator=torch.Generator().manual_seed(1))
    (g * upstream).sum().backward()
    z2 = z.detach().clone().requires_grad_()
    (z2.softmax(-1) * upstream).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_gumbel_noise_samples_the_choice_from_p():
    z = torch.tensor([[[1.0, 0.0, -1.0, 0.5]]]).expand(20000, 1, 4)
    torch.manual_seed(0)
    chosen = gate_weights(z, "straight_through", 1, noise=1.0).argmax(-1).flatten()
    share = torch.bincount(chosen, minlength=4).float() / chosen.numel()
    torch.testing.assert_close(share, z[0, 0].softmax(-1), atol=0.015, rtol=0)


@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("gating", SAME_IN_BOTH)
def test_inference_gates_are_the_training_gates(gating, routing):
    moe = make_moe(num_experts=4, top_k=1, gating=gating, routing=routing, temperature=0.3)
    randomize_experts(moe)
    batch, prompt = make_batch()
    moe.train()
    trained = moe(**batch, prompt_mask=prompt)
    moe.eval()
    with torch.no_grad():
        inferred = moe(**batch, prompt_mask=prompt)
    assert torch.equal(trained.routing_weights.detach(), inferred.routing_weights)
    torch.testing.assert_close(trained.logits.detach(), inferred.logits)  # dropout is 0 here


@pytest.mark.parametrize("gating", ["top_k", "straight_through"])
def test_the_router_learns_from_the_lm_loss_at_top1(gating):
    moe = make_moe(num_experts=4, top_k=1, gating=gating, balance_coefficient=0.0)
    randomize_experts(moe)
    moe.train()
    out = moe(**make_batch()[0])
    assert ((out.routing_weights.detach() > 0).sum(-1) == 1).all()
    out.loss.backward()
    grad = moe.router.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # straight-through: every expert's row learns (the stacked layer computes them all)
    if gating == "straight_through":
        assert (grad.abs().sum(-1) > 0).all()


def test_noise_is_training_only_and_follows_the_torch_rng():
    moe = make_moe(num_experts=4, top_k=1, gating="straight_through", router_noise=1.0)
    batch, _ = make_batch(batch=3)
    moe.train()
    draws = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        draws.append(moe(**batch).routing_weights.detach())
    assert torch.equal(draws[0], draws[1])  # a restored RNG (resume) redraws the same choice
    assert any(not torch.equal(draws[0], d) for d in draws[2:])
    moe.eval()
    with torch.no_grad():
        first, second = moe(**batch).routing_weights, moe(**batch).routing_weights
    assert torch.equal(first, second)


@pytest.mark.parametrize("field,value,message", [
    ("gating", "sparse", "MoEConfig.gating='sparse': expected one of"),
    ("router_noise", -1.0, "MoEConfig.router_noise=-1.0: expected a finite number >= 0"),
    ("router_init", "pca", "MoEConfig.router_init='pca': expected one of"),
    ("router_init_scale", 0, "MoEConfig.router_init_scale=0: expected a finite number > 0"),
])
def test_bad_gating_fields_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(**{field: value})


def test_noise_with_dense_gating_is_refused():
    with pytest.raises(ValueError, match="router_noise=0.5: expected 0 with gating='dense'"):
        MoEConfig(gating="dense", router_noise=0.5)


def test_a_model_saved_without_gating_loads_dense_as_it_was_trained(tmp_path, caplog):
    moe = make_moe(num_experts=2)
    moe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "moe_config.json").read_text())
    assert saved["gating"] == "dense"
    del saved["gating"]
    (tmp_path / "moe_config.json").write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        assert MoEConfig.load(tmp_path / "moe_config.json").gating == "dense"
    assert "gating='dense_train_top_k_eval' -> 'dense'" in caplog.text


def clustered(points_per=40, clusters=4, hidden=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, hidden, generator=g) * 3.0
    labels = torch.arange(clusters).repeat_interleave(points_per)
    return centers[labels] + torch.randn(len(labels), hidden, generator=g) * 0.3, labels


def purity(assignment, labels, k=4):
    """Share of points whose cluster's majority label is their own."""
    hits = 0
    for c in range(k):
        members = labels[assignment == c]
        hits += int(torch.bincount(members, minlength=k).max()) if len(members) else 0
    return hits / len(labels)


def test_spherical_kmeans_recovers_separated_clusters_deterministically():
    x, labels = clustered()
    x = F.normalize(x - x.mean(0), dim=-1)
    c1, a1 = spherical_kmeans(x, 4, seed=3)
    c2, a2 = spherical_kmeans(x, 4, seed=3)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    assert purity(a1, labels) == 1.0
    torch.testing.assert_close(c1.norm(dim=-1), torch.ones(4))


def test_router_from_clusters_sends_each_cluster_to_its_own_expert_and_survives_saving(tmp_path):
    moe = make_moe(num_experts=4)
    x, labels = clustered(hidden=64)
    weight, center, sizes = rows_from_clusters(x, 4, scale=2.0, seed=0)
    assert sizes.tolist() == [40, 40, 40, 40]
    with torch.no_grad():
        moe.router.gate.weight.copy_(weight)
        moe.router.feature_center.copy_(center)
    moe.eval()
    with torch.no_grad():
        routed = moe.router(x.unsqueeze(1)).argmax(-1).flatten()
    assert purity(routed, labels) == 1.0 and len(set(routed.tolist())) == 4
    moe.save_pretrained(tmp_path)
    again = DyLoRAMoE.from_pretrained(make_base(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again.router(x.unsqueeze(1)), moe.router(x.unsqueeze(1)))


@pytest.mark.parametrize("gating", ["top_k", "straight_through"])
def test_a_grown_expert_changes_nothing_under_sparse_gatings(gating):
    moe = make_moe(num_experts=3, top_k=1, gating=gating)
    randomize_experts(moe)
    batch, _ = make_batch()
    moe.eval()
    with torch.no_grad():
        before = moe(**batch).logits
        moe.add_expert("copy:0")
        after = moe(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_health_warns_about_dead_experts_with_the_numbers():
    from dylora_moe.eval.health import routing_warnings

    healthy = {"a": {"loss": 1.0, "gate_mean": [0.5, 0.3, 0.2]},
               "b": {"loss": 2.0, "gate_mean": [0.2, 0.3, 0.5]}}
    assert routing_warnings(healthy) == []
    sick = {"a": {"loss": 1.3, "gate_mean": [0.995, 0.005, 0.0]},
            "b": {"loss": 2.0, "gate_mean": [0.99, 0.01, 0.0]}}
    [dead] = routing_warnings(sick)
    assert dead.startswith("expert(s) [1, 2] take under 1% of routing") and "usage [0.992, 0.007, 0.0]" in dead


def test_report_prints_the_routing_warnings(tmp_path, capsys):
    from dylora_moe.eval.report import write_report

    step = {"step": 1, "epoch": 0, "loss": 1.0, "balance_loss": 0.1, "lr": 0.01, "tokens_per_s": 10.0,
            "memory_gib": 0.1, "router_entropy": 0.5, "gate_mean": [1.0, 0.0], "usage_top1": [1.0, 0.0]}
    evaluation = {"step": 1, "eval": {"s": {"loss": 3.0, "perplexity": 20.0,
                                            "gate_mean": [1.0, 0.0]}}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(step) + "\n" + json.dumps(evaluation) + "\n")
    out = write_report(tmp_path)
    err = capsys.readouterr().err
    assert "warning: expert(s) [1] take under 1% of routing" in err
    assert "**Warning:** expert(s) [1]" in (out / "report.md").read_text()
