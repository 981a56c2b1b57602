"""Paired comparisons: Student-t confidence intervals, sign counts and the verdict of a claim.

Pure Python (no SciPy): the t quantile comes from the regularised incomplete beta function
(continued fraction, as in Numerical Recipes' `betacf`) inverted by bisection, to ~1e-12.

A claim "A beats B" is tested on paired differences d_i = A_i - B_i (same data, ordering and seed
for both): the 95 % interval is mean(d) ± t_{0.975, n-1} · s / sqrt(n) with s the SAMPLE
standard deviation (n - 1 in the denominator). The claim is `supported` when the interval lies
entirely on the predicted side of 0, `contradicted` when it lies entirely on the other side, and
`undecided` otherwise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SUPPORTED, CONTRADICTED, UNDECIDED = "supported", "contradicted", "undecided"
DIRECTIONS = ("higher", "lower", None)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if not (a > 0 and b > 0) or not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete beta needs a, b > 0 and x in [0, 1], got {a}, {b}, {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if student_t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A t-interval of the mean of `n` values: mean ± half_width, and the sign count."""

    n: int
    mean: float
    sd: float           # sample standard deviation (n - 1)
    half_width: float
    low: float
    high: float
    confidence: float
    positive: int       # sign count: values > 0, < 0, == 0
    negative: int
    zero: int

    def as_dict(self) -> dict:
        return asdict(self)


def t_interval(values, confidence: float = 0.95) -> Interval:
    """The Student-t interval of the mean of `values` (at least two finite numbers)."""
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"a t-interval needs finite values, got {values}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    positive, negative, zero = sign_count(values)
    return Interval(n, mean, sd, half, mean - half, mean + half, confidence, positive, negative,
                    zero)


def sign_count(values) -> tuple[int, int, int]:
    """(how many values are > 0, < 0, == 0)."""
    values = list(values)
    return (sum(v > 0 for v in values), sum(v < 0 for v in values),
            sum(v == 0 for v in values))


def paired_differences(a, b) -> list[float]:
    """a_i - b_i of two equally long, paired sequences."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired values must come in pairs, got {len(a)} and {len(b)}")
    return [float(x) - float(y) for x, y in zip(a, b)]


def verdict(interval: Interval, predicted: str | None) -> str:
    """`supported` if the interval excludes 0 on the predicted side ('higher': low > 0,
    'lower': high < 0), `contradicted` if it excludes 0 on the other side, else `undecided`;
    without a prediction: which side of 0 the interval lies on, or `undecided`."""
    if predicted not in DIRECTIONS:
        raise ValueError(f"predicted must be one of {DIRECTIONS}, got {predicted!r}")
    above, below = interval.low > 0, interval.high < 0
    if predicted is None:
        return "above 0" if above else "below 0" if below else UNDECIDED
    agrees, disagrees = (above, below) if predicted == "higher" else (below, above)
    return SUPPORTED if agrees else CONTRADICTED if disagrees else UNDECIDED
