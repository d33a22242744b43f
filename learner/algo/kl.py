"""Per-token KL estimators between the current policy and a reference (optional KL penalty / loss).

With log-ratio x = logprobs - ref_logprobs on tokens sampled from the current policy:
k1 = x (unbiased, can be negative), k2 = x^2 / 2 (low variance, biased),
k3 = exp(-x) + x - 1 (unbiased for KL(current || ref) and >= 0; Schulman's "approximating KL").
No clamping: k3 overflows to inf when ref_logprobs exceed logprobs by more than ~88 in float32;
clamp the result (verl uses [-10, 10]) where that matters. Imports torch only.
"""

from __future__ import annotations

from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind) -> torch.Tensor:
    """Per-token KL estimate of `kind` (k1, k2 or k3); logprobs, ref_logprobs [B, T] -> [B, T] (not masked)."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"shape mismatch: {tuple(logprobs.shape)} vs {tuple(ref_logprobs.shape)}")
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of 'k1', 'k2', 'k3'")
