"""Moment sums over valid tokens and the critic's explained variance computed from them.

Statistics that must be exact across ranks are computed from sums: each rank returns
`moment_sums` of its tokens, the caller all-reduces them (one collective for all of a step's
sums) and derives the statistic, so one rank and many give the same number. Everything returns
tensors (never `.item()`); masks are bool or 0/1 floats of the values' shape.
"""

from __future__ import annotations

import torch


def moment_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[3]: (sum, sum of squares, count) of values over mask == 1; values, mask [B, T].

    Masked positions are multiplied by 0, so their values must be finite.
    """
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values shape {tuple(values.shape)}")
    m = mask.to(values.dtype)
    return torch.stack([(values * m).sum(), (values**2 * m).sum(), m.sum()])


def _mean_var(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    count = sums[2].clamp(min=1)
    mean = sums[0] / count
    return mean, sums[1] / count - mean**2


def mean_and_std(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) standard deviation from `moment_sums` (0 and 0 for no values)."""
    mean, var = _mean_var(sums)
    return mean, var.clamp(min=0).sqrt()


def explained_variance(return_sums: torch.Tensor, error_sums: torch.Tensor) -> torch.Tensor:
    """1 - Var[G - V] / Var[G] from the `moment_sums` of the returns G and of the errors G - V -> 0-dim.

    Defined as 0 when the returns have (numerically) zero variance: nothing to explain, and a
    finite number keeps metric charts usable (verl returns NaN).
    """
    _, var_g = _mean_var(return_sums)
    _, var_e = _mean_var(error_sums)
    explained = 1.0 - var_e / torch.where(var_g > 1e-12, var_g, torch.ones_like(var_g))
    return torch.where(var_g > 1e-12, explained, torch.zeros_like(explained))
