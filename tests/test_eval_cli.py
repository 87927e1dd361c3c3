"""Using a trained run: load it (run dir, checkpoint or final/), generate with any
routing, and write the routing report."""
import pytest
import torch
from trainrun import SMALL, explain, run

from dylora_moe.eval.generate import generate_batch, generate_text, generation_config, main as generate_main
from dylora_moe.eval.loading import load_run, portable_dir, weights_hash
from dylora_moe.eval.report import main as report_main
from dylora_moe.eval.variants import resolve


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    out = tmp / "run"
    done = run("single", SMALL + ["--max_steps", "6", "--eval_every", "3", "--save_every", "3",
                                  "--output_dir", str(out)], tmp)
    assert done.returncode == 0, explain(done)
    return out


def test_load_run_from_run_dir_checkpoint_and_final(trained):
    from_run = load_run(trained)
    assert from_run.source == trained / "final"
    assert load_run(trained / "final").weights_sha256 == from_run.weights_sha256
    ckpt = load_run(trained / "checkpoints" / "checkpoint-3")
    assert ckpt.source == trained / "checkpoints" / "checkpoint-3" / "portable"
    assert ckpt.weights_sha256 != from_run.weights_sha256  # step 3 is not step 6
    with torch.no_grad():
        next(iter(from_run.moe.experts.values())).lora_B[0, 0] += 1.0
    assert weights_hash(from_run.moe) != load_run(trained).weights_sha256  # the hash sees the weights
    with pytest.raises(FileNotFoundError, match="no trained experts"):
        portable_dir(trained / "plots")


def test_generate_routes_forces_and_disables_experts(trained, capsys):
    loaded = load_run(trained)
    prompt = "### Instruction:\nWrite a function add_3(xs).\n\n### Response:\n"
    _, routed = generate_text(loaded, prompt, max_new_tokens=5)
    config = loaded.moe.config
    assert sum(g > 0 for g in routed) == (config.num_experts if config.gating == "dense" else config.top_k)
    assert abs(sum(routed) - 1) < 1e-5
    _, forced = generate_text(loaded, prompt, max_new_tokens=5, variant="expert-2")
    assert forced == [0.0, 0.0, 1.0, 0.0]
    _, uniform = generate_text(loaded, prompt, max_new_tokens=5, variant="uniform")
    assert uniform == [0.25] * 4
    text, none = generate_text(loaded, prompt, max_new_tokens=5, variant="base")
    assert none is None
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(trained / "base_model")
    ids = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([torch.tensor([[loaded.tokenizer.bos_token_id]]), ids], 1)
    want = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                          pad_token_id=loaded.tokenizer.pad_token_id, eos_token_id=loaded.tokenizer.eos_token_id)
    assert text == loaded.tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)

    assert generate_main([str(trained), "--prompt", "Write add_3.", "--max_new_tokens", "4", "--expert", "1"]) == 0
    err = capsys.readouterr().err
    assert "expert 1; gates [0.00 1.00 0.00 0.00]" in err and "sha256" in err
    assert generate_main([str(trained), "--prompt", "x", "--expert", "9"]) == 2
    assert "--expert 9: expected 0..3" in capsys.readouterr().err


def test_batched_generation_equals_one_prompt_at_a_time(trained):
    """eval's path: left-padded prompts of different lengths in one batch, greedy, for the
    router and for a forced expert; and n sampled completions per prompt."""
    loaded = load_run(trained)
    prompts = ["### Instruction:\nWrite a function add_3(xs).\n\n### Response:\n",
               "### Instruction:\nWrite a function reverse_text(s) that returns s reversed.\n\n### Response:\n",
               "def"]
    for name in ("routed", "expert-1"):
        config = generation_config(loaded.tokenizer, max_new_tokens=12)
        together = generate_batch(loaded, prompts, config, resolve(name, 4), n=3)
        for prompt, (texts, gates) in zip(prompts, together):
            alone, alone_gates = generate_text(loaded, prompt, max_new_tokens=12, variant=name)
            assert texts == [alone] * 3 and gates == pytest.approx(alone_gates)
    torch.manual_seed(0)
    sampled = generate_batch(loaded, prompts, generation_config(loaded.tokenizer, 12, temperature=1.0, n=4))
    assert [len(texts) for texts, _ in sampled] == [4, 4, 4]
    assert len(set(sampled[0][0])) > 1  # n draws, not one copied


def test_stop_strings_match_only_the_new_text(trained):
    """A stop string that spans the end of the prompt and the first new characters must not
    end generation (transformers' own stop_strings do); one inside the new text cuts it."""
    loaded = load_run(trained)
    prompt = "### Instruction:\nWrite a function add_3(xs).\n\n### Response:\n"
    config = generation_config(loaded.tokenizer, max_new_tokens=16)
    [([free], _)] = generate_batch(loaded, [prompt], config)
    across = prompt[-3:] + free[:2]
    assert len(free) > 6 and across not in free
    [([text], _)] = generate_batch(loaded, [prompt], config, stop=(across,))
    assert text == free
    inside = free[3:6]
    [([cut], _)] = generate_batch(loaded, [prompt], config, stop=(inside,))
    assert cut == free[:free.find(inside)]


@pytest.mark.parametrize("flags,message", [(["--temperature", "-1"], "--temperature -1.0: expected >= 0"),
                                           (["--top_p", "2"], "--top_p 2.0: expected 0 < top_p <= 1"),
                                           (["--max_new_tokens", "0"], "--max_new_tokens 0: expected an integer >= 1")])
def test_generate_rejects_bad_decoding_flags(flags, message, tmp_path, capsys):
    assert generate_main([str(tmp_path / "no-run"), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_report_writes_plots_and_summary(trained, tmp_path, capsys):
    assert report_main([str(trained), "--out", str(tmp_path / "r")]) == 0
    for name in ("loss.png", "entropy.png", "usage_by_source.png"):
        assert (tmp_path / "r" / name).stat().st_size > 1000, name
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| demo:numbers |" in md and "| demo:strings |" in md and "Evaluation at step 6" in md
    assert report_main([str(tmp_path / "nothing")]) == 2
    assert "no metrics" in capsys.readouterr().err
