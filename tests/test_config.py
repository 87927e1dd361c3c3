import pytest

from dylora_moe import MoEConfig


@pytest.mark.parametrize("field,value", [
    ("num_experts", 0), ("num_experts", -1), ("num_experts", 2.5),
    ("top_k", 0), ("top_k", 5),  # num_experts is 4
    ("lora_r", 0),
    ("temperature", 0), ("temperature", -1.0),
    ("router_input", "logits"), ("routing", "batch"), ("mixture", "sum"),
    ("lora_dropout", 1.0), ("lora_dropout", -0.1),
    ("balance_coefficient", -1), ("balance_loss", "kl"),
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
