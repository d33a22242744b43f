"""Truncated importance weights that correct for the actors' staleness (decoupled PPO).

Actors sample with `behavior_logprobs` (weights up to max_staleness versions old); the learner's
proximal policy is `old_logprobs`. The surrogate is taken against old_logprobs and each token is
weighted by w = min(exp(old_logprobs - behavior_logprobs), cap), a constant (no gradient), as in
AReaL's decoupled objective and IMPALA-style truncated IS.

Padding gets weight 1.0, not 0: the losses mask padding anyway, and 1.0 makes "behavior == old"
an exact identity on the whole tensor (exp(0) = 1 exactly). Imports torch only.
"""

from __future__ import annotations

import torch


def truncated_is_weights(
    old_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, response_mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """min(exp(old - behavior), cap) per token, detached, 1.0 on padding; inputs [B, T] -> ([B, T], metrics).

    cap >= 1 (a cap below 1 would down-weight even on-policy tokens). Metrics, detached 0-dim
    float64 over valid tokens: is_weight_sum (truncated weights), is_weight_max (a max: reduce
    with MAX across ranks; 0 for no tokens), is_clipped_sum (raw weight > cap), num_tokens.
    """
    if old_logprobs.shape != behavior_logprobs.shape or old_logprobs.shape != response_mask.shape:
        raise ValueError(
            f"shape mismatch: old {tuple(old_logprobs.shape)}, behavior {tuple(behavior_logprobs.shape)}, "
            f"mask {tuple(response_mask.shape)}"
        )
    if not cap >= 1.0:
        raise ValueError(f"cap must be >= 1, got {cap}")
    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    log_ratio = torch.where(mask, (old_logprobs - behavior_logprobs).detach(), torch.zeros_like(old_logprobs))
    raw = torch.exp(log_ratio)
    weights = torch.clamp(raw, max=cap)
    w64 = torch.where(mask, weights.to(torch.float64), torch.zeros((), dtype=torch.float64, device=weights.device))
    metrics = {
        "is_weight_sum": w64.sum(),
        "is_weight_max": w64.amax() if w64.numel() else torch.zeros((), dtype=torch.float64, device=w64.device),
        "is_clipped_sum": (mask & (raw > cap)).sum(dtype=torch.float64),
        "num_tokens": mask.sum(dtype=torch.float64),
    }
    return weights, metrics
