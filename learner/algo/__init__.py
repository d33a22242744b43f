"""VAPO's algorithm core as pure functions over tensors: imports torch only (no distributed, no config).

- `gae`: blocked-scan GAE (scalar or per-sequence lambda) and length-adaptive lambda.
- `losses`: clipped surrogate (clip-higher, dual-clip, IS weights), value loss, positive-example NLL, entropy.
- `advantages`: group-normalised advantages (GRPO / DAPO baselines) and masked whitening.
- `filters`: DAPO dynamic-sampling group filter.
- `rewards`: token-level reward placement and DAPO soft overlong punishment.
- `kl`: k1 / k2 / k3 KL estimators.
- `staleness`: truncated importance weights for stale actor samples.
- `metrics`: masked reductions and explained variance.

Losses return sums and metrics return sums or counts; the train step divides by global counts.
"""
