"""Uncertainty for the evaluation: a subject-level bootstrap and the Kernel Inception Distance.

Slices of one subject are not independent (they share anatomy, and a method's error on one subject repeats on
every slice of it), so intervals come from resampling test *subjects* with replacement (Efron & Tibshirani
1993, the cluster bootstrap), never slices. Per-pair scores are computed once; a resample only re-weights them:
the resample's mean of a metric is sum_s c_s S_s / sum_s c_s N_s, with c_s the number of times subject s was
drawn, S_s the sum of its pairs' scores and N_s their number. 95 % intervals are the 2.5 and 97.5 percentiles
of the resampled means (percentile bootstrap). A paired difference (method - reference on the same pairs) is
bootstrapped the same way, from the per-pair differences, with the same resamples.
"""
import numpy as np

LEVEL = 0.95


class SubjectBootstrap:
    """`n_boot` seeded resamples of the subjects `groups` (one label per pair) with replacement."""

    def __init__(self, groups, n_boot=1000, seed=0):
        self.subjects, self.inverse = np.unique(np.asarray(groups), return_inverse=True)
        k = len(self.subjects)
        rng = np.random.default_rng([seed, 7])
        self.counts = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).astype(np.float64)   # (B, k)
        self.n_boot = n_boot

    def _rows(self, pair_groups):
        """Each pair's subject as a row of `counts` (every label must be one of `groups`)."""
        rows = np.searchsorted(self.subjects, np.asarray(pair_groups))
        if not np.array_equal(self.subjects[np.minimum(rows, len(self.subjects) - 1)], np.asarray(pair_groups)):
            raise ValueError("pairs of subjects the bootstrap was not drawn for")
        return rows

    def for_pairs(self, pair_groups):
        """Resample weights (B, P) of pairs labelled by subject."""
        return self.counts[:, self._rows(pair_groups)]

    def means(self, values, pair_groups):
        """Resampled means (B,) of per-pair values (NaN = no score for that pair, left out)."""
        v = np.asarray(values, np.float64)
        ok = ~np.isnan(v)
        rows = self._rows(np.asarray(pair_groups)[ok])
        k = len(self.subjects)
        sums = np.bincount(rows, v[ok], minlength=k)
        n = np.bincount(rows, minlength=k).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.counts @ sums) / (self.counts @ n)

    def interval(self, values, pair_groups):
        """(mean, [low, high]) of per-pair values; (None, None) when no pair has a score."""
        v = np.asarray(values, np.float64)
        if np.isnan(v).all():
            return None, None
        return float(np.nanmean(v)), percentile_interval(self.means(v, pair_groups))


def percentile_interval(samples, level=LEVEL):
    s = np.asarray(samples, np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    lo, hi = np.percentile(s, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def balanced_accuracy(pred, true, weights=None):
    """Mean per-class recall over the classes present in `true`; with `weights` (B, N) (bootstrap counts)
    the (B,) resampled values (NaN where a resample lacks a class)."""
    t, correct = np.asarray(true), (np.asarray(pred) == np.asarray(true)).astype(np.float64)
    w = np.ones(len(t)) if weights is None else np.asarray(weights, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = [(w @ (correct * (t == k))) / (w @ (t == k)) for k in np.unique(t)]
    return float(np.mean(recall)) if weights is None else np.mean(recall, axis=0)


# --- Kernel Inception Distance -------------------------------------------------------------------------------
def polynomial_kernel(a, b):
    """k(x, y) = (x.y / d + 1)^3, the KID kernel (Binkowski et al. 2018)."""
    return (np.asarray(a, np.float64) @ np.asarray(b, np.float64).T / a.shape[1] + 1.0) ** 3


def kid(a, b, weights=None, groups=None, ref_groups=None):
    """Unbiased squared MMD between feature sets a (P, d) and b (P, d) with the cubic polynomial kernel (KID).

    Pair p is (a[p], b[p]): a manipulated slice and its real reference. The estimate is the U-statistic of
    Gretton et al. (2012, eq. 3) over the pairs of pairs (p, q) that share no subject: p's source subject
    (`groups`) and its reference's subject (`ref_groups`) both differ from q's, as slices of one subject are
    not independent draws (and a reference may come from its source's own subject). Each such (p, q) adds
    k(a_p, a_q) + k(b_p, b_q) - k(a_p, b_q) - k(a_q, b_p): the cross term, too, never compares slices of one
    subject or a slice with its own pair's reference. Without groups, pairs are units of their own (p != q).
    With `weights` (B, P) (bootstrap counts: pair p drawn w_p times) it returns the (B,) values of the
    weighted statistic, so a subject drawn twice is never compared with itself; with weights = 1 (or None) it
    is the plain estimate."""
    kab = polynomial_kernel(a, b)
    h = polynomial_kernel(a, a) + polynomial_kernel(b, b) - kab - kab.T
    w = np.ones((1, len(a))) if weights is None else np.asarray(weights, np.float64)
    g = np.arange(len(a)) if groups is None else np.asarray(groups)
    r = g if ref_groups is None else np.asarray(ref_groups)
    apart = lambda u, v: u[:, None] != v[None, :]
    other = apart(g, g) & apart(r, r) & apart(g, r) & apart(r, g)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((w @ (h * other)) * w).sum(1) / ((w @ other) * w).sum(1)
    return float(out[0]) if weights is None else out
