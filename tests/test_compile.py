"""torch.compile of the base's decoder blocks (model.compile): same loss and gradients."""
import torch

from conftest import make_batch, make_moe, randomize_experts


def steps(moe):
    """Two training micro-batches of different shapes, then a no-grad eval forward."""
    moe.train()
    for seed, rows in ((0, 3), (1, 2)):
        batch, prompt = make_batch(batch=rows, seed=seed)
        out = moe(**batch, prompt_mask=prompt)
        out.loss.backward()
    moe.eval()
    with torch.no_grad():
        logits = moe(**batch, prompt_mask=prompt).logits
    return out.loss.detach(), logits, [p.grad.clone() for p in moe.trainable_parameters()]


def test_compiled_blocks_give_the_same_loss_logits_and_gradients():
    # A chunked loss (5-token chunks) so the compiled per-chunk softmax runs too.
    eager = make_moe("gemma", num_experts=3, loss_chunk_tokens=5)
    compiled = make_moe("gemma", num_experts=3, loss_chunk_tokens=5)
    randomize_experts(eager)
    randomize_experts(compiled)
    # aot_eager: dynamo's graph capture and AOT autograd, as inductor gets them, without
    # the minute of C++ code generation inductor spends on CPU (inductor is the default).
    assert compiled.compile_base(compile_loss=True, backend="aot_eager") == 2
    calls, compiled_loss = [], compiled._chunk_loss_fn
    compiled._chunk_loss_fn = lambda *args: calls.append(1) or compiled_loss(*args)
    ref_loss, ref_logits, ref_grads = steps(eager)
    loss, logits, grads = steps(compiled)
    assert calls  # the training forwards went through the compiled per-chunk softmax
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_recipe_compile_flag_compiles_the_blocks():
    from dylora_moe.model.blocks import decoder_blocks
    from dylora_moe.train.build import build_moe
    from dylora_moe.recipe import load_recipe
    from conftest import make_base

    cfg = load_recipe("configs/demo.yaml", ["--compile"])
    moe = build_moe(cfg, make_base("llama"))
    blocks = decoder_blocks(moe.base_model)
    assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    assert moe._chunk_loss_fn is None  # on CPU the loss's softmax stays eager (compile_base)


def test_a_run_with_evaluation_stays_within_the_recompile_limit(tmp_path, monkeypatch, fresh_accelerate):
    """One run meets more settings of a block than dynamo compiles by default
    (model/blocks.py), and past that limit the rest would run eager. Here the limit is a
    hard failure instead."""
    import torch._dynamo

    from dylora_moe.model.moe import DyLoRAMoE
    from dylora_moe.train.cli import main as train_main

    compile_base = DyLoRAMoE.compile_base
    monkeypatch.setattr(DyLoRAMoE, "compile_base", lambda self, compile_loss=None, **kwargs: compile_base(
        self, compile_loss, backend="aot_eager", **kwargs))  # as in the test above: no C++ build
    torch._dynamo.reset()  # the blocks' code is shared with other tests' compiled models
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        assert train_main(["--config", "configs/demo.yaml", "--compile", "true", "--packing", "true",
                           "--max_steps", "2", "--eval_every", "1", "--save_every", "0",
                           "--output_dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "final").is_dir()
