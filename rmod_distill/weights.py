"""Worst-case objective weights: the inner problem of RMOD (rmod.md, "The game, per block").

For candidate values ``A[k, g]`` (K candidates, G objectives, normalised) the worst-case
weights solve the convex problem

    w* = argmin_{w in simplex} log( (1/K) sum_k exp(lam * (A @ w)_k) ).

No library solves a batch of tiny simplex-constrained problems, so this is written by hand.
``solver="exact"`` (:func:`_solve_exact`) solves each problem on its own, in float64, in loops
compiled by numba: G is 2 to 16, so second-order steps are cheap, and a problem is a few
thousand flops that batched array code would spend on per-call overhead. Each iteration is
a step of sequential quadratic programming: the minimiser of the quadratic model over the
simplex (an active-set method on G x G systems) and an Armijo line search towards it; a unit
step that passes is taken, any other is compared with a Frank-Wolfe step, the safeguard that
makes it converge. A problem stops once its
Frank-Wolfe gap ``grad.w - min_g grad_g``, an upper bound on ``h(w) - h(w*)`` for
``h = f / lam``, is below ``tol``; its weights do not depend on the other problems of the
batch. ``solver="reference"`` reproduces the public reference implementation's 10 steps of
clipped gradient descent on softmax logits, for reproducing published numbers.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

SOLVERS = ("exact", "reference")


def log_mean_exp_objective(values: torch.Tensor, weights: torch.Tensor, lam: float) -> torch.Tensor:
    """``f(w) = log mean_k exp(lam * (A @ w)_k)`` for ``values [..., K, G]`` and ``weights [..., G]``."""
    z = lam * (values * weights.unsqueeze(-2)).sum(-1)
    return torch.logsumexp(z, dim=-1) - math.log(values.shape[-2])


def tilted_means(values: torch.Tensor, weights: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-objective means under ``softmax_k(lam * A @ w)``: the gradient of ``f / lam``."""
    p = torch.softmax(lam * (values * weights.unsqueeze(-2)).sum(-1), dim=-1)
    return (p.unsqueeze(-1) * values).sum(-2)


def kkt_gap(values: torch.Tensor, weights: torch.Tensor, lam: float) -> torch.Tensor:
    """Frank-Wolfe gap of ``f / lam`` at ``weights``: zero exactly at the optimum, ``[...]``."""
    grad = tilted_means(values, weights, lam)
    return (grad * weights).sum(-1) - grad.min(-1).values


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v [..., G]`` onto the probability simplex."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    ind = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / ind) > 0
    rho = cond.to(v.dtype).mul(ind).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0.0)


# ----------------------------------------------------------------------------- the exact solver
# One problem at a time in compiled loops (numba): G is 2 to 16 and K a few dozen, so a problem
# is a few thousand flops, and batched array code spends its time on per-call overhead instead
# (the numpy version this replaced ran about 60 array operations per Newton iteration). Every
# buffer is allocated once per batch in _solve_exact and handed down.


@numba.njit(cache=True, nogil=True)
def _cholesky_solve(M, n, b):
    """Overwrite the leading ``n x n`` block of the positive definite ``M`` with its Cholesky
    factor, and ``b`` with ``M^-1 b``."""
    for j in range(n):
        s = M[j, j]
        for t in range(j):
            s -= M[j, t] * M[j, t]
        s = math.sqrt(s) if s > 0.0 else 1e-300
        M[j, j] = s
        for i in range(j + 1, n):
            r = M[i, j]
            for t in range(j):
                r -= M[i, t] * M[j, t]
            M[i, j] = r / s
    for i in range(n):  # forward: L y = b
        r = b[i]
        for t in range(i):
            r -= M[i, t] * b[t]
        b[i] = r / M[i, i]
    for i in range(n - 1, -1, -1):  # backward: L' x = y
        r = b[i]
        for t in range(i + 1, n):
            r -= M[t, i] * b[t]
        b[i] = r / M[i, i]


@numba.njit(cache=True, nogil=True)
def _newton_point(H, grad, w, x, free, M, t, gq, face):
    """``x``: the minimiser of the quadratic model ``q(x) = grad.(x - w) + (x - w)' H (x - w) / 2``
    over the simplex, by a primal active-set method from ``x = w`` (``free``: the objectives
    whose weight is off its bound ``x_g = 0``).

    Each round minimises the model on the current face, with the weights off it at zero, in
    the face's own coordinates: with ``j`` the face's largest weight, a step moves the other
    weights by ``t`` and weight ``j`` by ``-sum(t)``, so every point stays on ``1'x = 1`` exactly
    (a bordered system would, with the ill-conditioned H of a large lam, miss it by more than
    the gap), and ``t`` solves the reduced system ``Z' H Z t = -Z' grad q(x)`` by Cholesky. If
    the step is feasible it is taken, and the objective off the face with the most negative
    multiplier ``mu_g = grad q_g - grad q_j`` joins the face (none: ``x`` solves the model);
    otherwise ``x`` moves along it until a weight reaches zero, and that objective leaves the
    face. Every round lowers ``q`` (H is positive definite), so ``x`` stays feasible with
    ``q(x) <= q(w) = 0``, and ``x - w`` is a descent direction even if the round limit stops it.
    Returns whether ``x`` is the model's minimiser (False: the round limit stopped it first).
    """
    G = grad.shape[0]
    scale = 0.0
    for g in range(G):
        scale = max(scale, abs(grad[g]))
    eps = 1e-13 * (1.0 + scale)
    at_face_optimum = False
    for _ in range(4 * G + 4):
        for a in range(G):
            s = grad[a]
            for b in range(G):
                s += H[a, b] * (x[b] - w[b])
            gq[a] = s
        j = -1
        for g in range(G):
            if free[g] and (j < 0 or x[g] > x[j]):
                j = g
        if at_face_optimum:
            worst = -eps
            release = -1
            for g in range(G):
                if not free[g] and gq[g] - gq[j] < worst:
                    worst = gq[g] - gq[j]
                    release = g
            if release < 0:
                return True
            free[release] = True
            at_face_optimum = False
            continue
        n = 0
        for g in range(G):
            if free[g] and g != j:
                face[n] = g
                n += 1
        for i in range(n):
            a = face[i]
            t[i] = gq[j] - gq[a]
            for c in range(n):
                b = face[c]
                M[i, c] = H[a, b] - H[a, j] - H[j, b] + H[j, j]
        _cholesky_solve(M, n, t)
        tj = 0.0
        for i in range(n):
            tj -= t[i]
        alpha = 1.0
        block = -1
        if tj < 0.0 and x[j] < -tj:
            alpha = x[j] / -tj
            block = j
        for i in range(n):
            a = face[i]
            if t[i] < 0.0 and x[a] < -alpha * t[i]:
                alpha = x[a] / -t[i]
                block = a
        for i in range(n):
            x[face[i]] += alpha * t[i]
        x[j] += alpha * tj
        if block >= 0:
            x[block] = 0.0
            free[block] = False
        else:
            at_face_optimum = True
    return False


@numba.njit(cache=True, nogil=True)
def _apply(B, v, out):
    """``out = B @ v`` for ``B [K, G]``; returns the smallest and largest entry of ``out``."""
    lo = math.inf
    hi = -math.inf
    for k in range(B.shape[0]):
        s = 0.0
        for g in range(B.shape[1]):
            s += B[k, g] * v[g]
        out[k] = s
        lo = min(lo, s)
        hi = max(hi, s)
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _change(p, logp, Bd, alpha, lmd):
    """``F(w + alpha d) - F(w) = log sum_k p_k exp(alpha (B d)_k) + alpha lam m.d``, computed as
    ``log1p(sum_k p_k expm1(.))`` so that a change of 1e-20 in an F of 1 is still seen; a term
    too large for ``expm1`` is taken in log space (``log p_k``), and inf means an overflow."""
    s = 0.0
    for k in range(p.shape[0]):
        t = alpha * Bd[k]
        if t < 700.0:
            s += p[k] * math.expm1(t)
        elif logp[k] + t < 700.0:
            s += math.exp(logp[k] + t) - p[k]
        else:
            return math.inf
    if s > -0.5:
        return math.log1p(s) + alpha * lmd
    # Every candidate's value falls a lot: log sum_k exp(log p_k + t_k) directly (no cancellation
    # left to avoid, and log1p would round s = -1 + tiny to -1, a fall of -inf).
    top = -math.inf
    for k in range(p.shape[0]):
        top = max(top, logp[k] + alpha * Bd[k])
    s = 0.0
    for k in range(p.shape[0]):
        s += math.exp(logp[k] + alpha * Bd[k] - top)
    return top + math.log(s) + alpha * lmd


@numba.njit(cache=True, nogil=True)
def _solve_exact(A, lam, tol, max_iter):
    """Worst-case weights of every problem of ``A [P, K, G]`` (float64, G >= 2): ``[P, G]``.

    Works on ``F(w) = log sum_k exp(lam (A w)_k)`` (``lam * h`` plus a constant: the same
    minimiser) with the values centred per objective, ``A = Ac + 1 m'``: ``lam A w`` differs from
    ``B w = lam Ac w`` by ``lam m.w``, the same for every candidate, so the tilted distribution
    ``p = softmax(B w)`` and the Hessian ``H = B' (diag p - p p') B = lam^2 Cov_p(A)`` come from
    ``B`` without cancellation. From uniform weights, each iteration is a step of sequential
    quadratic programming with a Frank-Wolfe safeguard:

    1. ``p``, the gradient ``grad = B'p + lam m`` and the Frank-Wolfe gap
       ``grad.w - min_g grad_g`` (``lam`` times the gap of h, an upper bound on
       ``F(w) - F(w*)``); the problem is done when it is below ``lam * tol``;
    2. the Newton point ``x``: the minimiser of the quadratic model of F over the simplex
       (:func:`_newton_point`), H with a ridge (1e-10 of its mean diagonal plus 1e-10 of ``lam``
       times the value spread) that keeps it positive definite when objectives are identical,
       have no spread, or K is 1;
    3. a backtracking (Armijo) line search on ``w + alpha (x - w)`` from ``alpha = 1``, beside a
       Frank-Wolfe step ``u`` towards the minimisers of the gradient, of length
       ``min(1, gap / L)`` with ``L = (max_k (B u)_k - min_k (B u)_k)^2 / 4`` (the curvature of F
       along ``u`` is a variance under p, at most a quarter of the squared range); the one that
       lowers F more is taken, each change of F computed without cancellation (:func:`_change`).

    When the unit step towards the model's minimiser passes the line search it is taken at once,
    and the Frank-Wolfe candidate is not computed (the usual case: it saves a product and K
    exponentials a step); when the active-set method stopped at its round limit short of the
    minimiser, every step is compared with the Frank-Wolfe one.

    Why it converges: the Frank-Wolfe candidate alone lowers F by at least
    ``gap * min(1, gap / L) / 2``, and a step compared with it is never worse. A unit step
    taken without the comparison lowers F by at least ``1e-4 |grad.d|``, and ``|grad.d|`` is
    at least that same bound: ``x`` minimises the model over the simplex, so
    ``grad.d <= q(x) <= q(w + beta u) = -beta gap + beta^2 u'Hu / 2`` for every beta in [0, 1],
    and ``u'Hu`` (a variance under p, plus the ridge) is at most about L. So F falls
    monotonically, by at least a fixed fraction of the Frank-Wolfe decrease a step, and the gap
    goes to zero. Near the optimum the model's minimiser over the simplex lies on the optimal
    face and is the Newton step there (H is the exact Hessian), the unit step passes the line
    search, and the convergence is quadratic: about 4 iterations from uniform weights at lam = 1. A problem
    also stops when neither step lowers F at all, or when 32 iterations lowered it by less than
    1e-12 relative: F is then optimal to rounding, which only happens when ``tol`` is below what
    float64 resolves (lam times the value spread above about 1e6).

    Where lam times the value spread exceeds 1e4, F is nearly piecewise linear and the exact
    Hessian sees its kinks only within about ``1 / (lam * spread)`` of them, so Newton steps from
    afar zig-zag. The problem is then solved by continuation: first at the lam that makes that
    product 1e4, then at ten times that lam from its weights, and so on up to lam; each start
    lies near the next optimum. In the limit this is the linear program
    ``min_w max_k (A w)_k``, which it solves to rounding (tested against scipy's ``linprog``).
    Below 1e4 (z-normalised values at lam up to about 100) it is one stage, as described above.
    """
    P, K, G = A.shape
    out = np.empty((P, G))
    B = np.empty((K, G))
    lm = np.empty(G)
    w = np.empty(G)
    x = np.empty(G)
    d = np.empty(G)
    fw = np.empty(G)
    grad = np.empty(G)
    bbar = np.empty(G)
    c = np.empty(G)
    H = np.empty((G, G))
    M = np.empty((G, G))
    t = np.empty(G)
    gq = np.empty(G)
    face = np.empty(G, np.int64)
    free = np.empty(G, np.bool_)
    z = np.empty(K)
    p = np.empty(K)
    logp = np.empty(K)
    Bd = np.empty(K)
    Bu = np.empty(K)
    mean = np.empty(G)
    for i in range(P):
        lo = math.inf
        hi = -math.inf
        for g in range(G):
            m = 0.0
            for k in range(K):
                a = A[i, k, g]
                m += a / K  # (a sum of values near the float64 limit would overflow)
                lo = min(lo, a)
                hi = max(hi, a)
            mean[g] = m
            w[g] = 1.0 / G
        # Continuation for a nearly piecewise-linear F (see the docstring).
        lspan = lam * hi - lam * lo  # finite: the caller refuses lam * |values| above 1e100
        stage = lam if lspan <= 1e4 else lam * (1e4 / lspan)
        while True:
            for g in range(G):
                lm[g] = stage * mean[g]
                for k in range(K):
                    v = A[i, k, g] - mean[g]
                    B[k, g] = stage * v if abs(v) < math.inf else stage * A[i, k, g] - stage * mean[g]
            _minimise(B, lm, w, stage * tol, 1e-10 * (stage / lam) * lspan + 1e-300, max_iter,
                      x, d, fw, grad, bbar, c, H, M, t, gq, face, free, z, p, logp, Bd, Bu)
            if stage >= lam:
                break
            stage = min(10.0 * stage, lam)
        for g in range(G):
            out[i, g] = w[g]
    return out


@numba.njit(cache=True, nogil=True)
def _minimise(B, lm, w, ltol, ridge_abs, max_iter, x, d, fw, grad, bbar, c, H, M, t, gq, face, free, z, p, logp,
              Bd, Bu):
    """The iterations of :func:`_solve_exact` on one problem, from ``w`` (overwritten with the
    result): ``F(w) = log sum_k exp((B w)_k) + lm.w`` to a Frank-Wolfe gap below ``ltol``; the
    other arguments are buffers."""
    K, G = B.shape
    dec = 0.0  # how much F fell since the last progress check
    for it in range(max_iter + 1):
        # 1. the tilted distribution, the gradient and the gap
        zmax = _apply(B, w, z)[1]
        se = 0.0
        for k in range(K):
            p[k] = math.exp(z[k] - zmax)
            se += p[k]
        gmin = math.inf
        gw = 0.0
        lse = math.log(se)
        for k in range(K):
            p[k] /= se
            logp[k] = z[k] - zmax - lse
        for g in range(G):
            s = 0.0
            for k in range(K):
                s += p[k] * B[k, g]
            bbar[g] = s
            grad[g] = s + lm[g]
            gmin = min(gmin, grad[g])
            gw += grad[g] * w[g]
        if gw - gmin < ltol or it == max_iter:
            break
        gap = gw - gmin
        if it % 32 == 0:
            if it > 0:
                f_now = zmax + lse
                for g in range(G):
                    f_now += lm[g] * w[g]
                if dec <= 1e-12 * (1.0 + abs(f_now)):
                    break
            dec = 0.0
        # 2. the Newton point over the simplex
        # H = sum_k p_k c_k c_k' with c_k = B_k - bbar, accumulated candidate by candidate
        # (the innermost loop runs over contiguous memory and vectorises)
        for a in range(G):
            for b in range(G):
                H[a, b] = 0.0
        for k in range(K):
            for g in range(G):
                c[g] = B[k, g] - bbar[g]
            for a in range(G):
                pc = p[k] * c[a]
                for b in range(a, G):
                    H[a, b] += pc * c[b]
        tr = 0.0
        for a in range(G):
            tr += H[a, a]
            for b in range(a + 1, G):
                H[b, a] = H[a, b]
        ridge = 1e-10 * tr / G + ridge_abs
        for a in range(G):
            H[a, a] += ridge
            x[a] = w[a]
            free[a] = w[a] > 0.0
        solved = _newton_point(H, grad, w, x, free, M, t, gq, face)
        # 3. the line search on the Newton direction, and the Frank-Wolfe step beside it
        gd = 0.0
        lmd = 0.0
        for g in range(G):
            d[g] = x[g] - w[g]
            gd += grad[g] * d[g]
            lmd += lm[g] * d[g]
        _apply(B, d, Bd)
        alpha = 2.0
        ch_newton = math.inf
        if gd < 0.0:
            for _ in range(64):  # alpha = 1, 1/2, ... 2^-63: the last one tried is the one taken
                alpha *= 0.5
                ch_newton = _change(p, logp, Bd, alpha, lmd)
                if ch_newton <= 1e-4 * alpha * gd:
                    break
        if solved and alpha == 1.0 and ch_newton <= 1e-4 * gd:
            # The unit step passed: it is taken without the Frank-Wolfe comparison (see why it
            # still converges in _solve_exact's docstring).
            dec -= ch_newton
            _renormalised_step(w, d, 1.0)
            continue
        nv = 0
        for g in range(G):
            if grad[g] == gmin:
                nv += 1
        lmu = 0.0
        for g in range(G):
            fw[g] = (1.0 / nv if grad[g] == gmin else 0.0) - w[g]
            lmu += lm[g] * fw[g]
        blo, bhi = _apply(B, fw, Bu)
        curv = 0.25 * (bhi - blo) ** 2
        beta = 1.0 if curv <= gap else gap / curv
        ch_fw = _change(p, logp, Bu, beta, lmu)
        if not min(ch_newton, ch_fw) < 0.0:
            break  # neither step lowers F: optimal to rounding
        if ch_newton <= ch_fw:
            dec -= ch_newton
            _renormalised_step(w, d, alpha)
        else:
            dec -= ch_fw
            _renormalised_step(w, fw, beta)


@numba.njit(cache=True, nogil=True)
def _renormalised_step(w, d, alpha):
    """``w += alpha d``: a convex combination of simplex points, put back on it (rounding)."""
    s = 0.0
    for g in range(w.shape[0]):
        w[g] = max(w[g] + alpha * d[g], 0.0)
        s += w[g]
    for g in range(w.shape[0]):
        w[g] /= s


def _solve_reference(A: torch.Tensor, lam: float, steps: int = 10) -> torch.Tensor:
    """The public implementation's procedure, as rmod.md specifies it (no warm start)."""
    u = torch.zeros(A.shape[0], A.shape[-1], dtype=A.dtype, device=A.device)
    for i in range(steps):
        w = torch.softmax(u, -1)
        e = torch.exp(lam * (A * w.unsqueeze(-2)).sum(-1))  # [P, K]
        dL_dw = lam * (e.unsqueeze(-1) * A).mean(-2)  # d/dw of mean_k exp(lam A w)
        grad = w * dL_dw - w * (w * dL_dw).sum(-1, keepdim=True)  # through softmax
        u = u - grad.clamp(-10.0, 10.0) / math.sqrt(i + 1)
    return torch.softmax(u, -1)


def worst_case_weights(
    values: torch.Tensor, lam: float, solver: str = "exact", tol: float = 1e-7, max_iter: int = 20000
) -> torch.Tensor:
    """Worst-case weights for candidate values ``[..., K, G]``; returns ``[..., G]`` on the simplex.

    Batched over every leading dimension. ``exact`` stops when the Frank-Wolfe gap of
    ``f / lam`` is below ``tol`` for every problem (default 1e-7, inside the 1e-6 the
    project promises), or, where lam times the values is so large that float64 cannot resolve
    that gap (above about 1e6), when the objective is optimal to rounding; ``reference`` runs
    the reference implementation's 10 steps.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not lam > 0 or not math.isfinite(lam):
        raise ValueError(f"lambda must be a positive finite number, got {lam}")
    values = torch.as_tensor(values)
    if values.ndim < 2:
        raise ValueError(f"values must be [..., K, G], got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("values contain NaN or inf")
    *lead, K, G = values.shape
    A = values.reshape(-1, K, G).to(torch.float64)
    if A.shape[0] == 0:
        w = A.new_zeros(0, G)
    elif G == 1:
        w = A.new_ones(A.shape[0], 1)
    elif solver == "exact":
        if lam * float(A.abs().max()) > 1e100:  # (lam * A)^2 must stay finite in float64
            raise ValueError(f"lambda x the largest value is {lam * float(A.abs().max()):.3g}: too large to solve in "
                             "float64; normalise the values or lower lambda")
        wn = _solve_exact(np.ascontiguousarray(A.detach().cpu().numpy()), float(lam), float(tol), int(max_iter))
        w = torch.from_numpy(wn).to(A.device)
    else:
        w = _solve_reference(A, lam)
    return w.reshape(*lead, G).to(values.dtype if values.is_floating_point() else torch.float32)
