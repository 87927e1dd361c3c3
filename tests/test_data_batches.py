"""Tokenization, labels, interleaving and packing: what reaches the model."""
import logging
from collections import Counter

import pytest
import torch
from conftest import make_moe, randomize_experts

from dylora_moe.data import (DataCollator, DataConfig, PackingCollator, build_datasets, build_demo_tokenizer,
                             load_examples, tokenize_examples)
from dylora_moe.model.packing import packed_prefixes

DEMO = [{"name": "demo", "family": "numbers"}, {"name": "demo", "family": "strings"}]


@pytest.fixture(scope="module")
def tokenizer():
    examples = load_examples(DataConfig(sources=DEMO))
    return build_demo_tokenizer(ex["prompt"] + ex["answer"] for s in examples.values() for ex in s["train"])


def example(prompt="### Instruction:\nAdd one.\n\n### Response:\n", answer="def f(x):\n    return x + 1"):
    return {"id": "0", "source": "t", "prompt": prompt, "answer": answer, "tests": [], "setup": ""}


def test_labels_mask_the_prompt_and_keep_the_answer_and_eos(tokenizer):
    rows, _ = tokenize_examples([example()], tokenizer, 0, 512)
    batch = DataCollator(tokenizer.pad_token_id)(rows + [dict(rows[0], input_ids=rows[0]["input_ids"][:5], prompt_len=3)])
    ids, labels, prompt_mask = batch["input_ids"][0], batch["labels"][0], batch["prompt_mask"][0]
    p = rows[0]["prompt_len"]
    assert (labels[:p] == -100).all() and prompt_mask[:p].all() and not prompt_mask[p:].any()
    assert labels[p] == ids[p] != -100                      # the answer's first token is learnt
    assert labels[len(rows[0]["input_ids"]) - 1] == tokenizer.eos_token_id
    assert ids[0] == tokenizer.bos_token_id
    assert (batch["labels"][1][5:] == -100).all() and (batch["attention_mask"][1][5:] == 0).all()


def test_eos_keeps_its_label_when_pad_equals_eos(tokenizer):
    rows, _ = tokenize_examples([example(), example(answer="x")], tokenizer, 0, 512)
    batch = DataCollator(pad_token_id=tokenizer.eos_token_id)(rows)
    for i, row in enumerate(rows):
        assert batch["labels"][i, len(row["input_ids"]) - 1] == tokenizer.eos_token_id
    assert (batch["input_ids"][1, len(rows[1]["input_ids"]):] == tokenizer.eos_token_id).all()
    assert (batch["labels"][1, len(rows[1]["input_ids"]):] == -100).all()


def test_train_on_prompt_labels_the_prompt_too(tokenizer):
    rows, _ = tokenize_examples([example()], tokenizer, 0, 512)
    labels = DataCollator(tokenizer.pad_token_id, train_on_prompt=True)(rows)["labels"][0]
    assert (labels == torch.tensor(rows[0]["input_ids"])).all()


def test_overlong_examples_are_truncated_or_dropped_and_counted(tokenizer):
    long = example(answer="return 1\n" * 200)
    rows, counts = tokenize_examples([example(), long], tokenizer, 0, 64, overlong="truncate")
    assert counts == Counter(kept=2, truncated=1) and len(rows[1]["input_ids"]) == 64
    rows, counts = tokenize_examples([example(), long], tokenizer, 0, 64, overlong="drop")
    assert counts == Counter(kept=1, dropped=1) and len(rows) == 1
    huge_prompt = example(prompt="word " * 300)  # no answer token would fit: always dropped
    _, counts = tokenize_examples([huge_prompt], tokenizer, 0, 64, overlong="truncate")
    assert counts["dropped"] == 1


def test_overlong_counts_are_logged(caplog, tokenizer):
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(DataConfig(sources=DEMO, max_seq_length=100), tokenizer)
    assert "over max_seq_length=100" in caplog.text and "truncated" in caplog.text
    assert all(len(ids) <= 100 for ids in bundle.train["input_ids"])
    assert sum(c["truncated"] for splits in bundle.stats.values() for c in splits.values()) > 0


def test_validation_text_is_exactly_what_was_formatted(shared_file, tokenizer):
    """A pipeline that joins a string's characters would insert a newline between each
    one; decode(tokens) must give back the formatted prompt + answer."""
    cfg = DataConfig(sources=DEMO + [{"name": "code_alpaca", "path": str(shared_file("code_alpaca_2k.json"))}])
    examples = load_examples(cfg)
    bundle = build_datasets(cfg, tokenizer, examples)
    for label, dataset in bundle.validation.items():
        by_id = {ex["id"]: ex for ex in examples[label]["validation"]}
        assert len(dataset) == len(by_id)
        for row in dataset:
            ex = by_id[row["id"]]
            text = tokenizer.decode(row["input_ids"], skip_special_tokens=True)
            assert text == ex["prompt"] + ex["answer"]
            assert tokenizer.decode(row["input_ids"][1 : row["prompt_len"]]) == ex["prompt"]


def test_interleaving_is_balanced_and_seeded(tokenizer):
    draws = lambda seed, weights=(1, 1): build_datasets(DataConfig(
        sources=[dict(s, weight=w) for s, w in zip(DEMO, weights)], seed=seed), tokenizer).train["source_id"][:1000]
    first = draws(0)
    assert len(first) == 1000
    assert abs(sum(first) / 1000 - 0.5) <= 0.05
    assert draws(0) == first and draws(1) != first
    skewed = draws(0, weights=(3, 1))
    assert abs(skewed.count(0) / 1000 - 0.75) <= 0.05


def test_source_labels_reach_the_batch(tokenizer):
    bundle = build_datasets(DataConfig(sources=DEMO), tokenizer)
    assert bundle.sources == ["demo:numbers", "demo:strings"]
    rows = [bundle.train[i] for i in range(16)]
    batch = DataCollator(tokenizer.pad_token_id)(rows)
    names = [bundle.sources[i] for i in batch["source_id"].tolist()]
    for row, name in zip(rows, names):
        is_numbers = "xs" in tokenizer.decode(row["input_ids"])
        assert name == ("demo:numbers" if is_numbers else "demo:strings")
    assert set(bundle.validation) == set(bundle.sources)


def test_demo_tokenizer_round_trips_through_save(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "def f(xs):\n    return [x + 1 for x in xs]  # ünïcode ✓"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.decode(again(text, add_special_tokens=False)["input_ids"]) == text
    assert (again.eos_token_id, again.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def rows_of(lengths):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 256, (n,), generator=g).tolist(), "prompt_len": p, "source_id": i % 2,
             "id": str(i)} for i, (n, p) in enumerate(lengths)]


def test_packing_collator_layout():
    rows = rows_of([(7, 3), (5, 2), (9, 4), (6, 3)])
    batch = PackingCollator(pad_token_id=0, max_seq_length=16)(rows)
    assert batch["input_ids"].shape == (2, 15)  # [7+5], [9+6]
    assert batch["position_ids"][0, :12].tolist() == list(range(7)) + list(range(5))
    assert batch["segment_ids"][0].tolist() == [0] * 7 + [1] * 5 + [-1] * 3
    assert batch["source_id"].tolist() == [[0, 1], [0, 1]]
    assert batch["labels"][0, 7:9].tolist() == [-100, -100]  # the next example's prompt
    assert batch["labels"][0, 9:12].tolist() == rows[1]["input_ids"][2:]
    assert batch["prompt_mask"][0, 7:12].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("arch", ["gemma", "llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
def test_packed_examples_neither_attend_nor_route_across(arch, router_input):
    """Each packed example gives the same logits, gates and loss as on its own row."""
    moe = make_moe(arch, num_experts=3, router_input=router_input)
    randomize_experts(moe, scale=0.3)
    moe.eval()
    rows = rows_of([(7, 3), (5, 2), (9, 4), (6, 3)])
    packed = PackingCollator(0, 16)(rows)
    plain = DataCollator(0)(rows)
    with torch.no_grad():
        got, want = moe(**packed), moe(**plain)
    example = 0
    for r in range(packed["input_ids"].shape[0]):
        for s in range(int(packed["segment_ids"][r].max()) + 1):
            where = packed["segment_ids"][r] == s
            n = len(rows[example]["input_ids"])
            torch.testing.assert_close(got.logits[r][where], want.logits[example, :n], atol=1e-5, rtol=0)
            torch.testing.assert_close(got.routing_weights[r, s], want.routing_weights[example, 0], atol=1e-6, rtol=0)
            example += 1
    torch.testing.assert_close(got.lm_loss, want.lm_loss, atol=1e-5, rtol=0)


def test_packed_prefixes_keep_each_segment_up_to_its_last_prompt_token():
    # row 0: segment 0 (prompt 2 of 4), segment 1 (no prompt token), segment 2 (prompt
    # tokens 0 and 2 only, so token 1 is kept for them), padding; row 1: one segment.
    segment_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2, 2, -1],
                                [0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0],
                              [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]])
    prompt = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0],
                           [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    order, valid, pos = packed_prefixes(prompt, segment_ids, positions)
    assert order[0].tolist() == [0, 1, 6, 7, 8]
    assert order[1, :1].tolist() == [0]
    assert valid.tolist() == [[True] * 5, [True] + [False] * 4]
    assert pos.tolist() == [[0, 1, 0, 1, 2], [0, 0, 1, 2, 3]]  # the tail restarts at 0


def test_packed_routing_pass_runs_on_the_prompts_only():
    """The no-grad base_hidden pass of packed rows sees each example's prompt, not the
    whole row (answers and padding are most of it), and routes exactly as before."""
    moe = make_moe("gemma", num_experts=3, router_input="base_hidden")
    seen = []
    layer = next(iter(moe.experts.values())).base_layer
    layer.register_forward_hook(lambda m, args, out: seen.append((torch.is_grad_enabled(), args[0].shape[:2])))
    moe.train()
    packed = PackingCollator(0, 16)(rows_of([(7, 3), (5, 2), (9, 4), (6, 3)]))
    moe(**packed).loss.backward()
    assert seen == [(False, (2, 7)), (True, (2, 15))]  # prompts 3+2 and 4+3 of rows 7+5 and 9+6


def test_packed_training_step_runs_with_gradients():
    moe = make_moe("gemma", num_experts=2)
    moe.train()
    out = moe(**PackingCollator(0, 16)(rows_of([(7, 3), (5, 2), (9, 4)])))
    out.loss.backward()
    assert all(p.grad is not None for p in moe.trainable_parameters())
