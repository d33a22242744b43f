"""The learner's batch: built once from groups, token-budget packing, micro-batch views in the model's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.batch import RolloutBatch, fixed_count_micro_batches, token_budget_micro_batches
from shared.types import Lease, make_group


def _group(prompt_len: int, response_lens: list[int], seed: int = 0, correct: list[bool] | None = None):
    rng = np.random.default_rng(seed)
    responses = [(rng.integers(3, 50, n), -rng.random(n), 0) for n in response_lens]
    flags = correct if correct is not None else [i % 2 == 0 for i in range(len(response_lens))]
    return make_group(lease=Lease(seed, seed, "", "", "math", None, 0), actor_id=0,
                      prompt_token_ids=rng.integers(3, 50, prompt_len), responses=responses,
                      finish_reasons=["stop"] * len(response_lens), rewards=[1.0 if c else -1.0 for c in flags],
                      correct=flags)


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
    with pytest.raises(ValueError, match="budget"):
        token_budget_micro_batches([1], 0)


def test_budget_packing_pads_less_than_fixed_count_on_long_tail() -> None:
    rng = np.random.default_rng(1)
    lengths = [int(rng.integers(50, 100)) if rng.random() < 0.9 else int(rng.integers(500, 1000)) for _ in range(256)]
    batch = RolloutBatch.from_groups([_group(10, [n - 10], i) for i, n in enumerate(lengths)], pad_id=0)
    budget = token_budget_micro_batches(batch.lengths.tolist(), 4096)
    fixed = fixed_count_micro_batches(batch.num_responses, 8)
    real = int(batch.lengths.sum())
    assert 1 - real / batch.padded_cells(budget) < 0.5 * (1 - real / batch.padded_cells(fixed))


def test_the_batch_holds_every_response_of_its_groups_in_order() -> None:
    groups = [_group(3, [5, 0, 2], seed=1, correct=[True, False, False]), _group(6, [1, 4], seed=2)]
    batch = RolloutBatch.from_groups(groups, pad_id=0)
    assert batch.num_responses == 5
    assert batch.response_lengths.tolist() == [5, 0, 2, 1, 4] and batch.prompt_lengths.tolist() == [3, 3, 3, 6, 6]
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1]
    assert batch.correct.tolist() == [True, False, False, True, False]
    assert batch.scores.tolist() == [1.0, -1.0, -1.0, 1.0, -1.0] and batch.scores.dtype == torch.float64
    tokens, logprobs, _ = groups[1].response(1)
    assert batch.response_ids[4, :4].tolist() == tokens.tolist()
    assert torch.equal(batch.behavior_logprobs[4, :4], torch.as_tensor(logprobs))
    assert batch.prompt_ids[0, 3:].tolist() == groups[0].prompt_token_ids.tolist()  # left-aligned prompts
    assert batch.response_mask.tolist()[1] == [0.0] * 5


def test_a_micro_batch_is_the_model_layout_of_its_rows() -> None:
    groups = [_group(3, [5], seed=1), _group(6, [2], seed=2), _group(2, [1], seed=3)]
    batch = RolloutBatch.from_groups(groups, pad_id=0)
    mb = batch.micro_batch([0, 1])
    assert mb.input_ids.shape == (2, 6 + 5) and mb.prompt_width == 6
    assert mb.input_ids[0, 3:6].tolist() == groups[0].prompt_token_ids.tolist()
    assert mb.input_ids[0, 6:11].tolist() == groups[0].token_ids.tolist()
    assert mb.input_ids[1, 6:8].tolist() == groups[1].token_ids.tolist()
    assert mb.attention_mask[0].tolist() == [0, 0, 0] + [1] * 8
    assert mb.response_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert mb.position_ids[0, 3:].tolist() == list(range(8))  # positions count real tokens only
    narrow = batch.micro_batch([2])  # widths of its own rows, not the batch's
    assert narrow.input_ids.shape == (1, 2 + 1) and narrow.correct.tolist() == [True]


def test_written_fields_are_zero_past_each_response_and_sliced_into_micro_batches() -> None:
    batch = RolloutBatch.from_groups([_group(3, [5, 2], seed=1)], pad_id=0)
    batch.write("old_logprobs", [1, 0], torch.full((2, 5), -2.0, dtype=torch.float64))
    assert batch.results["old_logprobs"].dtype == torch.float32
    assert batch.results["old_logprobs"].tolist() == [[-2.0] * 5, [-2.0, -2.0, 0.0, 0.0, 0.0]]
    batch.write("advantages", slice(None), torch.ones(2, 5))
    mb = batch.micro_batch([1])
    assert set(mb.data) == {"old_logprobs", "advantages"}
    assert mb.data["advantages"].tolist() == [[1.0, 1.0]] and mb.weight == 1.0
    padding = batch.micro_batch(None)
    assert padding.weight == 0.0 and padding.input_ids.shape == (1, 2)
    assert padding.data["advantages"].tolist() == [[0.0]] and padding.correct.tolist() == [False]
    with pytest.raises(AssertionError):
        batch.write("not_a_field", [0], torch.zeros(1, 1))
