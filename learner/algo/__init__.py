"""VAPO's algorithm core as pure functions over tensors: imports torch only (no distributed, no config).

- `gae`: blocked-scan GAE (scalar or per-sequence lambda) and length-adaptive lambda.
- `losses`: clipped surrogate (clip-higher, dual-clip, IS weights), value loss, positive-example NLL.
- `logprobs`: log-probs and entropies of the sampled tokens from hidden states, in chunks of tokens with
  the logits recomputed in the backward (memory O(chunk x vocabulary)).
- `advantages`: group-normalised advantages (GRPO / DAPO baselines) and masked whitening.
- `rewards`: token-level reward placement.
- `kl`: k1 / k2 / k3 KL estimators.
- `staleness`: truncated importance weights for stale actor samples.
- `metrics`: moment sums, and the explained variance computed from them.

Losses return sums and metrics return sums or counts; the train step divides by global counts (or
derives a statistic from all-reduced moment sums), so one rank and many give the same numbers.
"""
