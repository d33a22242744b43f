"""PPO losses of VAPO as pure functions: clipped surrogate, value loss, positive-example NLL.

Each loss returns `(sum, metrics)`: a sum over the valid tokens of the micro-batch, never a
mean. The train step all-reduces the global number of valid tokens once per mini-batch and
divides every sum by it, which gives VAPO's token-level loss across micro-batches and ranks. The
sample-level loss of the vanilla-PPO baseline instead averages each sequence first:
`sequence_mean_loss(policy_loss_per_token(...)[0], response_mask)` and divides by the global
number of sequences.

Metrics are dicts of detached 0-dim float64 tensors (no `.item()`), all sums or counts, so the
caller can stack them into one all-reduce and divide by the matching global count; float64 keeps
counts exact far beyond float32's 2^24. `num_tokens` is the number of valid tokens.

Masks may be bool or 0/1; masked positions use torch.where, so garbage (even inf) log-probs on
padding neither change the loss nor produce NaN gradients. Imports torch only.
"""

from __future__ import annotations

import torch

Metrics = dict[str, torch.Tensor]


def _check_same_shape(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _count(flags: torch.Tensor) -> torch.Tensor:
    return flags.sum(dtype=torch.float64).detach()


def _sum64(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.float64, device=values.device)
    return torch.where(mask, values.detach().to(torch.float64), zero).sum()


def policy_loss_per_token(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped surrogate per token, [B, T] (0 on padding), and its metrics; all inputs [B, T].

    loss = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) with r = exp(logprobs - old_logprobs)
    (clip-higher when clip_high > clip_low). With dual_clip = c > 1, tokens with A < 0 take
    min(loss, -c A), bounding the loss when r is very large (verl / DAPO dual-clip). is_weights
    (truncated importance weights, treated as constants) multiply the per-token loss.

    Metrics (sums over valid tokens; divide by the global `num_tokens`):
    clipfrac_high_sum (A > 0 and r > 1 + clip_high: the upper clip is active),
    clipfrac_low_sum (A < 0 and r < 1 - clip_low), dualclip_frac_sum (A < 0 and r > c; 0 without
    dual-clip), approx_kl_sum (k3 estimate of KL(old || current): r - 1 - log r >= 0),
    ratio_sum, num_tokens.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                      response_mask=response_mask, is_weights=is_weights)
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = _as_bool(response_mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Mask before exp so padding cannot overflow (and 0 * inf cannot make NaN gradients).
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)
    ratio = torch.exp(log_ratio)
    adv = torch.where(mask, advantages, torch.zeros_like(advantages)).detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    r = ratio.detach()
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
        dual_active = mask & (adv < 0) & (r > dual_clip)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    loss = torch.where(mask, loss, zero)
    metrics = {
        "clipfrac_high_sum": _count(mask & (adv > 0) & (r > 1.0 + clip_high)),
        "clipfrac_low_sum": _count(mask & (adv < 0) & (r < 1.0 - clip_low)),
        "dualclip_frac_sum": _count(dual_active),
        "approx_kl_sum": _sum64(r - 1.0 - log_ratio.detach(), mask),
        "ratio_sum": _sum64(r, mask),
        "num_tokens": _count(mask),
    }
    return loss, metrics


def sequence_mean_loss(per_token: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-level aggregation: mean over each sequence's valid tokens, summed over sequences.

    per_token, response_mask: [B, T]. Returns (loss sum, num_sequences as a 0-dim float64):
    sequences without valid tokens add nothing and are not counted. The caller divides by the
    global number of sequences (vanilla PPO baseline).
    """
    _check_same_shape(per_token=per_token, response_mask=response_mask)
    mask = _as_bool(response_mask)
    lengths = mask.sum(dim=1)
    per_seq = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum(dim=1)
    loss = (per_seq / lengths.clamp(min=1).to(per_token.dtype)).sum()
    return loss, _count(lengths > 0)


def value_loss_sum(
    values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    old_values: torch.Tensor | None = None,
    clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Sum over valid tokens of 0.5 (V - G)^2, or with value clipping 0.5 max((V - G)^2, (V_clip - G)^2).

    values, returns, old_values, response_mask: [B, T]; V_clip = clip(V, old - clip, old + clip)
    needs old_values. Metrics: num_tokens and, with clipping, value_clipfrac_sum (tokens where the
    clipped term is the larger one, i.e. the one whose gradient is used; ties count as unclipped).
    """
    _check_same_shape(values=values, returns=returns, response_mask=response_mask, old_values=old_values)
    if clip is not None and old_values is None:
        raise ValueError("value clipping needs old_values")
    if clip is not None and not clip > 0:
        raise ValueError(f"value clip must be > 0, got {clip}")
    mask = _as_bool(response_mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    target = returns.detach()
    loss = 0.5 * (values - target) ** 2
    metrics: Metrics = {"num_tokens": _count(mask)}
    if clip is not None:
        assert old_values is not None
        old = old_values.detach()
        clipped = old + torch.clamp(values - old, -clip, clip)
        loss_clipped = 0.5 * (clipped - target) ** 2
        metrics["value_clipfrac_sum"] = _count(mask & (loss_clipped > loss).detach())
        loss = torch.maximum(loss, loss_clipped)
    return torch.where(mask, loss, zero).sum(), metrics


def positive_nll_sum(
    logprobs: torch.Tensor, response_mask: torch.Tensor, is_correct: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood summed over the valid tokens of correct responses; VAPO's positive-example LM loss.

    logprobs, response_mask: [B, T]; is_correct: [B] bool. Returns (nll sum, num_tokens as a 0-dim
    float64); both are 0 (never NaN) when no response is correct. The caller divides by the
    global count of such tokens and weights the result by mu.
    """
    _check_same_shape(logprobs=logprobs, response_mask=response_mask)
    if is_correct.shape != logprobs.shape[:1]:
        raise ValueError(f"is_correct must be [B] = [{logprobs.shape[0]}], got {tuple(is_correct.shape)}")
    tokens = _as_bool(response_mask) & _as_bool(is_correct)[:, None]
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return -torch.where(tokens, logprobs, zero).sum(), _count(tokens)

