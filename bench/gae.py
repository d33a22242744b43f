"""Benchmark: blocked-scan `gae` against the step-per-token loop, measured side by side in one run.

Workload: B = 512 responses, T = 16384, float32, random lengths in [1, T] (right padding), a
+-1 score on each last token, random values, per-sequence length-adaptive lambda (alpha 0.05),
gamma = 1. The reference is the loop everyone writes first (verl's `compute_gae_advantage_return`
style): one Python step per token, vectorised over the batch. Both results are compared, then the
last line printed is `gae speedup vs loop: X` (reference time / gae time, best of the repeats).

    python bench/gae.py              # the comparison, torch's default thread count
    python bench/gae.py --threads 1  # the same on one thread (steadier on a busy machine)
    python bench/gae.py --large      # first one gae call at B = 8192, T = 20480 (time, added peak RSS)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where a module such as bench/queue.py would
# shadow the standard library; the repository root goes there instead, so `learner` imports too.
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from learner.algo.gae import gae, length_adaptive_lambda  # noqa: E402
from learner.algo.rewards import token_level_rewards  # noqa: E402


def loop_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one step per token, vectorised over the batch; inputs [B, T], lam [B]."""
    m = mask.to(values.dtype)
    lam = lam.to(values.dtype)
    next_value = torch.zeros(values.shape[0], dtype=values.dtype)
    last = torch.zeros_like(next_value)
    reversed_adv = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        next_value = values[:, t] * m[:, t]
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, (advantages + values) * m


def make_batch(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Rewards, values, mask [B, T] float32/bool and length-adaptive lambda [B]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    scores = torch.randint(0, 2, (batch,), generator=g).float() * 2 - 1
    rewards = token_level_rewards(scores, mask)
    values = torch.randn(batch, length, generator=g) * 0.5
    lam = length_adaptive_lambda(lengths, alpha=0.05).float()
    return rewards, values, mask, lam


def best_time(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls, seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _rss_gib(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process from /proc, GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_large() -> None:
    """One call at B = 8192, T = 20480 in float32; prints its time and the memory it added (Linux /proc)."""
    rewards, values, mask, lam = make_batch(8192, 20480, seed=1)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    before = _rss_gib("VmRSS")
    start = time.perf_counter()
    advantages, returns = gae(rewards, values, mask, 1.0, lam)
    seconds = time.perf_counter() - start
    peak = _rss_gib("VmHWM")
    print(
        f"large B=8192 T=20480 float32: gae {seconds:.2f} s, RSS {before:.2f} GiB before, peak {peak:.2f} GiB "
        f"(+{peak - before:.2f} GiB, of which the two outputs are {2 * advantages.nbytes / 2**30:.2f} GiB)"
    )
    assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5, help="gae repeats (the loop runs twice)")
    parser.add_argument("--large", action="store_true", help="also time one call at B = 8192, T = 20480")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.large:
        run_large()

    rewards, values, mask, lam = make_batch(args.batch, args.length)
    print(f"B={args.batch} T={args.length} float32, per-sequence lambda, torch threads {torch.get_num_threads()}")
    fast_adv, fast_ret = gae(rewards, values, mask, 1.0, lam)  # warm-up, and the result to compare
    ref_adv, ref_ret = loop_gae(rewards, values, mask, 1.0, lam)
    err = max(float((fast_adv - ref_adv).abs().max()), float((fast_ret - ref_ret).abs().max()))
    scale = float(ref_ret.abs().max())
    print(f"max abs difference {err:.2e} (largest |return| {scale:.2f})")
    if not err <= 1e-4 * max(scale, 1.0):
        raise SystemExit(f"gae and the loop disagree: max abs difference {err}")

    t_fast = best_time(lambda: gae(rewards, values, mask, 1.0, lam), args.repeats)
    t_loop = best_time(lambda: loop_gae(rewards, values, mask, 1.0, lam), 2)
    print(f"loop {t_loop * 1e3:.1f} ms, gae {t_fast * 1e3:.1f} ms (best of repeats)")
    print(f"gae speedup vs loop: {t_loop / t_fast:.1f}")


if __name__ == "__main__":
    main()
