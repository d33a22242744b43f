"""`vapo plan`: the memory terms in closed form, the built-in shapes, the presets, and the CLI's one-line failure.

Shapes read from a directory's config.json (transformers) are tested in tests/component/test_plan_shapes.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.cli import main
from deploy.plan import (
    GIB,
    KNOWN_SHAPES,
    ModelShape,
    activation_bytes,
    kv_bytes_per_token,
    learner_terms,
    make_plan,
    misfit,
    model_shape,
)
from shared.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted((CONFIGS / "model").glob("qwen2.5-*.yaml"))
SMALL = ModelShape(
    vocab_size=1000, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2, tied=False
)


def _terms(shape: ModelShape = SMALL, **kw) -> dict[str, float]:
    args = (
        dict(
            world=4,
            dtype_bytes=2,
            critic=True,
            reference=True,
            micro_batch_tokens=4096,
            longest=1024,
            checkpointing=False,
            chunk_tokens=256,
            cuda=False,
        )
        | kw
    )
    return {t.name: t.bytes for t in learner_terms(shape, **args)}


def test_parameter_count_is_the_hugging_face_one() -> None:
    # q/k/v with biases, o, gate/up/down, two norms per block; embeddings, final norm and an untied head
    h, i, kv, v = 64, 96, 32, 1000
    block = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    assert SMALL.block_params == block
    assert SMALL.num_params == 3 * block + 2 * v * h + h
    assert SMALL.value_params == 3 * block + v * h + h + h + 1
    # the model cards' counts: 0.49B (0.36B non-embedding), 7.61B (6.53B), 32.8B (31.2B)
    counts = {name: s.num_params for name, s in KNOWN_SHAPES.items()}
    assert counts == {
        "Qwen/Qwen2.5-0.5B": 494_032_768,
        "Qwen/Qwen2.5-7B": 7_615_616_512,
        "Qwen/Qwen2.5-32B": 32_763_876_352,
    }


def test_parameters_term_is_four_bytes_per_parameter_over_the_world() -> None:
    terms = _terms()
    assert terms["policy parameters"] == 4 * SMALL.num_params / 4
    assert terms["policy gradients"] == terms["policy parameters"]
    assert terms["policy AdamW states"] == 2 * terms["policy parameters"]
    assert terms["value parameters"] == 4 * SMALL.value_params / 4
    assert terms["reference parameters"] == 2 * SMALL.num_params / 4  # model.dtype, no masters


def test_doubling_the_ranks_halves_the_sharded_terms_and_nothing_else() -> None:
    four, eight = _terms(world=4), _terms(world=8)
    sharded = {k for k in four if k.split()[0] in ("policy", "value", "reference")}
    assert len(sharded) == 7
    for key in four:
        assert eight[key] == (four[key] / 2 if key in sharded else four[key]), key


def test_checkpointing_lowers_activations_to_block_inputs_plus_one_block() -> None:
    full = activation_bytes(SMALL, 4096, 2, checkpointing=False)
    ckpt = activation_bytes(SMALL, 4096, 2, checkpointing=True)
    h, i = 64, 96
    per_block = 4096 * (8 * h + 9 * 2 * h + 4 * 2 * i)
    head = 4096 * (4 + 3 * 2) * h
    assert full == 3 * per_block + head
    assert ckpt == 3 * 4096 * h * 2 + per_block + head < full
    assert _terms(checkpointing=True)["attention mask"] < _terms(checkpointing=False)["attention mask"]


def test_terms_follow_the_configuration() -> None:
    assert "value parameters" not in _terms(critic=False) and "reference parameters" not in _terms(reference=False)
    assert _terms(cuda=True)["cuda runtime"] > 0 and "cuda runtime" not in _terms()
    assert _terms(chunk_tokens=512)["log-prob chunk"] == 2 * _terms()["log-prob chunk"] == 2 * 3 * 256 * 1000 * 4
    assert _terms(dtype_bytes=4)["log-prob head"] == 4 * 1000 * 64  # a float32 head is not copied


def test_kv_cache_tokens() -> None:
    seven = KNOWN_SHAPES["Qwen/Qwen2.5-7B"]
    assert kv_bytes_per_token(seven, 1, 2) == 2 * 28 * 4 * 128 * 2
    assert kv_bytes_per_token(seven, 2, 2) == kv_bytes_per_token(seven, 1, 2) // 2
    assert kv_bytes_per_token(seven, 8, 2) == 2 * 28 * 1 * 128 * 2  # fewer KV heads than GPUs: replicated
    cfg = load_config([CONFIGS / "model" / "qwen2.5-7b.yaml"])
    plan = make_plan(cfg)
    kv = plan.actor[-1]
    assert kv.name == "KV cache" and plan.kv_tokens == int(kv.bytes // kv_bytes_per_token(seven, 2, 2))
    weights = 7_615_616_512 * 2 / 2
    assert plan.actor[0].bytes == weights
    assert kv.bytes == pytest.approx(cfg.actors.gpu_memory_utilization * 80 * GIB - weights - plan.actor[1].bytes)


def test_hub_ids_with_a_built_in_shape_plan_offline() -> None:
    assert model_shape("Qwen/Qwen2.5-7B-Instruct") == KNOWN_SHAPES["Qwen/Qwen2.5-7B"]
    with pytest.raises(ValueError, match="model.path 'org/unknown'"):
        model_shape("org/unknown")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_passes_vapo_plan(preset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(CONFIGS / "vapo.yaml"), str(preset)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "learner rank (1 of" in out and "KV cache" in out


def test_presets_set_everything_a_gpu_run_needs() -> None:
    assert [p.stem for p in PRESETS] == ["qwen2.5-0.5b", "qwen2.5-32b", "qwen2.5-7b"]
    for preset in PRESETS:
        cfg = load_config([preset])
        assert cfg.model.dtype == "bfloat16" and cfg.deploy.gpu_memory_gb == 80, preset
        assert cfg.deploy.learner_gpus == 1 and cfg.deploy.actor_gpus == 1, preset
        assert cfg.learner.device == "cuda" and misfit(make_plan(cfg), cfg) is None, preset


def test_a_term_that_does_not_fit_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    preset = str(CONFIGS / "model" / "qwen2.5-7b.yaml")
    assert main(["plan", preset, "model.gradient_checkpointing=false"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("vapo plan: learner rank does not fit: ") and "of deploy.gpu_memory_gb=80 " in err
    assert "(largest term: activations " in err
    assert main(["plan", preset, "actors.tensor_parallel_size=1", "actors.gpu_memory_utilization=0.15"]) == 1
    assert capsys.readouterr().err.startswith("vapo plan: actor does not fit: ")
    assert main(["plan", preset, "actors.tensor_parallel_size=1", "actors.gpu_memory_utilization=0.2"]) == 1
    assert capsys.readouterr().err.startswith("vapo plan: actor KV cache does not fit: it holds ")
    assert main(["plan", preset, "deploy.gpu_memory_gb=0"]) == 2  # a bad value: the config's one-line error
