"""Box-constrained L-BFGS run on every row of a batch, each row its own optimisation (DFI's reconstruction).

scipy's `minimize` has no batched mode: one L-BFGS-B call over a batch's summed objectives shares the step
lengths and the curvature history between the rows, so before convergence a row's result depends on its batch
mates, and one call per row evaluates the objective (a network) one row at a time. `minimize` keeps a history, a
step and a stopping state per row, and asks for the values and gradients of all rows still searching in one
call: for independent objectives the gradient of their sum is every row's own gradient.

Per row, with x in [lower, upper]^n, f = f(x), g = grad f(x), one iteration:
    held      the coordinates at a bound whose gradient points outward; d_j = 0 there
    d         = -H g on the others: H the inverse Hessian of the row's last `memory` pairs (s, y) (two-loop
                recursion, H0 = (s.y / y.y) I of the newest pair); without a pair d = -g / ||g||
    x(t)      = clip(x + t d, lower, upper) for t = 1, then the minimiser of the quadratic through f, the slope
                g.(x(t) - x) / t and f(x(t)), kept within [t / 10, t / 2], until the projected Armijo condition
                f(x(t)) <= f + C1 g.(x(t) - x) holds (at most MAX_TRIES trial points)
    pair      s = x(t) - x, y = g(x(t)) - g, kept if s.y > eps y.y (the slot of this iteration stays empty else)
    stop      max_j |clip(x - g) - x|_j <= gtol, or (f_old - f) / max(|f_old|, |f|, 1) <= ftol (scipy's L-BFGS-B
              defaults), or no acceptable point along -g; with a history, a failed search clears it first.
Rows iterate in lockstep: iteration i stores its pair in slot i mod memory of every row, so a row's iterates
depend on its own objective only.
"""
import numpy as np

C1, MAX_TRIES = 1e-4, 20
GTOL, FTOL = 1e-5, 1e7 * np.finfo(float).eps
EPS = np.finfo(np.float32).eps


def dot(a, b):
    """Row-wise dot products of (B, n) arrays, by matmul: einsum's sum takes another path for a single row."""
    return np.matmul(a[:, None, :], b[:, :, None])[:, 0, 0].astype(np.float64)


def projected_gradient(x, g, lower, upper):
    """max_j |clip(x - g, lower, upper) - x|_j of each row: 0 at a constrained stationary point."""
    return np.abs(np.clip(x - g, lower, upper) - x).max(1)


def _direction(x, g, S, Y, rho, gamma, newest, rows, lower, upper):
    """-H g of the batch's `rows` (a slice or indices; x, g theirs) with the held coordinates zeroed, by the
    two-loop recursion over their pairs, newest first; rho = 0 marks an empty slot, which contributes nothing."""
    held = ((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0))
    q, tmp = np.where(held, np.float32(0), g), np.empty_like(g)
    memory = S.shape[1]
    order, alpha = [(newest - j) % memory for j in range(memory)], np.zeros((len(g), memory))
    for k in order:
        alpha[:, k] = rho[rows, k] * dot(S[rows, k], q)
        q -= np.multiply(Y[rows, k], alpha[:, k, None].astype(np.float32), out=tmp)
    q *= gamma[rows, None].astype(np.float32)
    for k in reversed(order):
        beta = rho[rows, k] * dot(Y[rows, k], q)
        q += np.multiply(S[rows, k], (alpha[:, k] - beta)[:, None].astype(np.float32), out=tmp)
    q[held] = 0.0
    return np.negative(q, out=q)


def minimize(fun, x0, lower, upper, iterations, memory=10, gtol=GTOL, ftol=FTOL):
    """argmin over each row of x (B, n) within [lower, upper], from x0, for at most `iterations` iterations.

    fun(x (R, n) float32, rows (R,) indices into the batch) -> (values (R,) float64, gradients (R, n) float32)
    of those rows. Returns (x (B, n) float32, {"iterations": (B,), "evaluations": (B,), "calls": calls of fun})."""
    x = np.clip(np.asarray(x0, np.float32), lower, upper)
    b, n = x.shape
    f, g = fun(x, np.arange(b))
    S, Y = np.zeros((b, memory, n), np.float32), np.zeros((b, memory, n), np.float32)
    rho, gamma = np.zeros((b, memory)), np.ones(b)
    active = projected_gradient(x, g, lower, upper) > gtol
    nit, nfev, calls = np.zeros(b, np.int64), np.ones(b, np.int64), 1
    for i in range(iterations):
        r, slot = np.flatnonzero(active), i % memory
        if not len(r):
            break
        rows = slice(None) if len(r) == b else r
        d = _direction(x[rows], g[rows], S, Y, rho, gamma, (i - 1) % memory, rows, lower, upper)
        fresh = ~rho[r].any(1)
        d[fresh] /= np.sqrt(dot(d[fresh], d[fresh]))[:, None].astype(np.float32)
        rho[r, slot] = 0.0                                  # set below by an accepted step's pair
        t, trying, done = np.ones(len(r)), np.arange(len(r)), np.zeros(len(r), bool)
        for _ in range(MAX_TRIES):
            j = r[trying]
            xt = np.clip(x[j] + t[trying, None].astype(np.float32) * d[trying], lower, upper)
            ft, gt = fun(xt, j)
            nfev[j], calls = nfev[j] + 1, calls + 1
            slope = dot(g[j], xt - x[j])
            ok = ft <= f[j] + C1 * slope
            a = j[ok]
            s, y = xt[ok] - x[a], gt[ok] - g[a]
            sy, yy = dot(s, y), dot(y, y)
            keep = sy > EPS * yy
            rho[a[keep], slot], gamma[a[keep]] = 1.0 / sy[keep], sy[keep] / yy[keep]
            S[a[keep], slot], Y[a[keep], slot] = s[keep], y[keep]
            decrease = (f[a] - ft[ok]) / np.maximum(np.maximum(np.abs(f[a]), np.abs(ft[ok])), 1.0)
            active[a] = (decrease > ftol) & (projected_gradient(xt[ok], gt[ok], lower, upper) > gtol)
            x[a], f[a], g[a], done[trying[ok]] = xt[ok], ft[ok], gt[ok], True
            with np.errstate(divide="ignore", invalid="ignore"):
                quad = -slope * t[trying] / (2.0 * (ft - f[j] - slope))
            t[trying] = np.clip(np.where(np.isfinite(quad), quad, 0.0), t[trying] / 10, t[trying] / 2)
            trying = trying[~ok]
            if not len(trying):
                break
        failed = ~done
        active[r[failed & fresh]] = False                    # no acceptable point along -g: stop
        rho[r[failed]] = 0.0                                 # else clear the history: next, along -g
        nit[r] += 1
    return x, {"iterations": nit, "evaluations": nfev, "calls": calls}
