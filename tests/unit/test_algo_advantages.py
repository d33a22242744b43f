"""Group-normalised advantages, masked whitening, DAPO group filter, reward shaping, KL, IS weights, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from learner.algo.advantages import group_advantages, whiten
from learner.algo.filters import keep_group, keep_groups
from learner.algo.kl import kl_penalty
from learner.algo.metrics import explained_variance, masked_mean, masked_sum, masked_var
from learner.algo.rewards import overlong_penalty, token_level_rewards
from learner.algo.staleness import truncated_is_weights

F64 = torch.float64


def assert_near(actual, expected, atol):
    """Same shape and max |actual - expected| <= atol (torch.testing.assert_close costs ~1 s on first import)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel():
        err = float((actual.detach().double() - expected.detach().double()).abs().max())
        assert err <= atol, f"max abs error {err} > {atol}"


# ---- group advantages ------------------------------------------------------------------------------------


def group_advantages_loop(scores, group_ids, normalize_std=True, eps=1e-6):
    out = torch.zeros_like(scores)
    for gid in set(group_ids.tolist()):
        idx = (group_ids == gid).nonzero().squeeze(1)
        if idx.numel() < 2:
            continue
        group = scores[idx]
        centered = group - group.mean()
        out[idx] = centered / (group.std() + eps) if normalize_std else centered
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_match_loop(seed, normalize_std):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(60, generator=g, dtype=F64)
    group_ids = torch.randint(-5, 20, (60,), generator=g) * 7  # sparse, negative, unsorted ids
    adv = group_advantages(scores, group_ids, normalize_std=normalize_std)
    assert_near(adv, group_advantages_loop(scores, group_ids, normalize_std), 1e-12)


def test_group_advantages_edge_cases():
    scores = torch.tensor([1.0, 1.0, 1.0, 5.0, -1.0, 1.0], dtype=F64)
    group_ids = torch.tensor([0, 0, 0, 1, 2, 2])
    adv = group_advantages(scores, group_ids)
    assert torch.all(adv[:3] == 0)  # all equal: 0, not NaN
    assert float(adv[3]) == 0.0  # a group of one
    std = math.sqrt(2.0)  # unbiased std of (-1, 1)
    assert_near(adv[4:], torch.tensor([-1.0, 1.0], dtype=F64) / (std + 1e-6), 1e-12)
    assert group_advantages(torch.zeros(0, dtype=F64), torch.zeros(0, dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError):
        group_advantages(scores, group_ids[:3])
    with pytest.raises(ValueError, match="floating"):
        group_advantages(torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_whiten_masked():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(4, 10, generator=g, dtype=F64) * 3 + 2
    mask = torch.arange(10)[None, :] < torch.tensor([10, 5, 0, 7])[:, None]
    out = whiten(values, mask)
    valid = out[mask]
    assert abs(float(valid.mean())) < 1e-12
    assert abs(float(valid.var()) - 1.0) < 1e-6
    assert torch.all(out[~mask] == 0)
    scaled = whiten(values, mask, shift_mean=False)
    assert_near(scaled[mask].mean(), values[mask].mean(), 1e-12)
    one_token = torch.zeros(4, 10, dtype=torch.bool)
    one_token[1, 2] = True
    assert torch.all(whiten(values, one_token) == 0)  # variance taken as 0: a single token becomes 0
    assert torch.all(whiten(values, torch.zeros_like(one_token)) == 0)


# ---- DAPO group filter -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, keep",
    [([True, False, True], True), ([True, True], False), ([False, False, False], False), ([True], False), ([], False)],
)
def test_keep_group(flags, keep):
    assert keep_group(flags) is keep
    assert keep_group(torch.tensor(flags, dtype=torch.bool)) is keep
    assert keep_group(torch.tensor(flags, dtype=torch.float32)) is keep


def test_keep_groups_matches_keep_group():
    g = torch.Generator().manual_seed(5)
    correct = torch.rand(80, generator=g) < 0.3
    group_ids = torch.randint(0, 25, (80,), generator=g) * 3
    keep = keep_groups(correct, group_ids)
    expected = [keep_group(correct[group_ids == gid]) for gid in torch.unique(group_ids).tolist()]
    assert keep.tolist() == expected
    with pytest.raises(ValueError):
        keep_groups(correct, group_ids[:5])
    with pytest.raises(ValueError):
        keep_group(torch.ones(2, 2))


# ---- rewards -----------------------------------------------------------------------------------------------


def test_overlong_penalty_piecewise():
    lengths = torch.tensor([0, 100, 192, 193, 224, 256, 257, 1000])
    penalty = overlong_penalty(lengths, max_len=256, cache_len=64)
    expected = [0.0, 0.0, 0.0, -1 / 64, -0.5, -1.0, -1.0, -1.0]
    assert_near(penalty, torch.tensor(expected), 1e-7)
    hard = overlong_penalty(lengths, max_len=256, cache_len=0)
    assert hard.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0]
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_len=256, cache_len=300)


def test_token_level_rewards_on_last_valid_token():
    scores = torch.tensor([1.0, -1.0, 0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    rewards = token_level_rewards(scores, mask)
    expected = torch.tensor([[0, 0, 1.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2.0]])
    assert torch.equal(rewards, expected)  # the empty response carries no reward
    assert token_level_rewards(scores, torch.zeros(4, 0)).shape == (4, 0)
    with pytest.raises(ValueError):
        token_level_rewards(scores[:3], mask)


# ---- KL estimators -----------------------------------------------------------------------------------------


def test_kl_estimators_values():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=F64)
    x = logprobs - ref
    assert_near(kl_penalty(logprobs, ref, "k1"), x, 0)
    assert_near(kl_penalty(logprobs, ref, "k2"), 0.5 * x**2, 0)
    k3 = kl_penalty(logprobs, ref, "k3")
    assert_near(k3, torch.tensor([[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1, 0.0]], dtype=F64), 1e-15)
    assert torch.all(k3 >= 0) and float(k3[0, 2]) == 0.0
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logprobs, ref, "k4")  # type: ignore[arg-type]


def test_kl_clamp_bounds_the_estimate_and_its_gradient():
    # a rare token the policy pushed 10 nats below the reference: k3 = exp(10) - 11 unclamped
    logprobs = torch.tensor([[-15.0, -1.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-5.0, -1.2]], dtype=F64)
    assert math.isclose(float(kl_penalty(logprobs, ref, "k3")[0, 0]), math.exp(10) - 11, rel_tol=1e-12)
    clamped = kl_penalty(logprobs, ref, "k3", clamp=10.0)
    assert float(clamped[0, 0]) == 10.0
    assert math.isclose(float(clamped[0, 1]), math.exp(-0.2) + 0.2 - 1, rel_tol=1e-12)  # untouched below the bound
    clamped.sum().backward()
    assert logprobs.grad is not None and float(logprobs.grad[0, 0]) == 0.0 and float(logprobs.grad[0, 1]) != 0.0
    assert float(kl_penalty(logprobs.detach(), ref, "k1", clamp=3.0)[0, 0]) == -3.0  # both sides
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty(logprobs, ref, "k3", clamp=0.0)


def test_k3_is_unbiased_for_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=F64)
    k3 = kl_penalty(p.log()[None], q.log()[None], "k3")[0]
    assert math.isclose(float((p * k3).sum()), float((p * (p / q).log()).sum()), rel_tol=1e-12)


# ---- truncated IS weights ----------------------------------------------------------------------------------


def test_is_weights_identity_when_behavior_equals_old():
    old = -torch.rand(4, 7, dtype=F64) * 5
    mask = torch.rand(4, 7) < 0.7
    weights, metrics = truncated_is_weights(old, old.clone(), mask, cap=2.0)
    assert torch.equal(weights, torch.ones(4, 7, dtype=F64))
    assert float(metrics["is_weight_sum"]) == float(mask.sum()) == float(metrics["num_tokens"])
    assert float(metrics["is_clipped_sum"]) == 0.0


def test_is_weights_truncate_and_detach():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    behavior = torch.tensor([[-2.0, 0.5, -0.1, -50.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    weights, metrics = truncated_is_weights(old, behavior, mask, cap=2.0)
    assert not weights.requires_grad
    assert_near(weights, torch.tensor([[2.0, math.exp(-0.5), math.exp(0.1), 1.0]], dtype=F64), 1e-15)
    assert float(metrics["is_clipped_sum"]) == 1.0
    assert math.isclose(float(metrics["is_weight_max"]), 2.0)
    assert math.isclose(float(metrics["is_weight_sum"]), 2.0 + math.exp(-0.5) + math.exp(0.1), rel_tol=1e-15)
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, behavior, mask, cap=0.5)


# ---- metrics -----------------------------------------------------------------------------------------------


def test_explained_variance():
    g = torch.Generator().manual_seed(6)
    returns = torch.randn(3, 8, generator=g, dtype=F64)
    mask = torch.arange(8)[None, :] < torch.tensor([8, 3, 5])[:, None]
    assert math.isclose(float(explained_variance(returns, returns, mask)), 1.0)
    assert abs(float(explained_variance(torch.zeros_like(returns), returns, mask))) < 1e-12
    # Padding is ignored, even garbage.
    values = returns + 0.1 * torch.randn(3, 8, generator=g, dtype=F64)
    ev = explained_variance(values, returns, mask)
    ev_garbage = explained_variance(torch.where(mask, values, 1e9), torch.where(mask, returns, -1e9), mask)
    assert_near(ev, ev_garbage, 1e-12)
    err, ret = (returns - values)[mask], returns[mask]
    assert math.isclose(float(ev), 1 - float(err.var()) / float(ret.var()), rel_tol=1e-12)
    # Zero-variance returns (or no valid token): defined as 0, not NaN.
    assert float(explained_variance(values, torch.ones_like(returns), mask)) == 0.0
    assert float(explained_variance(values, returns, torch.zeros_like(mask))) == 0.0


def test_masked_reductions():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert float(masked_sum(values, mask)) == 11.0
    assert float(masked_mean(values, mask)) == 11.0 / 4
    assert math.isclose(float(masked_var(values, mask)), float(torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=F64).var()))
    assert float(masked_mean(values, torch.zeros_like(mask))) == 0.0
    assert float(masked_var(values, torch.tensor([[1, 0, 0], [0, 0, 0]]))) == 0.0
    with pytest.raises(ValueError):
        masked_sum(values, mask[:, :2])
