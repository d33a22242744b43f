"""Masked reductions and the critic's explained variance, as pure functions over tensors.

The other algo modules build their metrics from these. Everything returns tensors (never
`.item()`), so the train step decides when to synchronise with the host. Masks may be bool or
0/1 floats of the same shape as the values; masked positions are excluded with torch.where, so
NaN or inf on padding does not leak into a reduction.

Only local (per micro-batch) statistics live here. A metric that must be exact across ranks is
returned by the losses as a sum plus a count, which the caller all-reduces and divides.
"""

from __future__ import annotations

import torch


def _bool_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values shape {tuple(values.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of values over mask == 1; values and mask of one shape -> 0-dim tensor (0 for an empty mask)."""
    m = _bool_mask(values, mask)
    return torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over mask == 1 -> 0-dim tensor; 0 (not NaN) for an empty mask."""
    m = _bool_mask(values, mask)
    count = m.sum()
    return masked_sum(values, m) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of values over mask == 1 -> 0-dim tensor; 0 when fewer than 2 (unbiased) or 1 values are valid."""
    m = _bool_mask(values, mask)
    count = m.sum()
    mean = masked_sum(values, m) / count.clamp(min=1)
    centered_sq = (values - mean) ** 2
    denom = count - 1 if unbiased else count
    return masked_sum(centered_sq, m) / denom.clamp(min=1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over valid tokens; values, returns, mask [B, T] -> 0-dim tensor.

    Defined as 0 when the returns have zero variance over the valid tokens (or fewer than two are
    valid): nothing to explain, and a finite number keeps metric charts usable (verl returns NaN).
    """
    if values.shape != returns.shape:
        raise ValueError(f"values shape {tuple(values.shape)} does not match returns {tuple(returns.shape)}")
    var_returns = masked_var(returns, mask, unbiased=False)
    var_error = masked_var(returns - values, mask, unbiased=False)
    ratio = var_error / torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
    return torch.where(var_returns > 0, 1.0 - ratio, torch.zeros_like(ratio))
