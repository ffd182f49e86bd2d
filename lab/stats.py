"""Honest numbers: proportions with Wilson CIs, bootstrap CIs, exact McNemar, permutation nulls.

Every reported number is a `Measure`: value, n, CI and (where there is one) the control it is
compared with and the paired test's p-value. Built on scipy and statsmodels, not by hand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as _mcnemar
from statsmodels.stats.proportion import proportion_confint

from lab import LabError


@dataclass
class Measure:
    """One reported number with its sample size, interval and provenance."""
    name: str
    value: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None
    ci_method: str = ""
    control: str | None = None        # what it is compared against
    control_value: float | None = None
    p_value: float | None = None
    test: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def value_text(self, digits: int = 3, signed: bool = False, percent: bool = False) -> str:
        """The value with its 95% CI as the lab prints it everywhere: "0.412 [0.377, 0.448]" ("+" signs if
        `signed`, "41.2% [37.7%, 44.8%]" if `percent`); "n/a" for a value that could not be computed."""
        def num(v):
            if v is None or not math.isfinite(v):
                return "n/a"
            return f"{v * 100:{'+' if signed else ''}.{max(digits - 2, 0)}f}%" if percent else f"{v:{'+' if signed else ''}.{digits}f}"
        s = num(self.value)
        if self.ci_low is not None and self.ci_high is not None:
            s += f" [{num(self.ci_low)}, {num(self.ci_high)}]"
        return s

    def __str__(self) -> str:
        s = f"{self.name} = {self.value:.4g} (n={self.n}"
        if self.ci_low is not None:
            s += f", 95% CI [{self.ci_low:.4g}, {self.ci_high:.4g}]"
        if self.control is not None:
            s += f"; vs {self.control} {self.control_value:.4g}" if self.control_value is not None else f"; vs {self.control}"
        if self.p_value is not None:
            s += f", p = {self.p_value:.3g} ({self.test})"
        return s + ")"


def _as_bool(x: Sequence) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise LabError(f"expected a 1-D sequence of outcomes, got shape {a.shape}")
    return a.astype(bool)


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    if n <= 0:
        raise LabError(f"a proportion needs n >= 1, got n={n}")
    if not 0 <= successes <= n:
        raise LabError(f"successes must be in [0, n={n}], got {successes}")
    lo, hi = proportion_confint(successes, n, alpha=alpha, method="wilson")
    # at 0 or n successes the bound is exactly 0 or 1; statsmodels' float arithmetic leaves e.g. 4e-19
    return (0.0 if successes == 0 else float(lo)), (1.0 if successes == n else float(hi))


def proportion(name: str, outcomes: Sequence, alpha: float = 0.05) -> Measure:
    a = _as_bool(outcomes)
    k, n = int(a.sum()), len(a)
    lo, hi = wilson_ci(k, n, alpha)
    return Measure(name, k / n, n, lo, hi, "wilson")


def bootstrap_ci(data: Sequence[float], statistic: Callable = np.mean, n_resamples: int = 2000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    a = np.asarray(data, dtype=float)
    if a.size < 2:
        raise LabError(f"a bootstrap CI needs at least 2 values, got {a.size}")
    if np.all(a == a[0]):  # degenerate: every resample gives the same statistic
        v = float(statistic(a))
        return v, v
    res = sps.bootstrap((a,), statistic, n_resamples=n_resamples, confidence_level=1 - alpha,
                        method="percentile", random_state=np.random.default_rng(seed), vectorized=False)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def sum_by_unit(values: np.ndarray, units: np.ndarray | None) -> np.ndarray:
    """Sum `values` within each unit (units: an id per value, 0..U-1, e.g. its document); None: each value its own unit."""
    return values if units is None else np.bincount(units, weights=values)


def ratio_of_sums_ci(num: np.ndarray, den: np.ndarray, seed: int = 0, n_resamples: int = 2000,
                     alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(num) / sum(den), resampling units (paired rows of num and den): the
    ratio estimator, so the denominator (e.g. bytes) varies with the resample as it does between texts."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    n = num.size
    if n < 2:
        raise LabError(f"a bootstrap CI needs at least 2 units, got {n}")
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_resamples, 250):  # resampled unit indices, in blocks to bound memory
        idx = rng.integers(0, n, size=(min(250, n_resamples - start), n))
        d = den[idx].sum(1)
        stats.append(np.where(d > 0, num[idx].sum(1) / np.where(d > 0, d, 1.0), np.nan))
    stats = np.concatenate(stats)
    stats = stats[np.isfinite(stats)]
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


def mean_with_ci(name: str, data: Sequence[float], seed: int = 0) -> Measure:
    a = np.asarray(data, dtype=float)
    if a.size == 1:  # one value: its mean, and no interval to give
        return Measure(name, float(a[0]), 1)
    lo, hi = bootstrap_ci(a, seed=seed)
    return Measure(name, float(a.mean()), int(a.size), lo, hi, "bootstrap percentile")


def paired_delta(name: str, treatment: Sequence[float], control: Sequence[float], control_name: str,
                 seed: int = 0) -> Measure:
    """Mean of treatment - control with a paired bootstrap CI and a paired sign-flip permutation p of that mean.

    The test is of the statistic reported (the mean difference), so the p and the CI answer the same question:
    a Wilcoxon signed-rank p tests the ranks instead and, on skewed differences, can disagree with the mean's CI."""
    t, c = np.asarray(treatment, float), np.asarray(control, float)
    if t.shape != c.shape:
        raise LabError(f"paired samples must have equal length, got {t.shape} and {c.shape}")
    d = t - c
    lo, hi = bootstrap_ci(d, seed=seed)
    return Measure(name, float(d.mean()), int(d.size), lo, hi, "paired bootstrap", control_name,
                   float(c.mean()), sign_flip_p(d, seed=seed), "paired sign-flip permutation (mean)")


def _t_measure(name: str, a: np.ndarray, null: float | None, null_name: str | None, paired: bool) -> Measure:
    """The mean of `a` with its t interval and (given `null`) the t-test's p against it; `paired` names the test as the
    paired one (when `a` holds differences)."""
    if a.ndim != 1 or a.size < 2:
        raise LabError(f"a t interval needs a 1-d sample of at least 2 values, got shape {a.shape}")
    if np.all(a == a[0]):
        # no spread at all: no t statistic (scipy gives nan); the interval is the value, and the test the exact
        # sign-flip one, which stays honest here (two units: p >= .5)
        return Measure(name, float(a[0]), int(a.size), float(a[0]), float(a[0]), "none: the same value in every unit",
                       null_name, null, None if null is None else sign_flip_p(a - null),
                       "" if null is None else "sign-flip permutation (no spread for a t-test)")
    r = sps.ttest_1samp(a, 0.0 if null is None else null)
    ci = r.confidence_interval()  # of the mean itself
    kind = "paired t" if paired else "t"
    return Measure(name, float(a.mean()), int(a.size), float(ci.low), float(ci.high), kind, null_name, null,
                   None if null is None else float(r.pvalue),
                   "" if null is None else ("paired t-test" if paired else "one-sample t-test"))


def t_mean(name: str, data: Sequence[float], null: float | None = None, null_name: str | None = None) -> Measure:
    """Mean over a few independent units (training runs: one value per seed) with its t interval and, given `null`,
    the one-sample t-test's p against it (scipy.stats.ttest_1samp). For three seeds a bootstrap has no meaningful
    interval and a sign-flip test cannot give p below 2/2^3 = .25; the t-test assumes roughly normal per-run values."""
    return _t_measure(name, np.asarray(data, float), null, null_name, paired=False)


def paired_t(name: str, treatment: Sequence[float], control: Sequence[float], control_name: str) -> Measure:
    """Mean of treatment - control over a few independent units, with the paired t interval and p (the one-sample
    t-test of the differences against 0, which is scipy.stats.ttest_rel)."""
    t, c = np.asarray(treatment, float), np.asarray(control, float)
    if t.shape != c.shape or t.ndim != 1 or t.size < 2:
        raise LabError(f"paired_t needs two equally long 1-d samples of at least 2 values, got shapes {t.shape} and {c.shape}")
    m = _t_measure(name, t - c, 0.0, control_name, paired=True)
    m.control_value = float(c.mean())
    return m


def sign_flip_p(differences: Sequence[float], n_resamples: int = 9999, seed: int = 0) -> float:
    """Two-sided p of mean(differences) = 0 under random signs (paired permutation test; exact for n <= 13)."""
    d = np.asarray(differences, float)
    if d.ndim != 1 or d.size < 1:
        raise LabError(f"sign_flip_p needs a 1-D sample of differences, got shape {d.shape}")
    if not np.any(d != 0):
        return 1.0
    res = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=n_resamples,
                               alternative="two-sided", vectorized=True, batch=1000,  # bounded memory, 3x faster
                               random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def paired_ratio(treatment: Sequence[float], control: Sequence[float], statistic: Callable = np.median,
                 n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """statistic(treatment) / statistic(control) with a paired bootstrap percentile CI: (ratio, low, high).

    For timings measured side by side (rep i of both arms under the same load), e.g. the overhead of
    a hook against the bare forward; resampling reps keeps each pair together."""
    t, c = np.asarray(treatment, float), np.asarray(control, float)
    if t.shape != c.shape or t.ndim != 1 or t.size < 2:
        raise LabError(f"paired_ratio needs two 1-D samples of equal length >= 2, got {t.shape} and {c.shape}")
    if np.any(c <= 0) or np.any(t < 0):
        raise LabError("paired_ratio expects non-negative values with a positive control (timings)")
    res = sps.bootstrap((t, c), lambda a, b: statistic(a) / statistic(b), paired=True, vectorized=False,
                        n_resamples=n_resamples, confidence_level=1 - alpha, method="percentile",
                        random_state=np.random.default_rng(seed))
    return (float(statistic(t) / statistic(c)), float(res.confidence_interval.low),
            float(res.confidence_interval.high))


def mcnemar_exact(a: Sequence, b: Sequence) -> dict:
    """Exact paired McNemar test of two arms' per-item successes on the same items."""
    x, y = _as_bool(a), _as_bool(b)
    if x.shape != y.shape:
        raise LabError(f"McNemar needs paired outcomes of equal length, got {x.size} and {y.size}")
    table = [[int(np.sum(x & y)), int(np.sum(x & ~y))], [int(np.sum(~x & y)), int(np.sum(~x & ~y))]]
    res = _mcnemar(table, exact=True)
    return {"p_value": float(res.pvalue), "a_only": table[0][1], "b_only": table[1][0], "table": table}


def compare_proportions(name: str, treatment: Sequence, control: Sequence, control_name: str) -> Measure:
    """Treatment success rate with a Wilson CI, against a paired control by exact McNemar."""
    m = proportion(name, treatment)
    mc = mcnemar_exact(treatment, control)
    m.control, m.control_value = control_name, float(_as_bool(control).mean())
    m.p_value, m.test = mc["p_value"], "exact McNemar"
    m.extra = {"discordant": {"treatment_only": mc["a_only"], "control_only": mc["b_only"]}}
    return m


def permutation_pvalue(x: Sequence[float], y: Sequence[float], n_resamples: int = 5000, seed: int = 0,
                       statistic: Callable | None = None) -> float:
    """Two-sample permutation test (difference in means by default), two-sided."""
    stat = statistic or (lambda a, b, axis=-1: np.mean(a, axis=axis) - np.mean(b, axis=axis))
    res = sps.permutation_test((np.asarray(x, float), np.asarray(y, float)), stat, n_resamples=n_resamples,
                               alternative="two-sided", random_state=np.random.default_rng(seed), vectorized=True)
    return float(res.pvalue)


def null_quantiles(null_values: Sequence[float], q_low: float = 0.005, q_high: float = 0.995) -> tuple[float, float]:
    """Thresholds from a null distribution (e.g. gates of control runs)."""
    a = np.asarray(null_values, float).ravel()
    if a.size < 10:
        raise LabError(f"a null needs at least 10 values, got {a.size}")
    return float(np.quantile(a, q_low)), float(np.quantile(a, q_high))
