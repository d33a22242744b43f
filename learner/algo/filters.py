"""DAPO dynamic sampling: keep only groups whose responses are not all judged the same.

A group where every response is correct (or every one wrong) has zero group-normalised advantage
and, with a critic, little signal; DAPO drops such groups and keeps sampling until the batch is
full. An empty group is dropped too (nothing to learn from). Imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def keep_group(correct_flags: Sequence[bool] | torch.Tensor) -> bool:
    """True when the group's correctness flags are not all equal (at least one right and one wrong)."""
    if isinstance(correct_flags, torch.Tensor):
        if correct_flags.dim() != 1:
            raise ValueError(f"correct_flags must be [G], got shape {tuple(correct_flags.shape)}")
        flags = correct_flags != 0
        return bool(flags.any()) and not bool(flags.all())
    values = [bool(flag) for flag in correct_flags]
    return any(values) and not all(values)


def keep_groups(correct: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Vectorised keep_group: correct [N] bool, group_ids [N] ints -> [num_groups] bool, in sorted group-id order.

    Group k is the k-th smallest distinct id (the order of torch.unique(group_ids)).
    """
    if correct.dim() != 1 or group_ids.shape != correct.shape:
        raise ValueError(
            f"correct and group_ids must both be [N], got {tuple(correct.shape)}, {tuple(group_ids.shape)}"
        )
    unique_ids, dense = torch.unique(group_ids, return_inverse=True)
    num_groups = unique_ids.shape[0]
    flags = (correct != 0).long()
    num_correct = torch.zeros(num_groups, dtype=torch.long, device=correct.device).index_add_(0, dense, flags)
    sizes = torch.zeros_like(num_correct).index_add_(0, dense, torch.ones_like(flags))
    return (num_correct > 0) & (num_correct < sizes)
