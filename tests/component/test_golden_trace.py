"""Golden trace of the learner step: fixed rollout groups in, the first steps' losses, metrics and a
parameter checksum out, compared with the trace recorded in `golden_trace.json`.

A refactor that does not mean to change the computation must reproduce the trace; one that does
re-records it on purpose (`VAPO_RECORD_GOLDEN=1 pytest tests/component/test_golden_trace.py`) and
says why in its commit. The comparison is tight (relative 1e-6): float reordering inside one
kernel stays below it, any change to what is computed does not.

Three configurations cover the paper's recipe (critic, value pretraining, decoupled and
length-adaptive GAE, KL to a reference, positive NLL, truncated IS), the critic-free baseline
with the options that production implements itself (whitening, sequence-level loss, dual clip,
entropy bonus, fixed-row micro-batches, two epochs) and value clipping with a cosine schedule;
the first also runs on two FSDP ranks over gloo, through the rank-0 scatter of whole groups.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).with_name("golden_trace.json")
RTOL, ATOL = 1e-6, 1e-9
NUM_STEPS = 3

COMMON = [
    "learner.device=cpu",
    "model.dtype=float32",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "learner.mini_batch_size=8",
    "learner.micro_batch_tokens=96",
    "learner.actor_lr=1e-3",
    "learner.critic_lr=1e-3",
    "learner.warmup_steps=1",
    "learner.total_steps=10",
    "seed=7",
]
CONFIGS = {
    "vapo": ["algo.value_pretrain_steps=1", "algo.kl_coef=0.01", "algo.nll_coef=0.3"],
    "grpo_options": [
        "algo.estimator=grpo",
        "algo.whiten_advantages=true",
        "algo.loss_agg=sequence",
        "algo.dual_clip=3.0",
        "algo.entropy_coef=0.01",
        "learner.micro_batch_rows=3",
        "learner.ppo_epochs=2",
    ],
    "value_clip": [
        "algo.value_pretrain_steps=0",
        "algo.value_clip=0.2",
        "algo.decoupled_gae=false",
        "algo.length_adaptive=false",
        "algo.is_cap=1.5",
        "learner.lr_schedule=cosine",
        "learner.min_lr_ratio=0.1",
    ],
}


def _groups(step: int, vocab: int = 50) -> list:
    """Four prompt groups of four responses, different at every step, with stale behavior log-probs."""
    from shared.types import Lease, make_group

    rng = np.random.default_rng(1000 + step)
    groups = []
    for g in range(4):
        prompt = rng.integers(3, vocab, int(rng.integers(3, 9)))
        responses, rewards, correct = [], [], []
        for _ in range(4):
            n = int(rng.integers(1, 24))
            responses.append((rng.integers(3, vocab, n), (-3.5 + 0.3 * rng.standard_normal(n)), step))
            ok = bool(rng.random() < 0.5)
            rewards.append(1.0 if ok else -1.0)
            correct.append(ok)
        lease = Lease(g, g, "", "", "arithmetic", None, step)
        groups.append(make_group(lease=lease, actor_id=0, prompt_token_ids=prompt, responses=responses,
                                 finish_reasons=["stop"] * 4, rewards=rewards, correct=correct))
    return groups


def _checksum(model: torch.nn.Module) -> list[float]:
    """(sum, sum of squares, sum of |x| weighted by position) over every parameter, float64, full tensors."""
    total = sq = weighted = 0.0
    for _, p in sorted(model.named_parameters()):
        t = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().reshape(-1)
        total += float(t.sum())
        sq += float((t * t).sum())
        weighted += float((t.abs() * torch.linspace(0.5, 1.5, t.numel(), dtype=torch.float64)).sum())
    return [total, sq, weighted]


def _trace(model_dir: Path, name: str) -> list[dict[str, float]]:
    """Steps of configuration `name` on this process's (possibly sharded) learner; rank 0's share is
    scattered by the production code when a process group exists."""
    import torch.distributed as dist

    from learner.dist import scatter_groups
    from learner.main import build_learner
    from shared.config import load_config

    cfg = load_config([], COMMON + CONFIGS[name])
    torch.manual_seed(cfg.seed)
    learner = build_learner(load_config([], [*COMMON, *CONFIGS[name], f"model.path={model_dir}"]), torch.device("cpu"))
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out = []
    for step in range(NUM_STEPS):
        mine = scatter_groups(_groups(step) if rank0 else None)
        metrics = learner.train_step(mine)
        row = {k: float(v) for k, v in sorted(metrics.items()) if not k.startswith("perf/")}
        row.pop("train/padding_frac", None)  # depends on the micro-batching of each rank, not the math
        row["policy_checksum"] = _checksum(learner.policy)
        if learner.value_model is not None:
            row["value_checksum"] = _checksum(learner.value_model)
        out.append(row)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, model_dir: str, name: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        trace = _trace(Path(model_dir), name)
        if rank == 0:
            Path(out).write_text(json.dumps(trace))
    finally:
        dist.destroy_process_group()


def _two_rank_trace(model_dir: Path, name: str, tmp_path: Path) -> list[dict[str, float]]:
    ctx = mp.get_context("spawn")
    port, out = _free_port(), tmp_path / f"{name}_2ranks.json"
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(model_dir), name, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return json.loads(out.read_text())


def _flat(value) -> list[float]:
    return list(value) if isinstance(value, list) else [value]


def _compare(name: str, got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want), f"{name}: {len(got)} steps, golden has {len(want)}"
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert sorted(g) == sorted(w), f"{name} step {step}: keys differ: {sorted(set(g) ^ set(w))}"
        for key in w:
            for a, b in zip(_flat(g[key]), _flat(w[key]), strict=True):
                ok = math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) or (math.isnan(a) and math.isnan(b))
                assert ok, f"{name} step {step} {key}: {a!r} != golden {b!r}"


@pytest.fixture(scope="module")
def golden() -> dict:
    if os.environ.get("VAPO_RECORD_GOLDEN") or not GOLDEN.exists():
        return {}
    return json.loads(GOLDEN.read_text())


def _check(golden: dict, key: str, trace: list[dict]) -> None:
    if os.environ.get("VAPO_RECORD_GOLDEN"):
        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        data[key] = trace
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    assert key in golden, f"no golden trace for {key}: record it with VAPO_RECORD_GOLDEN=1"
    _compare(key, trace, golden[key])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_rank_reproduces_the_golden_trace(random_model_dir: Path, golden: dict, name: str) -> None:
    _check(golden, name, _trace(random_model_dir, name))


def test_two_fsdp_ranks_reproduce_the_golden_trace(random_model_dir: Path, golden: dict, tmp_path: Path) -> None:
    _check(golden, "vapo_2ranks", _two_rank_trace(random_model_dir, "vapo", tmp_path))
