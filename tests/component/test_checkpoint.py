"""Checkpoint and resume: a resumed learner takes exactly the step an uninterrupted one takes."""

from __future__ import annotations

from pathlib import Path

import torch

from learner import checkpoint
from tests.component.test_learner import _cfg, _groups, _learner


def test_resume_continues_the_same_trajectory(random_model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("algo.value_pretrain_steps=1", f"model.path={random_model_dir}")
    steps = [_groups(seed) for seed in range(3)]

    straight = _learner(random_model_dir, cfg)
    for batch in steps[:2]:
        straight.train_step(batch)
    ckpt = checkpoint.save(straight, tmp_path, version=2, data_cursor={"epoch": 0, "index": 8})
    expected = straight.train_step(steps[2])

    resumed = _learner(random_model_dir, cfg)
    assert checkpoint.latest(tmp_path) == ckpt
    meta = checkpoint.load(resumed, ckpt)
    assert (meta["step"], meta["version"], meta["data_cursor"]) == (2, 2, {"epoch": 0, "index": 8})
    got = resumed.train_step(steps[2])
    for key in ("loss/policy", "loss/value", "loss/nll_pos", "grad_norm/policy"):
        assert got[key] == expected[key], key
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_incomplete_checkpoint_is_ignored_and_export_loads(random_model_dir: Path, tmp_path: Path) -> None:
    learner = _learner(random_model_dir, _cfg(f"model.path={random_model_dir}"))
    learner.train_step(_groups())
    ckpt = checkpoint.save(learner, tmp_path, version=1, data_cursor=None)
    (tmp_path / "checkpoints" / "step_000009").mkdir()  # a crash mid-save: no meta.json
    assert checkpoint.latest(tmp_path) == ckpt

    from transformers import AutoModelForCausalLM

    out = checkpoint.export_policy(ckpt, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, p in learner.policy.named_parameters():
        assert torch.equal(exported.get_parameter(name), p.detach()), name
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_exported_policy_loads_in_vllm_with_the_same_logprobs(random_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from actors.engine import Engine
    from deploy.doctor import fixed_sequences, hf_logprobs, max_abs_diff

    learner = _learner(random_model_dir, _cfg(f"model.path={random_model_dir}"))
    learner.train_step(_groups())
    ckpt = checkpoint.save(learner, tmp_path, version=1, data_cursor=None)
    out = checkpoint.export_policy(ckpt, tmp_path / "export")
    sequences = fixed_sequences(learner.policy.config.vocab_size, seed=3)
    expected = hf_logprobs(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), sequences)
    assert max_abs_diff(expected, hf_logprobs(learner.policy, sequences)) < 1e-5  # the export is the trained policy
    engine = Engine(str(out), dtype="float32", kv_cache_memory_bytes=64 << 20, max_num_seqs=8, enforce_eager=True)
    try:
        assert max_abs_diff(engine.score(sequences), expected) < 1e-4
    finally:
        engine.shutdown()
    assert not engine.ipc_dir.exists()  # vLLM's IPC socket files go with the engine (actors.engine)
