"""The chunked LM loss equals the plain one, in value and gradients, and never builds
the full logits in training."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, make_moe, randomize_experts

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.loss import (causal_lm_loss, chunk_loss_functional, chunked_causal_lm_loss,
                                   compiled_chunk_loss)
from dylora_moe.model.tiny import random_causal_lm, tiny_config


CHUNK_FNS = {"in place": None, "functional": chunk_loss_functional,
             "compiled": compiled_chunk_loss(backend="aot_eager")}  # aot_eager: see test_compile.py


@pytest.mark.parametrize("chunk_fn", CHUNK_FNS)
@pytest.mark.parametrize("chunk,softcap", [(1, None), (7, None), (4096, None), (5, 30.0)])
def test_chunked_equals_plain_loss_and_gradients(chunk, softcap, chunk_fn):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    plain, n_plain = causal_lm_loss(logits, labels)
    plain.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked, n_chunked = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk, softcap=softcap,
                                                chunk_fn=CHUNK_FNS[chunk_fn])
    chunked.backward()
    assert n_plain == n_chunked
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad, grads[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(weight.grad, grads[1], atol=1e-5, rtol=0)


def _loss_problem(dtype=torch.float32, vocab=300):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 40, 24, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, 24, generator=g).to(dtype)  # frozen, as the real LM head is
    labels = torch.randint(0, vocab, (2, 40), generator=g)
    labels[1, :9] = -100
    return hidden, weight, labels


def test_chunked_loss_scales_its_gradient_by_the_incoming_one():
    """The gradients are computed in the forward; the backward must still honour what
    flows in (gradient accumulation scales the loss, DeepSpeed scales it again)."""
    hidden, weight, labels = _loss_problem()
    (causal_lm_loss(hidden @ weight.T, labels)[0] * 2.5).backward()
    expected, hidden.grad = hidden.grad.clone(), None
    (chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=16)[0] * 2.5).backward()
    torch.testing.assert_close(hidden.grad, expected, atol=1e-6, rtol=1e-5)


def test_chunked_loss_without_grad_gives_the_same_value():
    hidden, weight, labels = _loss_problem()
    with_grad, _ = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=16)
    with torch.no_grad():
        without, _ = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=16)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), atol=0, rtol=0)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_one():
    """Mixed precision: the matmuls run in bf16 in both paths, the softmax in fp32."""
    hidden, weight, labels = _loss_problem(torch.bfloat16, vocab=2000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = causal_lm_loss(F.linear(hidden, weight), labels)
        plain.backward()
        expected, hidden.grad = hidden.grad.clone(), None
        chunked, _ = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=16)
        chunked.backward()
    assert hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, plain, atol=1e-4, rtol=1e-4)
    # bf16 rounds at ~0.4% of a value; the paths scale by 1/count before or after it.
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(hidden.grad.float(), expected.float(), atol=1e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("arch", ["gemma", "llama", "gpt2"])
@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
def test_model_chunked_loss_matches_plain(arch, router_input):
    results = []
    for chunk in (0, 5):
        moe = make_moe(arch, num_experts=3, router_input=router_input, loss_chunk_tokens=chunk)
        randomize_experts(moe)
        moe.train()
        batch, prompt = make_batch()
        out = moe(**batch, prompt_mask=prompt, num_items_in_batch=torch.tensor(20.0))
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in moe.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert plain.logits is not None and chunked.logits is None  # never built in the chunked step
    torch.testing.assert_close(chunked.lm_loss, plain.lm_loss, atol=1e-5, rtol=0)
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


def test_chunked_loss_is_on_by_default_for_large_vocabularies_only():
    big = DyLoRAMoE(random_causal_lm(tiny_config("gemma", vocab_size=32_000, hidden_size=32, num_heads=2)),
                    MoEConfig(num_experts=2))
    big.train()
    batch, _ = make_batch()
    assert big(**batch).logits is None          # training with labels: chunked
    assert big(input_ids=batch["input_ids"]).logits is not None  # no labels: logits
    big.eval()
    assert big(**batch).logits.shape[-1] == 32_000  # eval: logits
    small = make_moe(num_experts=2)
    small.train()
    assert small(**batch).logits is not None    # 256-token vocabulary: plain loss


def test_automatic_chunk_size_follows_the_vocabulary():
    from dylora_moe.model.loss import auto_chunk_tokens

    assert auto_chunk_tokens(8192) == 0                      # small vocabularies: plain loss
    assert auto_chunk_tokens(32_000) == 4096                 # capped
    assert auto_chunk_tokens(256_000) == 2**28 // 256_000    # CodeGemma: ~1k tokens, ~1.5 GiB in flight
    assert auto_chunk_tokens(10**7) == 512                   # floored
    base = random_causal_lm(tiny_config("gemma", vocab_size=128_000, hidden_size=16, intermediate_size=64))
    moe = DyLoRAMoE(base, MoEConfig())
    assert moe.loss_chunk_tokens() == 2**28 // 128_000 < 4096
    moe.unload()
    assert DyLoRAMoE(base, MoEConfig(loss_chunk_tokens=0)).loss_chunk_tokens() == 0


def test_chunked_loss_trains_like_the_plain_one_under_zero2(tmp_path):
    """A real 2-process ZeRO-2 run with gradient accumulation: DeepSpeed scales the loss
    before its backward, which the chunked loss (gradients computed in the forward) must
    honour. Same losses at every step as with the plain loss, to fp32 rounding."""
    from trainrun import SMALL, explain, losses, run

    curves = []
    for chunk in ("0", "16"):
        out = tmp_path / f"chunk{chunk}"
        done = run("zero2_2", SMALL + ["--max_steps", "6", "--eval_every", "0", "--save_every", "0",
                                       "--loss_chunk_tokens", chunk, "--output_dir", str(out)], tmp_path)
        assert done.returncode == 0, explain(done)
        curves.append(losses(out))
    plain, chunked = curves
    assert sorted(plain) == sorted(chunked) == list(range(1, 7))
    for step in plain:
        assert chunked[step] == pytest.approx(plain[step], rel=1e-5, abs=1e-6), (step, plain, chunked)
    assert plain[6] < plain[1]  # it trained
