import json
from pathlib import Path

import pytest

from services.planner.errors import PlannerError
from services.planner.model_spec import builtin_model, model_from_hf_config


def test_parameter_counts_match_the_published_sizes() -> None:
    assert builtin_model("llama-3-8b").total_params == pytest.approx(8.03e9, rel=0.01)
    assert builtin_model("llama-3-70b").total_params == pytest.approx(70.6e9, rel=0.01)
    assert builtin_model("qwen2.5-72b").total_params == pytest.approx(72.7e9, rel=0.02)


def test_kv_bytes_per_token() -> None:
    # 2 x 80 layers x 8 KV heads x 128 x 2 bytes
    assert builtin_model("llama-3-70b").kv_bytes_per_token == 327_680


def test_unknown_builtin_names_the_known_ones() -> None:
    with pytest.raises(PlannerError, match="unknown model 'llama-9'.*llama-3-70b"):
        builtin_model("llama-9")


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_reads_a_hugging_face_config(tmp_path: Path) -> None:
    config = {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 352,
        "vocab_size": 1028,
        "torch_dtype": "float32",
        "head_dim": 32,
    }
    model = model_from_hf_config(_write(tmp_path, config).parent)
    assert (model.num_layers, model.num_kv_heads, model.bytes_per_element) == (4, 2, 4)
    assert model.kv_bytes_per_token == 2 * 4 * 2 * 32 * 4


def test_moe_and_missing_fields_are_refused_precisely(tmp_path: Path) -> None:
    with pytest.raises(PlannerError, match="mixture-of-experts.*num_local_experts=8"):
        model_from_hf_config(_write(tmp_path, {"num_local_experts": 8}))
    with pytest.raises(PlannerError, match="lacks .*num_hidden_layers"):
        model_from_hf_config(_write(tmp_path, {"hidden_size": 64}))
    with pytest.raises(PlannerError, match="cannot read"):
        model_from_hf_config(tmp_path / "absent.json")
