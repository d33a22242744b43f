"""From leased prompts to rollout groups: prompt tokens, rewards, and the groups an actor submits.

Owns the per-round work around one `Engine.generate` call, apart from the engine and the
sockets, so it can be tested without either:
- `prompt_ids`: a lease becomes the text the engine continues (`shared.data.records.render_prompt`:
  the tokenizer's chat template when it has one, the plain prompt otherwise) and its tokens.
  Special tokens are added only without a chat template (a template writes its own). A prompt
  longer than `max_prompt_tokens` keeps its last tokens (the question's end and the template's
  generation prompt); the data loader should have rejected it, so this is counted and logged.
- `score_round`: the verifier's reward per response (`shared.reward.math_verifier.score`, whose math-verify
  runs in a killable child process with its own time limit, so a hostile answer cannot stall
  scoring for longer than `reward.timeout_s`), plus the DAPO overlong penalty when enabled;
  then one `RolloutGroup` per lease, yielded as soon as it is scored: the actor hands the
  generator to its pipelined submit, so a group travels to the queue while the next is scored.

Timing fields of a group: `gen_started_at` is when the round's generate call started;
`gen_seconds` is the group's share of that call, in proportion to its response tokens (the
prompts of a round are batched together, so only shares add up: over an actor's groups,
sum(tokens) / sum(gen_seconds) is its generation throughput, and `perf/gen_tokens_per_s`
over the run is the sum of that over actors); `reward_seconds` is the time spent scoring it.
Versions: in `between` mode every token of a round carries the version the actor's weights had
during it (`Round.version`). In `during` mode a push can land in the middle of a round and each
Sample brings its own `token_versions` ([T], non-decreasing, the first at least `Round.version`);
the group keeps them per token and its `policy_version` is the oldest (`shared.types.make_group`).

Must not import learner, deploy or vllm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shared.config import RewardConfig
from shared.data.records import PromptRecord, render_prompt
from shared.reward import math_verifier, shaping
from shared.types import FINISH_REASONS, Lease, RolloutGroup, make_group

log = logging.getLogger("vapo.actor")


class SampleLike(Protocol):
    """One sampled response as `actors.engine.Sample` holds it."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    text: str
    token_versions: np.ndarray | None
    """[T] the version that sampled each token, or None when all have the round's version."""


@dataclass
class Round:
    """One generate call: the leases, their prompt tokens, G samples per lease, and when and with what it ran."""

    leases: list[Lease]
    prompt_ids: list[list[int]]
    samples: Sequence[Sequence[SampleLike]]
    version: int
    """The version of the weights when the round started (every token's, unless its Sample says otherwise)."""
    started_at: float
    """Wall clock (seconds since the epoch) at the start of the generate call."""
    gen_seconds: float

    @property
    def num_tokens(self) -> int:
        """Response tokens of the whole round."""
        return sum(len(s.token_ids) for group in self.samples for s in group)


def prompt_ids(lease: Lease, tokenizer: Any, max_prompt_tokens: int) -> tuple[list[int], bool]:
    """The token ids the engine continues for `lease`, and whether they had to be cut to `max_prompt_tokens`."""
    record = PromptRecord(lease.prompt, lease.ground_truth, lease.data_source, lease.prompt_id, lease.messages)
    templated = bool(getattr(tokenizer, "chat_template", None))
    ids = list(tokenizer.encode(render_prompt(record, tokenizer), add_special_tokens=not templated))
    if not ids:
        raise ValueError(f"prompt {lease.prompt_id} has no tokens")
    if len(ids) > max_prompt_tokens:
        return ids[-max_prompt_tokens:], True
    return ids, False


def response_reward(text: str, num_tokens: int, ground_truth: str, cfg: RewardConfig) -> tuple[float, bool]:
    """(reward, correct) of one response: the verifier's score plus the overlong penalty when enabled."""
    result = math_verifier.score(text, ground_truth, correct_reward=cfg.correct, wrong_reward=cfg.wrong,
                          timeout_s=cfg.timeout_s)
    value = result.score
    if cfg.overlong_penalty:
        value += shaping.overlong_penalty(num_tokens, cfg.overlong_max_len, cfg.overlong_cache_len)
    return value, result.correct


def score_round(rnd: Round, cfg: RewardConfig, actor_id: int) -> Iterator[RolloutGroup]:
    """One group per lease of the round, rewards included, each yielded once scored (timing fields: module note)."""
    total = rnd.num_tokens
    for lease, ids, samples in zip(rnd.leases, rnd.prompt_ids, rnd.samples, strict=True):
        t0 = time.perf_counter()
        try:
            scored = [response_reward(s.text, len(s.token_ids), lease.ground_truth, cfg) for s in samples]
        except ValueError as e:  # a ground truth the verifier cannot use: bad data, not the model's fault
            log.warning("prompt %d: unusable ground truth (%s); every response scored wrong", lease.prompt_id, e)
            scored = [(cfg.wrong, False)] * len(samples)
        tokens = sum(len(s.token_ids) for s in samples)
        share = tokens / total if total else 1.0 / len(rnd.leases)
        for s in samples:
            assert s.finish_reason in FINISH_REASONS, f"unexpected finish reason {s.finish_reason!r}"
        yield make_group(
            lease=lease, actor_id=actor_id, prompt_token_ids=ids,
            responses=[(s.token_ids, s.logprobs, _versions(s, rnd.version)) for s in samples],
            finish_reasons=[s.finish_reason for s in samples],
            rewards=[r for r, _ in scored], correct=[c for _, c in scored],
            gen_started_at=rnd.started_at, gen_seconds=rnd.gen_seconds * share,
            reward_seconds=time.perf_counter() - t0)


def _versions(sample: SampleLike, version: int) -> np.ndarray | int:
    """The sample's per-token versions, checked against the round's start version; the start version without them."""
    if sample.token_versions is None:
        return version
    versions = sample.token_versions
    assert len(versions) == len(sample.token_ids), "one version per token"
    assert versions.size == 0 or (versions[0] >= version and np.all(np.diff(versions) >= 0)), (
        f"token versions must not go back and start at the round's version {version}; got {versions.tolist()}")
    return versions
