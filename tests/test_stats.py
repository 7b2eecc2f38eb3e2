"""mri/stats.py against definitions computed another way: the KID's pairs of different subjects, balanced
accuracy, the level of the percentile intervals, the subject bootstrap."""
import numpy as np
import pytest

from mri import stats


def brute_kid(a, b, g, h):
    """The KID by its definition, pair of pairs by pair of pairs: the mean over (p, q) sharing no subject
    (sources g, references h) of k(a_p, a_q) + k(b_p, b_q) - k(a_p, b_q) - k(a_q, b_p)."""
    k = lambda x, y: (x @ y / len(x) + 1) ** 3
    terms = [k(a[p], a[q]) + k(b[p], b[q]) - k(a[p], b[q]) - k(a[q], b[p])
             for p in range(len(a)) for q in range(len(a)) if not {g[p], h[p]} & {g[q], h[q]}]
    return np.mean(terms)


def test_kid_compares_pairs_of_different_subjects_only():
    """References drawn from the other subjects, from the source's own subject and shared between pairs: the
    estimate is the brute-force mean over the pairs of pairs that share no subject, also on a resample."""
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(12), 4)                          # 48 pairs of 12 source subjects
    h = np.where(rng.random(48) < 0.3, g, rng.integers(0, 16, 48))   # references: own subject or any of 16
    a, b = rng.normal(0, 1, (48, 6)), rng.normal(0.2, 1, (48, 6))
    assert stats.kid(a, b, None, g, h) == pytest.approx(brute_kid(a, b, g, h), rel=1e-10)
    w = stats.SubjectBootstrap(g, 3, seed=0).for_pairs(g)
    rows = np.repeat(np.arange(48), w[0].astype(int))
    assert stats.kid(a, b, w, g, h)[0] == pytest.approx(brute_kid(a[rows], b[rows], g[rows], h[rows]), rel=1e-10)
    ids = np.arange(48)   # without groups every pair is a unit of its own
    assert stats.kid(a, b) == pytest.approx(brute_kid(a, b, ids, ids), rel=1e-10)


def real_slices(rng, subjects=40, visits=3, positions=8, d=16):
    """Feature vectors of every slice of a cohort: subject effect + position effect + noise; (features,
    subject, position)."""
    subject, position = (a.ravel() for a in np.meshgrid(np.arange(subjects), np.arange(visits * positions),
                                                        indexing="ij"))
    position = position % positions
    feats = (rng.normal(0, 1, (subjects, d))[subject] + rng.normal(0, 1, (positions, d))[position]
             + rng.normal(0, 0.5, (len(subject), d)))
    return feats, subject, position


def matched_split(rng, subject, position, n=200, own=0.3):
    """The evaluation's pairing on real slices alone: n sampled slices, each with a reference among the other
    slices at its position, from its own subject with probability `own`, else from another subject."""
    sample = rng.choice(len(subject), n, replace=False)
    free = np.ones(len(subject), bool)
    free[sample] = False
    ref = np.empty(n, int)
    for i, s in enumerate(sample):
        here = free & (position == position[s])
        same = here & (subject == subject[s]) if rng.random() < own else here & (subject != subject[s])
        ref[i] = rng.choice(np.flatnonzero(same if same.any() else here))
        free[ref[i]] = False
    return sample, ref


def test_kid_of_two_disjoint_sets_of_real_slices_is_zero():
    """Manipulated = real: a sample of real slices against references from the other real slices, matched by
    position and a third of them from the source's own subject. Both sets come from one population, so the
    KID's subject-bootstrap interval holds 0; a shifted set is told apart."""
    rng = np.random.default_rng(0)
    feats, subject, position = real_slices(rng)
    sample, ref = matched_split(rng, subject, position)
    a, b, g, h = feats[sample], feats[ref], subject[sample], subject[ref]
    assert 0.2 < np.mean(g == h) < 0.4
    w = stats.SubjectBootstrap(g, 1000, seed=0).for_pairs(g)
    lo, hi = stats.percentile_interval(stats.kid(a, b, w, g, h))
    assert lo < 0 < hi
    assert stats.percentile_interval(stats.kid(a + 0.5, b, w, g, h))[0] > 0


def test_subject_bootstrap_intervals():
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(40), 10)                 # 400 pairs of 40 subjects
    own = rng.normal(0, 1, (40, 8))[subjects]               # subject effects: pairs of a subject are alike
    boot = stats.SubjectBootstrap(subjects, 1000, seed=0)
    w = boot.for_pairs(subjects)
    # the subject bootstrap is wider than treating the clustered pairs as independent
    v = own[:, 0] + rng.normal(0, 0.1, len(own))
    lo, hi = boot.interval(v, subjects)[1]
    naive = 2 * 1.96 * v.std() / np.sqrt(len(v))
    assert hi - lo > 2 * naive
    # resampled means are the means of the resampled pairs
    rows0 = np.repeat(np.arange(len(v)), w[0].astype(int))
    assert boot.means(v, subjects)[0] == pytest.approx(v[rows0].mean())


def test_intervals_hold_the_level_they_are_labelled_with():
    """A percentile interval holds LEVEL of the resampled values, and LEVEL is the 95 % that the README,
    evaluate.py's help and every report state."""
    samples = np.random.default_rng(0).normal(size=100_001)
    lo, hi = stats.percentile_interval(samples)
    assert np.mean((samples >= lo) & (samples <= hi)) == pytest.approx(stats.LEVEL, abs=1e-4)
    assert np.mean(samples < lo) == pytest.approx(np.mean(samples > hi), abs=1e-3)
    assert stats.LEVEL == 0.95


def test_balanced_accuracy_is_the_mean_recall_per_class():
    true = np.array([0] * 8 + [1] * 2 + [2] * 4)
    pred = np.array([0] * 7 + [1] + [1, 0] + [2, 2, 0, 0])
    recall = [np.mean(pred[true == k] == k) for k in range(3)]      # 7/8, 1/2, 1/2
    assert stats.balanced_accuracy(pred, true) == pytest.approx(np.mean(recall))
    assert stats.balanced_accuracy(pred, true) != pytest.approx(np.mean(pred == true))
    w = stats.SubjectBootstrap(np.arange(len(true)), 4, seed=0).for_pairs(np.arange(len(true)))
    for i in range(len(w)):   # a resample without some class has no balanced accuracy (NaN)
        rows = np.repeat(np.arange(len(true)), w[i].astype(int))
        t, p = true[rows], pred[rows]
        expected = np.mean([np.mean(p[t == k] == k) if (t == k).any() else np.nan for k in range(3)])
        np.testing.assert_allclose(stats.balanced_accuracy(pred, true, w)[i], expected, rtol=1e-12)
