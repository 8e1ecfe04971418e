"""The split's FLOP ceiling, one formula for ``inspect``, ``bench``, the demo and the split report.

A request of N candidates costs N·(U+G) FLOPs unsplit and U + N·G split (U, G: user and
group FLOPs per row), so the split can be at most (U+G) / (U/N + G) times faster. Either
side may do no arithmetic: U = 0 (the user side only looks up embeddings) gives 1.0,
G = 0 gives N, both 0 gives 1.0 (nothing to save).
"""

from __future__ import annotations


def flop_ceiling(user_per_row: float, group_per_row: float, n: int) -> float:
    """(U + G) / (U / N + G), defined for every U, G >= 0 and N >= 1."""
    u, g = float(user_per_row or 0), float(group_per_row or 0)
    if u + g == 0:
        return 1.0
    return (u + g) / (u / n + g)
