"""Learner memory: the peak resident memory of each rank while loading and during one train step, against
its floor and against `vapo plan`'s estimate, measured side by side in one run.

    python3 bench/learner_memory.py [--layers 2] [--chunk 256] [key=value ...]

A random model with Qwen2.5-0.5B's configuration (vocabulary 151,936, hidden 896, intermediate 4864,
14 heads, 2 KV heads, tied embeddings) cut to `--layers` decoder blocks is written (bf16
safetensors, the learner's tokenizer) to a temporary directory. Two CPU ranks (torch.multiprocessing
spawn, gloo) load policy + value model through `learner.main.build_learner` in bf16 mixed precision
(FSDP2, float32 masters), as `run_rank` does; the default config has `algo.kl_coef = 0`, so there is
no reference policy. Each rank then takes two train steps, each on one group of 4 responses of 1,024
tokens (16-token prompts), i.e. one full micro-batch of 4,096 response tokens
(`learner.micro_batch_tokens` = 4 x 1,040), no activation checkpointing unless overridden. The first
step creates AdamW's states (lazily, at its optimiser step); the second is every later step: its
peak has the states in memory during the forward and backward passes.

Measured per rank, from /proc/self/status: the baseline VmRSS after the imports (the torch
runtime), then the high-water mark VmHWM of loading and of each step, each reset before its phase
by writing "5" to /proc/self/clear_refs (after `malloc_trim(0)`, so heap pages freed by the
previous phase do not count). Every figure below is memory above the baseline, and `vapo plan`'s
CPU case has no runtime term, so the comparison is on memory above the baseline.

The floor of a rank: its shards of parameters, gradients and AdamW states of both models (16 bytes
per parameter / 2) plus the activation bound: the plan's terms that scale with the micro-batch's
tokens (activations, attention mask, log-prob chunk). `learner peak memory / floor` (target at
most 1.5) and `plan estimate / measured peak` (target within 25%, i.e. 0.75-1.25) close the output.

The log-prob chunk is 256 tokens here (`learner.logprob_chunk_tokens`, 2048 by default: three
float32 [2048, 151936] buffers are 3.7 GB per rank, more than this machine gives a bench).

Measured on the 2-core, 23 GB CPU machine (torch 2.13.0+cpu, transformers 5.19.0; about 6 minutes with
other jobs running beside it; 5.1 GiB resident per rank at the peak, about 11 GB in all), defaults:

    model: Qwen2.5-0.5B shape, 2 layers, 166.0M parameters (value 166.0M); policy + value, bf16 on 2 CPU ranks
    micro-batch 4160 tokens, log-prob chunk 256
    vapo plan, per rank:
      policy parameters         0.309 GiB  float32 masters, 0.166B / 2
      policy gradients          0.309 GiB  float32, sharded
      policy AdamW states       0.618 GiB  2 x float32, sharded
      value parameters          0.309 GiB  float32 masters, 0.166B / 2
      value gradients           0.309 GiB  float32, sharded
      value AdamW states        0.618 GiB  2 x float32, sharded
      fsdp gathered blocks      0.056 GiB  one computing, one prefetched
      fsdp root unit            0.507 GiB  embeddings/norm/head gathered, and their unsharded gradient
      activations               0.517 GiB  4160 tokens, 2 blocks, no checkpointing
      attention mask            0.020 GiB  rows x T^2 <= 4160 x 1040
      log-prob chunk            0.435 GiB  3 x 256 x 151936 float32 logits
      log-prob head             1.014 GiB  float32 weight copy and gradient accumulator
      total                     5.022 GiB
    floor per rank: 3.445 GiB (states 2.473 + activation bound 0.972)
    rank 0: baseline 0.270 GiB; above it: loading peak 0.983
      step 1: at its start 0.905, peak 3.639 GiB (loss/policy 0.0000, loss/value 0.5000)
      step 2: at its start 2.644, peak 4.831 GiB (loss/policy -0.0000, loss/value 0.5000)
    rank 1: baseline 0.270 GiB; above it: loading peak 0.988
      step 1: at its start 0.905, peak 3.652 GiB (loss/policy 0.0000, loss/value 0.5000)
      step 2: at its start 2.672, peak 4.853 GiB (loss/policy -0.0000, loss/value 0.5000)
    measured peak (any rank, either step): 4.853 GiB above the baseline
    plan estimate / measured peak: 1.035
    learner peak memory / floor: 1.409

The second step's peak is the run's: AdamW's states (1.24 GiB per rank) are resident through its forward
and backward passes. Memory beyond the floor is mostly the vocabulary: the root unit gathered in bf16 with
its unsharded gradient and the log-prob head's float32 weight copy and gradient accumulator (together
1.5 GiB here, from a 151,936 x 896 matrix, next to 2 layers of 15M parameters each).

With `model.gradient_checkpointing=true` (same machine, same day): plan 4.786 GiB, floor 3.209 GiB
(activation bound 0.736), step peaks 3.663 / 4.690 (rank 0) and 3.659 / 4.670 GiB (rank 1), so
`plan estimate / measured peak: 1.021` and `learner peak memory / floor: 1.461`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench/queue.py would shadow the stdlib's queue

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

from tests.component.conftest import QWEN2_5_0_5B  # noqa: E402

PROMPT_TOKENS, RESPONSE_TOKENS, GROUP = 16, 1024, 4
GIB = 2**30


def overrides(model_dir: str, chunk: int, extra: list[str]) -> list[str]:
    return [
        f"model.path={model_dir}",
        "model.dtype=bfloat16",
        "learner.device=cpu",
        "learner.num_ranks=2",
        "rollout.prompts_per_step=2",
        f"rollout.samples_per_prompt={GROUP}",
        f"learner.mini_batch_size={2 * GROUP}",
        f"learner.micro_batch_tokens={GROUP * (PROMPT_TOKENS + RESPONSE_TOKENS)}",
        f"learner.logprob_chunk_tokens={chunk}",
        f"rollout.max_prompt_tokens={PROMPT_TOKENS}",
        f"rollout.max_new_tokens={RESPONSE_TOKENS}",
        "algo.value_pretrain_steps=0",
        "learner.warmup_steps=0",
        *extra,
    ]


def write_model(out: Path, layers: int) -> Path:
    """A random Qwen2.5-0.5B-shaped model of `layers` blocks in bf16 safetensors, with the learner's tokenizer."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from learner.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_5_0_5B, num_hidden_layers=layers, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = Qwen2ForCausalLM(config).bfloat16()
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def groups(seed: int) -> list:
    """Two groups of GROUP responses of RESPONSE_TOKENS tokens: one full micro-batch per rank."""
    from shared.types import Lease, make_group

    rng = np.random.default_rng(seed)
    out = []
    for g in range(2):
        correct = [bool(c) for c in rng.random(GROUP) < 0.5]
        responses: list[tuple[np.ndarray, np.ndarray, np.ndarray | int]] = [
            (rng.integers(3, 40, RESPONSE_TOKENS), -3.0 + 0.1 * rng.standard_normal(RESPONSE_TOKENS), 0)
            for _ in range(GROUP)
        ]
        out.append(
            make_group(
                lease=Lease(g, g, "", "", "math", None, 0),
                actor_id=0,
                prompt_token_ids=rng.integers(3, 40, PROMPT_TOKENS),
                responses=responses,
                finish_reasons=["length"] * GROUP,
                rewards=[1.0 if c else -1.0 for c in correct],
                correct=correct,
            )
        )
    return out


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _rank_main(rank: int, port: int, cfg_overrides: list[str], out_dir: str) -> None:
    from learner import dist as ldist
    from learner.main import build_learner
    from shared.config import load_config

    torch.set_num_threads(1)
    ldist.init("gloo", f"tcp://127.0.0.1:{port}", rank, 2)
    cfg = load_config([], cfg_overrides)
    torch.manual_seed(cfg.seed)
    _reset_peak()
    baseline = _status_kb("VmRSS") * 1024
    learner = build_learner(cfg, torch.device("cpu"))
    loading = _status_kb("VmHWM") * 1024
    result: dict[str, Any] = {"baseline": baseline, "loading": loading - baseline}
    for step in (1, 2):  # the first step creates AdamW's states; the second runs with them, as every later one
        ldist.barrier()
        _reset_peak()
        result[f"before_step{step}"] = _status_kb("VmRSS") * 1024 - baseline
        metrics = learner.train_step(ldist.scatter_groups(groups(step) if rank == 0 else None))
        result[f"step{step}"] = _status_kb("VmHWM") * 1024 - baseline
        result[f"loss{step}"] = [metrics["loss/policy"], metrics["loss/value"]]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    ldist.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256, help="learner.logprob_chunk_tokens")
    parser.add_argument("extra", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from deploy.plan import make_plan, sharded_state_bytes
    from shared.config import load_config

    with tempfile.TemporaryDirectory(prefix="vapo_learner_memory_") as tmpdir:
        model_dir = write_model(Path(tmpdir, "model"), args.layers)
        cfg_overrides = overrides(str(model_dir), args.chunk, args.extra)
        cfg = load_config([], cfg_overrides)
        tmp.spawn(_rank_main, args=(_free_port(), cfg_overrides, tmpdir), nprocs=2, join=True)
        ranks = [json.loads(Path(tmpdir, f"rank{r}.json").read_text()) for r in range(2)]
        plan = make_plan(cfg)

    shape, world = plan.shape, cfg.learner.num_ranks
    states = sum(sharded_state_bytes(n, world, trained=True) for n in (shape.num_params, shape.value_params))
    per_token = {"activations", "attention mask", "log-prob chunk"}
    activation_bound = sum(t.bytes for t in plan.learner if t.name in per_token)
    floor = states + activation_bound
    print(
        f"model: Qwen2.5-0.5B shape, {args.layers} layers, {shape.num_params / 1e6:.1f}M parameters "
        f"(value {shape.value_params / 1e6:.1f}M); policy + value, bf16 on 2 CPU ranks\n"
        f"micro-batch {cfg.learner.micro_batch_tokens} tokens, log-prob chunk {cfg.learner.logprob_chunk_tokens}"
    )
    print("vapo plan, per rank:")
    for t in plan.learner:
        print(f"  {t.name:<24} {t.bytes / GIB:6.3f} GiB  {t.note}")
    print(f"  {'total':<24} {plan.learner_bytes / GIB:6.3f} GiB")
    print(
        f"floor per rank: {floor / GIB:.3f} GiB (states {states / GIB:.3f} + activation bound "
        f"{activation_bound / GIB:.3f})"
    )
    for r, m in enumerate(ranks):
        print(f"rank {r}: baseline {m['baseline'] / GIB:.3f} GiB; above it: loading peak {m['loading'] / GIB:.3f}")
        for step in (1, 2):
            print(
                f"  step {step}: at its start {m[f'before_step{step}'] / GIB:.3f}, peak {m[f'step{step}'] / GIB:.3f} "
                f"GiB (loss/policy {m[f'loss{step}'][0]:.4f}, loss/value {m[f'loss{step}'][1]:.4f})"
            )
    peak = max(m[f"step{step}"] for m in ranks for step in (1, 2))
    print(f"measured peak (any rank, either step): {peak / GIB:.3f} GiB above the baseline")
    print(f"plan estimate / measured peak: {plan.learner_bytes / peak:.3f}")
    print(f"learner peak memory / floor: {peak / floor:.3f}")


if __name__ == "__main__":
    main()
