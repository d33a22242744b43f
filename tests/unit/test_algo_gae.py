"""GAE and length-adaptive lambda against closed forms, a plain reference loop, and invariances."""

from __future__ import annotations

import math

import pytest
import torch

import learner.algo.gae as gae_module
from learner.algo.gae import gae, length_adaptive_lambda

F64 = torch.float64


def assert_near(actual, expected, atol):
    """Same shape and max |actual - expected| <= atol (torch.testing.assert_close costs ~1 s on first import)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel():
        err = float((actual.detach().double() - expected.detach().double()).abs().max())
        assert err <= atol, f"max abs error {err} > {atol}"


def reference_gae(rewards, values, mask, gamma, lam):
    """One Python step per token and per row, straight from the definition (right padding, terminal at the end)."""
    batch, length = values.shape
    lams = [float(x) for x in lam] if isinstance(lam, torch.Tensor) else [float(lam)] * batch
    adv = torch.zeros(batch, length, dtype=F64)
    for b in range(batch):
        r, v, m = rewards[b].tolist(), values[b].tolist(), mask[b].tolist()
        last, next_value = 0.0, 0.0
        for t in reversed(range(length)):
            if not m[t]:
                last, next_value = 0.0, 0.0
                continue
            delta = r[t] + gamma * next_value - v[t]
            last = delta + gamma * lams[b] * last
            adv[b, t] = last
            next_value = v[t]
    return adv, torch.where(mask.bool(), adv + values, torch.zeros((), dtype=F64))


def random_batch(batch, length, seed, min_len=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, length, generator=g, dtype=F64)
    values = torch.randn(batch, length, generator=g, dtype=F64)
    lengths = torch.randint(min_len, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return rewards, values, mask, lengths


@pytest.mark.parametrize("shape", [(1, 1), (4, 2), (5, 7), (3, 64), (6, 65), (2, 300), (3, 4097)])
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (0.0, 0.7), (1.0, 0.5)])
def test_matches_reference_loop_scalar_lambda(shape, gamma, lam):
    rewards, values, mask, _ = random_batch(*shape, seed=shape[0] * 1000 + shape[1])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, mask, gamma, lam)
    assert_near(adv, ref_adv, 1e-10)
    assert_near(ret, ref_ret, 1e-10)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (6, 65), (4, 1000), (3, 4097)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop_per_sequence_lambda(shape, seed):
    rewards, values, mask, _ = random_batch(*shape, seed=seed)
    lam = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed + 7), dtype=F64)
    lam[0] = 0.0
    if shape[0] > 1:
        lam[1] = 1.0
    adv, ret = gae(rewards, values, mask, 0.995, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, mask, 0.995, lam)
    assert_near(adv, ref_adv, 1e-10)
    assert_near(ret, ref_ret, 1e-10)


@pytest.mark.parametrize("lam", [1.0 - 1e-12, 1e-300, 1e-8])
def test_stable_for_decay_near_one_and_near_zero(lam):
    rewards, values, mask, _ = random_batch(3, 5000, seed=3, min_len=4000)
    adv, _ = gae(rewards, values, mask, 1.0, lam)
    ref_adv, _ = reference_gae(rewards, values, mask, 1.0, lam)
    assert torch.isfinite(adv).all()
    assert_near(adv, ref_adv, 1e-10)


def test_lambda_one_gives_monte_carlo_returns():
    rewards, values, mask, _ = random_batch(6, 300, seed=4)
    for gamma in (1.0, 0.97):
        adv, ret = gae(rewards, values, mask, gamma, 1.0)
        r = torch.where(mask, rewards, 0.0)
        expected = torch.zeros_like(r)
        running = torch.zeros(6, dtype=F64)
        for t in reversed(range(300)):  # discounted reward-to-go, no values involved
            running = r[:, t] + gamma * running
            expected[:, t] = running
        expected = torch.where(mask, expected, 0.0)
        assert_near(ret, expected, 1e-10)
        assert_near(adv, torch.where(mask, expected - values, 0.0), 1e-10)


def test_lambda_zero_gives_one_step_td():
    rewards, values, mask, _ = random_batch(5, 50, seed=5)
    gamma = 0.9
    adv, ret = gae(rewards, values, mask, gamma, 0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(5, 1, dtype=F64)], dim=1)
    expected = torch.where(mask, rewards + gamma * next_values - values, 0.0)
    assert_near(adv, expected, 1e-12)
    assert_near(ret, torch.where(mask, rewards + gamma * next_values, 0.0), 1e-12)


def test_gamma_zero_gives_reward_minus_value():
    rewards, values, mask, _ = random_batch(5, 50, seed=6)
    adv, _ = gae(rewards, values, mask, 0.0, torch.rand(5, dtype=F64))
    assert_near(adv, torch.where(mask, rewards - values, 0.0), 1e-12)


def test_terminal_reward_with_gamma_one_lambda_one_reaches_every_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]], dtype=F64)
    values = torch.zeros(2, 4, dtype=F64)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]], dtype=F64)
    assert torch.equal(ret, expected)
    assert torch.equal(adv, expected)


def test_values_and_rewards_on_padding_change_nothing():
    rewards, values, mask, _ = random_batch(6, 200, seed=8)
    lam = torch.rand(6, dtype=F64)
    adv, ret = gae(rewards, values, mask, 1.0, lam)
    garbage = torch.randn(6, 200, dtype=F64) * 1e6
    adv2, ret2 = gae(torch.where(mask, rewards, garbage), torch.where(mask, values, -garbage), mask, 1.0, lam)
    assert torch.equal(adv, adv2)
    assert torch.equal(ret, ret2)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


@pytest.mark.parametrize("extra", [1, 63, 4200])
def test_padding_length_changes_nothing(extra):
    rewards, values, mask, _ = random_batch(4, 100, seed=9)
    adv, ret = gae(rewards, values, mask, 0.99, 0.9)
    pad = torch.zeros(4, extra, dtype=F64)
    adv2, ret2 = gae(
        torch.cat([rewards, pad + 3.0], 1),
        torch.cat([values, pad - 2.0], 1),
        torch.cat([mask, pad.bool()], 1),
        0.99,
        0.9,
    )
    assert_near(adv2[:, :100], adv, 1e-12)
    assert_near(ret2[:, :100], ret, 1e-12)
    assert torch.all(adv2[:, 100:] == 0) and torch.all(ret2[:, 100:] == 0)


def test_per_sequence_constant_lambda_equals_scalar():
    rewards, values, mask, _ = random_batch(7, 5000, seed=10)
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    adv2, ret2 = gae(rewards, values, mask, 1.0, torch.full((7,), 0.95, dtype=F64))
    assert_near(adv2, adv, 1e-12)
    assert_near(ret2, ret, 1e-12)


def test_empty_rows_and_length_one_responses():
    rewards, values, _, _ = random_batch(4, 9, seed=11)
    lengths = torch.tensor([0, 1, 1, 0])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    adv, ret = gae(rewards, values, mask, 1.0, 0.9)
    assert torch.all(adv[[0, 3]] == 0) and torch.all(ret[[0, 3]] == 0)
    # A single token is terminal: A = r - V, G = r.
    assert_near(adv[[1, 2], 0], rewards[[1, 2], 0] - values[[1, 2], 0], 0)
    assert_near(ret[[1, 2], 0], rewards[[1, 2], 0], 1e-15)


def test_empty_batch_and_zero_length():
    adv, ret = gae(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), 1.0, 0.9)
    assert adv.shape == ret.shape == (0, 5)
    adv, ret = gae(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool), 1.0, torch.ones(3))
    assert adv.shape == ret.shape == (3, 0)


def test_float_mask_and_float32_inputs():
    rewards, values, mask, _ = random_batch(5, 700, seed=12)
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    adv32, ret32 = gae(rewards.float(), values.float(), mask.float(), 1.0, 0.95)
    assert adv32.dtype == torch.float32
    assert_near(adv32, adv, 1e-3)
    assert_near(ret32, ret, 1e-3)


def test_leading_padding_is_one_run_too():
    rewards, values, _, _ = random_batch(3, 40, seed=13)
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, 5:30] = True
    mask[1, 0:40] = True
    mask[2, 39] = True
    adv, ret = gae(rewards, values, mask, 1.0, 0.8)
    ref_adv, ref_ret = reference_gae(rewards, values, mask, 1.0, 0.8)
    assert_near(adv, ref_adv, 1e-12)
    assert_near(ret, ref_ret, 1e-12)


def test_mask_with_a_hole_is_rejected_naming_the_row():
    rewards, values, mask, _ = random_batch(3, 5000, seed=14, min_len=5000)
    mask = mask.clone()
    mask[2, 4500] = False  # a hole across no block boundary
    with pytest.raises(ValueError, match="row 2"):
        gae(rewards, values, mask, 1.0, 0.9)
    mask = torch.ones(3, 5000, dtype=torch.bool)
    mask[1, 4095:4097] = False  # a hole across the block boundary
    with pytest.raises(ValueError, match="row 1"):
        gae(rewards, values, mask, 1.0, 0.9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 1.5, "lam": 0.9}, "gamma"),
        ({"gamma": 1.0, "lam": -0.1}, "lam"),
        ({"gamma": 1.0, "lam": torch.tensor([0.5, 1.2, 0.5])}, "row 1"),
        ({"gamma": 1.0, "lam": torch.ones(2)}, r"\[B\]"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    rewards, values, mask, _ = random_batch(3, 10, seed=15)
    with pytest.raises(ValueError, match=match):
        gae(rewards, values, mask, **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 4), 1.0, 1.0)


def test_length_adaptive_lambda_formula_and_clamps():
    lengths = torch.tensor([0, 1, 10, 20, 21, 40, 100, 16384])
    lam = length_adaptive_lambda(lengths, alpha=0.05)
    assert lam.dtype == F64 and lam.shape == (8,)
    assert not torch.isnan(lam).any()
    # l <= 1 / alpha = 20: the formula gives <= 0, clamped to lam_min = 0 (one-step TD).
    assert torch.equal(lam[:4], torch.zeros(4, dtype=F64))
    assert math.isclose(float(lam[4]), 1 - 1 / (0.05 * 21), abs_tol=1e-15)
    assert math.isclose(float(lam[5]), 0.5, abs_tol=1e-15)
    assert math.isclose(float(lam[6]), 0.8, abs_tol=1e-15)
    assert torch.all(lam < 1.0)
    clamped = length_adaptive_lambda(lengths, alpha=0.05, lam_min=0.6)
    assert torch.equal(clamped[:6], torch.full((6,), 0.6, dtype=F64))
    assert math.isclose(float(clamped[6]), 0.8, abs_tol=1e-15)


def test_length_adaptive_lambda_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        length_adaptive_lambda(torch.tensor([3]), alpha=0.0)
    with pytest.raises(ValueError, match="lam_min"):
        length_adaptive_lambda(torch.tensor([3]), alpha=0.05, lam_min=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        length_adaptive_lambda(torch.tensor([-1]), alpha=0.05)


def test_decoupled_gae_with_length_adaptive_lambda_matches_reference():
    rewards, values, mask, lengths = random_batch(8, 400, seed=16)
    lam = length_adaptive_lambda(lengths, alpha=0.05)
    adv, _ = gae(rewards, values, mask, 1.0, lam)
    _, ret = gae(rewards, values, mask, 1.0, 1.0)
    ref_adv, _ = reference_gae(rewards, values, mask, 1.0, lam)
    _, ref_ret = reference_gae(rewards, values, mask, 1.0, 1.0)
    assert_near(adv, ref_adv, 1e-10)
    assert_near(ret, ref_ret, 1e-10)


@pytest.mark.parametrize("lam", [0.999, "per_sequence"])
@pytest.mark.parametrize("one_block_per_pass", [False, True])
def test_carries_across_several_blocks(lam, one_block_per_pass, monkeypatch):
    # Long responses cross many block boundaries (blocks are at most 256 tokens), inside one pass
    # (level 3) or, with a tiny element budget, across passes (the carry), as at large B.
    if one_block_per_pass:
        monkeypatch.setattr(gae_module, "_ELEMENT_BUDGET", 1)
    rewards, values, mask, _ = random_batch(3, 2 * 4096 + 300, seed=17, min_len=4096)
    lam_arg = torch.tensor([0.9999, 0.99, 1.0], dtype=F64) if lam == "per_sequence" else lam
    adv, ret = gae(rewards, values, mask, 1.0, lam_arg)
    ref_adv, ref_ret = reference_gae(rewards, values, mask, 1.0, lam_arg)
    assert_near(adv, ref_adv, 1e-10)
    assert_near(ret, ref_ret, 1e-10)
