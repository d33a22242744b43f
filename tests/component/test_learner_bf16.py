"""The learner in bf16 mixed precision on CPU: two FSDP2 ranks over gloo, policy + value + reference, on a
random model of Qwen2.5-0.5B's shape cut to 2 layers.

The model has Qwen2.5-0.5B's configuration (vocabulary 151,936, hidden 896, intermediate 4864, 14
heads, 2 KV heads, tied embeddings, rope theta 1e6) with 2 decoder blocks, over the component tier's
51-entry char tokenizer: the model's vocabulary exceeds the tokenizer's, as real Qwen's does. The
ranks build the learner the way `run_rank` does (`build_learner` with a process group, so FSDP's
MixedPrecisionPolicy: bf16 parameters and compute, float32 master weights and reductions; with
activation checkpointing of the policy's and the value model's blocks), take a
step on rank 0's scattered groups, checkpoint, take a second step, and a fresh learner resumed from
the checkpoint takes the second step with exactly the losses of the uninterrupted one. Batches are
small (8 responses of 1 to 23 tokens, one micro-batch per rank) so that the 152k-vocabulary logits
and FSDP's gathers of the embedding stay cheap on 2 cores (about 2 minutes).
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from tests.component.conftest import QWEN2_5_0_5B, build_random_model
from tests.component.test_learner import _free_port, _groups

KEYS = ("loss/policy", "loss/value", "loss/nll_pos", "loss/kl", "grad_norm/policy", "grad_norm/value")
OVERRIDES = [
    "learner.device=cpu",
    "model.dtype=bfloat16",
    "rollout.prompts_per_step=2",
    "rollout.samples_per_prompt=4",
    "learner.mini_batch_size=8",
    "learner.micro_batch_tokens=4096",  # one micro-batch per rank: each costs FSDP gathers of the 152k embedding
    "algo.value_pretrain_steps=0",
    "algo.kl_coef=0.01",  # a reference policy
    "model.gradient_checkpointing=true",  # the trained models' blocks recompute their activations
    "learner.actor_lr=1e-4",
    "learner.critic_lr=1e-4",
    "learner.warmup_steps=0",
    "seed=3",
]


@pytest.fixture(scope="module")
def qwen_shaped_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The char tokenizer of `build_random_model`, with a random 2-layer model of Qwen2.5-0.5B's shape."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = build_random_model(tmp_path_factory.mktemp("qwen_shaped"), tie_word_embeddings=True)
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_5_0_5B, num_hidden_layers=2, bos_token_id=None, eos_token_id=1, pad_token_id=0,
                         dtype="float32")
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    model.save_pretrained(out)
    return out


def _checksum(model: torch.nn.Module) -> float:
    """Of this rank's shards (no gathers)."""
    return sum(float(p.to_local().double().sum()) for p in model.parameters())


def _steps(seed: int) -> list:
    return _groups(seed=seed, num_groups=2, group_size=4)


def _rank_main(rank: int, port: int, model_dir: str, run_dir: str) -> None:
    from learner import checkpoint
    from learner import dist as ldist
    from learner.main import build_learner
    from learner.model import decoder_layers
    from shared.config import load_config

    torch.set_num_threads(1)
    ldist.init("gloo", f"tcp://127.0.0.1:{port}", rank, 2)
    cfg = load_config([], [*OVERRIDES, f"model.path={model_dir}"])
    try:
        torch.manual_seed(cfg.seed)
        learner = build_learner(cfg, torch.device("cpu"))
        compute: dict[str, str] = {}

        def record(name: str):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
                compute.setdefault(name, str(output.dtype))
            return hook

        learner.policy.get_decoder().layers[0].mlp.register_forward_hook(record("policy_block"))
        learner.value_model.value_head.register_forward_hook(record("value_head"))
        wrapped = [type(block).__name__ for m in (learner.policy, learner.value_model, learner.ref_policy)
                   for block in decoder_layers(m)]
        masters = {p.dtype for m in (learner.policy, learner.value_model) for p in m.parameters()}
        before = (_checksum(learner.policy), _checksum(learner.value_model))
        first = learner.train_step(ldist.scatter_groups(_steps(0) if rank == 0 else None))
        after = (_checksum(learner.policy), _checksum(learner.value_model))
        ckpt = checkpoint.save(learner, run_dir, version=1, data_cursor=None)
        expected = learner.train_step(ldist.scatter_groups(_steps(1) if rank == 0 else None))  # the second step
        del learner
        gc.collect()
        torch.manual_seed(cfg.seed)
        resumed = build_learner(cfg, torch.device("cpu"))
        checkpoint.load(resumed, ckpt)
        got = resumed.train_step(ldist.scatter_groups(_steps(1) if rank == 0 else None))
        if rank == 0:
            Path(run_dir, "result.json").write_text(json.dumps({
                "first": {k: first[k] for k in KEYS}, "expected": {k: expected[k] for k in KEYS},
                "got": {k: got[k] for k in KEYS}, "before": before, "after": after,
                "masters": sorted(str(d) for d in masters), "wrapped": wrapped, "compute": compute,
            }))
    finally:
        ldist.destroy()


def test_two_bf16_ranks_train_checkpoint_and_resume(qwen_shaped_model_dir: Path, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(qwen_shaped_model_dir), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0, 0]
    got = json.loads((tmp_path / "result.json").read_text())
    # FSDP2 makes each CheckpointWrapper an FSDPCheckpointWrapper; the reference's blocks stay plain
    assert [name.endswith("CheckpointWrapper") for name in got["wrapped"]] == [True] * 4 + [False] * 2, got["wrapped"]
    assert got["masters"] == ["torch.float32"]  # master weights; the compute below is bf16
    assert got["compute"] == {"policy_block": "torch.bfloat16", "value_head": "torch.bfloat16"}
    for metrics in (got["first"], got["expected"]):  # the two steps of the uninterrupted learner
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert got["first"]["loss/nll_pos"] > 0 and got["expected"]["loss/kl"] > 0  # the reference is in the loss
    for before, after in zip(got["before"], got["after"], strict=True):  # policy, value: the first step moved both
        assert before != after
    assert got["got"] == got["expected"]  # the resumed learner's second step is the uninterrupted one's
