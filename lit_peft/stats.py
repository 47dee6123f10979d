"""The one standard-error formula the run (val/loss_se) and the sweep report (a job's SE, two jobs' paired difference)
share, in plain Python: the report reads it without torch."""

from __future__ import annotations

import math
from collections.abc import Sequence


def weighted_mean_se(
    a: Sequence[float], wa: Sequence[float], b: Sequence[float] | None = None, wb: Sequence[float] | None = None
) -> float | None:
    """Standard error of the weighted mean sum(w a) / sum(w) over n examples (example i: its mean loss a_i over its
    w_i units, e.g. target tokens), or of the difference of two such means over the same examples (paired), by the
    delta method: each example's influence psi_i = w_i (a_i - mean_a) / mean(w) (minus the same of b), and
    SE^2 = sum(psi^2) / (n (n - 1)). With unit weights: sd(a) / sqrt(n), or sd(a - b) / sqrt(n). Written with the
    loss sums l_i = w_i a_i and L = sum(l) / sum(w): SE = sqrt(sum_i (l_i - L w_i)^2 / (n (n - 1))) / mean(w).
    None with fewer than two examples or no unit."""
    n = len(a)
    if n < 2:
        return None

    def influence(x: Sequence[float], w: Sequence[float]) -> list[float] | None:
        total = sum(w)
        if not total > 0:
            return None
        mean = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / total
        return [wi * (xi - mean) / (total / n) for wi, xi in zip(w, x, strict=True)]

    psi = influence(a, wa)
    if psi is not None and b is not None:
        other = influence(b, wb)
        psi = None if other is None else [p - q for p, q in zip(psi, other, strict=True)]
    return None if psi is None else math.sqrt(sum(p * p for p in psi) / (n * (n - 1)))
