"""One rollout step's responses on one rank, as one batch from the groups to the loss.

Owns `RolloutBatch`, built once from this rank's prompt groups, and the micro-batch plans and
views the train step takes from it:

- the inputs are padded once: prompts LEFT-aligned in `[N, P]`, responses and every per-token
  tensor RIGHT-padded in `[N, R]` (response-aligned: column j is response token j), P and R the
  longest of the rank's step;
- the step writes its per-token results into the same batch (`old_logprobs`, `values`,
  `ref_logprobs` from the proximal pass; `returns`, `advantages`, `is_weights` from the advantage
  step), zero beyond each response's length;
- a micro-batch is a list of row indices; `micro_batch(rows)` cuts the model inputs (the
  `MicroBatch` layout of `learner.model`) and `side(key, rows)` the matching `[b, R_mb]` slice of a
  per-token field, so no per-token data lives outside the batch.

Why padded and not packed: GAE scans `[B, T]` rows, and slicing a padded tensor is a view. The
cost is host memory of N x R_max per field (float32; per-token results are computed in float64
and stored once); responses within one rank's step are of similar length after token-budget
packing, and the step's whole batch lives on the host, never on the device.

Token-budget packing (`token_budget_micro_batches`): sorting by length and filling rows while
`rows * padded_length <= budget` keeps padding small and the memory of a micro-batch bounded,
where a fixed number of rows per micro-batch pads every short response up to the longest one
beside it. `bench/learner.py` measures the difference.

No torch.distributed here: the train step equalises micro-batch counts across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from learner.model import MicroBatch
from shared.types import RolloutGroup

RESULT_FIELDS = ("old_logprobs", "values", "ref_logprobs", "returns", "advantages", "is_weights")
"""Per-token `[N, R]` fields the train step writes into the batch."""


@dataclass
class RolloutBatch:
    """N responses (this rank's share of one rollout step) with their prompts; see the module docstring."""

    prompt_ids: torch.Tensor
    """[N, P] long, each prompt in the last `prompt_lengths[i]` columns, `pad_id` before it."""
    prompt_lengths: torch.Tensor
    """[N] long."""
    response_ids: torch.Tensor
    """[N, R] long, each response in the first `response_lengths[i]` columns, `pad_id` after it."""
    response_lengths: torch.Tensor
    """[N] long."""
    behavior_logprobs: torch.Tensor
    """[N, R] float32: log-probs of the sampled tokens under the actor's weights, 0 on padding."""
    scores: torch.Tensor
    """[N] float64: reward of each response (verifier plus any shaping), placed on its last token."""
    correct: torch.Tensor
    """[N] bool: whether the verifier judged the response correct (the positive-example NLL term)."""
    group_ids: torch.Tensor
    """[N] long: index of the response's prompt group in the step (group-normalised baselines)."""
    pad_id: int
    versions: torch.Tensor | None = None
    """[N, 2] long: the oldest and the newest policy version among each response's tokens (they differ
    when a push landed mid-response; an empty response has its group's version)."""
    results: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-token `[N, R]` float32 results of the step, keyed by a name of RESULT_FIELDS."""

    @classmethod
    def from_groups(cls, groups: Sequence[RolloutGroup], pad_id: int) -> RolloutBatch:
        """Every response of `groups`, in order; group k of the sequence gets group id k."""
        prompts, responses, logprobs, scores, correct, group_ids, versions = [], [], [], [], [], [], []
        for k, group in enumerate(groups):
            for i in range(group.num_responses):
                tokens, lps, token_versions = group.response(i)
                versions.append((int(token_versions.min()), int(token_versions.max())) if len(token_versions)
                                else (group.policy_version, group.policy_version))
                prompts.append(group.prompt_token_ids)
                responses.append(tokens)
                logprobs.append(lps)
                scores.append(float(group.rewards[i]))
                correct.append(bool(group.correct[i]))
                group_ids.append(k)
        prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        response_lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
        return cls(
            prompt_ids=_pad(prompts, prompt_lengths, pad_id, torch.long, left=True),
            prompt_lengths=prompt_lengths,
            response_ids=_pad(responses, response_lengths, pad_id, torch.long),
            response_lengths=response_lengths,
            behavior_logprobs=_pad(logprobs, response_lengths, 0, torch.float32),
            scores=torch.tensor(scores, dtype=torch.float64),
            correct=torch.tensor(correct, dtype=torch.bool),
            group_ids=torch.tensor(group_ids, dtype=torch.long),
            pad_id=pad_id,
            versions=torch.tensor(versions, dtype=torch.long).reshape(-1, 2),
        )

    @property
    def num_responses(self) -> int:
        return int(self.response_lengths.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """[N] prompt plus response tokens of each row (what a micro-batch's token budget counts)."""
        return self.prompt_lengths + self.response_lengths

    @property
    def response_mask(self) -> torch.Tensor:
        """[N, R] float64, 1 on response tokens."""
        width = self.response_ids.shape[1]
        return (torch.arange(width)[None] < self.response_lengths[:, None]).double()

    def write(self, key: str, rows: Sequence[int] | slice, values: torch.Tensor) -> None:
        """Store `values` `[len(rows), w]` (w <= R) as field `key` of `rows`; positions past each row's
        response are set to 0, whatever `values` holds there."""
        assert key in RESULT_FIELDS, key
        if key not in self.results:
            self.results[key] = torch.zeros(self.response_ids.shape, dtype=torch.float32)
        width = values.shape[1]
        index = torch.arange(self.num_responses)[rows]
        mask = torch.arange(width)[None] < self.response_lengths[index][:, None]
        self.results[key][index, :width] = torch.where(mask, values.detach().cpu(), 0.0).float()

    def micro_batch(self, rows: Sequence[int] | None) -> MicroBatch:
        """The model inputs of `rows` (`[b, P_mb + R_mb]`, widths of the longest prompt and response among
        them) with their slices of every per-token field written so far; rows None: a padding micro-batch
        (one pad token of prompt and of response, zero fields, weight 0)."""
        if rows is None:
            pad = torch.full((1, 1), self.pad_id, dtype=torch.long)
            one = torch.ones(1, dtype=torch.long)
            mb = _micro_batch(pad, one, pad, one)
            mb.data = {key: torch.zeros((1, 1)) for key in self.results}
            mb.correct, mb.weight = torch.zeros(1, dtype=torch.bool), 0.0
            return mb
        index = list(rows)
        assert index, "a micro-batch needs at least one row"
        p_len, r_len = self.prompt_lengths[index], self.response_lengths[index]
        p, r = int(p_len.max()), max(int(r_len.max()), 1)
        mb = _micro_batch(self.prompt_ids[index, self.prompt_ids.shape[1] - p :], p_len, self.response_ids[index, :r],
                          r_len)
        mb.data = {key: values[index, :r] for key, values in self.results.items()}
        mb.correct = self.correct[index]
        return mb

    def padded_cells(self, plan: Sequence[Sequence[int]]) -> int:
        """Cells of the `[b, P + R]` inputs of the micro-batches of `plan`."""
        cells = 0
        for rows in plan:
            index = list(rows)
            p = int(self.prompt_lengths[index].max())
            r = max(int(self.response_lengths[index].max()), 1)
            cells += len(index) * (p + r)
        return cells


def _pad(rows: Sequence[np.ndarray], lengths: torch.Tensor, value: float, dtype: torch.dtype,
         left: bool = False) -> torch.Tensor:
    """`[len(rows), max(lengths, 1)]`: each row at the left (or right) end, `value` around it."""
    width = max(int(lengths.max()) if len(rows) else 0, 1)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        n = len(row)
        if n:
            target = out[i, width - n :] if left else out[i, :n]
            target.copy_(torch.as_tensor(np.asarray(row), dtype=dtype))
    return out


def _micro_batch(prompts: torch.Tensor, prompt_lengths: torch.Tensor, responses: torch.Tensor,
                 response_lengths: torch.Tensor) -> MicroBatch:
    """`MicroBatch` of left-aligned prompts `[b, P]` and right-padded responses `[b, R]`."""
    p, r = prompts.shape[1], responses.shape[1]
    columns = torch.arange(p + r)[None]
    attention = (columns >= p - prompt_lengths[:, None]) & (columns < p + response_lengths[:, None])
    response_mask = (torch.arange(r)[None] < response_lengths[:, None]).float()
    return MicroBatch(torch.cat([prompts, responses], dim=1), attention.long(), response_mask, p)


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
