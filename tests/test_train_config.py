"""Recipes, command-line overrides and the one-line errors for bad values."""
from pathlib import Path

import pytest

from dylora_moe.train.cli import main as train_main
from dylora_moe.train.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def test_shipped_recipes_parse():
    demo = load_recipe(DEMO)
    assert demo.model.base_model == "tiny-random:gemma" and demo.data.sources[0].label == "demo:numbers"
    real = load_recipe(str(ROOT / "configs" / "codegemma-2b.yaml"))
    assert real.model.base_model == "google/codegemma-2b"
    assert (real.moe.num_experts, real.train.train_batch_size, real.train.gradient_accumulation_steps) == (4, 2, 32)
    assert real.train.bf16 and real.data.interleaved_sampling and real.train.cosine_restarts == 2
    assert real.moe.balance_coefficient == 0.01
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
