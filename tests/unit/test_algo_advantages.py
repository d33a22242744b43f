"""Group-normalised advantages, masked whitening, reward placement, KL, IS weights, explained variance."""

from __future__ import annotations

import math

import pytest
import torch

from learner.algo.advantages import group_advantages, whiten
from learner.algo.kl import kl_penalty
from learner.algo.metrics import explained_variance, mean_and_std, moment_sums
from learner.algo.rewards import token_level_rewards
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
    out = whiten(values, mask, moment_sums(values, mask))
    valid = out[mask]
    assert abs(float(valid.mean())) < 1e-12
    assert abs(float(valid.var(unbiased=False)) - 1.0) < 1e-6
    assert torch.all(out[~mask] == 0)
    one_token = torch.zeros(4, 10, dtype=torch.bool)
    one_token[1, 2] = True
    assert torch.all(whiten(values, one_token, moment_sums(values, one_token)) == 0)  # std 0: the token becomes 0
    assert torch.all(whiten(values, ~mask, moment_sums(values, ~mask))[mask] == 0)
    empty = torch.zeros_like(one_token)
    assert torch.all(whiten(values, empty, moment_sums(values, empty)) == 0)


def test_whitening_over_two_shards_equals_whitening_the_whole():
    """What the train step does across ranks: each rank's moment sums, added, whiten every rank's part alike."""
    g = torch.Generator().manual_seed(6)
    values = torch.randn(6, 9, generator=g, dtype=F64)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 3, 1, 7, 0, 5])[:, None]
    whole = whiten(values, mask, moment_sums(values, mask))
    total = moment_sums(values[:2], mask[:2]) + moment_sums(values[2:], mask[2:])
    parts = torch.cat([whiten(values[:2], mask[:2], total), whiten(values[2:], mask[2:], total)])
    assert_near(parts, whole, 1e-12)


# ---- rewards -----------------------------------------------------------------------------------------------


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


def _ev(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    return float(explained_variance(moment_sums(returns, mask), moment_sums(returns - values, mask)))


def test_explained_variance():
    g = torch.Generator().manual_seed(8)
    returns = torch.randn(3, 7, generator=g, dtype=F64)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 4, 2])[:, None]
    assert math.isclose(_ev(returns, returns, mask), 1.0)
    assert abs(_ev(torch.zeros_like(returns), returns, mask)) < 1e-12
    values = returns + 0.5 * torch.randn(3, 7, generator=g, dtype=F64)
    expected = 1.0 - float((returns - values)[mask].var(unbiased=False)) / float(returns[mask].var(unbiased=False))
    assert math.isclose(_ev(values, returns, mask), expected, rel_tol=1e-10)
    assert _ev(values, torch.ones_like(returns), mask) == 0.0  # nothing to explain
    assert _ev(values, returns, torch.zeros_like(mask)) == 0.0


def test_moment_sums_and_mean_and_std():
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, 7.0, 11.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert moment_sums(values, mask).tolist() == [11.0, 39.0, 4.0]
    mean, std = mean_and_std(moment_sums(values, mask))
    ref = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=F64)
    assert float(mean) == 11.0 / 4 and math.isclose(float(std), float(ref.std(unbiased=False)))
    assert [float(x) for x in mean_and_std(moment_sums(values, torch.zeros_like(mask)))] == [0.0, 0.0]
    with pytest.raises(ValueError):
        moment_sums(values, mask[:, :2])
