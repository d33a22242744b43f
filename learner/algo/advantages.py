"""Critic-free advantages for the GRPO / DAPO baselines, and masked whitening.

Group-normalised advantages compare each response's score with its siblings (the G responses to
one prompt). They are computed in one pass over all responses with index_add (no Python loop
over groups); `group_ids` can be any integers, they are densified with torch.unique.

Choices, documented because baselines differ: the standard deviation is the unbiased one
(torch.std, as GRPO and verl use); a group of one response gets advantage 0 (it has no sibling
to compare with, and its unbiased std is undefined), where verl would pass the raw score through.
A group whose scores are all equal gets 0 (numerator 0, denominator eps).
"""

from __future__ import annotations

import torch

from learner.algo.metrics import masked_mean, masked_var


def group_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """(score - group mean) / (group unbiased std + eps), or without std normalisation score - mean; [N] -> [N].

    scores: [N] float; group_ids: [N] integers naming each response's group. Groups of one get 0.
    """
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(f"scores and group_ids must both be [N], got {tuple(scores.shape)}, {tuple(group_ids.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    unique_ids, dense = torch.unique(group_ids, return_inverse=True)
    num_groups = unique_ids.shape[0]
    counts = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, dense, torch.ones_like(scores)
    )
    sums = torch.zeros_like(counts).index_add_(0, dense, scores)
    mean = sums / counts
    centered = scores - mean[dense]
    sq = torch.zeros_like(counts).index_add_(0, dense, centered**2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    adv = centered / (std[dense] + eps) if normalize_std else centered
    return torch.where(counts[dense] > 1, adv, torch.zeros_like(adv))


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening: (x - mean) / sqrt(var + eps) over mask == 1, 0 on padding; values, mask [B, T] -> [B, T].

    Unbiased variance over the valid tokens of this tensor (local, not across ranks). With
    shift_mean=False the mean is added back (scale only). Fewer than two valid tokens: the
    variance is taken as 0, so a single valid token becomes 0 (or its value without the shift).
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    mean = masked_mean(values, m)
    var = masked_var(values, m, unbiased=True)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))
