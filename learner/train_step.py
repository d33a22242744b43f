"""One VAPO rollout step on the learner: proximal pass, advantages, mini-batch updates.

Owns: the `Learner` (policy, value model, optional reference policy, their AdamW optimisers
and learning-rate schedules) and the order of operations of a step, all on one
`learner.batch.RolloutBatch` built from this rank's groups:

1. proximal pass (no grad): `old_logprobs` and `values` (and `ref_logprobs` with a KL term) of
   every response with the current weights, micro-batched by a token budget, written into the
   batch;
2. advantages: token rewards (verifier score on the last token, plus the optional overlong
   punishment already in `score`), decoupled GAE — `returns` from lambda_critic, policy
   `advantages` from the per-sequence length-adaptive lambda_policy, both from the same old
   values — or group-normalised scores for the GRPO/DAPO baselines;
3. truncated IS weights `min(exp(old - behavior), cap)` against the actors' staleness;
4. mini-batch updates: clip-higher surrogate * IS weight, divided by the *global* count of
   valid tokens of the mini-batch (all micro-batches, all ranks: one all-reduce), plus
   mu * positive-example NLL divided by the global count of correct-response tokens, plus
   the value loss (same token normalisation); gradient clipping; AdamW.

Value pretraining: while `step < algo.value_pretrain_steps` only the critic trains, on
lambda = 1 (Monte-Carlo) returns, and the policy is untouched.

Ranks: each rank holds whole prompt groups (so group statistics stay local) and runs the same
number of micro-batches per mini-batch (FSDP collectives must match): a rank with fewer runs
zero-weighted padding micro-batches. Metrics are sums and counts all-reduced once per step
(`learner.dist`); statistics that need every rank's tokens (whitening, explained variance) are
computed from all-reduced moment sums by the same `learner.algo` functions the tests test.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from learner import dist
from learner.algo import advantages as adv_lib
from learner.algo import kl as kl_lib
from learner.algo import losses, staleness
from learner.algo import metrics as metrics_lib
from learner.algo.gae import gae, length_adaptive_lambda
from learner.algo.rewards import token_level_rewards
from learner.batch import RolloutBatch, fixed_count_micro_batches, token_budget_micro_batches
from learner.model import MicroBatch, policy_forward, value_forward
from shared.config import VapoConfig
from shared.types import RolloutGroup

LENGTH_BUCKETS = (64, 256, 1024, 4096, 16384)
MOMENTS = ("sum", "sq", "count")  # the parts of `metrics.moment_sums`

Sums = dict[str, torch.Tensor]
"""Named 0-dim float64 sums of one step, all-reduced together at its end."""


def _host(t: torch.Tensor) -> torch.Tensor:
    """A metric term as a float64 CPU tensor: the step's sums live on the host and are reduced over the
    learner's gloo control group (NCCL has no CPU tensors; a CUDA term cannot be added to a CPU sum)."""
    return t.detach().double().cpu()


class GlobalCounts(NamedTuple):
    """What a mini-batch's losses are divided by: counts over every rank (at least 1)."""

    tokens: float
    correct_tokens: float
    sequences: float


def lr_factor(warmup_steps: int, schedule: str, min_lr_ratio: float, progress: Callable[[], float]):
    """LambdaLR factor: linear warm-up over `warmup_steps` optimiser steps, times 1 (`constant`, VAPO's)
    or a cosine from 1 at progress 0 to `min_lr_ratio` at progress 1 (`cosine`). `progress()` is the
    share of the run's training steps done (read when the factor is computed), so the decay follows
    rollout steps whatever the number of mini-batches each has."""

    def factor(opt_step: int) -> float:
        warm = min(1.0, (opt_step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if schedule == "constant":
            return warm
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress(), 0.0), 1.0)))
        return warm * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)

    return factor


class Learner:
    """The learner's models and optimisers on one rank, and the step that trains them."""

    def __init__(
        self,
        cfg: VapoConfig,
        policy: nn.Module,
        value_model: nn.Module | None,
        ref_policy: nn.Module | None,
        *,
        pad_id: int,
        device: torch.device,
    ) -> None:
        self.cfg, self.policy, self.value_model, self.ref_policy = cfg, policy, value_model, ref_policy
        self.pad_id, self.device = pad_id, device
        lc = cfg.learner
        betas = (lc.adam_betas[0], lc.adam_betas[1])
        self.policy_opt = torch.optim.AdamW(
            policy.parameters(), lr=lc.actor_lr, betas=betas, weight_decay=lc.weight_decay
        )
        self.step = 0
        pretrain = cfg.algo.value_pretrain_steps
        self.policy_sched = torch.optim.lr_scheduler.LambdaLR(
            self.policy_opt,
            lr_factor(lc.warmup_steps, lc.lr_schedule, lc.min_lr_ratio,
                      lambda: (self.step - pretrain) / max(lc.total_steps - pretrain, 1)),
        )
        self.value_opt = self.value_sched = None
        if value_model is not None:
            self.value_opt = torch.optim.AdamW(
                value_model.parameters(), lr=lc.critic_lr, betas=betas, weight_decay=lc.weight_decay
            )
            self.value_sched = torch.optim.lr_scheduler.LambdaLR(
                self.value_opt,
                lr_factor(lc.warmup_steps, lc.lr_schedule, lc.min_lr_ratio, lambda: self.step / lc.total_steps),
            )
        self._rng = np.random.default_rng(cfg.seed)
        self._extremes: dict[str, float] = {}
        self._version: int | None = None  # of the weights the current step trains on (see train_step)
        # FSDP averages gradients over ranks; the losses are divided by global counts, so undo the mean
        self._grad_scale = float(dist.world_size())

    # ---- the step -------------------------------------------------------------------------

    def trains_policy(self) -> bool:
        """Whether the next step trains the policy (else it is value pretraining: the policy stays as it is)."""
        return not (self.cfg.algo.uses_critic and self.step < self.cfg.algo.value_pretrain_steps)

    def train_step(self, groups: Sequence[RolloutGroup], version: int | None = None) -> dict[str, float]:
        """Train on this rank's share (whole prompt groups) of one rollout step; returns globally reduced metrics.

        `version` (the same on every rank) is the policy version of the weights trained on; with it the step
        also reports `sync/logprob_abs_diff_lag0`, the mismatch of the actors' and the learner's log-probs on
        the tokens both computed with these same weights (responses generated at `version` throughout, so
        neither staleness nor a mid-response push is in it): a sync or numerics error, nothing else.
        """
        t0 = time.perf_counter()
        self._version = version
        value_only = not self.trains_policy()
        batch = RolloutBatch.from_groups(groups, self.pad_id)
        sums: Sums = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self._refresh_learning_rates()
        plan = self.prepare(batch, value_only, sums)
        num_mb = self._num_mini_batches(batch.num_responses)
        for _ in range(self.cfg.learner.ppo_epochs):
            for chunk in np.array_split(self._rng.permutation(batch.num_responses), num_mb):
                self.accumulate_gradients(batch, [int(i) for i in chunk], value_only, sums)
                self._optimizer_step(value_only, sums)
        self.step += 1
        self._rollout_sums(batch, plan, sums)
        return self._finish_metrics(sums, time.perf_counter() - t0, value_only)

    def _refresh_learning_rates(self) -> None:
        """Recompute each rate from its schedule at the start of a step: the schedulers last ran after
        the previous step's last update, when the step counter (the cosine's progress) was one lower."""
        for sched in (self.policy_sched, self.value_sched):
            if sched is not None:
                for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas,
                                               strict=True):
                    group["lr"] = base * factor(sched.last_epoch)

    def _micro_batches(self, batch: RolloutBatch, rows: Sequence[int]) -> list[list[int]]:
        """The micro-batch plan of `rows`: lists of batch rows, by token budget (or a fixed row count)."""
        rows = list(rows)
        fixed = self.cfg.learner.micro_batch_rows
        if fixed > 0:  # the padded baseline: fixed row count, arrival order
            plan = fixed_count_micro_batches(len(rows), fixed)
        else:
            plan = token_budget_micro_batches(batch.lengths[rows].tolist(), self.cfg.learner.micro_batch_tokens)
        return [[rows[j] for j in mb] for mb in plan]

    def _num_mini_batches(self, local: int) -> int:
        total = int(dist.all_reduce(torch.tensor(local, dtype=torch.long)).item())
        return max(1, math.ceil(total / self.cfg.learner.mini_batch_size))

    def _equalised(self, plan: list[list[int]]) -> list[list[int] | None]:
        """Pad the plan to the largest micro-batch count of any rank with `None` (zero-weighted)."""
        most = int(dist.all_reduce_max(torch.tensor(len(plan), dtype=torch.long)).item())
        return list(plan) + [None] * (most - len(plan))

    def prepare(self, batch: RolloutBatch, value_only: bool, sums: Sums | None = None) -> list[list[int]]:
        """Proximal pass and advantages: writes old_logprobs, values, ref_logprobs, returns, advantages and
        is_weights (those that apply to the configuration) into `batch`; returns the proximal pass's plan."""
        sums = sums if sums is not None else defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self._extremes = {}
        plan = self._micro_batches(batch, range(batch.num_responses))
        self._proximal_pass(batch, plan)
        if batch.num_responses:
            self._advantages(batch, value_only, sums)
        return plan

    @torch.no_grad()
    def _proximal_pass(self, batch: RolloutBatch, plan: list[list[int]]) -> None:
        """old_logprobs, values (critic) and ref_logprobs (KL) of every response, under the current weights."""
        temperature, chunk = self.cfg.rollout.temperature, self.cfg.learner.logprob_chunk_tokens
        for rows in self._equalised(plan):
            mb = batch.micro_batch(rows).to(self.device)
            results = {"old_logprobs": policy_forward(self.policy, mb, temperature=temperature, chunk_tokens=chunk)[0]}
            if self.value_model is not None:
                results["values"] = value_forward(self.value_model, mb)
            if self.ref_policy is not None:
                results["ref_logprobs"] = policy_forward(
                    self.ref_policy, mb, temperature=temperature, chunk_tokens=chunk
                )[0]
            if rows is not None:
                for key, values in results.items():
                    batch.write(key, rows, values)

    def _advantages(self, batch: RolloutBatch, value_only: bool, sums: Sums) -> None:
        """Write returns (critic), advantages and is_weights into `batch`."""
        algo = self.cfg.algo
        mask = batch.response_mask
        if algo.uses_critic:
            advantages = self._gae(batch, mask, value_only, sums)
        else:
            seq_adv = adv_lib.group_advantages(batch.scores, batch.group_ids, normalize_std=algo.group_norm_std)
            advantages = seq_adv[:, None] * mask
        if algo.whiten_advantages:  # over every rank's tokens
            advantages = adv_lib.whiten(advantages, mask, dist.all_reduce(metrics_lib.moment_sums(advantages, mask)))
        batch.write("advantages", slice(None), advantages)
        old, behavior = batch.results["old_logprobs"].double(), batch.behavior_logprobs.double()
        weights, is_metrics = staleness.truncated_is_weights(old, behavior, mask, algo.is_cap)
        batch.write("is_weights", slice(None), weights if algo.is_correction else torch.ones_like(weights))
        sums["is/weight_sum"] += is_metrics["is_weight_sum"]
        sums["is/clipped_count"] += is_metrics["is_clipped_sum"]
        self._extremes["is/weight_max"] = float(is_metrics["is_weight_max"])
        sums["sync/logprob_abs_diff_sum"] += ((old - behavior).abs() * mask).sum()
        if self._version is not None and batch.versions is not None:
            lag0 = (batch.versions == self._version).all(dim=1).double()[:, None] * mask
            sums["sync/lag0_abs_diff_sum"] += ((old - behavior).abs() * lag0).sum()
            sums["sync/lag0_tokens"] += lag0.sum()

    def _gae(self, batch: RolloutBatch, mask: torch.Tensor, value_only: bool, sums: Sums) -> torch.Tensor:
        """Decoupled, length-adaptive GAE from the old values: writes the critic's returns, returns the
        policy's advantages `[N, R]` float64."""
        algo = self.cfg.algo
        n, lengths = batch.num_responses, batch.response_lengths.double()
        values = batch.results["values"].double()
        rewards = token_level_rewards(batch.scores, mask)
        lam_policy = (
            length_adaptive_lambda(lengths, algo.alpha, algo.lambda_min)
            if algo.length_adaptive
            else torch.full((n,), algo.lambda_policy, dtype=torch.float64)
        )
        advantages, _ = gae(rewards, values, mask, algo.gamma, lam_policy)
        lam_critic = 1.0 if value_only else (algo.lambda_critic if algo.decoupled_gae else lam_policy)
        _, returns = gae(rewards, values, mask, algo.gamma, lam_critic)
        batch.write("returns", slice(None), returns)
        self._explained_variance_sums(values, returns * mask, mask, lengths, sums)
        sums["lambda_policy/sum"] += lam_policy.sum()
        sums["lambda_policy/count"] += n
        self._extremes["lambda_policy/min"] = min(self._extremes.get("lambda_policy/min", 1.0),
                                                  float(lam_policy.min()) if n else 1.0)
        return advantages * mask

    def accumulate_gradients(self, batch: RolloutBatch, chunk: list[int], value_only: bool, sums: Sums) -> None:
        """Zero the gradients, then back-propagate the mini-batch `chunk` (this rank's rows of it) through
        every trained model, each loss divided by its global count."""
        train_policy = not value_only
        lengths = batch.response_lengths[chunk].double()
        local = torch.stack([lengths.sum(), (lengths * batch.correct[chunk]).sum(),
                             torch.tensor(float(len(chunk)), dtype=torch.float64)])
        counts = GlobalCounts(*(max(float(x), 1.0) for x in dist.all_reduce(local)))
        if train_policy:
            self.policy_opt.zero_grad(set_to_none=True)
        if self.value_opt is not None:
            self.value_opt.zero_grad(set_to_none=True)
        for rows in self._equalised(self._micro_batches(batch, chunk)):
            mb = batch.micro_batch(rows).to(self.device)
            scale = mb.weight * self._grad_scale
            if train_policy:
                (self._policy_loss(mb, counts, sums) * scale).backward()
            if self.value_model is not None:
                v_sum, _ = losses.value_loss_sum(
                    value_forward(self.value_model, mb), mb.data["returns"], mb.response_mask,
                    old_values=mb.data["values"] if self.cfg.algo.value_clip is not None else None,
                    clip=self.cfg.algo.value_clip,
                )
                (v_sum / counts.tokens * scale).backward()
                sums["loss/value"] += _host(v_sum) * mb.weight / counts.tokens

    def _optimizer_step(self, value_only: bool, sums: Sums) -> None:
        if not value_only:
            sums["grad_norm/policy"] += self._clip_and_step(self.policy, self.policy_opt, self.policy_sched)
        if self.value_model is not None:
            sums["grad_norm/value"] += self._clip_and_step(self.value_model, self.value_opt, self.value_sched)
        sums["mini_batches"] += 1

    def _policy_loss(self, mb: MicroBatch, counts: GlobalCounts, sums: Sums) -> torch.Tensor:
        """The policy's loss on one micro-batch, already divided by the global counts."""
        algo = self.cfg.algo
        mask = mb.response_mask
        logprobs, entropy = policy_forward(
            self.policy, mb, temperature=self.cfg.rollout.temperature,
            chunk_tokens=self.cfg.learner.logprob_chunk_tokens, with_entropy=True, entropy_grad=algo.entropy_coef > 0,
        )
        per_token, pg_metrics = losses.policy_loss_per_token(
            logprobs, mb.data["old_logprobs"], mb.data["advantages"], mask, clip_low=algo.clip_low,
            clip_high=algo.clip_high, dual_clip=algo.dual_clip, is_weights=mb.data["is_weights"],
        )
        if algo.loss_agg == "sequence":  # vanilla PPO: per-sequence token mean, over the global sequence count
            loss = losses.sequence_mean_loss(per_token, mask)[0] / counts.sequences
        else:  # VAPO: token-level, over the global count of valid tokens of the mini-batch
            loss = per_token.sum() / counts.tokens
        sums["loss/policy"] += _host(loss)
        for key, value in pg_metrics.items():
            sums[f"pg/{key}"] += _host(value)
        assert mb.correct is not None and entropy is not None
        nll = losses.positive_nll_sum(logprobs, mask, mb.correct)[0] / counts.correct_tokens
        sums["loss/nll_pos"] += _host(nll)
        if algo.nll_coef > 0:
            loss = loss + algo.nll_coef * nll
        ent_sum = (entropy * mask).sum()
        sums["entropy_sum"] += _host(ent_sum)
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * ent_sum / counts.tokens
        if self.ref_policy is not None:
            kl = kl_lib.kl_penalty(logprobs, mb.data["ref_logprobs"], algo.kl_estimator, algo.kl_clamp)
            kl_sum = torch.where(mask > 0, kl, torch.zeros_like(kl)).sum()  # k3 can overflow on padding
            sums["loss/kl"] += _host(kl_sum / counts.tokens)
            loss = loss + algo.kl_coef * kl_sum / counts.tokens
        return loss

    def _clip_and_step(self, model: nn.Module, opt, sched) -> torch.Tensor:
        clip = self.cfg.learner.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        opt.step()
        sched.step()
        return _host(norm)

    # ---- metrics --------------------------------------------------------------------------

    def _rollout_sums(self, batch: RolloutBatch, plan: list[list[int]], sums: Sums) -> None:
        sums["rollout/count"] += batch.num_responses
        sums["rollout/score_sum"] += batch.scores.sum()
        sums["rollout/correct_sum"] += batch.correct.sum()
        sums["rollout/len_sum"] += batch.response_lengths.sum()
        sums["train/tokens"] += batch.lengths.sum()
        sums["train/response_tokens"] += batch.response_lengths.sum()
        sums["train/padded_cells"] += batch.padded_cells(plan)

    @staticmethod
    def _explained_variance_sums(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                                 lengths: torch.Tensor, sums: Sums) -> None:
        """Moment sums of the returns and of their errors, overall and per length bucket, from which the
        explained variance 1 - Var[G - V] / Var[G] is computed over every rank."""
        buckets = [("all", torch.ones_like(lengths, dtype=torch.bool))]
        lo = 0
        for hi in LENGTH_BUCKETS:
            buckets.append((f"len_le_{hi}", (lengths > lo) & (lengths <= hi)))
            lo = hi
        for name, rows in buckets:
            m = mask * rows[:, None].double()
            for key, t in (("g", returns), ("e", returns - values)):
                for part, s in zip(MOMENTS, metrics_lib.moment_sums(t, m), strict=True):
                    sums[f"ev/{name}/{key}_{part}"] += s

    def _finish_metrics(self, sums: Sums, seconds: float, value_only: bool) -> dict[str, float]:
        keys = sorted(sums)
        total = dict(zip(keys, dist.all_reduce(torch.stack([sums[k] for k in keys])).tolist(), strict=True))
        ext_keys = sorted(self._extremes)
        signs = [-1.0 if k.endswith("/min") else 1.0 for k in ext_keys]
        ext = torch.tensor([s * self._extremes[k] for s, k in zip(signs, ext_keys, strict=True)], dtype=torch.float64)
        ext = dist.all_reduce_max(ext).tolist()
        num_mb = max(total["mini_batches"] / dist.world_size(), 1.0)
        tokens = max(total["train/response_tokens"], 1.0)
        count = max(total["rollout/count"], 1.0)
        m: dict[str, float] = {k: total[k] / num_mb for k in keys if k.startswith("loss/")}
        m.update({k: total[k] / total["mini_batches"] for k in keys if k.startswith("grad_norm/")})
        m.update({k: s * v for k, s, v in zip(ext_keys, signs, ext, strict=True)})
        epochs_tokens = tokens * self.cfg.learner.ppo_epochs
        if not value_only:
            for key in ("clipfrac_high", "clipfrac_low", "approx_kl"):
                m[f"policy/{key}"] = total.get(f"pg/{key}_sum", 0.0) / epochs_tokens
            m["policy/entropy"] = total.get("entropy_sum", 0.0) / epochs_tokens
        for name in ["all"] + [f"len_le_{hi}" for hi in LENGTH_BUCKETS]:
            if total.get(f"ev/{name}/g_count", 0.0) > 1:
                g, e = (torch.tensor([total[f"ev/{name}/{key}_{part}"] for part in MOMENTS], dtype=torch.float64)
                        for key in "ge")
                key = "value/explained_var" if name == "all" else f"value/explained_var_{name}"
                m[key] = float(metrics_lib.explained_variance(g, e))
        if "lambda_policy/count" in total:
            m["lambda_policy/mean"] = total["lambda_policy/sum"] / max(total["lambda_policy/count"], 1.0)
        m["is/weight_mean"] = total["is/weight_sum"] / tokens
        m["is/clipped_frac"] = total["is/clipped_count"] / tokens
        m["sync/logprob_abs_diff_mean"] = total["sync/logprob_abs_diff_sum"] / tokens
        if total.get("sync/lag0_tokens", 0.0) > 0:
            m["sync/logprob_abs_diff_lag0"] = total["sync/lag0_abs_diff_sum"] / total["sync/lag0_tokens"]
            m["sync/lag0_token_frac"] = total["sync/lag0_tokens"] / tokens
        m["rollout/reward_mean"] = total["rollout/score_sum"] / count
        m["rollout/acc"] = total["rollout/correct_sum"] / count
        m["rollout/len_mean"] = total["rollout/len_sum"] / count
        m["train/padding_frac"] = 1.0 - total["train/tokens"] / max(total["train/padded_cells"], 1.0)
        m["perf/train_tokens_per_s"] = total["train/tokens"] * self.cfg.learner.ppo_epochs / max(seconds, 1e-9)
        m["train/value_only"] = float(value_only)
        return m
