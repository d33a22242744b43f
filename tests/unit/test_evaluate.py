"""Held-out evaluation figures: average accuracy over k samples, pass@k, response length."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from actors.evaluate import score_samples
from shared.config import RewardConfig
from shared.data.records import PromptRecord


@dataclass
class Sample:
    """One response as the engine returns it (actors.engine.Sample, without importing vLLM)."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    text: str


def _sample(text: str, num_tokens: int) -> Sample:
    return Sample(np.arange(num_tokens, dtype=np.int32), np.zeros(num_tokens, np.float32), "stop", text)


def test_average_accuracy_pass_at_k_and_length() -> None:
    records = [PromptRecord("Compute 9 + 4.", "13", "arithmetic", 0),
               PromptRecord("Compute 2 * 3.", "6", "arithmetic", 1)]
    samples = [
        [_sample("9 + 4 = 13\nAnswer: 13", 10), _sample("Answer: 12", 4), _sample("no answer", 3),
         _sample("Answer: 13", 3)],
        [_sample("Answer: 5", 4)] * 4,
    ]
    result = score_samples(records, samples, RewardConfig())
    assert result.per_problem == (0.5, 0.0)
    assert result.accuracy == 0.25 and result.pass_at_k == 0.5 and result.k == 4 and result.num_problems == 2
    assert result.mean_response_tokens == pytest.approx((10 + 4 + 3 + 3 + 16) / 8)
    assert result.as_metrics()["eval/accuracy"] == 0.25


def test_the_overlong_penalty_does_not_change_correctness() -> None:
    records = [PromptRecord("Compute 9 + 4.", "13", "arithmetic", 0)]
    cfg = RewardConfig(overlong_penalty=True, overlong_max_len=8, overlong_cache_len=4)
    assert score_samples(records, [[_sample("Answer: 13", 8)]], cfg).accuracy == 1.0


def test_uneven_or_missing_groups_are_refused() -> None:
    records = [PromptRecord("Compute 9 + 4.", "13", "arithmetic", 0)] * 2
    with pytest.raises(ValueError, match="same k"):
        score_samples(records, [[_sample("Answer: 13", 3)], [_sample("a", 1)] * 2], RewardConfig())
    with pytest.raises(ValueError, match="same k"):
        score_samples(records, [[_sample("Answer: 13", 3)]], RewardConfig())
