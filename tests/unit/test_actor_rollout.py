"""actors.rollout and the overlong penalty of shared.reward: prompt tokens, rewards and the groups an actor submits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from actors.rollout import Round, prompt_ids, response_reward, score_round
from shared.config import RewardConfig
from shared.reward.shaping import overlong_penalty
from shared.types import Lease


@dataclass
class FakeSample:
    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    text: str
    token_versions: np.ndarray | None = None


class CharTokenizer:
    """One token per character; optionally a chat template that wraps the user turn."""

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def _lease(i: int, prompt: str = "1+1?", truth: str = "2", messages=None) -> Lease:
    return Lease(lease_id=100 + i, prompt_id=i, prompt=prompt, ground_truth=truth, data_source="math",
                 messages=messages, policy_version=0)


def _sample(text: str, n: int, finish: str = "stop") -> FakeSample:
    return FakeSample(np.arange(n, dtype=np.int32), -np.linspace(0.1, 1.0, n).astype(np.float32), finish, text)


@pytest.mark.parametrize(
    "lengths, cache_len, expected",
    [([0, 100, 192, 193, 224, 256, 257, 1000], 64, [0.0, 0.0, 0.0, -1 / 64, -0.5, -1.0, -1.0, -1.0]),
     ([0, 100, 256, 257], 0, [0.0, 0.0, 0.0, -1.0])],
)
def test_overlong_penalty_piecewise(lengths: list[int], cache_len: int, expected: list[float]) -> None:
    got = [overlong_penalty(n, 256, cache_len) for n in lengths]
    assert got == pytest.approx(expected, abs=1e-12)


def test_overlong_penalty_shape() -> None:
    assert overlong_penalty(6, 10, 4) == 0.0 and overlong_penalty(8, 10, 4) == -0.5
    assert overlong_penalty(10, 10, 4) == -1.0 and overlong_penalty(11, 10, 4) == -1.0
    with pytest.raises(ValueError):
        overlong_penalty(3, 10, 11)


def test_plain_prompts_get_special_tokens_and_chat_templates_do_not() -> None:
    ids, cut = prompt_ids(_lease(0, "ab"), CharTokenizer(), 100)
    assert ids == [1, ord("a"), ord("b")] and not cut
    ids, cut = prompt_ids(_lease(0, "ab", messages=(("system", "s"), ("user", "ab"))), CharTokenizer("t"), 100)
    assert "".join(map(chr, ids)) == "<system>s<user>ab<assistant>" and not cut


def test_long_prompts_keep_their_end() -> None:
    ids, cut = prompt_ids(_lease(0, "x" * 20 + "question?"), CharTokenizer(), 9)
    assert cut and "".join(map(chr, ids)) == "question?"


def test_rewards_and_overlong_penalty() -> None:
    cfg = RewardConfig(correct=1.0, wrong=-1.0)
    assert response_reward("so\nAnswer: 2", 3, "2", cfg) == (1.0, True)
    assert response_reward("Answer: 3", 3, "2", cfg) == (-1.0, False)
    shaped = RewardConfig(correct=1.0, wrong=0.0, overlong_penalty=True, overlong_max_len=10, overlong_cache_len=4)
    assert response_reward("Answer: 2", 8, "2", shaped) == (0.5, True)
    assert response_reward("Answer: 5", 12, "2", shaped) == (-1.0, False)


def test_a_round_becomes_one_group_per_lease() -> None:
    leases = [_lease(0, truth="2"), _lease(1, truth="5")]
    samples = [[_sample("Answer: 2", 3), _sample("Answer: 4", 1, "length")],
               [_sample("Answer: 5", 4), _sample("", 0)]]
    rnd = Round(leases, [[1, 2], [3, 4, 5]], samples, version=6, started_at=1e9, gen_seconds=2.0)
    groups = list(score_round(rnd, RewardConfig(), actor_id=3))
    assert [g.lease_id for g in groups] == [100, 101] and [g.actor_id for g in groups] == [3, 3]
    a, b = groups
    assert a.rewards.tolist() == [1.0, -1.0] and a.correct.tolist() == [True, False]
    assert b.rewards.tolist() == [1.0, -1.0] and b.correct.tolist() == [True, False]
    assert a.response_lengths.tolist() == [3, 1] and b.response_lengths.tolist() == [4, 0]
    assert a.finish_reasons == ["stop", "length"] and a.prompt_token_ids.tolist() == [1, 2]
    assert np.array_equal(a.response(0)[1], samples[0][0].logprobs)
    assert a.policy_version == b.policy_version == 6 and set(a.token_versions.tolist()) == {6}
    # generation time is shared by tokens, so the shares add up to the round's time
    assert a.gen_seconds == pytest.approx(2.0 * 4 / 8) and b.gen_seconds == pytest.approx(2.0 * 4 / 8)
    assert a.gen_started_at == b.gen_started_at == 1e9 and a.reward_seconds >= 0


def test_a_ground_truth_the_verifier_cannot_use_scores_wrong() -> None:
    rnd = Round([_lease(0, truth="$$")], [[1]], [[_sample("Answer: 2", 2)]], 0, 0.0, 1.0)
    (group,) = score_round(rnd, RewardConfig(correct=1.0, wrong=-0.5), actor_id=0)
    assert group.rewards.tolist() == [-0.5] and group.correct.tolist() == [False]


def test_tokens_sampled_after_a_mid_round_push_keep_their_versions() -> None:
    switched = _sample("Answer: 2", 5)
    switched.token_versions = np.array([4, 4, 5, 5, 5], np.int32)
    later = _sample("Answer: 3", 3)
    later.token_versions = np.array([5, 5, 5], np.int32)  # started after the push (it waited for a slot)
    plain = _sample("Answer: 2", 2)  # no per-token versions: the round's version
    rnd = Round([_lease(0), _lease(1)], [[1], [2]], [[switched, later], [plain]], 4, 0.0, 1.0)
    a, b = score_round(rnd, RewardConfig(), actor_id=0)
    assert a.token_versions.tolist() == [4, 4, 5, 5, 5, 5, 5, 5] and a.policy_version == 4
    assert a.response(0)[2].tolist() == [4, 4, 5, 5, 5] and a.response(1)[2].tolist() == [5, 5, 5]
    assert np.array_equal(a.response(0)[1], switched.logprobs)
    assert b.token_versions.tolist() == [4, 4] and b.policy_version == 4
    only_new = Round([_lease(0)], [[1]], [[later]], 4, 0.0, 1.0)
    assert next(score_round(only_new, RewardConfig(), actor_id=0)).policy_version == 5  # the oldest token's version


@pytest.mark.parametrize("versions", [[5, 4, 5], [3, 4, 4], [4, 4]])
def test_token_versions_that_go_back_precede_the_round_or_miscount_are_refused(versions: list[int]) -> None:
    sample = _sample("Answer: 2", 3)
    sample.token_versions = np.array(versions, np.int32)
    with pytest.raises(AssertionError):
        list(score_round(Round([_lease(0)], [[1]], [[sample]], 4, 0.0, 1.0), RewardConfig(), actor_id=0))


def test_each_group_is_handed_out_before_the_next_is_scored() -> None:
    bad = _sample("Answer: 2", 3)
    bad.token_versions = np.array([3, 4, 4], np.int32)  # precedes the round: refused when its group is made
    rnd = Round([_lease(0), _lease(1)], [[1], [2]], [[_sample("Answer: 2", 2)], [bad]], 4, 0.0, 1.0)
    groups = score_round(rnd, RewardConfig(), actor_id=0)
    assert next(groups).lease_id == 100  # the submit can send it while the next one is scored
    with pytest.raises(AssertionError):
        next(groups)
