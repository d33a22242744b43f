"""Learner throughput: token-budget micro-batching vs fixed-count padded micro-batches, same run.

A long-tailed mix of response lengths (most short, some 10x longer), as long chain-of-thought
produces. Both arms run the same VAPO train step on the same random-init Qwen2-style model
(float32, CPU) over the same rollouts; only the micro-batching differs. Prints each arm's
padding fraction and train tokens/s, then, last, the ratio. `--budgets` adds token-budget arms
(tokens/s for each budget, on the same rollouts): on CPU, smaller micro-batches than padding
alone explains are faster (see configs/tiny_cpu.yaml).

    python3 bench/learner.py [--steps 2] [--responses 128] [--budgets 8192,2048,1024]

`--real-shape` times instead one real-shape row: a random model of Qwen2.5-0.5B's configuration
(vocabulary 151,936, hidden 896, intermediate 4864, 14 heads, 2 KV heads, tied embeddings, rope
theta 1e6) cut to 2 layers, trained in bf16 mixed precision and in float32 on the same rollouts
(token budget 4096). Mixed precision is FSDP2's, so this process joins a world-size-1 gloo group
and both arms' models are sharded (float32: no MixedPrecisionPolicy, as `vapo train` runs
model.dtype=float32). The row trains the policy alone (algo.estimator=grpo): a value model would
add a second 166M-parameter backbone with its gradients and Adam moments (policy + value peaked
at 8 GB, more than this shared 23 GB machine leaves one process) but not the 152k-vocabulary
head, where most of the compute is. Prints each arm's train tokens/s, then, last, their ratio.

Measured on this 2-core machine (AMD EPYC, AVX512-BF16, torch 2.13 CPU; 16 responses, about 1,200
tokens a step, padding fraction 0.70 from one long response; 14 minutes; peak RSS 5.7 GB; other
jobs ran alongside, load average 4 to 7, so the absolute rates are low, the ratio is of one run):

    real shape, bf16 mixed precision: padding fraction 0.702, train tokens/s 10
    real shape, float32: padding fraction 0.702, train tokens/s 6
    bf16 / float32 train tokens/s: 1.50

    python3 bench/learner.py --real-shape [--steps 2] [--responses 16]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where bench/queue.py would shadow the
# standard library; the repository root goes there instead, so `learner` imports too.
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import gc  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from learner import dist as ldist  # noqa: E402
from learner.model import ValueModel, compute_dtype, shard  # noqa: E402
from learner.train_step import Learner  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.types import Lease, RolloutGroup, make_group  # noqa: E402

VOCAB = 512
from tests.component.conftest import QWEN2_5_0_5B  # noqa: E402

REAL_VOCAB = QWEN2_5_0_5B["vocab_size"]
QWEN2_5_0_5B_2_LAYERS: dict[str, Any] = {**QWEN2_5_0_5B, "num_hidden_layers": 2}
"""Qwen2.5-0.5B's configuration with 2 of its 24 decoder blocks (the `--real-shape` row)."""


def long_tailed_groups(num: int, seed: int, vocab: int = VOCAB) -> list[RolloutGroup]:
    """90% of responses 16-48 tokens, 10% 10x longer (160-480); groups of 8, prompts of 16 tokens; ids below `vocab`."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(num // 8):
        responses: list[tuple[np.ndarray, np.ndarray, np.ndarray | int]] = []
        correct = []
        for _ in range(8):
            n = int(rng.integers(16, 49)) if rng.random() < 0.9 else int(rng.integers(160, 481))
            correct.append(bool(rng.random() < 0.4))
            responses.append((rng.integers(3, vocab, n), -4.0 + 0.1 * rng.standard_normal(n), 0))
        groups.append(
            make_group(
                lease=Lease(g, g, "", "", "math", None, 0),
                actor_id=0,
                prompt_token_ids=rng.integers(3, vocab, 16),
                responses=responses,
                finish_reasons=["stop"] * 8,
                rewards=[1.0 if c else -1.0 for c in correct],
                correct=correct,
            )
        )
    return groups


def make_learner(overrides: list[str], *, real_shape: bool = False) -> Learner:
    """Policy + value of the small Qwen2-style model, unsharded; `real_shape`: the policy alone (GRPO), of
    Qwen2.5-0.5B's shape, sharded with FSDP2 in `model.dtype` (needs the process group of `real_shape_group`)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if real_shape:
        config = Qwen2Config(**QWEN2_5_0_5B_2_LAYERS)
    else:
        config = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config)
    torch.manual_seed(1)
    value = None if real_shape else ValueModel(Qwen2ForCausalLM(config).model, config.hidden_size)
    cfg = load_config(
        [],
        [
            "learner.device=cpu",
            "algo.value_pretrain_steps=0",
            "rollout.prompts_per_step=16",
            "rollout.samples_per_prompt=8",
            "learner.mini_batch_size=64",
            *overrides,
        ],
    )
    if real_shape:
        shard(policy, dtype=compute_dtype(cfg.model.dtype))
    return Learner(cfg, policy, value, None, pad_id=0, device=torch.device("cpu"))


def real_shape_group() -> None:
    """A world-size-1 gloo group for this process: FSDP2 (and with it bf16 mixed precision) needs one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ldist.init("gloo", f"tcp://127.0.0.1:{port}", 0, 1)


def run_arm(name: str, overrides: list[str], batches: list[list[RolloutGroup]], *, real_shape: bool = False) -> float:
    learner = make_learner(overrides, real_shape=real_shape)
    learner.train_step(batches[0])  # warm-up
    tokens = seconds = 0.0
    pad = []
    for batch in batches[1:]:
        t0 = time.perf_counter()
        m = learner.train_step(batch)
        seconds += time.perf_counter() - t0
        tokens += sum(len(g.prompt_token_ids) * g.num_responses + g.num_tokens for g in batch)
        pad.append(m["train/padding_frac"])
    rate = tokens / seconds
    print(f"{name}: padding fraction {np.mean(pad):.3f}, train tokens/s {rate:,.0f}", flush=True)
    del learner  # the real-shape arms run one after the other: the first one's memory goes before the second
    gc.collect()
    return rate


def real_shape_row(args: argparse.Namespace) -> None:
    """bf16 mixed precision against float32 on the same rollouts of 152k-vocabulary token ids."""
    batches = [long_tailed_groups(args.responses, seed, vocab=REAL_VOCAB) for seed in range(args.steps + 1)]
    real_shape_group()
    try:
        common = [
            "algo.estimator=grpo",
            "learner.micro_batch_tokens=4096",
            "learner.logprob_chunk_tokens=256",  # [256, 151936] float32 logits: 0.16 GB a copy (2048: 1.2 GB)
            f"rollout.prompts_per_step={args.responses // 8}",
            f"learner.mini_batch_size={args.responses}",
        ]
        bf16 = run_arm("real shape, bf16 mixed precision", [*common, "model.dtype=bfloat16"], batches, real_shape=True)
        fp32 = run_arm("real shape, float32", [*common, "model.dtype=float32"], batches, real_shape=True)
    finally:
        ldist.destroy()
    print(f"bf16 / float32 train tokens/s: {bf16 / fp32:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--responses", type=int, default=None, help="per step, a multiple of 8 (default 64; 16 with --real-shape)"
    )
    parser.add_argument("--budgets", default="", help="comma-separated micro_batch_tokens to time as well")
    parser.add_argument("--real-shape", action="store_true", help="only the real-shape row: bf16 against float32")
    args = parser.parse_args()
    if args.real_shape:
        args.responses = args.responses or 16
        real_shape_row(args)
        return
    args.responses = args.responses or 64
    batches = [long_tailed_groups(args.responses, seed) for seed in range(args.steps + 1)]
    for b in (int(x) for x in args.budgets.split(",") if x):
        run_arm(f"token-budget ({b} tokens)", [f"learner.micro_batch_tokens={b}"], batches)
    budget = run_arm("token-budget (4096 tokens)", ["learner.micro_batch_tokens=4096"], batches)
    padded = run_arm("fixed-count padded (8 rows)", ["learner.micro_batch_rows=8"], batches)
    print(f"token-budget/padded train throughput ratio: {budget / padded:.2f}")


if __name__ == "__main__":
    main()
