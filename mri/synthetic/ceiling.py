"""What a slice can tell of diagnosis at best: a classifier given the slice's true anatomy (synthetic stores).

The oracle reads diagnosis from pixels. How well any slice classifier could do is bounded by how much the
diagnosis changes what a slice shows. On the synthetic cohort the renderer knows each slice's true areas of
brain, lateral ventricles and hippocampus (mm², from the structure masks, `synthetic.counterfactual`), its
subject's age and its position. The ceiling classifier sees exactly those:

    features  age, and per structure z = (log(1 + area) - m_k) / s_k with m_k, s_k the train mean and SD at
              the slice's axial index k (areas depend on position far more than on disease), plus every
              square and pairwise product of these four (a quadratic decision boundary)
    model     multinomial logistic regression, class-balanced weights (the target is balanced accuracy),
              L2 1e-3, fitted by scipy's L-BFGS on the train split's slices

and is scored on another split like the oracle: balanced accuracy per slice, and per volume (the mean of its
slices' log-probabilities), each with a subject-level 95 % interval. It is an estimate of the ceiling: its
features are the anatomy that the atrophy model changes (mri/synthetic.py), without scan noise or the
subject's texture.
"""
import numpy as np
from scipy import optimize

from mri import stats

STRUCTURES = ("brain", "ventricles", "hippocampus")
L2 = 1e-3


def true_areas(store, idx, batch_size=256, progress=None):
    """{structure: (N,) true areas in mm²} of stored synthetic slices (each volume re-rendered once)."""
    from mri import synthetic
    idx = np.asarray(idx)
    order = np.argsort(store.volume[idx], kind="stable")   # consecutive slices of one volume: one render
    out = {s: np.zeros(len(idx)) for s in STRUCTURES}
    for i in range(0, len(idx), batch_size):
        part = order[i:i + batch_size]
        areas = synthetic.counterfactual(store, idx[part])
        for s in STRUCTURES:
            out[s][part] = areas[s]
        if progress:
            progress(len(part))
    return out


def _design(areas, age, position, norm):
    z = [(np.log1p(areas[s]) - norm[s][0][position]) / norm[s][1][position] for s in STRUCTURES]
    base = np.stack([(age - norm["age"][0]) / norm["age"][1], *z], axis=1)
    pairs = [base[:, i] * base[:, j] for i in range(base.shape[1]) for j in range(i, base.shape[1])]
    return np.concatenate([base, np.stack(pairs, axis=1), np.ones((len(base), 1))], axis=1)


def _normaliser(areas, age, position, n_positions):
    norm = {"age": (age.mean(), age.std() or 1.0)}
    for s in STRUCTURES:
        v = np.log1p(areas[s])
        mean = np.array([v[position == k].mean() if (position == k).any() else v.mean() for k in range(n_positions)])
        sd = np.array([v[position == k].std() if (position == k).sum() > 1 else 0.0 for k in range(n_positions)])
        norm[s] = (mean, np.where(sd > 1e-9, sd, 1.0))
    return norm


def fit_logistic(x, y, n_classes, l2=L2):
    """Class-balanced multinomial logistic regression: weights (features, classes)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w_sample = (len(y) / (n_classes * np.maximum(counts, 1)))[y]
    onehot = np.eye(n_classes)[y]

    def loss(flat):
        w = flat.reshape(x.shape[1], n_classes)
        z = x @ w
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        value = -(w_sample * (onehot * logp).sum(1)).sum() / len(y) + l2 * (w[:-1] ** 2).sum()
        grad = x.T @ ((np.exp(logp) - onehot) * w_sample[:, None]) / len(y)
        grad[:-1] += 2 * l2 * w[:-1]
        return value, grad.ravel()

    res = optimize.minimize(loss, np.zeros(x.shape[1] * n_classes), jac=True, method="L-BFGS-B",
                            options={"maxiter": 1000})
    return res.x.reshape(x.shape[1], n_classes)


def log_probabilities(x, w):
    z = x @ w
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def dx_ceiling(store, fit_split="train", score_split="val", max_fit_subjects=200, n_boot=1000, seed=0,
               progress=None):
    """Fit the ceiling classifier on (up to `max_fit_subjects` seeded subjects of) `fit_split` and score it on
    `score_split`: {"slice": {...}, "volume": {...}} with balanced accuracy and its interval, chance, n."""
    if "dx" not in store.schema.names or "csv/subject_seed" not in store.file:
        raise ValueError(f"{store.path}: the diagnosis ceiling needs a synthetic store with a 'dx' attribute "
                         "(data_prep.py --synthetic N)")
    fit_idx = store.indices(fit_split)
    subjects = np.unique(store.subject[fit_idx])
    if len(subjects) > max_fit_subjects:
        keep = np.random.default_rng([seed, 3]).choice(subjects, max_fit_subjects, replace=False)
        fit_idx = fit_idx[np.isin(store.subject[fit_idx], keep)]
    score_idx = store.indices(score_split)
    n_pos = int(store.slice.max()) + 1
    k = store.schema["dx"].width
    a_fit, a_score = true_areas(store, fit_idx, progress=progress), true_areas(store, score_idx, progress=progress)
    age_fit, age_score = store.attrs["age"][fit_idx], store.attrs["age"][score_idx]
    norm = _normaliser(a_fit, age_fit, store.slice[fit_idx], n_pos)
    w = fit_logistic(_design(a_fit, age_fit, store.slice[fit_idx], norm), store.attrs["dx"][fit_idx].astype(int), k)
    logp = log_probabilities(_design(a_score, age_score, store.slice[score_idx], norm), w)
    truth = store.attrs["dx"][score_idx].astype(int)
    volumes, inverse = np.unique(store.volume[score_idx], return_inverse=True)
    vol_logp = np.stack([np.bincount(inverse, logp[:, c]) for c in range(k)], axis=1)
    vol_truth = np.zeros(len(volumes), int)
    vol_truth[inverse] = truth
    vol_subject = np.empty(len(volumes), object)
    vol_subject[inverse] = store.subject[score_idx]
    out = {"fit_slices": len(fit_idx), "fit_subjects": int(len(np.unique(store.subject[fit_idx])))}
    for level, lp, t, groups in (("slice", logp, truth, store.subject[score_idx]),
                                 ("volume", vol_logp, vol_truth, vol_subject.astype(str))):
        pred = lp.argmax(axis=1)
        boot = stats.SubjectBootstrap(groups, n_boot, seed)
        out[level] = {"balanced_accuracy": stats.balanced_accuracy(pred, t),
                      "ci": stats.percentile_interval(stats.balanced_accuracy(pred, t, boot.for_pairs(groups))),
                      "chance_balanced_accuracy": 1.0 / len(np.unique(t)), "n": len(t)}
    return out


def describe(result):
    """One printed line of dx_ceiling()."""
    cells = [f"{level} {result[level]['balanced_accuracy']:.3f} [{result[level]['ci'][0]:.3f}, "
             f"{result[level]['ci'][1]:.3f}] (n = {result[level]['n']})" for level in ("slice", "volume")]
    return (f"dx ceiling from true areas, age and position (fitted on {result['fit_subjects']} subjects): balanced "
            f"accuracy per " + ", per ".join(cells) + f"; chance {result['slice']['chance_balanced_accuracy']:.3g}")
