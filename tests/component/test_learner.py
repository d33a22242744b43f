"""The learner's VAPO step on a real (random-init) Qwen2: closed forms, value pretraining, FSDP on gloo.

Two FSDP ranks must give the same losses and gradients as one rank on the same batch: that is
what the global token normalisation (one all-reduce of the counts per mini-batch) guarantees.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import socket
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.batch import RolloutBatch
from learner.model import load_policy, load_value_model
from learner.train_step import Learner
from shared.config import VapoConfig, load_config
from shared.types import Lease, RolloutGroup, make_group

BASE = [
    "learner.device=cpu",
    "model.dtype=float32",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "learner.mini_batch_size=16",
    "learner.micro_batch_tokens=96",
    "algo.value_pretrain_steps=0",
    "learner.actor_lr=1e-3",
    "learner.critic_lr=1e-3",
    "learner.warmup_steps=0",
]


def _cfg(*overrides: str) -> VapoConfig:
    return load_config([], BASE + list(overrides))


def _groups(seed: int = 0, num_groups: int = 4, group_size: int = 4, vocab: int = 50,
            correct: bool | None = None) -> list[RolloutGroup]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(num_groups):
        prompt = rng.integers(3, vocab, int(rng.integers(3, 9)))
        responses, flags = [], []
        for _ in range(group_size):
            n = int(rng.integers(1, 24))
            flags.append(bool(rng.random() < 0.5) if correct is None else correct)
            responses.append((rng.integers(3, vocab, n), -3.5 + 0.3 * rng.standard_normal(n), 0))
        out.append(make_group(lease=Lease(g, g, "", "", "math", None, 0), actor_id=0, prompt_token_ids=prompt,
                              responses=responses, finish_reasons=["stop"] * group_size,
                              rewards=[1.0 if f else -1.0 for f in flags], correct=flags))
    return out


def _batch(groups: list[RolloutGroup]) -> RolloutBatch:
    return RolloutBatch.from_groups(groups, pad_id=0)


def _learner(model_dir: Path, cfg: VapoConfig, shard: bool = False) -> Learner:
    policy = load_policy(model_dir)
    value = load_value_model(model_dir) if cfg.algo.uses_critic else None
    if shard:
        from learner.model import shard as fsdp_shard

        checkpointing = cfg.model.gradient_checkpointing
        fsdp_shard(policy, activation_checkpointing=checkpointing)
        if value is not None:
            fsdp_shard(value, activation_checkpointing=checkpointing)
    return Learner(cfg, policy, value, None, pad_id=0, device=torch.device("cpu"))


def _sums() -> dict[str, torch.Tensor]:
    return defaultdict(lambda: torch.zeros((), dtype=torch.float64))


def test_returns_are_monte_carlo_with_lambda_one(random_model_dir: Path) -> None:
    learner = _learner(random_model_dir, _cfg("algo.lambda_critic=1.0"))
    batch = _batch(_groups())
    learner.prepare(batch, value_only=False)
    mask = batch.response_mask.bool()
    # gamma = 1, one reward on the last token: every token's Monte-Carlo return is the score
    expected = batch.scores[:, None].expand_as(mask)[mask].float()
    torch.testing.assert_close(batch.results["returns"][mask], expected, rtol=0, atol=1e-6)
    for key in ("advantages", "returns", "old_logprobs", "values", "is_weights"):
        assert torch.all(batch.results[key][~mask] == 0), key


def test_is_weights_are_exactly_one_when_behavior_equals_old(random_model_dir: Path) -> None:
    learner = _learner(random_model_dir, _cfg())
    batch = _batch(_groups())
    learner.prepare(batch, value_only=False)
    batch.behavior_logprobs = batch.results["old_logprobs"].clone()
    learner.prepare(batch, value_only=False)
    mask = batch.response_mask.bool()
    assert torch.equal(batch.results["is_weights"][mask], torch.ones(int(mask.sum())))


def test_positive_nll_is_zero_when_nothing_is_correct(random_model_dir: Path) -> None:
    learner = _learner(random_model_dir, _cfg())
    batch = _batch(_groups(correct=False))
    sums = _sums()
    learner.prepare(batch, False, sums)
    learner.accumulate_gradients(batch, list(range(batch.num_responses)), False, sums)
    assert sums["loss/nll_pos"].item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in learner.policy.parameters() if p.grad is not None)


def test_value_pretraining_trains_only_the_critic(random_model_dir: Path) -> None:
    learner = _learner(random_model_dir, _cfg("algo.value_pretrain_steps=3"))
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    groups = _groups()
    value_losses = [learner.train_step(groups)["loss/value"] for _ in range(3)]
    assert value_losses[-1] < value_losses[0]
    for k, v in learner.policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    metrics = learner.train_step(groups)  # step 3: the policy starts training
    assert metrics["train/value_only"] == 0.0
    assert any(not torch.equal(v, before[k]) for k, v in learner.policy.state_dict().items())


def test_a_vapo_step_reports_every_metric(random_model_dir: Path) -> None:
    learner = _learner(random_model_dir, _cfg())
    m = learner.train_step(_groups())
    for key in (
        "loss/policy",
        "loss/value",
        "loss/nll_pos",
        "policy/clipfrac_high",
        "policy/clipfrac_low",
        "policy/approx_kl",
        "policy/entropy",
        "value/explained_var",
        "lambda_policy/mean",
        "is/weight_mean",
        "is/weight_max",
        "is/clipped_frac",
        "train/padding_frac",
        "rollout/acc",
        "perf/train_tokens_per_s",
        "grad_norm/policy",
        "grad_norm/value",
    ):
        assert key in m and np.isfinite(m[key]), key
    assert 0.0 <= m["train/padding_frac"] < 1.0


@pytest.mark.parametrize("estimator", ["grpo"])
def test_grpo_baseline_has_no_critic(random_model_dir: Path, estimator: str) -> None:
    learner = _learner(random_model_dir, _cfg(f"algo.estimator={estimator}", "algo.loss_agg=sequence"))
    assert learner.value_model is None
    m = learner.train_step(_groups())
    assert "loss/value" not in m and np.isfinite(m["loss/policy"])


# ---- FSDP: two ranks equal one rank ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model_dir: str, out: str, overrides: tuple[str, ...]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    learner = _learner(Path(model_dir), _cfg(*overrides), shard=True)
    mine = _batch(_groups()[rank::world])  # whole groups per rank
    sums = _sums()
    learner.prepare(mine, False, sums)
    learner.accumulate_gradients(mine, list(range(mine.num_responses)), False, sums)
    grads = {}
    for prefix, model in (("policy.", learner.policy), ("value.", learner.value_model)):
        for name, p in model.named_parameters():
            grads[prefix + name.replace("_checkpoint_wrapped_module.", "")] = p.grad.full_tensor().clone()
    keys = ["loss/policy", "loss/value", "loss/nll_pos"]
    totals = torch.stack([sums[k] for k in keys])
    dist.all_reduce(totals)
    if rank == 0:
        torch.save({"grads": grads, "losses": dict(zip(keys, totals.tolist(), strict=True))}, out)
    dist.destroy_process_group()


def _run(world: int, model_dir: Path, out: Path, *overrides: str) -> dict:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, str(model_dir), str(out), overrides)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    return torch.load(out)


def test_two_fsdp_ranks_equal_one(random_model_dir: Path, tmp_path: Path) -> None:
    one = _run(1, random_model_dir, tmp_path / "one.pt")
    # two ranks, with activation checkpointing too: neither may change losses or gradients
    two = _run(2, random_model_dir, tmp_path / "two.pt", "model.gradient_checkpointing=true")
    for key, value in one["losses"].items():
        assert abs(value - two["losses"][key]) < 1e-5, key
    assert one["losses"]["loss/nll_pos"] > 0
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_cosine_schedule_decays_each_model_over_its_own_training_steps(random_model_dir: Path) -> None:
    """Policy: from actor_lr at the first policy step (after value pretraining) towards the floor at
    total_steps; critic: over all steps. Every update of a rollout step uses that step's rate."""
    cfg = _cfg("learner.lr_schedule=cosine", "learner.min_lr_ratio=0.1", "learner.total_steps=5",
               "algo.value_pretrain_steps=1", "learner.mini_batch_size=8")
    learner = _learner(random_model_dir, cfg)
    used: dict[str, list[float]] = {"policy": [], "value": []}
    for name, opt in (("policy", learner.policy_opt), ("value", learner.value_opt)):
        opt.register_step_pre_hook(lambda o, args, kwargs, name=name: used[name].append(o.param_groups[0]["lr"]))
    for step in range(cfg.learner.total_steps):
        learner.train_step(_groups(seed=step))
    floor = 0.1 * 1e-3

    def cosine(progress: float) -> float:
        return floor + (1e-3 - floor) * 0.5 * (1 + np.cos(np.pi * progress))

    # 16 responses in mini-batches of 8: two updates per step, at the same rate
    np.testing.assert_allclose(used["policy"], [cosine(k / 4) for k in range(4) for _ in range(2)], rtol=1e-9)
    np.testing.assert_allclose(used["value"], [cosine(k / 5) for k in range(5) for _ in range(2)], rtol=1e-9)


def _versioned(groups: list[RolloutGroup], versions: list) -> list[RolloutGroup]:
    """`groups` with each response's token versions replaced (an int, or a per-token function of the length)."""
    out = []
    for group, ver in zip(groups, versions, strict=True):
        responses = []
        for i in range(group.num_responses):
            tokens, lps, _ = group.response(i)
            responses.append((tokens, lps, ver if isinstance(ver, int) else ver(len(tokens))))
        out.append(make_group(lease=Lease(group.lease_id, group.prompt_id, "", "", "math", None, 0), actor_id=0,
                              prompt_token_ids=group.prompt_token_ids, responses=responses,
                              finish_reasons=["stop"] * group.num_responses, rewards=group.rewards,
                              correct=group.correct))
    return out


def test_the_lag0_sync_metric_counts_only_tokens_of_responses_generated_at_the_trained_version(
    random_model_dir: Path,
) -> None:
    from learner.main import _check_sync, sync_alert_threshold

    cfg = _cfg("algo.value_pretrain_steps=0")
    pushed_mid = lambda n: np.array([2] * (n // 2) + [3] * (n - n // 2))  # a push landed mid-response
    groups = _versioned(_groups(seed=4), [3, 2, pushed_mid, 3])  # trained at version 3: groups 0 and 3
    batch = _batch(groups)
    _learner(random_model_dir, cfg).prepare(batch, value_only=False)
    diff = (batch.results["old_logprobs"].double() - batch.behavior_logprobs.double()).abs() * batch.response_mask
    # every token at version 3: groups 0 and 3, and group 2's one-token responses (no token before the push)
    lag0 = torch.tensor([bool(np.all(g.response(i)[2] == 3)) for g in groups for i in range(g.num_responses)])
    assert 0 < int(lag0.sum()) < len(lag0)
    expected = diff[lag0].sum() / batch.response_mask[lag0].sum()

    metrics = _learner(random_model_dir, cfg).train_step(groups, version=3)
    assert math.isclose(metrics["sync/logprob_abs_diff_lag0"], float(expected), rel_tol=1e-9)
    assert math.isclose(metrics["sync/lag0_token_frac"],
                        float(batch.response_mask[lag0].sum() / batch.response_mask.sum()), rel_tol=1e-12)
    assert "sync/logprob_abs_diff_lag0" not in _learner(random_model_dir, cfg).train_step(groups)  # no version

    assert sync_alert_threshold(_cfg("model.dtype=bfloat16")) == 1e-2 and sync_alert_threshold(cfg) == 1e-4
    assert sync_alert_threshold(_cfg("sync.alert_logprob_diff=0.5")) == 0.5
    _check_sync(cfg, metrics, 1)  # the behavior log-probs are random: far from the learner's
    assert metrics["sync/alert"] == 1.0
    _check_sync(_cfg("sync.alert_logprob_diff=1000"), metrics, 1)
    assert metrics["sync/alert"] == 0.0
    from deploy.cluster import progress_line

    assert "SYNC ALERT" in progress_line({**metrics, "sync/alert": 1.0})
    assert "SYNC ALERT" not in progress_line({**metrics, "sync/alert": 0.0})
