"""Image metrics of the protocol: MSE, SSIM and L1 (whole image or inside a mask), the pixels above the
background, and the Fréchet distance."""
import warnings

import numpy as np
from scipy import linalg



BACKGROUND = -1.0 + 1e-3   # brain mask: source pixels above the background value (-1)
# --- image metrics ------------------------------------------------------------------------------------
def ssim(x, y, data_range=2.0, size=11, sigma=1.5, k1=0.01, k2=0.03, mask=None):
    """Mean SSIM of each image pair (Wang et al. 2004, IEEE TIP 13:600), (N, H, W[, C]) -> (N,).
    Gaussian window 11x11 with sigma 1.5, averaged over the window positions inside the image, or over those
    centred on `mask` (N, H, W) pixels (NaN for an empty mask); C > 1 channels: the mean of the channels' SSIM."""
    channels = np.shape(x)[3] if np.ndim(x) == 4 else 1
    if channels > 1:
        per_channel = lambda v: np.moveaxis(np.asarray(v), 3, 1).reshape(-1, *np.shape(v)[1:3])
        m = None if mask is None else np.repeat(np.asarray(mask, bool).reshape(np.shape(x)[:3]), channels, axis=0)
        return ssim(per_channel(x), per_channel(y), data_range, size, sigma, k1, k2, m).reshape(-1, channels).mean(1)
    x = np.asarray(x, np.float64).reshape(len(x), *np.shape(x)[1:3])
    y = np.asarray(y, np.float64).reshape(x.shape)
    g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
    g /= g.sum()

    def blur(z):
        z = np.lib.stride_tricks.sliding_window_view(z, size, axis=1) @ g
        return np.lib.stride_tricks.sliding_window_view(z, size, axis=2) @ g

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    if mask is None:
        return s.mean(axis=(1, 2))
    h = size // 2
    m = np.asarray(mask, bool).reshape(x.shape)[:, h:h + s.shape[1], h:h + s.shape[2]]
    with np.errstate(invalid="ignore"):
        return (s * m).sum(axis=(1, 2)) / m.sum(axis=(1, 2))


def mse(x, y, mask=None):
    d = (np.asarray(x, np.float64) - np.asarray(y, np.float64).reshape(np.shape(x))) ** 2
    axes = tuple(range(1, np.ndim(x)))
    if mask is None:
        return d.mean(axis=axes)
    m = np.asarray(mask, bool)
    m = np.broadcast_to(m.reshape(m.shape[:3] + (1,) * (d.ndim - 3)) if d.ndim > 3 else m.reshape(d.shape), d.shape)
    with np.errstate(invalid="ignore"):
        return (d * m).sum(axis=axes) / m.sum(axis=axes)


def cosine(a, b, mask):
    """Per image, the cosine between two images (or changes) over the `mask` pixels, (N,); NaN where either
    is zero there (no direction: e.g. the no-change floor)."""
    a, b = (np.asarray(v, np.float64).reshape(len(mask), -1) for v in (a, b))
    m = np.asarray(mask, bool).reshape(len(mask), -1)
    a, b = a * m, b * m
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (a * b).sum(1) / norms, np.nan)


def correlation(x, y, mask):
    """Pearson correlation of each pair of images inside its mask, (N, H, W[, 1]) -> (N,): the cosine of the
    two centred on their means inside the mask; 0 where x is constant there and y is not (a method that
    predicts no change predicts none of the observed one), NaN where y is constant or the mask is empty."""
    m = np.asarray(mask, bool).reshape(len(mask), -1)
    x, y = (np.asarray(v, np.float64).reshape(m.shape) for v in (x, y))
    with np.errstate(invalid="ignore", divide="ignore"):
        xc, yc = ((v - (v * m).sum(1, keepdims=True) / m.sum(1, keepdims=True)) * m for v in (x, y))
    flat = lambda v: (v ** 2).sum(1) <= 1e-12 * np.maximum(m.sum(1), 1)
    return np.where(flat(xc) & ~flat(yc), 0.0, cosine(np.where(flat(xc)[:, None], 0.0, xc), yc, m))


def l1(x, y):
    return np.mean(np.abs(np.asarray(x, np.float64) - y), axis=tuple(range(1, np.ndim(x))))


def above_background(images):
    """The brain of each source image: its pixels above the background value in any channel, (N, S, S) bool."""
    x = np.asarray(images)
    return x.reshape(len(x), *x.shape[1:3], -1).max(-1) > BACKGROUND


def frechet_distance(a, b, eps=1e-6):
    """Fréchet distance between Gaussians fitted to two feature sets (Dowson & Landau 1982; the FID of
    Heusel et al. 2017): |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)). When the product is singular
    (fewer samples than dimensions) eps*I is added to both covariances, as in pytorch-fid; the matrix square
    root's negligible imaginary part is dropped. Biased and noisy with few samples: see FD_MIN_RATIO."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():   # singular products are handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(ca @ cb)
        if not np.isfinite(root).all():
            offset = eps * np.eye(len(ca))
            root = linalg.sqrtm((ca + offset) @ (cb + offset))
    d = a.mean(0) - b.mean(0)
    return float(max(d @ d + np.trace(ca) + np.trace(cb) - 2 * np.trace(root.real), 0.0))


# --- protocol -------------------------------------------------------------------------------------------
