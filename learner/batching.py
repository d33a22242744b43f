"""Responses to micro-batches: token-budget packing, padding and the per-response record.

Owns: `Rollout` (one response as the learner sees it), the packing of responses into
micro-batches by a token budget, and collation into the token layout of `learner.model`
(prompts left-padded to P, responses right-padded to R, per-token tensors `[b, R]`).

Why a token budget: long chain-of-thought responses have heterogeneous lengths. Sorting by
length and packing rows while `rows * padded_length <= budget` keeps padding small and the
memory of a micro-batch bounded, where a fixed number of rows per micro-batch pads every
short response up to the longest one beside it. `bench/learner.py` measures the difference.

No torch.distributed here: the train step equalises micro-batch counts across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from learner.model import MicroBatch


@dataclass
class Rollout:
    """One response with its prompt, as the learner consumes it."""

    prompt_ids: np.ndarray
    """[P_i] int prompt token ids."""
    response_ids: np.ndarray
    """[R_i] int sampled token ids."""
    behavior_logprobs: np.ndarray
    """[R_i] float log-probs of the sampled tokens under the actor's weights."""
    score: float
    """Scalar reward of the response (verifier reward plus any shaping), placed on its last token."""
    correct: bool
    """Whether the verifier judged the response correct (selects it for the positive NLL term)."""
    group: int
    """Index of the prompt group within the rollout step (for group-normalised baselines)."""
    policy_version: int
    """Oldest policy version that produced any of its tokens."""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def token_budget_micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into micro-batches with `rows * longest <= budget`, longest first.

    A sequence longer than the budget gets a micro-batch of its own. Deterministic.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be > 0, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def fixed_count_micro_batches(num: int, rows: int) -> list[list[int]]:
    """Indices in arrival order, `rows` per micro-batch (the padded baseline)."""
    return [list(range(s, min(s + rows, num))) for s in range(0, num, rows)]


def pad_right(
    rows: Sequence[np.ndarray | torch.Tensor], width: int, value: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`[len(rows), width]`: each 1-D row copied to the left, `value` after it."""
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        n = len(row)
        if n:
            out[i, :n] = torch.as_tensor(row, dtype=dtype)
    return out


def collate(rollouts: Sequence[Rollout], pad_id: int) -> MicroBatch:
    """The micro-batch of `rollouts`: `[b, P + R]` ids and masks, `[b, R]` response mask."""
    assert rollouts, "collate needs at least one rollout"
    p = max(len(r.prompt_ids) for r in rollouts)
    r_width = max(max(len(r.response_ids) for r in rollouts), 1)
    b = len(rollouts)
    input_ids = torch.full((b, p + r_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, p + r_width), dtype=torch.long)
    response_mask = torch.zeros((b, r_width), dtype=torch.float32)
    for i, ro in enumerate(rollouts):
        np_, nr = len(ro.prompt_ids), len(ro.response_ids)
        input_ids[i, p - np_ : p] = torch.as_tensor(ro.prompt_ids, dtype=torch.long)
        input_ids[i, p : p + nr] = torch.as_tensor(ro.response_ids, dtype=torch.long)
        attention_mask[i, p - np_ : p + nr] = 1
        response_mask[i, :nr] = 1.0
    return MicroBatch(input_ids, attention_mask, response_mask, p)


def padded_cells(batches: Sequence[Sequence[int]], rollouts: Sequence[Rollout]) -> int:
    """Cells of the padded `[b, P + R]` tensors these micro-batches collate to."""
    cells = 0
    for idx in batches:
        p = max(len(rollouts[i].prompt_ids) for i in idx)
        r = max(max(len(rollouts[i].response_ids) for i in idx), 1)
        cells += len(idx) * (p + r)
    return cells


def padding_fraction(batches: Sequence[Sequence[int]], rollouts: Sequence[Rollout]) -> float:
    """Share of the padded `[b, P + R]` cells of these micro-batches that hold padding."""
    cells = padded_cells(batches, rollouts)
    real = sum(rollouts[i].length for idx in batches for i in idx)
    return 1.0 - real / cells if cells else 0.0
