"""generate(): KV-cached decoding routes exactly like a full forward would."""
import pytest
import torch
from conftest import VOCAB, make_moe, randomize_experts


def greedy_without_cache(moe, prompt, steps):
    """Reference: re-run the full forward for every token, routing on the prompt only
    (sequence) or on every token (token)."""
    moe.eval()
    ids = prompt
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    for _ in range(steps):
        pad = torch.zeros(ids.shape[0], ids.shape[1] - prompt.shape[1], dtype=torch.bool)
        with torch.no_grad():
            logits = moe(input_ids=ids, prompt_mask=torch.cat([prompt_mask, pad], 1)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
def test_cached_generation_equals_full_recompute(routing, router_input):
    moe = make_moe("llama", num_experts=4, routing=routing, router_input=router_input)
    randomize_experts(moe, scale=1.0)
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    out = moe.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(out, greedy_without_cache(moe, prompt, 8))


def test_generation_uses_the_experts_and_restores_mode():
    from conftest import make_base

    moe = make_moe("gemma", num_experts=2)
    randomize_experts(moe, scale=2.0)
    moe.train()
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    mixed = moe.generate(prompt, **kwargs)
    assert moe.training  # generate() switches to eval and back
    with moe.experts_disabled():
        plain = moe.generate(prompt, **kwargs)
    untouched = make_base("gemma").generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert torch.equal(plain, untouched)  # experts off == a base model that never had experts
    assert not torch.equal(mixed, plain)


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(routing, router_input):
    """Left-padded rows of different lengths, routed to different experts, in one batch:
    pooling skips the padding, positions start at each row's first real token."""
    moe = make_moe("llama", num_experts=4, routing=routing, router_input=router_input)
    randomize_experts(moe, scale=1.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (length,), generator=g) for length in (3, 9, 5, 7, 4, 8)]
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    one = [moe.generate(p[None], **kwargs)[0, len(p):] for p in prompts]
    ids, mask = left_pad(prompts)
    gates = []
    hook = moe.router.register_forward_hook(lambda m, a, out: gates.append(out) if not gates else None)
    batched = moe.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    hook.remove()
    for row, alone in zip(batched, one):
        assert torch.equal(row, alone)
    if routing == "sequence":
        assert len({int(g.argmax()) for g in gates[0][:, 0]}) >= 2  # the batch mixed rows of different experts
