"""`vapo plan`'s model shapes read through transformers: a directory's config.json and `builtin:tiny` give the
parameter counts of the models transformers builds from them (on the meta device: no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deploy.plan import ModelShape, model_shape


def _meta_count(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter


@pytest.mark.parametrize(
    ("model_type", "tied"), [("qwen2", False), ("qwen2", True), ("llama", False)], ids=["qwen2", "tied", "llama"]
)
def test_a_directory_s_config_json(tmp_path: Path, model_type: str, tied: bool) -> None:
    from transformers import AutoConfig

    config = {
        "model_type": model_type,
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": tied,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = model_shape(str(tmp_path))
    head_dim = 16 if model_type == "llama" else 0  # LlamaConfig states it; Qwen2Config leaves it implied
    assert shape == ModelShape(1000, 64, 96, 3, 4, 2, tied=tied, head_dim=head_dim, qkv_bias=model_type == "qwen2")
    assert shape.num_params == _meta_count(AutoConfig.from_pretrained(tmp_path))


def test_builtin_tiny_is_the_tiny_model_s_configuration() -> None:
    from learner.tiny_model import TinyModelSpec, build_config, build_tokenizer

    shape = model_shape("builtin:tiny")
    assert shape.tied and shape.num_params == _meta_count(build_config(TinyModelSpec(), build_tokenizer()))
