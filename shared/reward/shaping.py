"""Reward shaping added to a verifier's score on the actor: DAPO's soft overlong punishment.

Pure: stdlib only.
"""

from __future__ import annotations


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment of one response of `length` tokens, in [-1, 0], added to its reward.

    0 up to max_len - cache_len, then linear down to -1 at max_len, -1 beyond; cache_len = 0 gives
    the hard cut (0 up to max_len, -1 beyond). Actors score responses one at a time, in plain Python.
    """
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    start = max_len - cache_len
    if length <= start:
        return 0.0
    if length > max_len:
        return -1.0
    return (start - length) / max(cache_len, 1)
