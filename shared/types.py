"""The data that crosses process boundaries: prompt leases, rollout groups, queue counters.

Owns the in-memory shape of every message; `shared/wire.py` owns their bytes. Pure: numpy
only, no zmq, no torch.

Design notes:
- A `RolloutGroup` keeps its G responses concatenated: one flat int32 `token_ids` array, one
  float32 `behavior_logprobs` array and one int32 `token_versions` array, all of length N (the
  total response tokens), plus `offsets` [G + 1] marking where each response starts. Three
  large arrays travel as three raw frames instead of 3 G small ones, and the learner can pack
  micro-batches straight from the flat arrays.
- `token_versions` carries the policy version that sampled each token, so a weight update in
  the middle of a generation is represented exactly. The group's `policy_version` is the
  oldest of them (the version the actor's weights had when it started the group); the
  staleness gate uses it, so a group's `version_lag` is that of its oldest token and the
  bound `max_staleness` holds for every token.
- Arrays decoded from the wire are read-only views of the received frames (no copy); call
  `.copy()` before writing into them.
- `QueueStats` is the accounting of the replay queue. Every lease ends in exactly one bucket:
  `leased = consumed + dropped_stale + filtered + rejected_late + expired_and_reissued
  + in_flight + queued` at every moment. `expired_and_reissued` holds leases that timed out
  and whose result never came; when a late result does come it is discarded and the lease
  moves to `rejected_late`, so `num_expired = expired_and_reissued + rejected_late` is the
  monotone count of timeouts. A timed-out or stale-dropped prompt is leased again under a
  new lease id (which counts again in `leased`), so no prompt is skipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 2  # 2: versions come with the version whose weights they are (weights_version)
FINISH_REASONS = ("stop", "length")
TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")
VERSION_DTYPE = np.dtype("<i4")
LEASE_REASONS = ("", "paused", "stopping", "capacity", "stale_weights", "memory", "exhausted", "replaced")


@dataclass(frozen=True)
class Lease:
    """One prompt leased to an actor; a result is accepted only for a lease that is still live."""

    lease_id: int
    prompt_id: int
    prompt: str
    ground_truth: str
    data_source: str
    messages: tuple[tuple[str, str], ...] | None
    policy_version: int
    """The learner's version when the lease was granted."""


@dataclass
class RolloutGroup:
    """The G responses an actor sampled for one leased prompt, with their rewards.

    `token_ids`, `behavior_logprobs`, `token_versions`: [N], the responses concatenated;
    response i is `[offsets[i], offsets[i + 1])`. `rewards`, `correct`: [G].
    """

    lease_id: int
    prompt_id: int
    prompt_token_ids: np.ndarray
    """[P] int32."""
    ground_truth: str
    data_source: str
    actor_id: int
    policy_version: int
    """Oldest policy version of any token of the group (the actor's version when it started)."""
    token_ids: np.ndarray
    behavior_logprobs: np.ndarray
    token_versions: np.ndarray
    offsets: np.ndarray
    """[G + 1] int64, offsets[0] == 0 and offsets[G] == N."""
    finish_reasons: list[str]
    rewards: np.ndarray
    """[G] float32."""
    correct: np.ndarray
    """[G] bool."""
    gen_started_at: float
    """Wall-clock time (seconds since the epoch) when the actor started generating the group."""
    gen_seconds: float
    """Time spent generating the group."""
    reward_seconds: float
    """Time spent scoring the group."""

    @property
    def num_responses(self) -> int:
        """G."""
        return len(self.offsets) - 1

    @property
    def response_lengths(self) -> np.ndarray:
        """[G] tokens per response."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        """N, the response tokens of the whole group."""
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what dominates the message size)."""
        arrays = (self.prompt_token_ids, self.token_ids, self.behavior_logprobs, self.token_versions, self.offsets)
        return sum(int(a.nbytes) for a in arrays)

    def response(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token_ids, behavior_logprobs, token_versions) of response i, as views."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.token_ids[lo:hi], self.behavior_logprobs[lo:hi], self.token_versions[lo:hi]


def make_group(
    *,
    lease: Lease,
    actor_id: int,
    prompt_token_ids: np.ndarray | list[int],
    responses: list[tuple[np.ndarray, np.ndarray, np.ndarray | int]],
    finish_reasons: list[str],
    rewards: list[float] | np.ndarray,
    correct: list[bool] | np.ndarray,
    gen_started_at: float = 0.0,
    gen_seconds: float = 0.0,
    reward_seconds: float = 0.0,
) -> RolloutGroup:
    """Build a group from per-response (token_ids [T_i], behavior_logprobs [T_i], versions [T_i] or one int).

    A single int as versions means every token of that response was sampled by that version.
    """
    if not responses:
        raise ValueError("a group needs at least one response")
    tokens, logprobs, versions = [], [], []
    for toks, lps, ver in responses:
        toks = np.asarray(toks, dtype=TOKEN_DTYPE).reshape(-1)
        tokens.append(toks)
        logprobs.append(np.asarray(lps, dtype=LOGPROB_DTYPE).reshape(-1))
        versions.append(np.full(len(toks), ver, VERSION_DTYPE) if isinstance(ver, int | np.integer)
                        else np.asarray(ver, dtype=VERSION_DTYPE).reshape(-1))
    token_versions = np.concatenate(versions)
    oldest = [int(v) for _, _, v in responses if isinstance(v, int | np.integer)]
    if token_versions.size:
        oldest.append(int(token_versions.min()))
    offsets = np.zeros(len(responses) + 1, np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    return RolloutGroup(
        lease_id=lease.lease_id,
        prompt_id=lease.prompt_id,
        prompt_token_ids=np.asarray(prompt_token_ids, dtype=TOKEN_DTYPE).reshape(-1),
        ground_truth=lease.ground_truth,
        data_source=lease.data_source,
        actor_id=actor_id,
        policy_version=min(oldest) if oldest else lease.policy_version,
        token_ids=np.concatenate(tokens),
        behavior_logprobs=np.concatenate(logprobs),
        token_versions=token_versions,
        offsets=offsets,
        finish_reasons=list(finish_reasons),
        rewards=np.asarray(rewards, dtype=np.float32).reshape(-1),
        correct=np.asarray(correct, dtype=bool).reshape(-1),
        gen_started_at=float(gen_started_at),
        gen_seconds=float(gen_seconds),
        reward_seconds=float(reward_seconds),
    )


@dataclass
class LeaseReply:
    """The queue's answer to a lease request: leases, or none and when to ask again."""

    leases: list[Lease]
    retry_after_s: float
    reason: str
    """Why fewer leases than asked were granted ('' when all were); one of LEASE_REASONS."""
    version: int
    """The learner's current policy version."""
    weights_version: int = 0
    """The oldest version with the same weights as `version` (value pretraining keeps the policy unchanged)."""


@dataclass
class QueueStats:
    """Counters of the replay queue, in prompts (= groups); see the module docstring for the identity."""

    leased: int = 0
    consumed: int = 0
    dropped_stale: int = 0
    filtered: int = 0
    rejected_late: int = 0
    expired_and_reissued: int = 0
    in_flight: int = 0
    queued: int = 0
    queued_bytes: int = 0
    duplicates: int = 0
    """Results that arrived twice for the same lease (a retried submit); discarded."""
    batches: int = 0
    short_batches: int = 0
    """Batches handed out with fewer groups than asked (dynamic-sampling rounds exhausted, or no progress possible)."""
    version: int = 0
    num_actors: int = 0
    version_lag_sum: int = 0
    """Sum over consumed groups of their version lag (mean = version_lag_sum / consumed)."""
    version_lag_max: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    """Messages rejected, by reason (malformed, unauthenticated, too_large, unknown_lease, wrong_actor, ...)."""
    cursor: dict = field(default_factory=dict)
    """Where the prompt stream stands: checkpoint it; `serve(..., cursor=...)` resumes from it."""

    @property
    def num_expired(self) -> int:
        """Leases that timed out so far (their prompts were leased again)."""
        return self.expired_and_reissued + self.rejected_late

    def identity_holds(self) -> bool:
        """leased = consumed + dropped_stale + filtered + rejected_late + expired_and_reissued + in_flight + queued."""
        ended = self.consumed + self.dropped_stale + self.filtered + self.rejected_late + self.expired_and_reissued
        return self.leased == ended + self.in_flight + self.queued

    def metrics(self) -> dict[str, float]:
        """Flat metric keys for logging (`queue/...`, `async/dropped_stale`)."""
        out: dict[str, float] = {
            f"queue/{f.name}": float(getattr(self, f.name))
            for f in dataclasses.fields(self) if f.name not in ("rejected", "cursor", "version_lag_sum")
        }
        out["async/dropped_stale"] = float(self.dropped_stale)
        # Run-wide lag; the per-step `async/version_lag_*` of DESIGN.md are the learner's, of each batch.
        out["queue/version_lag_mean"] = self.version_lag_sum / self.consumed if self.consumed else 0.0
        out["queue/rejected"] = float(sum(self.rejected.values()))
        out.update({f"queue/rejected_{k}": float(v) for k, v in self.rejected.items()})
        return out
