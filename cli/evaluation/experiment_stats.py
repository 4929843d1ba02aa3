"""Interval estimates for an online experiment: proportions per arm and the relative lift.

Why these: a click-through or conversion rate is a proportion of impressions, often small and
sometimes from few impressions, where the normal ("Wald") interval misbehaves (it can leave
[0, 1] and is too narrow near 0); the Wilson score interval does not. The lift is a ratio of two
proportions, whose sampling distribution is skewed; the interval is taken on its logarithm
(Katz et al. 1978) and mapped back, so it is asymmetric like the ratio itself. "Significant"
means that 95% interval excludes no lift (0).

Both treat impressions as independent trials. A user sees several impressions, and users (not
impressions) are what the arms randomize, so with heavy repeat users the true intervals are
somewhat wider than these (docs/experiments.md, "Reading the report").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``successes / trials``; (0, 1) when there are no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # Exact at the edges (the formula leaves rounding dust there).
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= trials else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Lift:
    """Relative lift of a treatment proportion over a control one: ``pt / pc - 1``."""

    lift: float | None
    low: float | None
    high: float | None

    @property
    def significant(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def relative_lift(xt: int, nt: int, xc: int, nc: int, z: float = Z95) -> Lift:
    """Lift with its log-ratio interval; undefined (None) while either arm has no success yet,
    because a ratio against zero (or of zero) has no finite interval."""
    if min(xt, xc) <= 0 or min(nt, nc) <= 0:
        return Lift(None, None, None)
    pt, pc = xt / nt, xc / nc
    log_rr = math.log(pt / pc)
    se = math.sqrt(max(0.0, 1 / xt - 1 / nt + 1 / xc - 1 / nc))
    return Lift(pt / pc - 1, math.exp(log_rr - z * se) - 1, math.exp(log_rr + z * se) - 1)
