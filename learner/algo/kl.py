"""Per-token KL estimators between the current policy and a reference (optional KL penalty / loss).

With log-ratio x = logprobs - ref_logprobs on tokens sampled from the current policy:
k1 = x (unbiased, can be negative), k2 = x^2 / 2 (low variance, biased),
k3 = exp(-x) + x - 1 (unbiased for KL(current || ref) and >= 0; Schulman's "approximating KL").
`clamp` bounds the estimate to [-clamp, clamp] (verl's low_var_kl uses 10). Without it, k3
explodes on a rare token the policy has already pushed far below the reference: sampled by
chance at temperature 1 with log-prob -15 where the reference gives -5, it costs exp(10) ~ 22,000,
one such token in 12,000 lifts the batch mean above 1, and its gradient (clipped to the global
norm) is that whole update. Imports torch only.
"""

from __future__ import annotations

from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind, clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL estimate of `kind` (k1, k2 or k3), bounded to [-clamp, clamp] when `clamp` is given;
    logprobs, ref_logprobs [B, T] -> [B, T] (not masked). A clamped token contributes no gradient."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"shape mismatch: {tuple(logprobs.shape)} vs {tuple(ref_logprobs.shape)}")
    if clamp is not None and clamp <= 0:
        raise ValueError(f"KL clamp must be > 0 (or None); got {clamp}")
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    elif kind == "k3":
        kl = torch.exp(-log_ratio) + log_ratio - 1.0
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of 'k1', 'k2', 'k3'")
    return kl if clamp is None else kl.clamp(-clamp, clamp)
