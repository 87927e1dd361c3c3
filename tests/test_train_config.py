"""Recipes, command-line overrides and the one-line errors for bad values."""
from pathlib import Path

import pytest

from dylora_moe.train.cli import main as train_main
from dylora_moe.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def test_shipped_recipes_parse():
    demo = load_recipe(DEMO)
    assert demo.model.base_model == "tiny-random:gemma" and demo.data.sources[0].label == "demo:numbers"
    real = load_recipe(str(ROOT / "configs" / "codegemma-2b.yaml"))
    assert real.model.base_model == "google/codegemma-2b"
    assert (real.moe.num_experts, real.train.train_batch_size, real.train.gradient_accumulation_steps) == (4, 2, 32)
    assert real.train.bf16 and real.data.interleaved_sampling and real.train.cosine_restarts == 2
    # the measured routing on a real base: k-means-started sequence router, weak balance (design.md, routing)
    assert (real.moe.gating, real.moe.routing, real.moe.router_init) == ("dense", "sequence", "kmeans")
    assert real.moe.balance_coefficient == 0.01
    assert real.data.mbpp_split == "official"  # eval scores MBPP on the official test tasks
    assert [s.name for s in real.data.sources] == ["code_alpaca", "mbpp"]
    qlora = load_recipe(str(ROOT / "configs" / "codegemma-2b-qlora.yaml"))
    assert qlora.model.load_in_4bit and qlora.model.gradient_checkpointing and qlora.moe.num_experts == 8
    assert qlora.train.optimizer == "paged_adamw_8bit" and qlora.train.bf16


def test_the_seed_flags_keep_their_names():
    cfg = load_recipe(DEMO, ["--bf16", "--num_epochs", "3", "--num_experts", "6", "--interleaved_sampling", "false",
                             "--balance_coefficient", "0.05", "--cosine_restarts", "2", "--train_batch_size", "4",
                             "--gradient_accumulation_steps", "8", "--training_subset", "10", "--eval_subset", "50",
                             "--resume_from_checkpoint", "auto"])
    assert cfg.train.bf16 is True and cfg.train.num_epochs == 3.0 and cfg.moe.num_experts == 6
    assert cfg.data.interleaved_sampling is False and cfg.moe.balance_coefficient == 0.05
    assert (cfg.train.cosine_restarts, cfg.train.train_batch_size, cfg.train.gradient_accumulation_steps) == (2, 4, 8)
    assert (cfg.data.training_subset, cfg.data.eval_subset) == (10.0, 50.0)
    assert cfg.train.resume_from_checkpoint == "auto"


def test_overrides_accept_equals_sections_and_lists():
    cfg = load_recipe(DEMO, ["--learning_rate=3e-4", "--data.seed", "7", "--seed", "9", "--log_with", "tensorboard",
                             "--target_modules", "[q_proj, v_proj]"])
    assert cfg.train.learning_rate == 3e-4 and cfg.data.seed == 7 and cfg.train.seed == 9
    assert cfg.train.log_with == ["tensorboard"] and cfg.moe.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("args,message", [
    (["--learning_rate", "-1"], "train.learning_rate=-1.0: expected a number > 0"),
    (["--train_batch_size", "0"], "train.train_batch_size=0: expected an integer >= 1"),
    (["--gradient_accumulation_steps", "0"], "train.gradient_accumulation_steps=0"),
    (["--top_k", "9"], "MoEConfig.top_k=9: expected an integer in [1, num_experts=4]"),
    (["--num_experts", "0"], "MoEConfig.num_experts=0"),
    (["--nope", "1"], "unknown option --nope"),
    (["--learning_rate", "fast"], "train.learning_rate='fast': expected a finite number"),
    (["--lr_scheduler", "cyclic"], "train.lr_scheduler='cyclic'"),
    (["--mbpp_split", "paper"], "data.mbpp_split='paper'"),
    (["--optimizer", "sgd"], "train.optimizer='sgd': expected one of ['adamw', 'adamw_8bit', 'paged_adamw_8bit']"),
])
def test_bad_values_fail_fast_naming_the_field(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--config", DEMO, "--output_dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line
    assert not out.exists()  # nothing written, nothing loaded


def test_unknown_recipe_key_and_missing_data_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {learning_rat: 0.1}\n")
    assert train_main(["--config", str(recipe)]) == 2
    assert "unknown key(s) ['train.learning_rat']" in capsys.readouterr().err
    recipe.write_text(f"model: {{base_model: 'tiny-random:gemma', tokenizer: demo}}\n"
                      f"data: {{sources: [{{name: jsonl, path: {tmp_path / 'missing.jsonl'}}}]}}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}}}\n")
    assert train_main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: data file not found" in err and not (tmp_path / "run").exists()
    assert train_main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: recipe not found" in capsys.readouterr().err


def test_dylora_moe_train_is_the_same_command(tmp_path, capsys):
    from dylora_moe.cli import main

    assert main(["train", "--config", DEMO, "--train_batch_size", "0"]) == 2
    assert "train.train_batch_size=0" in capsys.readouterr().err


# Every bad input below is refused by `dylora-moe train` in one line naming the field or
# file, with exit 2, before anything is read or written (docs/troubleshooting.md).
BAD_OVERRIDES = [
    (["--learning_rate", "inf"], "train.learning_rate='inf': expected a finite number"),
    (["--learning_rate", "nan"], "train.learning_rate='nan': expected a finite number"),
    (["--learning_rate"], "train.learning_rate: no value after --learning_rate; expected a finite number"),
    (["--learning_rate", "--bf16"], "train.learning_rate: no value after --learning_rate"),
    (["--learning_rate", "[0.01]"], "train.learning_rate=[0.01]: expected a finite number"),
    (["--bf16", "5"], "train.bf16=5: expected true or false"),
    (["--seed", "1.5"], "train.seed=1.5: expected an integer"),
    (["--seed", "-1"], "train.seed=-1: expected an integer in [0, 2**32 - 1]"),
    (["--max_steps", "true"], "train.max_steps=True: expected an integer"),
    (["--sources", "5"], "data.sources=5: expected a list"),
    (["--num_experts", "10000000"], "MoEConfig.num_experts=10000000: expected at most 1024"),
    (["--demo_examples", "1000000000"], "data.demo_examples=1000000000: expected an integer in [10, 100000]"),
    (["--max_row_bytes", "0"], "data.max_row_bytes=0: expected an integer >= 1"),
    (["--warmup_ratio", "2"], "train.warmup_ratio=2.0: expected a fraction in [0, 1]"),
    (["--max_grad_norm", "-inf"], "train.max_grad_norm='-inf': expected a finite number"),
    (["--temperature", ".inf"], "moe.temperature=inf: expected a finite number"),
    (["--log_with", "5"], "train.log_with=5: expected a list"),
    (["--resume_from_checkpoint"], "train.resume_from_checkpoint: no value after --resume_from_checkpoint"),
    (["--grow_on_novelty", "--max_experts", "2"], "train.max_experts=2 is below moe.num_experts=4"),
    (["--grow_init", "copy:7"], "train.grow_init='copy:7': expected copy:<i> with i < moe.num_experts=4"),
    (["--early_stopping_patience", "2", "--eval_every", "0"],
     "train.early_stopping_patience=2 needs train.eval_every > 0"),
    (["--base_model", "tiny-random:bert"], "unknown tiny-random architecture 'bert'"),
    (["--base_model", "/nonexistent/model", "--tokenizer", "none", "--tiny", "{}"],
     "model.base_model='/nonexistent/model': no such directory"),
    (["--base_model", "not a hub id", "--tokenizer", "none", "--tiny", "{}"],
     "model.base_model='not a hub id': neither a local"),
    (["--tokenizer", "./no/such/tokenizer"], "model.tokenizer='./no/such/tokenizer': no such directory"),
    (["--base_model", "google/codegemma-2b", "--tokenizer", "none", "--tiny", "{}"],
     "model.base_model='google/codegemma-2b': not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"),
    (["--tiny", "{hidden_size: -4}"], "model.tiny.hidden_size=-4: expected an integer >= 1"),
    (["--tiny", "{hidden_sizes: 64}"], "model.tiny: unknown key(s) ['hidden_sizes']"),
    (["--tiny", "{hidden_size: 100, num_heads: 3}"], "model.tiny.hidden_size=100: expected a multiple of num_heads=3"),
    (["--tiny", "{hidden_size: 65536, num_layers: 64}"], "a tiny random base is for demos and tests"),
    (["--base_model", "tiny-random:gpt2", "--max_seq_length", "1024"],
     "data.max_seq_length=1024 exceeds the tiny base's positions (model.tiny.max_positions=512)"),
]


@pytest.mark.parametrize("args,message", BAD_OVERRIDES, ids=[" ".join(a) for a, _ in BAD_OVERRIDES])
def test_bad_command_line_values_are_one_line_before_anything_runs(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--config", DEMO, "--output_dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


BAD_RECIPES = [
    ("train: {learning_rate: [0.01]}", "train.learning_rate=[0.01]: expected a finite number"),
    ("train: {output_dir: 123}", "train.output_dir=123: expected a string (in YAML, quote it: '123')"),
    ("train: [1, 2]", "section 'train' must be a mapping of field: value, got list"),
    ("data: {sources: 5}", "data.sources=5: expected a list"),
    ("data: {sources: [{name: demo, family: letters}]}", "data.sources[demo].family='letters'"),
    ("data: {sources: [{name: demo, path: x.jsonl}]}", "the demo source is generated, it reads no file"),
    ("data: {sources: [{family: numbers}]}", "has no name"),
    ("data: {sources: [{name: demo, weight: .inf}]}", "data.sources[demo].weight=inf: expected a finite number"),
    ("train: {bf16: 5}", "train.bf16=5: expected true or false"),
    ("moe: {num_experts: 2.5}", "moe.num_experts=2.5: expected an integer"),
    ("model: {base_model: 'tiny-random:gemma', tiny: 4}", "model.tiny=4: expected a mapping"),
    ("model: {base_model: google/codegemma-2b, tiny: {hidden_size: 8}}", "model.tiny={'hidden_size': 8}: only used"),
    ("- just a list", "expected a mapping of sections"),
    ("train: {seed: 1\n  bad indent", "invalid YAML"),
]


@pytest.mark.parametrize("text,message", BAD_RECIPES, ids=[t.split("\n")[0] for t, _ in BAD_RECIPES])
def test_bad_recipes_are_one_line_naming_the_field(text, message, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {base_model: 'tiny-random:gemma', tokenizer: demo}\n" + text + "\n"
                      if not text.startswith(("model:", "-")) else text + "\n")
    monkeypatch.chdir(tmp_path)  # the default output_dir (runs/...) would land here
    assert train_main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # nothing written


@pytest.mark.parametrize("argv,message", [
    ([], "no --config given: model.base_model is not set"),
    (["--num_experts", "2"], "no --config given: model.base_model is not set"),
    (["--config", "EMPTY"], "model.base_model is not set, and its default means downloading"),
    (["--config", "ONLY_TRAIN"], "model.base_model is not set"),
])
def test_no_recipe_never_trains_the_hub_default(argv, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "train.yaml").write_text("train: {max_steps: 2}\n")
    monkeypatch.chdir(tmp_path)  # the default output_dir (runs/...) would land here
    argv = [{"EMPTY": "empty.yaml", "ONLY_TRAIN": "train.yaml"}.get(a, a) for a in argv]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "--config configs/demo.yaml" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_an_explicit_base_model_is_a_request(tmp_path, capsys):
    """Naming the base is asking for it: then the recipe is built (here it fails offline, in one line)."""
    assert train_main(["--base_model", "google/codegemma-2b", "--output_dir", str(tmp_path / "run")]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_recipe_file_problems_name_the_file(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train: {project_name: caf\xe9}\n".encode("latin-1"))
    assert train_main(["--config", str(latin1)]) == 2
    err = capsys.readouterr().err
    assert f"{latin1}: not UTF-8 text (byte 0xe9 on line 1)" in err and err.count("\n") == 1
    assert train_main(["--config", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a directory; expected a recipe YAML file" in capsys.readouterr().err
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    assert train_main(["--config", str(deep)]) == 2
    assert "deep.yaml: invalid YAML" in capsys.readouterr().err


def test_values_are_coerced_exactly():
    cfg = load_recipe(DEMO, ["--max_steps", "1e3", "--learning_rate", "1", "--bf16", "--num_epochs", "2",
                             "--resume_from_checkpoint", "none", "--target_modules", "q_proj"])
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.bf16 is True and cfg.train.resume_from_checkpoint is None
    assert cfg.moe.target_modules == ["q_proj"]
