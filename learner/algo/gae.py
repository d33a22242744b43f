"""Generalised advantage estimation as a blocked linear scan, and VAPO's length-adaptive lambda.

Owns the advantage/return computation of the learner; imports torch only. VAPO calls `gae` twice
on the same old values (decoupled GAE): once with lambda_critic (1.0) for the critic's `returns`,
once with the per-sequence lambda_policy from `length_adaptive_lambda` for the `advantages`.

The recurrence. With delta_t = r_t + gamma * V_{t+1} - V_t (V after the last valid token is 0:
the response is terminal) and c = gamma * lambda, A_t = delta_t + c * A_{t+1}. Per row, c is a
constant, so A is a discounted reverse cumulative sum of the deltas, computed here without a
Python step per token:

- levels 1 and 2 work on a block of C * C tokens: each sub-chunk of C tokens is scanned by a
  matmul with the triangular M[j, i] = c^(j - i), j >= i (one [C, C] matrix for a scalar lambda,
  a [B, C, C] batch for per-sequence lambda), then the C sub-chunk heads the same way with
  decay c^C. C = min(16, ceil(sqrt(T))): a short batch is one small block.
- level 3 joins the blocks right to left (decay c^(C * C)), then every token gets c^(distance)
  times the head to its right;
- time is processed in passes of whole blocks, right to left with one carry per row, each pass
  as wide as `_ELEMENT_BUDGET` elements allow (at least one block): temporaries stay at a few
  [B, columns] tensors besides the two [B, T] outputs, and a small batch takes few kernels.

Memory at B = 8192, T = 20480 in float32: the two outputs (1.25 GiB) plus about 60 MiB of pass
temporaries and per-row tables ([B, 16, 16]); `python bench/gae.py --large` prints it.
On CPU much of the time goes to first-touch page faults of the two fresh outputs.

Only non-negative integer powers of c <= 1 appear, so there is no division by small powers
(the cumprod/divide trick overflows for c near 0 and loses precision near 1); c = 0 works
(0^0 = 1). In float64 the result agrees with the step-by-step loop to about 1e-14 (tests ask 1e-10).

Masks. Each row's valid tokens form one contiguous run (right padding: the run starts at the
first response token); `gae` checks this and raises ValueError naming the row otherwise. Rewards
and values at masked positions do not change the result as long as they are finite: masking
multiplies by a 0/1 float mask, because torch.where and masked_fill with a bool mask are several
times slower on CPU, and NaN * 0 is NaN.
"""

from __future__ import annotations

import math

import torch

_MAX_CHUNK = 16  # largest sub-chunk length C; a block is C * C tokens (level 1 costs C multiply-adds per token)
_ELEMENT_BUDGET = 1 << 21  # elements per [B, columns] temporary (8 MB in float32: stays in cache on CPU)


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float, lam_min: float = 0.0) -> torch.Tensor:
    """Per-sequence lambda_policy = 1 - 1 / (alpha * l), clamped to [lam_min, 1); lengths [B] -> [B] float64.

    The paper leaves l <= 1 / alpha open (the formula gives lambda <= 0 there): we clamp to
    `lam_min`, by default 0, i.e. one-step TD advantages for very short responses. l = 0 gives
    lam_min (1 / 0 = inf, no NaN). The upper bound holds because 1 / (alpha * l) > 0 for finite l.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0.0 <= lam_min < 1.0:
        raise ValueError(f"lam_min must be in [0, 1), got {lam_min}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(lengths.shape)}")
    lengths = lengths.to(torch.float64)
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")
    return (1.0 - 1.0 / (alpha * lengths)).clamp(min=lam_min)


def _triangular_powers(c: torch.Tensor, size: int, scale: int) -> torch.Tensor:
    """From c [R]: [R, C, C] with m[j, i] = c^(scale (j - i)) for j >= i, else 0 (x @ m: decayed reverse cumsum)."""
    exponents = torch.arange(size + 1, device=c.device, dtype=c.dtype) * scale
    powers = torch.pow(c[:, None], exponents)  # [R, C + 1]
    powers[:, size] = 0.0  # slot C stands for the zeros below the diagonal
    j = torch.arange(size, device=c.device)
    dist = j[:, None] - j[None, :]
    return torch.index_select(powers, 1, torch.where(dist >= 0, dist, size).flatten()).view(-1, size, size)


def _decay_tables(c: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Powers of the decay c [R] (R = 1 for a scalar lambda, else B) used by the blocked scan with C = size.

    Returns the level-1 and level-2 matrices [R, C, C] (decays c and c^C), tail [R, 1, 1, C]
    (c^(C - i): from the next sub-chunk's head to token i), head [R, 1, C] (c^((C - n) C): from the
    next block's head to the head of sub-chunk n) and block [R] (c^(C * C), across a whole block).
    """
    steps = size - torch.arange(size, device=c.device, dtype=c.dtype)
    tail = torch.pow(c[:, None], steps)[:, None, None, :]
    head = torch.pow(c[:, None], steps * size)[:, None, :]
    return _triangular_powers(c, size, 1), _triangular_powers(c, size, size), tail, head, torch.pow(c, size * size)


def _scan_chunk(d: torch.Tensor, carry: torch.Tensor, tables: tuple[torch.Tensor, ...], scalar: bool) -> torch.Tensor:
    """Reverse discounted scan of d [B, K * C * C] given A at the token after it (carry [B]) -> [B, K * C * C]."""
    m1, m2, tail, head, block = tables
    size = m1.shape[-1]
    batch = d.shape[0]
    num_blocks = d.shape[1] // (size * size)

    def matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, m[0]) if scalar else torch.bmm(x, m)

    # Level 1: y[k, n, i] = sum_{j >= i} c^(j - i) d[k, n, j], one matmul for the whole pass.
    y = matmul(d.view(batch, num_blocks * size, size), m1).view(batch, num_blocks, size, size)
    # Level 2: s[k, n] = sum_{m >= n} c^((m - n) C) y[k, m, 0], the sub-chunk heads without the next blocks.
    s = matmul(y[..., 0].contiguous(), m2)  # contiguous first: bmm on the strided view is 4x slower
    # Level 3, right to left over the K blocks: A at the head of block k (the first entry is the carry).
    block_heads = [carry]
    for k in reversed(range(num_blocks)):
        block_heads.append(torch.addcmul(s[:, k, 0], block, block_heads[-1]))
    next_heads = torch.stack(block_heads[-2::-1], dim=1)  # [B, K]: A at the head of block k + 1
    s.addcmul_(head, next_heads[:, :, None])  # s[k, n] = A at the head of sub-chunk n of block k
    nxt = torch.cat([s[:, :, 1:], next_heads[:, :, None]], dim=2)  # A at the head of the next sub-chunk
    y.addcmul_(tail, nxt[..., None])
    return y.view(batch, -1)


def _lambda_rows(lam: float | torch.Tensor, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lam as a [1] (float) or [B] tensor of like's dtype and device, and a [B] flag of rows with lam outside [0, 1]."""
    if isinstance(lam, torch.Tensor):
        if lam.shape != (batch,):
            raise ValueError(f"lam must be a float or a [B] = [{batch}] tensor, got shape {tuple(lam.shape)}")
        lam_t = lam.to(like)
        return lam_t, (lam_t < 0) | (lam_t > 1) | torch.isnan(lam_t)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return torch.tensor([lam], dtype=like.dtype, device=like.device), torch.zeros(
        batch, dtype=torch.bool, device=like.device
    )


def _load_columns(
    response_mask: torch.Tensor, values: torch.Tensor, t0: int, t1: int, m_ext: torch.Tensor, v_ext: torch.Tensor
) -> None:
    """Write the 0/1 mask and masked values of columns [t0, t1] into m_ext, v_ext [B, >= t1 - t0 + 1]; past T, 0."""
    e1 = min(t1 + 1, values.shape[1])
    mask = response_mask[:, t0:e1]
    # A float mask: multiplying is several times faster on CPU than where/masked_fill with bools.
    m_ext[:, : e1 - t0].copy_(mask.view(torch.uint8) if mask.dtype == torch.bool else mask != 0)
    torch.mul(values[:, t0:e1], m_ext[:, : e1 - t0], out=v_ext[:, : e1 - t0])
    if e1 == t1:  # the last column is past T: not valid, value 0 (terminal)
        m_ext[:, t1 - t0].zero_()
        v_ext[:, t1 - t0].zero_()


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unwhitened) GAE advantages and returns = advantages + values, both [B, T], zero on padding.

    rewards, values, response_mask: [B, T]; each row's mask is one contiguous run of valid
    tokens (right padding), padding values finite. lam: a float or a [B] tensor (per-sequence
    lambda), gamma and lam in [0, 1]. Computed in values' dtype (float32 for half types).
    """
    if rewards.shape != values.shape or values.shape != response_mask.shape or values.dim() != 2:
        raise ValueError(
            f"rewards, values, response_mask must share one [B, T] shape, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(response_mask.shape)}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    batch, length = values.shape
    dtype = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
    advantages = torch.empty(batch, length, dtype=dtype, device=values.device)
    returns = torch.empty_like(advantages)
    lam_t, bad_lam = _lambda_rows(lam, batch, advantages)
    if batch == 0 or length == 0:
        return advantages, returns
    chunk = min(_MAX_CHUNK, math.isqrt(length - 1) + 1)  # smallest C with C * C >= T, at most _MAX_CHUNK
    tables = _decay_tables(gamma * lam_t, chunk)
    # Columns per pass: whole blocks of C * C tokens, as many as the element budget allows (at least one).
    width = chunk * chunk * max(1, min(-(-length // (chunk * chunk)), _ELEMENT_BUDGET // (batch * chunk * chunk)))
    d = advantages.new_empty(batch, width)  # buffers reused by every pass, written before they are read
    m_ext = advantages.new_empty(batch, width + 1)
    v_ext = advantages.new_empty(batch, width + 1)
    carry = advantages.new_zeros(batch)
    changes = advantages.new_zeros(batch)
    for t0 in reversed(range(0, length, width)):
        t1 = min(t0 + width, length)
        w = t1 - t0
        _load_columns(response_mask, values, t0, t1, m_ext, v_ext)
        m = m_ext[:, :w]
        # 0/1 changes along the row (the column after T counts as 0): at most 2 for one run of valid tokens.
        changes += torch.sub(m, m_ext[:, 1 : w + 1]).abs_().sum(dim=1)
        if w < width:
            d.zero_()  # only the rightmost pass is partial: zeros after T and a zero carry are exact
        # delta_t = (r_t - V_t) m_t + gamma V_{t+1} m_{t+1}; V_{t+1} m_{t+1} is 0 on right padding.
        torch.sub(rewards[:, t0:t1], v_ext[:, :w], out=d[:, :w]).mul_(m).add_(v_ext[:, 1 : w + 1], alpha=gamma)
        x = _scan_chunk(d, carry, tables, scalar=not isinstance(lam, torch.Tensor))
        carry = x[:, 0].clone()
        adv = torch.mul(x[:, :w], m, out=advantages[:, t0:t1])
        torch.add(adv, v_ext[:, :w], out=returns[:, t0:t1])
    bad = (changes > 2.5) | bad_lam
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        if bool(bad_lam[row]):
            raise ValueError(f"lam must be in [0, 1]; row {row} has {float(lam_t[row])}")
        raise ValueError(f"response_mask row {row} is not one contiguous run of valid tokens (right padding)")
    return advantages, returns
