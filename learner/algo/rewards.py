"""Token-level placement of a response's reward.

VAPO scores a whole response (+1 correct / -1 wrong, from the verifier) and places that score on
the last valid response token; every other token gets 0, so with gamma = 1 and lambda = 1 each
token's return is the final score. Shaping (DAPO's overlong penalty, `shared.reward.shaping`) is
added to the score by the actor, before it reaches the learner. Imports torch only.
"""

from __future__ import annotations

import torch


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
