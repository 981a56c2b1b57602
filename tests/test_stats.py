"""Paired statistics of the study against hand-computed values and published t tables."""
import math

import pytest

import _harness  # noqa: F401  (the study on sys.path)

import stats


@pytest.mark.parametrize("df, expected", [
    # Two-sided 95 % critical values of Student's t (any printed table, 7 digits).
    (1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (7, 2.3646243), (10, 2.2281389),
    (23, 2.0686576), (120, 1.9799304)])
def test_t_quantile_matches_the_table(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=5e-7)
    assert stats.t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-7)


def test_t_cdf_hand_computed_cases():
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi.
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert stats.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi,
                                                          abs=1e-12)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-2.0, 0.3, 4.0):
        assert stats.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)),
                                                          abs=1e-12)


def test_t_interval_hand_computed():
    # d = 1, 2, 3, 4: mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3,
    # half width t_{0.975,3} sqrt(5/3) / 2 = 3.1824463 * 1.2909944 / 2 = 2.0542603.
    iv = stats.t_interval([1, 2, 3, 4])
    assert (iv.n, iv.mean) == (4, 2.5)
    assert iv.sd == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert iv.half_width == pytest.approx(2.0542603, abs=1e-6)
    assert (iv.low, iv.high) == pytest.approx((0.4457397, 4.5542603), abs=1e-6)
    assert (iv.positive, iv.negative, iv.zero) == (4, 0, 0)
    assert stats.verdict(iv, "higher") == stats.SUPPORTED
    assert stats.verdict(iv, "lower") == stats.CONTRADICTED
    assert stats.verdict(iv, None) == "above 0"
    # d = -1, 0, 2, 3: mean 1, sample sd sqrt((4 + 1 + 1 + 4) / 3) = 1.8257419,
    # half width 3.1824463 * 1.8257419 / 2 = 2.9051627
    iv = stats.t_interval(stats.paired_differences([1, 5, 4, 9], [2, 5, 2, 6]))
    assert iv.mean == 1.0 and iv.half_width == pytest.approx(2.9051627, abs=1e-6)
    assert (iv.positive, iv.negative, iv.zero) == (2, 1, 1)
    assert stats.verdict(iv, "higher") == stats.verdict(iv, None) == stats.UNDECIDED
    # Two pairs: t_{0.975,1}; d = 0.1, 0.3: mean 0.2, sd sqrt(0.02), half 12.7062047 * 0.1
    iv = stats.t_interval([0.1, 0.3])
    assert iv.half_width == pytest.approx(1.27062047, abs=1e-7)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 2 values"):
        stats.t_interval([1.0])
    with pytest.raises(ValueError, match="finite"):
        stats.t_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="in pairs"):
        stats.paired_differences([1, 2], [1])
    with pytest.raises(ValueError, match="predicted must be one of"):
        stats.verdict(stats.t_interval([1, 2]), "up")
    with pytest.raises(ValueError, match="p must be in"):
        stats.t_quantile(1.0, 3)
