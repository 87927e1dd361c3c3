"""Router behaviour: prompt-only pooling, top_k (one algorithm for every k, in training and
in eval), the balance loss. The other gatings: tests/test_gating.py."""
import pytest
import torch
from conftest import VOCAB, make_batch, make_moe

from dylora_moe.model.balance import balance_loss


@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
@pytest.mark.parametrize("source", ["prompt_mask", "labels"])
def test_sequence_gates_ignore_padding_and_answer_tokens(router_input, source):
    moe = make_moe(num_experts=4, router_input=router_input)
    moe.train()
    batch, prompt = make_batch()
    kwargs = {"prompt_mask": prompt} if source == "prompt_mask" else {}
    gates = moe(**batch, **kwargs).routing_weights

    changed = {k: v.clone() for k, v in batch.items()}
    not_prompt = ~prompt
    g = torch.Generator().manual_seed(5)
    changed["input_ids"][not_prompt] = torch.randint(3, VOCAB, (int(not_prompt.sum()),), generator=g)
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    if source == "labels":  # keep the label layout consistent with the new answer tokens
        answer = changed["labels"] != -100
        changed["labels"][answer] = changed["input_ids"][answer]
    torch.testing.assert_close(moe(**changed, **kwargs).routing_weights, gates, atol=1e-6, rtol=0)

    # ...while changing a prompt token does move the gates
    changed["input_ids"][0, 0] = (changed["input_ids"][0, 0] + 1) % VOCAB
    assert not torch.allclose(moe(**changed, **kwargs).routing_weights[0], gates[0], atol=1e-6)


@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
def test_left_padding_values_do_not_matter(router_input):
    moe = make_moe(num_experts=4, router_input=router_input)
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    gates = moe(input_ids=ids, attention_mask=mask).routing_weights
    ids2 = ids.clone()
    ids2[0, :3] = torch.tensor([7, 8, 9])
    torch.testing.assert_close(moe(input_ids=ids2, attention_mask=mask).routing_weights, gates, atol=1e-6, rtol=0)


@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_keeps_p_on_the_top_k_for_every_k_in_training_and_eval(routing, top_k):
    moe = make_moe(num_experts=4, top_k=top_k, routing=routing, gating="top_k")
    batch, prompt = make_batch()
    gates = {}
    for training in (False, True):
        moe.train(training)
        with torch.no_grad():
            gates[training] = moe(**batch, prompt_mask=prompt).routing_weights
    assert torch.equal(gates[False], gates[True])  # no noise: the same function
    moe.router.gating = "dense"
    with torch.no_grad():
        probs = moe(**batch, prompt_mask=prompt).routing_weights
    expected_units = 1 if routing == "sequence" else batch["input_ids"].shape[1]
    assert gates[False].shape == (3, expected_units, 4)
    assert ((gates[False] > 0).sum(-1) == top_k).all()
    kept = probs.topk(top_k, dim=-1).indices
    assert torch.equal(gates[False].gather(-1, kept), probs.gather(-1, kept))  # p itself, not renormalised


def test_temperature_flattens_training_gates():
    batch, _ = make_batch()
    spread = []
    for temperature in (0.5, 8.0):
        moe = make_moe(num_experts=4, temperature=temperature)
        moe.train()
        gates = moe(**batch).routing_weights
        spread.append((gates.max(-1).values - gates.min(-1).values).mean().item())
    assert spread[1] < spread[0]


def test_balance_loss():
    uniform = torch.full((4, 1, 4), 0.25)
    skewed = torch.tensor([[[0.97, 0.01, 0.01, 0.01]]]).expand(4, 1, 4)
    # Switch loss: E * sum f*P = 1 when balanced, E * 0.97 when all units pick expert 0
    assert balance_loss(uniform + torch.tensor([0.01, 0, 0, 0]), None).item() == pytest.approx(4 * 0.26)
    assert balance_loss(skewed, None).item() == pytest.approx(4 * 0.97)
    # token routing: masked tokens do not count
    tokens = torch.stack([skewed[:, 0], uniform[:, 0] + torch.tensor([0.01, 0, 0, 0])], dim=1)  # (4, 2, 4)
    assert balance_loss(tokens, torch.tensor([[0, 1]] * 4)).item() == pytest.approx(4 * 0.26)


def test_loss_reports_lm_and_balance_separately():
    moe = make_moe(num_experts=4, balance_coefficient=0.5)
    moe.train()
    out = moe(**make_batch()[0])
    assert out.balance_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.balance_loss)
