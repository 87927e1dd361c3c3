import pytest

from dylora_moe import MoEConfig


@pytest.mark.parametrize("field,value", [
    ("num_experts", 0), ("num_experts", -1), ("num_experts", 2.5),
    ("top_k", 0), ("top_k", 5),  # num_experts is 4
    ("lora_r", 0),
    ("temperature", 0), ("temperature", -1.0),
    ("router_input", "logits"), ("routing", "batch"), ("gating", "sparse"),
    ("lora_dropout", 1.0), ("lora_dropout", -0.1),
    ("balance_coefficient", -1),
])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}="):
        MoEConfig(**{"num_experts": 4, field: value})


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = MoEConfig(num_experts=8, top_k=2, target_modules="q_proj")
    assert cfg.target_modules == ["q_proj"]
    cfg.save(tmp_path / "c.json")
    assert MoEConfig.load(tmp_path / "c.json") == cfg


def test_unknown_field_in_file_is_named(tmp_path):
    (tmp_path / "c.json").write_text('{"num_experts": 2, "num_expert": 3}')
    with pytest.raises(ValueError, match=r"c\.json.*num_expert"):
        MoEConfig.load(tmp_path / "c.json")


OLD_SAVED = {"num_experts": 2, "gating": "dense_train_top_k_eval", "balance_loss": "mse", "mixture": "logits",
             "experts_mature": False, "top_k": 1}


def test_a_config_with_removed_options_converts_once_with_one_warning(tmp_path, caplog):
    import json

    (tmp_path / "c.json").write_text(json.dumps(OLD_SAVED))
    with caplog.at_level("WARNING"):
        cfg = MoEConfig.load(tmp_path / "c.json")
    assert cfg.gating == "dense" and cfg.num_experts == 2
    [record] = [r for r in caplog.records if "removed MoEConfig options" in r.getMessage()]
    assert record.getMessage() == (
        f"{tmp_path / 'c.json'}: converted removed MoEConfig options: gating='dense_train_top_k_eval' -> 'dense'; "
        "balance_loss='mse' dropped; mixture='logits' dropped; experts_mature=False dropped (docs/recipe.md)")


def test_a_recipe_with_removed_options_still_loads(tmp_path, caplog):
    from dylora_moe.recipe import load_recipe

    (tmp_path / "r.yaml").write_text("moe:\n  gating: dense_train_top_k_eval\n  balance_loss: switch\n"
                                     "  mixture: deltas\n  num_experts: 3\n")
    with caplog.at_level("WARNING"):
        cfg = load_recipe(str(tmp_path / "r.yaml"))
    assert cfg.moe.gating == "dense" and cfg.moe.num_experts == 3
    assert "gating='dense_train_top_k_eval' -> 'dense'; balance_loss='switch' dropped; mixture='deltas' dropped" \
        in caplog.text


@pytest.mark.parametrize("field,value,message", [
    ("gating", "top_k_renormalised", "MoEConfig.gating='top_k_renormalised': expected one of ('dense', 'top_k', "
                                     "'straight_through')"),
    ("mixture", "sum", "unknown MoEConfig field(s) ['mixture']"),
])
def test_an_unknown_value_of_a_converted_field_is_one_line(field, value, message):
    from dylora_moe.errors import UserError

    with pytest.raises(UserError) as error:
        MoEConfig.from_dict({"num_experts": 2, field: value})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_docs_recipe_md_lists_every_recipe_field_once_and_says_the_count():
    import dataclasses
    import re
    from pathlib import Path

    from dylora_moe.recipe import SECTIONS

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipe.md").read_text()
    fields = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
    total = sum(map(len, fields.values()))
    assert f"**{total}**" in text
    for section, names in fields.items():
        table = text.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
        listed = re.findall(r"^\| `(\w+)` \|", table, re.M)
        assert sorted(listed) == sorted(names), section  # each once, in the order that reads best
