"""The Pareto front of (quality loss, cost) points, both minimized.

A point is on the front when no other point is at least as good on both and strictly better on one.
Identical models (the same file hash) count once: the earliest trial represents them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pareto_front"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, sorted by cost (then loss)."""
    front = []
    for i, (loss_i, cost_i) in enumerate(points):
        dominated = any(
            loss_j <= loss_i and cost_j <= cost_i and (loss_j < loss_i or cost_j < cost_i)
            for j, (loss_j, cost_j) in enumerate(points)
            if j != i
        )
        duplicate = any(points[j] == (loss_i, cost_i) for j in range(i))
        if not dominated and not duplicate:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][1], points[i][0]))
