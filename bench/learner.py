"""Learner throughput: token-budget micro-batching vs fixed-count padded micro-batches, same run.

A long-tailed mix of response lengths (most short, some 10x longer), as long chain-of-thought
produces. Both arms run the same VAPO train step on the same random-init Qwen2-style model
(float32, CPU) over the same rollouts; only the micro-batching differs. Prints each arm's
padding fraction and train tokens/s, then, last, the ratio. `--budgets` adds token-budget arms
(tokens/s for each budget, on the same rollouts): on CPU, smaller micro-batches than padding
alone explains are faster (see configs/tiny_cpu.yaml).

    python3 bench/learner.py [--steps 2] [--responses 128] [--budgets 8192,2048,1024]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where bench/queue.py would shadow the
# standard library; the repository root goes there instead, so `learner` imports too.
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from learner.model import ValueModel  # noqa: E402
from learner.train_step import Learner  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.types import Lease, RolloutGroup, make_group  # noqa: E402

VOCAB = 512


def long_tailed_groups(num: int, seed: int) -> list[RolloutGroup]:
    """90% of responses 16-48 tokens, 10% 10x longer (160-480); groups of 8, prompts of 16 tokens."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(num // 8):
        responses, correct = [], []
        for _ in range(8):
            n = int(rng.integers(16, 49)) if rng.random() < 0.9 else int(rng.integers(160, 481))
            correct.append(bool(rng.random() < 0.4))
            responses.append((rng.integers(3, VOCAB, n), -4.0 + 0.1 * rng.standard_normal(n), 0))
        groups.append(make_group(lease=Lease(g, g, "", "", "math", None, 0), actor_id=0,
                                 prompt_token_ids=rng.integers(3, VOCAB, 16), responses=responses,
                                 finish_reasons=["stop"] * 8, rewards=[1.0 if c else -1.0 for c in correct],
                                 correct=correct))
    return groups


def make_learner(overrides: list[str]) -> Learner:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config)
    torch.manual_seed(1)
    value = ValueModel(Qwen2ForCausalLM(config).model, config.hidden_size)
    cfg = load_config([], ["learner.device=cpu", "algo.value_pretrain_steps=0", "rollout.prompts_per_step=16",
                           "rollout.samples_per_prompt=8", "learner.mini_batch_size=64", *overrides])
    return Learner(cfg, policy, value, None, pad_id=0, device=torch.device("cpu"))


def run_arm(name: str, overrides: list[str], batches: list[list[RolloutGroup]]) -> float:
    learner = make_learner(overrides)
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
    print(f"{name}: padding fraction {np.mean(pad):.3f}, train tokens/s {rate:,.0f}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--responses", type=int, default=64)
    parser.add_argument("--budgets", default="", help="comma-separated micro_batch_tokens to time as well")
    args = parser.parse_args()
    batches = [long_tailed_groups(args.responses, seed) for seed in range(args.steps + 1)]
    for b in (int(x) for x in args.budgets.split(",") if x):
        run_arm(f"token-budget ({b} tokens)", [f"learner.micro_batch_tokens={b}"], batches)
    budget = run_arm("token-budget (4096 tokens)", ["learner.micro_batch_tokens=4096"], batches)
    padded = run_arm("fixed-count padded (8 rows)", ["learner.micro_batch_rows=8"], batches)
    print(f"token-budget/padded train throughput ratio: {budget / padded:.2f}")


if __name__ == "__main__":
    main()
