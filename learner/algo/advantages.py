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

from learner.algo.metrics import mean_and_std


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


def whiten(values: torch.Tensor, mask: torch.Tensor, sums: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening (x - mean) / (std + eps) on mask == 1, 0 elsewhere; values, mask [B, T] -> [B, T].

    mean and the (biased) std come from `sums` = `moment_sums(values, mask)`: this tensor's own for a
    local whitening, or summed over ranks for the global one the train step does.
    """
    mean, std = mean_and_std(sums)
    return (values - mean) / (std + eps) * mask.to(values.dtype)
