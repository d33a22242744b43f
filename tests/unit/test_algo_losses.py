"""Policy, value and positive-NLL losses: formulas, clipping gradients, masking and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from learner.algo.losses import (
    policy_loss_per_token,
    positive_nll_sum,
    sequence_mean_loss,
    value_loss_sum,
)


def policy_loss_sum(*args, **kwargs):
    """The token-level sum the train step takes of the per-token surrogate."""
    per_token, metrics = policy_loss_per_token(*args, **kwargs)
    return per_token.sum(), metrics

F64 = torch.float64


def assert_near(actual, expected, atol):
    """Same shape and max |actual - expected| <= atol (torch.testing.assert_close costs ~1 s on first import)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel():
        err = float((actual.detach().double() - expected.detach().double()).abs().max())
        assert err <= atol, f"max abs error {err} > {atol}"


def random_inputs(batch=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=F64) * 3
    logprobs = (old + 0.5 * torch.randn(batch, length, generator=g, dtype=F64)).requires_grad_()
    advantages = torch.randn(batch, length, generator=g, dtype=F64)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return logprobs, old, advantages, mask


def surrogate_reference(logprobs, old, adv, mask, clip_low, clip_high, dual_clip=None, weights=None):
    out = torch.zeros_like(adv)
    logprobs = logprobs.detach()
    for idx in mask.nonzero().tolist():
        b, t = idx
        r = math.exp(float(logprobs[b, t]) - float(old[b, t]))
        a = float(adv[b, t])
        loss = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
        if dual_clip is not None and a < 0:
            loss = min(loss, -a * dual_clip)
        out[b, t] = loss * (1.0 if weights is None else float(weights[b, t]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_per_token_formula(seed, dual_clip):
    logprobs, old, adv, mask = random_inputs(seed=seed)
    weights = torch.rand(4, 9, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2
    per_token, metrics = policy_loss_per_token(
        logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, is_weights=weights
    )
    expected = surrogate_reference(logprobs, old, adv, mask, 0.2, 0.28, dual_clip, weights)
    assert_near(per_token, expected, 1e-12)
    total, metrics_sum = policy_loss_sum(
        logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, is_weights=weights
    )
    assert_near(total, per_token.sum(), 1e-12)
    assert metrics.keys() == metrics_sum.keys()
    assert float(metrics["num_tokens"]) == float(mask.sum())


def grad_of_single_token(log_ratio, advantage, **clip):
    logprobs = torch.tensor([[log_ratio]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=F64)
    loss, metrics = policy_loss_sum(logprobs, old, torch.tensor([[advantage]], dtype=F64), torch.ones(1, 1), **clip)
    loss.backward()
    assert logprobs.grad is not None
    return float(logprobs.grad), float(loss.detach()), metrics


CLIP = {"clip_low": 0.2, "clip_high": 0.28}


@pytest.mark.parametrize(
    "ratio, advantage, clipped, metric",
    [
        (1.5, 1.0, True, "clipfrac_high_sum"),  # A > 0 above 1 + eps_high: clipped
        (1.25, 1.0, False, None),  # inside the asymmetric band (a symmetric 0.2 clip would cut it)
        (0.5, 1.0, False, None),  # A > 0 below 1 - eps_low: the min keeps the unclipped term
        (0.5, -1.0, True, "clipfrac_low_sum"),  # A < 0 below 1 - eps_low: clipped
        (0.9, -1.0, False, None),
        (1.5, -1.0, False, None),  # A < 0 above 1 + eps_high: unclipped (pessimistic)
    ],
)
def test_clip_higher_gradient_is_exactly_zero_in_clipped_region(ratio, advantage, clipped, metric):
    grad, loss, metrics = grad_of_single_token(math.log(ratio), advantage, **CLIP)
    if clipped:
        assert grad == 0.0
    else:
        assert math.isclose(grad, -advantage * ratio, rel_tol=1e-12)  # d(-A r)/d logp = -A r
    for key in ("clipfrac_high_sum", "clipfrac_low_sum"):
        assert float(metrics[key]) == (1.0 if key == metric else 0.0)


def test_symmetric_clip_cuts_where_clip_higher_does_not():
    grad_sym, _, _ = grad_of_single_token(math.log(1.25), 1.0, clip_low=0.2, clip_high=0.2)
    grad_high, _, _ = grad_of_single_token(math.log(1.25), 1.0, clip_low=0.2, clip_high=0.28)
    assert grad_sym == 0.0 and grad_high != 0.0


def test_dual_clip_bounds_negative_advantage_loss():
    grad, loss, metrics = grad_of_single_token(math.log(10.0), -2.0, dual_clip=3.0, **CLIP)
    assert math.isclose(loss, 6.0, rel_tol=1e-12)  # -c A instead of -A r = 20
    assert grad == 0.0
    assert float(metrics["dualclip_frac_sum"]) == 1.0
    grad, loss, metrics = grad_of_single_token(math.log(10.0), -2.0, **CLIP)
    assert math.isclose(loss, 20.0, rel_tol=1e-12)
    assert float(metrics["dualclip_frac_sum"]) == 0.0
    # Positive advantages are untouched by dual-clip.
    _, loss_pos, _ = grad_of_single_token(math.log(10.0), 2.0, dual_clip=3.0, **CLIP)
    assert math.isclose(loss_pos, -2.0 * 1.28, rel_tol=1e-12)


def test_is_weights_scale_loss_and_get_no_gradient():
    logprobs, old, adv, mask = random_inputs(seed=5)
    weights = torch.full((4, 9), 2.0, dtype=F64, requires_grad=True)
    loss_w, _ = policy_loss_sum(logprobs, old, adv, mask, is_weights=weights, **CLIP)
    loss, _ = policy_loss_sum(logprobs, old, adv, mask, **CLIP)
    assert_near(loss_w, 2.0 * loss, 1e-12)
    loss_w.backward()
    assert weights.grad is None
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()


def test_policy_loss_ignores_padding_even_if_infinite():
    logprobs, old, adv, mask = random_inputs(seed=6)
    garbage = torch.where(mask, logprobs.detach(), torch.full_like(old, 1e4))
    garbage.requires_grad_()
    adv_pad = torch.where(mask, adv, torch.full_like(adv, float("inf")))
    loss, metrics = policy_loss_sum(garbage, old, adv_pad, mask, **CLIP)
    ref, _ = policy_loss_sum(logprobs.detach(), old, adv, mask, **CLIP)
    assert_near(loss, ref, 1e-12)
    loss.backward()
    assert torch.isfinite(garbage.grad).all()
    assert torch.all(garbage.grad[~mask] == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_policy_metrics_counts_and_kl():
    old = torch.zeros(1, 4, dtype=F64)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0, 3.0]], dtype=F64))
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    _, metrics = policy_loss_per_token(logprobs, old, adv, mask, **CLIP)
    assert float(metrics["clipfrac_high_sum"]) == 1.0  # the 3.0 is padding
    assert float(metrics["clipfrac_low_sum"]) == 1.0
    assert float(metrics["num_tokens"]) == 3.0
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.0))
    assert math.isclose(float(metrics["approx_kl_sum"]), expected_kl, rel_tol=1e-12)
    assert math.isclose(float(metrics["ratio_sum"]), 3.0, rel_tol=1e-12)
    for value in metrics.values():
        assert value.dim() == 0 and value.dtype == F64 and not value.requires_grad


def test_on_policy_gradient_is_minus_advantage():
    logprobs, _, adv, mask = random_inputs(seed=7)
    old = logprobs.detach().clone()
    loss, metrics = policy_loss_sum(logprobs, old, adv, mask, **CLIP)
    loss.backward()
    assert_near(logprobs.grad, torch.where(mask, -adv, 0.0), 1e-12)
    assert float(metrics["approx_kl_sum"]) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [{"clip_low": 1.0, "clip_high": 0.2}, {"clip_low": 0.2, "clip_high": -0.1}, {**CLIP, "dual_clip": 1.0}],
)
def test_policy_loss_rejects_bad_clip(kwargs):
    logprobs, old, adv, mask = random_inputs()
    with pytest.raises(ValueError):
        policy_loss_sum(logprobs, old, adv, mask, **kwargs)


def test_policy_loss_rejects_shape_mismatch():
    logprobs, old, adv, mask = random_inputs()
    with pytest.raises(ValueError, match="shape"):
        policy_loss_sum(logprobs, old[:, :3], adv, mask, **CLIP)


def test_sequence_mean_loss_averages_each_sequence_first():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    loss, num_sequences = sequence_mean_loss(per_token, mask)
    assert math.isclose(float(loss), 2.0 + 4.0, rel_tol=1e-15)
    assert float(num_sequences) == 2.0


def test_value_loss_unclipped_and_clipped():
    values = torch.tensor([[1.0, 2.0, 0.0, 5.0]], dtype=F64, requires_grad=True)
    returns = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=F64)
    old = torch.tensor([[0.0, 1.9, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = value_loss_sum(values, returns, mask)
    assert math.isclose(float(loss.detach()), 0.5 * (1 + 4), rel_tol=1e-15)
    assert set(metrics) == {"num_tokens"} and float(metrics["num_tokens"]) == 3.0
    loss_c, metrics_c = value_loss_sum(values, returns, mask, old_values=old, clip=0.5)
    # Token 0: V = 1 clipped to 0.5, max(1, 0.25) = 1 (unclipped). Token 1: V = 2 within 1.9 +- 0.5.
    assert math.isclose(float(loss_c.detach()), 0.5 * (1 + 4), rel_tol=1e-15)
    assert float(metrics_c["value_clipfrac_sum"]) == 0.0
    # Moving toward the target past the clip range: the clipped term is larger and its gradient is 0.
    values2 = torch.tensor([[-1.0]], dtype=F64, requires_grad=True)
    loss2, metrics2 = value_loss_sum(
        values2, torch.tensor([[-2.0]], dtype=F64), torch.ones(1, 1), old_values=torch.zeros(1, 1, dtype=F64), clip=0.2
    )
    assert math.isclose(float(loss2.detach()), 0.5 * 1.8**2, rel_tol=1e-12)
    assert float(metrics2["value_clipfrac_sum"]) == 1.0
    loss2.backward()
    assert float(values2.grad) == 0.0


def test_value_loss_gradient_and_errors():
    values = torch.randn(3, 5, dtype=F64, requires_grad=True)
    returns = torch.randn(3, 5, dtype=F64)
    mask = torch.rand(3, 5) < 0.6
    loss, _ = value_loss_sum(values, returns, mask)
    loss.backward()
    assert_near(values.grad, torch.where(mask, values.detach() - returns, 0.0), 1e-12)
    with pytest.raises(ValueError, match="old_values"):
        value_loss_sum(values, returns, mask, clip=0.2)
    with pytest.raises(ValueError, match="clip"):
        value_loss_sum(values, returns, mask, old_values=returns, clip=0.0)


def test_positive_nll_is_zero_not_nan_without_correct_responses():
    logprobs = torch.randn(3, 4, dtype=F64, requires_grad=True)
    mask = torch.ones(3, 4, dtype=torch.bool)
    nll, num_tokens = positive_nll_sum(logprobs, mask, torch.zeros(3, dtype=torch.bool))
    assert float(nll.detach()) == 0.0 and float(num_tokens) == 0.0
    nll.backward()
    assert torch.all(logprobs.grad == 0)


def test_positive_nll_sums_correct_responses_only():
    logprobs = -torch.rand(3, 4, dtype=F64)
    logprobs.requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    correct = torch.tensor([True, False, True])
    nll, num_tokens = positive_nll_sum(logprobs, mask, correct)
    expected = -(logprobs[0, :2].sum() + logprobs[2, 0])
    assert math.isclose(float(nll.detach()), float(expected.detach()), rel_tol=1e-15)
    assert float(num_tokens) == 3.0 and num_tokens.dim() == 0
    nll.backward()
    expected_grad = torch.zeros(3, 4, dtype=F64)
    expected_grad[0, :2] = -1.0
    expected_grad[2, 0] = -1.0
    assert torch.equal(logprobs.grad, expected_grad)
    with pytest.raises(ValueError, match="is_correct"):
        positive_nll_sum(logprobs, mask, correct[:2])

