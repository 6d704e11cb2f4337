"""Closed-form binomial intervals (no resampling): Wilson's score interval.

Wilson rather than the normal ("Wald") interval because it stays inside [0, 1] and is never
degenerate: one question answered wrongly gives 0.0–79.3%, not 0.0–0.0, and two give 0.0–65.8%,
not 0.0–100.0. The successes may be fractional (the sum of per-question accuracies across shuffles),
which is what the conservative interval over questions needs.
"""

from __future__ import annotations

import math

from scipy.stats import norm

__all__ = ["wilson_ci", "z_value"]


def z_value(confidence: float = 0.95) -> float:
    """The two-sided standard normal quantile for `confidence` (1.959964 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(norm.ppf(1.0 - (1.0 - confidence) / 2.0))


def wilson_ci(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes/n; (nan, nan) when n == 0.

    centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    z = z_value(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
