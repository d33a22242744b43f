"""One VAPO rollout step on the learner: proximal pass, advantages, mini-batch updates.

Owns: the `Learner` (policy, value model, optional reference policy, their AdamW optimisers
and learning-rate schedules, the learner process group) and the order of operations of a step:

1. proximal pass (no grad): `old_logprobs` and `values` of every response with the current
   weights, micro-batched by a token budget;
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
zero-weighted padding micro-batches. Metrics are sums and counts all-reduced once per step.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from learner.algo import advantages as adv_lib
from learner.algo import kl as kl_lib
from learner.algo import losses, staleness
from learner.algo.gae import gae, length_adaptive_lambda
from learner.algo.rewards import token_level_rewards
from learner.batching import (
    Rollout,
    collate,
    fixed_count_micro_batches,
    pad_right,
    padded_cells,
    token_budget_micro_batches,
)
from learner.model import MicroBatch, policy_forward, value_forward
from shared.config import VapoConfig

LENGTH_BUCKETS = (64, 256, 1024, 4096, 16384)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


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
        # FSDP averages gradients over ranks; the losses are divided by global counts, so undo the mean
        self._grad_scale = float(dist.get_world_size()) if dist.is_initialized() else 1.0

    # ---- the step -------------------------------------------------------------------------

    def train_step(self, rollouts: Sequence[Rollout]) -> dict[str, float]:
        """Train on this rank's share of one rollout step; returns globally reduced metrics."""
        t0 = time.perf_counter()
        algo = self.cfg.algo
        value_only = algo.uses_critic and self.step < algo.value_pretrain_steps
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self._refresh_learning_rates()
        old = self.prepare(rollouts, value_only, sums)
        num_mb = self._num_mini_batches(len(rollouts))
        for _ in range(self.cfg.learner.ppo_epochs):
            for chunk in np.array_split(self._rng.permutation(len(rollouts)), num_mb):
                self.accumulate_gradients(rollouts, [int(i) for i in chunk], old, value_only, sums)
                self._optimizer_step(value_only, sums)
        self.step += 1
        self._rollout_sums(rollouts, sums)
        return self._finish_metrics(sums, time.perf_counter() - t0, value_only)

    def _refresh_learning_rates(self) -> None:
        """Recompute each rate from its schedule at the start of a step: the schedulers last ran after
        the previous step's last update, when the step counter (the cosine's progress) was one lower."""
        for sched in (self.policy_sched, self.value_sched):
            if sched is not None:
                for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas,
                                               strict=True):
                    group["lr"] = base * factor(sched.last_epoch)

    def _micro_batches(self, rollouts: Sequence[Rollout], indices: Sequence[int]) -> list[list[int]]:
        indices = list(indices)
        rows = self.cfg.learner.micro_batch_rows
        if rows > 0:  # the padded baseline: fixed row count, arrival order
            batches = fixed_count_micro_batches(len(indices), rows)
        else:
            lengths = [rollouts[i].length for i in indices]
            batches = token_budget_micro_batches(lengths, self.cfg.learner.micro_batch_tokens)
        return [[indices[j] for j in mb] for mb in batches]

    def _num_mini_batches(self, local: int) -> int:
        total = int(_all_reduce(torch.tensor(local, dtype=torch.long)).item())
        return max(1, math.ceil(total / self.cfg.learner.mini_batch_size))

    def _equalised(self, mbs: list[list[int]]) -> list[list[int] | None]:
        """Pad the micro-batch list to the largest count of any rank with `None` (zero-weighted)."""
        most = int(_all_reduce(torch.tensor(len(mbs), dtype=torch.long), dist.ReduceOp.MAX).item())
        return list(mbs) + [None] * (most - len(mbs))

    def _collate(self, rollouts: Sequence[Rollout], idx: list[int] | None) -> tuple[MicroBatch, float]:
        if idx is None:  # a padding micro-batch: one pad token of prompt and of response, weight 0
            dummy = Rollout(
                np.array([self.pad_id]), np.array([self.pad_id]), np.zeros(1, np.float32), 0.0, False, -1, 0
            )
            return collate([dummy], self.pad_id).to(self.device), 0.0
        return collate([rollouts[i] for i in idx], self.pad_id).to(self.device), 1.0

    def prepare(
        self, rollouts: Sequence[Rollout], value_only: bool, sums: dict[str, torch.Tensor] | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """Proximal pass and advantages: per rollout `[R_i]` float64 tensors keyed old_logprobs, values,
        ref_logprobs, returns, advantages, is_weights (those that apply to the configuration)."""
        sums = sums if sums is not None else defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self._extremes = {}
        old = self._proximal_pass(rollouts)
        if rollouts:
            self._advantages(rollouts, old, value_only, sums)
        return old

    @torch.no_grad()
    def _proximal_pass(self, rollouts: Sequence[Rollout]) -> dict[str, list[torch.Tensor]]:
        """Per rollout `[R_i]` tensors: old_logprobs, values (critic), ref_logprobs (KL)."""
        out: dict[str, list[torch.Tensor]] = {"old_logprobs": [torch.empty(0)] * len(rollouts)}
        if self.value_model is not None:
            out["values"] = [torch.empty(0)] * len(rollouts)
        if self.ref_policy is not None:
            out["ref_logprobs"] = [torch.empty(0)] * len(rollouts)
        temperature = self.cfg.rollout.temperature
        for idx in self._equalised(self._micro_batches(rollouts, range(len(rollouts)))):
            mb, _ = self._collate(rollouts, idx)
            results = {"old_logprobs": policy_forward(self.policy, mb, temperature=temperature)[0]}
            if self.value_model is not None:
                results["values"] = value_forward(self.value_model, mb)
            if self.ref_policy is not None:
                results["ref_logprobs"] = policy_forward(self.ref_policy, mb, temperature=temperature)[0]
            if idx is None:
                continue
            for key, t in results.items():
                for row, i in enumerate(idx):
                    out[key][i] = t[row, : len(rollouts[i].response_ids)].detach().double().cpu()
        return out

    def _advantages(
        self,
        rollouts: Sequence[Rollout],
        old: dict[str, list[torch.Tensor]],
        value_only: bool,
        sums: dict[str, torch.Tensor],
    ) -> None:
        """Fill old['advantages'], old['returns'], old['is_weights'] per rollout (float64 `[R_i]`)."""
        algo = self.cfg.algo
        n = len(rollouts)
        lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float64)
        width = max(int(lengths.max().item()) if n else 1, 1)
        mask = (torch.arange(width, dtype=torch.float64)[None] < lengths[:, None]).double()
        pad = lambda key: torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in old[key]])  # noqa: E731
        scores = torch.tensor([r.score for r in rollouts], dtype=torch.float64)
        if algo.uses_critic:
            values = pad("values")
            rewards = token_level_rewards(scores, mask)
            lam_policy = (
                length_adaptive_lambda(lengths, algo.alpha, algo.lambda_min)
                if algo.length_adaptive
                else torch.full((n,), algo.lambda_policy, dtype=torch.float64)
            )
            advantages, _ = gae(rewards, values, mask, algo.gamma, lam_policy)
            lam_critic = 1.0 if value_only else (algo.lambda_critic if algo.decoupled_gae else lam_policy)
            _, returns = gae(rewards, values, mask, algo.gamma, lam_critic)
            old["returns"] = [returns[i, : int(lengths[i])] for i in range(n)]
            self._explained_variance_sums(values, returns, mask, lengths, sums)
            sums["lambda_policy/sum"] += lam_policy.sum()
            sums["lambda_policy/count"] += n
            self._extremes["lambda_policy/min"] = min(
                self._extremes.get("lambda_policy/min", 1.0), float(lam_policy.min()) if n else 1.0
            )
        else:
            groups = torch.tensor([r.group for r in rollouts], dtype=torch.long)
            seq_adv = adv_lib.group_advantages(scores, groups, normalize_std=algo.group_norm_std)
            advantages = seq_adv[:, None] * mask
        if algo.whiten_advantages:
            stats = _all_reduce(torch.stack([(advantages * mask).sum(), (advantages**2 * mask).sum(), mask.sum()]))
            mean = stats[0] / stats[2].clamp(min=1)
            std = (stats[1] / stats[2].clamp(min=1) - mean**2).clamp(min=0).sqrt()
            advantages = (advantages - mean) / (std + 1e-8) * mask
        old["advantages"] = [advantages[i, : int(lengths[i])] for i in range(n)]
        behavior = torch.stack(
            [
                torch.nn.functional.pad(
                    torch.as_tensor(r.behavior_logprobs, dtype=torch.float64), (0, width - len(r.response_ids))
                )
                for r in rollouts
            ]
        )
        weights, is_metrics = staleness.truncated_is_weights(pad("old_logprobs"), behavior, mask, algo.is_cap)
        if not algo.is_correction:
            weights = torch.ones_like(weights)
        old["is_weights"] = [weights[i, : int(lengths[i])] for i in range(n)]
        sums["is/weight_sum"] += is_metrics["is_weight_sum"]
        sums["is/clipped_count"] += is_metrics["is_clipped_sum"]
        self._extremes["is/weight_max"] = float(is_metrics["is_weight_max"])
        sums["sync/logprob_abs_diff_sum"] += ((pad("old_logprobs") - behavior).abs() * mask).sum()

    def accumulate_gradients(
        self,
        rollouts: Sequence[Rollout],
        chunk: list[int],
        old: dict[str, list[torch.Tensor]],
        value_only: bool,
        sums: dict[str, torch.Tensor],
    ) -> None:
        """Zero the gradients, then back-propagate the mini-batch `chunk` (this rank's share) through
        every trained model, each loss divided by its global count."""
        algo = self.cfg.algo
        train_policy = not value_only
        lens = [len(rollouts[i].response_ids) for i in chunk]
        local = torch.tensor(
            [sum(lens), sum(n for n, i in zip(lens, chunk, strict=True) if rollouts[i].correct), len(chunk)],
            dtype=torch.float64,
        )
        num_tokens, num_correct_tokens, num_seqs = (float(x) for x in _all_reduce(local))
        token_denom = max(num_tokens, 1.0)
        if train_policy:
            self.policy_opt.zero_grad(set_to_none=True)
        if self.value_opt is not None:
            self.value_opt.zero_grad(set_to_none=True)
        for idx in self._equalised(self._micro_batches(rollouts, chunk)):
            mb, weight = self._collate(rollouts, idx)
            width = mb.response_mask.shape[1]
            mask = mb.response_mask

            def side(key: str, idx: list[int] | None = idx, width: int = width) -> torch.Tensor:
                if idx is None:
                    return torch.zeros((1, width), device=self.device)
                return pad_right([old[key][i] for i in idx], width).to(self.device)

            if train_policy:
                loss = self._policy_loss(mb, idx, rollouts, side, token_denom, num_seqs, num_correct_tokens, sums)
                (loss * (weight * self._grad_scale)).backward()
            if self.value_model is not None:
                values = value_forward(self.value_model, mb)
                old_values = side("values") if algo.value_clip is not None else None
                v_sum, v_metrics = losses.value_loss_sum(
                    values, side("returns"), mask, old_values=old_values, clip=algo.value_clip
                )
                (v_sum / token_denom * (weight * self._grad_scale)).backward()
                sums["loss/value"] += v_sum.detach().double() * weight / token_denom

    def _optimizer_step(self, value_only: bool, sums: dict[str, torch.Tensor]) -> None:
        if not value_only:
            sums["grad_norm/policy"] += self._clip_and_step(self.policy, self.policy_opt, self.policy_sched)
        if self.value_model is not None:
            sums["grad_norm/value"] += self._clip_and_step(self.value_model, self.value_opt, self.value_sched)
        sums["mini_batches"] += 1

    def _policy_loss(
        self,
        mb: MicroBatch,
        idx: list[int] | None,
        rollouts: Sequence[Rollout],
        side,
        token_denom: float,
        num_seqs: float,
        num_correct_tokens: float,
        sums: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The policy's loss on one micro-batch, already divided by the global counts."""
        algo = self.cfg.algo
        mask = mb.response_mask
        logprobs, entropy = policy_forward(
            self.policy,
            mb,
            temperature=self.cfg.rollout.temperature,
            with_entropy=True,
            entropy_grad=algo.entropy_coef > 0,
        )
        per_token, pg_metrics = losses.policy_loss_per_token(
            logprobs,
            side("old_logprobs"),
            side("advantages"),
            mask,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            dual_clip=algo.dual_clip,
            is_weights=side("is_weights"),
        )
        if algo.loss_agg == "sequence":  # vanilla PPO: per-sequence token mean, over the global sequence count
            pg_sum, _ = losses.sequence_mean_loss(per_token, mask)
            loss = pg_sum / max(num_seqs, 1.0)
        else:  # VAPO: token-level, over the global count of valid tokens of the mini-batch
            loss = per_token.sum() / token_denom
        sums["loss/policy"] += loss.detach().double()
        for key, value in pg_metrics.items():
            sums[f"pg/{key}"] += value.detach().double()
        correct = torch.tensor([rollouts[i].correct for i in idx] if idx else [False], device=mask.device)
        nll_sum, _ = losses.positive_nll_sum(logprobs, mask, correct)
        nll = nll_sum / max(num_correct_tokens, 1.0)
        sums["loss/nll_pos"] += nll.detach().double()
        if algo.nll_coef > 0:
            loss = loss + algo.nll_coef * nll
        assert entropy is not None
        ent_sum = (entropy * mask).sum()
        sums["entropy_sum"] += ent_sum.detach().double()
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * ent_sum / token_denom
        if self.ref_policy is not None:
            kl = kl_lib.kl_penalty(logprobs, side("ref_logprobs"), algo.kl_estimator, algo.kl_clamp)
            kl_sum = torch.where(mask > 0, kl, torch.zeros_like(kl)).sum()  # k3 can overflow on padding
            sums["loss/kl"] += (kl_sum / token_denom).detach().double()
            loss = loss + algo.kl_coef * kl_sum / token_denom
        return loss

    def _clip_and_step(self, model: nn.Module, opt, sched) -> torch.Tensor:
        clip = self.cfg.learner.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        opt.step()
        sched.step()
        return norm.detach().double().cpu()

    # ---- metrics --------------------------------------------------------------------------

    def _rollout_sums(self, rollouts: Sequence[Rollout], sums: dict[str, torch.Tensor]) -> None:
        sums["rollout/count"] += len(rollouts)
        sums["rollout/score_sum"] += sum(r.score for r in rollouts)
        sums["rollout/correct_sum"] += sum(r.correct for r in rollouts)
        sums["rollout/len_sum"] += sum(len(r.response_ids) for r in rollouts)
        sums["train/tokens"] += sum(r.length for r in rollouts)
        sums["train/response_tokens"] += sum(len(r.response_ids) for r in rollouts)
        sums["train/padded_cells"] += padded_cells(self._micro_batches(rollouts, range(len(rollouts))), rollouts)

    def _explained_variance_sums(
        self,
        values: torch.Tensor,
        returns: torch.Tensor,
        mask: torch.Tensor,
        lengths: torch.Tensor,
        sums: dict[str, torch.Tensor],
    ) -> None:
        """Sums from which explained variance 1 - Var[G - V] / Var[G] is computed globally, per length bucket."""
        buckets = [("all", torch.ones_like(lengths, dtype=torch.bool))]
        lo = 0
        for hi in LENGTH_BUCKETS:
            buckets.append((f"len_le_{hi}", (lengths > lo) & (lengths <= hi)))
            lo = hi
        err = returns - values
        for name, rows in buckets:
            m = mask * rows[:, None].double()
            for key, t in (("g", returns), ("g2", returns**2), ("e", err), ("e2", err**2)):
                sums[f"ev/{name}/{key}"] += (t * m).sum()
            sums[f"ev/{name}/n"] += m.sum()

    def _finish_metrics(self, sums: dict[str, torch.Tensor], seconds: float, value_only: bool) -> dict[str, float]:
        keys = sorted(sums)
        total = dict(zip(keys, _all_reduce(torch.stack([sums[k] for k in keys])).tolist(), strict=True))
        ext_keys = sorted(self._extremes)
        signs = [-1.0 if k.endswith("/min") else 1.0 for k in ext_keys]
        ext = torch.tensor([s * self._extremes[k] for s, k in zip(signs, ext_keys, strict=True)], dtype=torch.float64)
        ext = _all_reduce(ext, dist.ReduceOp.MAX).tolist()
        world = dist.get_world_size() if dist.is_initialized() else 1
        num_mb = max(total["mini_batches"] / world, 1.0)
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
            n = total.get(f"ev/{name}/n", 0.0)
            if n > 1:
                var_g = total[f"ev/{name}/g2"] / n - (total[f"ev/{name}/g"] / n) ** 2
                var_e = total[f"ev/{name}/e2"] / n - (total[f"ev/{name}/e"] / n) ** 2
                key = "value/explained_var" if name == "all" else f"value/explained_var_{name}"
                m[key] = 1.0 - var_e / var_g if var_g > 1e-12 else 0.0
        if "lambda_policy/count" in total:
            m["lambda_policy/mean"] = total["lambda_policy/sum"] / max(total["lambda_policy/count"], 1.0)
        m["is/weight_mean"] = total["is/weight_sum"] / tokens
        m["is/clipped_frac"] = total["is/clipped_count"] / tokens
        m["sync/logprob_abs_diff_mean"] = total["sync/logprob_abs_diff_sum"] / tokens
        m["rollout/reward_mean"] = total["rollout/score_sum"] / count
        m["rollout/acc"] = total["rollout/correct_sum"] / count
        m["rollout/len_mean"] = total["rollout/len_sum"] / count
        m["train/padding_frac"] = 1.0 - total["train/tokens"] / max(total["train/padded_cells"], 1.0)
        m["perf/train_tokens_per_s"] = total["train/tokens"] * self.cfg.learner.ppo_epochs / max(seconds, 1e-9)
        m["train/value_only"] = float(value_only)
        return m
