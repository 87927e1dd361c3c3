"""Data: sources -> seeded splits -> token rows -> batches, padded or packed.

The `demo` source is generated offline; `code_alpaca`, `mbpp` and `jsonl` read the hub
or a local file the same way. Every source yields one example shape (an Alpaca prompt
and its answer), split by sha256(seed, prompt) after exact duplicates are removed.
"""
from dylora_moe.data import (DataCollator, DataConfig, PackingCollator, build_datasets, build_demo_tokenizer,
                             load_examples)

cfg = DataConfig(sources=[{"name": "demo", "family": "numbers"}, {"name": "demo", "family": "strings"}],
                 demo_examples=40, max_seq_length=256, interleaved_sampling=True)
examples = load_examples(cfg)  # reads and validates everything before any model exists
for label, splits in examples.items():
    print(label, {split: len(rows) for split, rows in splits.items()})

first = examples["demo:numbers"]["train"][0]
print("prompt ends:", repr(first["prompt"][-60:]))
print("answer:", repr(first["answer"]))

# The demo recipe trains a small byte-level BPE on its own prompts; real runs use the base's tokenizer.
tokenizer = build_demo_tokenizer([ex["prompt"] + ex["answer"] for s in examples.values() for ex in s["train"]])
bundle = build_datasets(cfg, tokenizer, examples)
print("train rows:", len(bundle.train), "sources:", bundle.sources)
rows = [bundle.train[i] for i in range(6)]

padded = DataCollator(tokenizer.pad_token_id)(rows)
print("padded:", {k: tuple(v.shape) for k, v in padded.items()})
label_count = int((padded["labels"] != -100).sum())
answer_count = sum(len(r["input_ids"]) - r["prompt_len"] for r in rows)
print(f"labelled tokens {label_count} = answer tokens incl. EOS {answer_count}: {label_count == answer_count}")

# Packing: several examples per row, positions restarting and a segment id each, so the
# model attends (and routes) within each example only.
packed = PackingCollator(tokenizer.pad_token_id, cfg.max_seq_length)(rows)
print("packed:", {k: tuple(v.shape) for k, v in packed.items()})
print("segments in row 0:", sorted(set(packed["segment_ids"][0].tolist()) - {-1}))
