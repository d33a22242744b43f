"""Token-budget packing and collation into the learner's token layout."""

from __future__ import annotations

import numpy as np
import torch

from learner.batching import (
    Rollout,
    collate,
    fixed_count_micro_batches,
    pad_right,
    padding_fraction,
    token_budget_micro_batches,
)


def _rollout(p: int, r: int, seed: int = 0) -> Rollout:
    rng = np.random.default_rng(seed)
    return Rollout(
        prompt_ids=rng.integers(3, 50, p),
        response_ids=rng.integers(3, 50, r),
        behavior_logprobs=-rng.random(r).astype(np.float32),
        score=1.0,
        correct=True,
        group=0,
        policy_version=0,
    )


def test_budget_packing_respects_budget_and_covers_everything() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 300, 200)]
    batches = token_budget_micro_batches(lengths, 1024)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 1024
        assert lengths[b[0]] == max(lengths[i] for i in b)  # longest first within a batch


def test_oversized_sequence_gets_its_own_micro_batch() -> None:
    assert token_budget_micro_batches([5000, 10, 10], 1000) == [[0], [1, 2]]


def test_budget_packing_pads_less_than_fixed_count_on_long_tail() -> None:
    rng = np.random.default_rng(1)
    lengths = [int(rng.integers(50, 100)) if rng.random() < 0.9 else int(rng.integers(500, 1000)) for _ in range(256)]
    rollouts = [_rollout(10, n - 10, i) for i, n in enumerate(lengths)]
    budget = token_budget_micro_batches([r.length for r in rollouts], 4096)
    fixed = fixed_count_micro_batches(len(rollouts), 8)
    assert padding_fraction(budget, rollouts) < 0.5 * padding_fraction(fixed, rollouts)


def test_collate_layout() -> None:
    rollouts = [_rollout(3, 5, 1), _rollout(6, 2, 2)]
    mb = collate(rollouts, pad_id=0)
    assert mb.input_ids.shape == (2, 6 + 5) and mb.prompt_width == 6
    # prompts are left-padded, responses right-padded
    assert mb.input_ids[0, 3:6].tolist() == rollouts[0].prompt_ids.tolist()
    assert mb.input_ids[0, 6:11].tolist() == rollouts[0].response_ids.tolist()
    assert mb.input_ids[1, 6:8].tolist() == rollouts[1].response_ids.tolist()
    assert mb.attention_mask[0].tolist() == [0, 0, 0] + [1] * 8
    assert mb.response_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # positions count real tokens only
    assert mb.position_ids[0, 3:].tolist() == list(range(8))


def test_pad_right() -> None:
    out = pad_right([np.array([1.0, 2.0]), torch.tensor([3.0]), np.array([])], 3, value=-1.0)
    assert out.tolist() == [[1.0, 2.0, -1.0], [3.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]
