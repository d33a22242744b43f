"""Reward shaping on the learner side: DAPO's soft overlong punishment and token-level placement.

VAPO scores a whole response (+1 correct / -1 wrong, from the verifier) and places that score on
the last valid response token; every other token gets 0, so with gamma = 1 and lambda = 1 each
token's return is the final score. The optional overlong penalty is added to the score before
placement. Imports torch only.
"""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment per response; lengths [B] -> [B] float32 in [-1, 0].

    0 for l <= max_len - cache_len; (max_len - cache_len - l) / cache_len, linear down to -1,
    for max_len - cache_len < l <= max_len; -1 for l > max_len. cache_len = 0 gives the hard
    cut: 0 up to max_len, -1 beyond.
    """
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(lengths.shape)}")
    lengths = lengths.to(torch.float32)
    start = max_len - cache_len
    ramp = (start - lengths) / max(cache_len, 1)
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)


def token_level_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's score on its last valid response token; scores [B], response_mask [B, T] -> [B, T].

    Zeros elsewhere. A row without valid tokens (vLLM can, rarely, return an empty response)
    gets no reward at all: there is no token to carry it, and it adds nothing to any loss.
    """
    if scores.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"need scores [B] and response_mask [B, T], got {tuple(scores.shape)}, {tuple(response_mask.shape)}"
        )
    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    rewards = torch.zeros(mask.shape, dtype=dtype, device=scores.device)
    if mask.shape[1] == 0:
        return rewards
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)  # -1: empty response
    rows = (last >= 0).nonzero().squeeze(1)
    rewards[rows, last[rows]] = scores[rows].to(dtype)
    return rewards
