"""Worst-case objective weights: the inner problem of RMOD (rmod.md, "The game, per block").

For candidate values ``A[k, g]`` (K candidates, G objectives, normalised) the worst-case
weights solve the convex problem

    w* = argmin_{w in simplex} log( (1/K) sum_k exp(lam * (A @ w)_k) ).

No library solves a batch of tiny simplex-constrained problems on tensors, so this is
written by hand. ``solver="exact"`` works in float64 on ``h(w) = f(w) / lam`` (the same
minimiser, and a scale that does not blow up with lam) and uses how small the problem is:
G is 2 to 16, so second-order steps are cheap. G = 2 is a one-dimensional root search
(``_solve_pair``); G >= 3 is a batched active-set Newton method in numpy: one face of the
simplex per iteration on large batches (``_solve_newton``), three on small batches, whose
time is per call rather than per value, and on the few problems where one face stalls
(``_solve_faces``). All stop a problem once its Frank-Wolfe gap ``grad.w - min_g grad_g``, an upper bound on
``h(w) - h(w*)``, is below ``tol``. ``solver="reference"`` reproduces the public reference
implementation's 10 steps of clipped gradient descent on softmax logits, for reproducing
published numbers.
"""

from __future__ import annotations

import math

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


def _solve_pair(A: torch.Tensor, lam: float, tol: float, max_iter: int) -> torch.Tensor:
    """G = 2: an exact one-dimensional solve over ``w = (1 - s, s)``, s in [0, 1].

    ``lam * h'(s) = E_p[b]`` with ``b = lam * (A[:, 1] - A[:, 0])`` and ``p = softmax(lam * A @ w)`` is
    nondecreasing in s (``lam * h'' = Var_p(b) >= 0``). The end points are checked first (s = 0 is
    optimal when ``h'(0) >= 0``, s = 1 when ``h'(1) <= 0``, and s = 1/2 is kept when it already
    meets ``tol``, as the old solver's start did). Otherwise the root of h' lies strictly inside
    a bracket ``[lo, hi]`` with ``h'(lo) < 0 < h'(hi)``, and a safeguarded Newton iteration
    (Numerical Recipes' rtsafe) finds it: take the Newton step on h' when it stays inside the
    bracket and at least halves the step before last, else bisect, and shrink the bracket
    with the sign of h'. The bracket always holds the root and its width at least halves
    every two steps, so the iteration converges; near the root the Newton step is taken and
    the convergence is quadratic. The Frank-Wolfe gap is ``s * h'(s)`` or ``(s - 1) * h'(s)``.
    """
    a = lam * A[..., 0]
    b = lam * (A[..., 1] - A[..., 0])  # z(s) = a + s * b
    # First pass: s = 1/2 and both end points at once.
    s3 = torch.tensor([0.5, 0.0, 1.0], dtype=A.dtype, device=A.device)
    p3 = torch.softmax(a.unsqueeze(1) + s3.view(1, 3, 1) * b.unsqueeze(1), 2)
    m3 = (p3 * b.unsqueeze(1)).sum(2)  # lam * h' at 1/2, 0, 1
    mid_ok = torch.where(m3[:, 0] > 0, 0.5 * m3[:, 0], -0.5 * m3[:, 0]) < lam * tol
    s = torch.where(mid_ok, 0.5, torch.where(m3[:, 1] >= 0, 0.0, torch.where(m3[:, 2] <= 0, 1.0, 0.5)))
    stop = mid_ok | (m3[:, 1] >= 0) | (m3[:, 2] <= 0)
    lo = torch.where(m3[:, 0] > 0, 0.0, 0.5)
    hi = lo + 0.5
    s = torch.where(stop, s, 0.5 * (lo + hi))
    dx_old = torch.full_like(s, 0.5)
    dx = dx_old.clone()
    b2 = b * b
    for _ in range(max_iter):
        if bool(stop.all()):
            break
        p = torch.softmax(a + s.unsqueeze(1) * b, 1)
        m = (p * b).sum(1)
        stop |= torch.where(m > 0, s, s - 1.0) * m < lam * tol
        stop |= hi - lo <= 4e-16
        v = (p * b2).sum(1) - m * m  # Var_p(b) = lam * h''
        pos = m > 0
        hi = torch.where(pos, s, hi)
        lo = torch.where(pos, lo, s)
        newton = s - m / v
        take = (newton > lo) & (newton < hi) & (2.0 * m.abs() <= (dx_old * v).abs())
        s_new = torch.where(take, newton, 0.5 * (lo + hi))
        dx_old, dx = dx, s_new - s
        s = torch.where(stop, s, s_new)
    return torch.stack((1.0 - s, s), 1)


# Shorter Newton steps for the line search: 1/4, ..., 1/256, then 1/4^6 ... 1/4^18 for a nearly
# piecewise-linear h (lam times the value spread in the millions).
_CS = np.array([1.0, 4.0]).reshape(1, 2, 1)  # the active-set rule's c for two of the three faces
_SHORT_STEPS = np.array([4.0**-k for k in (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18)]).reshape(1, -1, 1)


def _no_progress(h_then: np.ndarray | None, h_now: np.ndarray) -> np.ndarray | bool:
    """Where 32 iterations lowered ``lam * h`` by less than 1e-12 relative: at the rounding
    floor h 'improves' by noise only, so those problems are done."""
    return False if h_then is None else h_then - h_now <= 1e-12 * (1.0 + np.abs(h_now))


def _solve_newton(A: np.ndarray, lam: float, tol: float, max_iter: int) -> np.ndarray:
    """Batched active-set Newton method on the simplex, for G >= 3 (numpy, float64).

    Written in numpy, not torch: the problems are tiny (G x G systems), so much of the cost
    is the number of array operations, and numpy's are cheaper per call (and its batched
    solve on small batches); torch's batched LU is used for large batches only. The values
    are centred per objective (``A = Ac + 1 m'``): ``lam * A @ w`` differs from
    ``lam * Ac @ w`` by ``lam * m.w``, the same for every candidate, so the tilted
    distribution p and the Hessian come from ``Ac`` without cancellation, and ``lam * m``
    is added back to the gradient and to every change of h.

    Each iteration, for every problem still in the batch (all quantities times lam:
    ``lg = lam * grad h`` are the tilted means, ``H = lam * hess h = lam^2 * Cov_p(A)``, so the
    Newton step is unchanged):

    1. one face of the simplex to take a Newton step on: the objectives kept by the
       primal-dual active-set rule ``c * tau * w_g > lg_g - min(lg)`` (tau: mean diagonal of
       H; the objectives with the smallest gradient are always kept), with c = 4. A problem
       whose Newton step loses to the Frank-Wolfe step, or where nothing lowers h, is handed
       to ``_solve_faces``, which tries three faces per iteration (at lam = 1 a few problems in
       a hundred; more as h gets nearly linear at large lam);
    2. the Newton step of the quadratic model of h on that face with the weights off it
       moved to zero: one bordered KKT system ``[[H_SS, 1], [1', 0]]`` per problem in one
       batched solve, plus a tiny ridge on H that keeps it invertible when objectives are
       identical, have no spread, or K is 1; the step is cut at the simplex boundary
       (ratio test), so it stays feasible;
    3. a line search over that step at length 1 and a Frank-Wolfe step of length
       ``min(1, gap / L)`` towards the minimisers of the gradient (L bounds the curvature of h
       along it); only where the unit step loses, lengths 1/4, ..., 1/4^18 too. The
       candidate with the lowest h wins; h is compared exactly, without cancellation, as
       ``exp(lam * (h(w + u) - h(w))) = exp(lam * m.u) * sum_k p_k exp(lam * (Ac u)_k)``.

    Why it converges: the Frank-Wolfe candidate alone lowers h by at least
    ``gap * min(1, gap / L) / 2``, and the chosen candidate is never worse, so h decreases
    monotonically and the gap goes to zero at least as fast as for Frank-Wolfe with short
    steps. Near the optimum the rule keeps the objectives with positive weight and drops
    those whose gradient stays above the minimum, so the face is the optimal one, the unit
    Newton step on it wins and the convergence is quadratic: from uniform weights a problem
    at lam = 1 takes 3 to 7 iterations. A problem leaves the batch when its gap is below
    ``tol``, or when 32 iterations lowered ``lam * h`` by less than 1e-12 relative (only when
    ``tol`` is below what float64 can resolve: values ~1e3 with lam ~1e3), or when it is handed
    over (with the iterations it has left).
    """
    P, K, G = A.shape
    out = np.empty((P, G))
    w = np.full((P, G), 1.0 / G)
    idx = np.arange(P)
    m = A.mean(1)
    Ac = A - m[:, None, :]
    lAc = np.ascontiguousarray(lam * Ac.transpose(0, 2, 1))  # [P, G, K]
    lm = lam * m  # [P, G]
    # Boehning's bound hess h = lam * Cov_p(A) <= lam/2 * Ac'Ac for every p: twice its trace bounds
    # the curvature of h along any e_g - w (squared length <= 2), hence the Frank-Wolfe step length.
    bd = (0.5 * lam) * (Ac * Ac).sum(1)  # [P, G]
    inv_lL = 0.5 / (lam * np.maximum(bd.sum(1), 1e-300))  # 1 / (lam * L): the gap here is lam * gap
    # The ridge: relative to H's size, and to the spread of the values so that a flat direction
    # (identical objectives, one candidate) gives a long but finite step, not rounding noise.
    span = A.max((1, 2)) - A.min((1, 2))
    reg = (lam * (1e-12 * bd.max(1) + 1e-8 * span) + 1e-300)[:, None, None] * np.eye(G)
    border = np.zeros((G + 1, G + 1))
    border[G, :G] = border[:G, G] = 1.0
    eye_b = np.eye(G + 1)
    eye_b[G, G] = 0.0
    hand_idx, hand_w = [], []  # problems handed to the three-face path, and their weights then
    h_then = None
    ltol = lam * tol
    for it in range(max_iter + 1):
        z = (w[:, None, :] @ lAc)[:, 0, :]  # lam * Ac @ w, [n, K]
        zmax = z.max(1)
        e = np.exp(z - zmax[:, None])
        esum = e.sum(1)
        p = e / esum[:, None]
        lgc = (lAc @ p[:, :, None])[:, :, 0]
        lg = lgc + lm
        lgmin = lg.min(1)
        gap = (lg * w).sum(1) - lgmin
        stop = gap < ltol
        if it % 32 == 0:
            h_now = zmax + np.log(esum) + (lm * w).sum(1)  # lam * h + log K
            stop |= _no_progress(h_then, h_now)
            h_then = h_now
        if it == max_iter or stop.all():
            out[idx] = w
            break
        if stop.any():
            out[idx[stop]] = w[stop]
            keep = ~stop
            idx, lAc, lm, inv_lL, reg, h_then, w, z, zmax, esum, p, lgc, lg, lgmin, gap = (
                t[keep] for t in (idx, lAc, lm, inv_lL, reg, h_then, w, z, zmax, esum, p, lgc, lg, lgmin, gap)
            )
        n = len(idx)
        H = (lAc * p[:, None, :]) @ lAc.transpose(0, 2, 1) - lgc[:, :, None] * lgc[:, None, :] + reg
        dg = lg - lgmin[:, None]
        vertex = dg == 0.0
        tw = (np.einsum("pii->p", H) / G)[:, None] * w
        S = (4.0 * tw > dg) | vertex
        Se = np.concatenate((S, np.ones((n, 1), dtype=bool)), 1)
        Hb = np.zeros((n, G + 1, G + 1))
        Hb[:, :G, :G] = H
        Hb += border
        Kt = np.where(Se[:, :, None] & Se[:, None, :], Hb, eye_b)
        w_off = np.where(S, 0.0, w)  # the weight the face moves to zero
        rhs = np.concatenate((np.where(S, (w_off[:, None, :] @ H)[:, 0, :] - lg, -w_off), w_off.sum(1, keepdims=True)), 1)
        if n * (G + 1) ** 3 > 100_000:  # torch's batched LU is faster on large batches, numpy's call on small ones
            d = torch.linalg.solve_ex(torch.from_numpy(Kt), torch.from_numpy(rhs[:, :, None]))[0].numpy()[:, :G, 0]
        else:
            d = np.linalg.solve(Kt, rhs[:, :, None])[:, :G, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            d *= np.minimum(np.where(d < 0, w / -d, 1.0).min(1), 1.0)[:, None]  # cut: ratio test
        fw = np.minimum(gap * inv_lL, 1.0)[:, None] * (vertex / vertex.sum(1, keepdims=True) - w)
        U = np.stack((d, fw), 1)  # [n, 2, G]
        logp = z - (zmax + np.log(esum))[:, None]
        ar = np.arange(n)
        with np.errstate(over="ignore", invalid="ignore"):
            s = np.exp(logp[:, None, :] + U @ lAc + U @ lm[:, :, None]).sum(2)
            s[np.isnan(s)] = np.inf
            best = s.argmin(1)
            s_best = s[ar, best]
            step = U[ar, best]
            lost = ~(s[:, 0] < s[:, 1])
            if lost.any():  # shorter Newton steps, only where the unit one lost
                Us = d[lost][:, None, :] * _SHORT_STEPS
                s2 = np.exp(logp[lost][:, None, :] + Us @ lAc[lost] + Us @ lm[lost][:, :, None]).sum(2)
                s2[np.isnan(s2)] = np.inf
                b2 = s2.argmin(1)
                s2 = s2[np.arange(len(b2)), b2]
                better = s2 < s_best[lost]
                at = lost.nonzero()[0][better]
                s_best[at] = s2[better]
                step[at] = Us[better, b2[better]]
                best[at] = 0
        moved = s_best < 1.0
        w = w + np.where(moved[:, None], step, 0.0)
        hand = (best == 1) | ~moved  # the one face lost or stalls: the three-face path takes over
        if hand.any():
            hand_idx.append(idx[hand])
            hand_w.append(w[hand])
            keep = ~hand
            idx, lAc, lm, inv_lL, reg, h_then, w = (
                t[keep] for t in (idx, lAc, lm, inv_lL, reg, h_then, w)
            )
            if not len(idx):
                break
    if hand_idx:
        at = np.concatenate(hand_idx)
        w0 = np.concatenate(hand_w)
        out[at] = _solve_faces(A[at], lam, tol, max(max_iter - it, 1), w0)
    return out


def _solve_faces(A: np.ndarray, lam: float, tol: float, max_iter: int, w0: np.ndarray) -> np.ndarray:
    """The robust path of the G >= 3 solver, from ``w0``: three candidate faces per iteration.

    ``worst_case_weights`` sends small batches here from uniform weights (three faces cost
    hardly more than one when the time is per call), and ``_solve_newton`` hands over the
    problems where its one face per iteration stalls. Each iteration, for every problem still
    in the batch:

    1. ``H = lam * Cov_p(A)``, the Hessian of h (G x G), plus a tiny ridge that keeps it
       invertible when objectives are identical, have no spread, or K is 1;
    2. three candidate faces of the simplex: the objectives kept by a primal-dual active-set
       rule ``c * tau * w_g > grad_g - min(grad)`` for c = 1 and 4 (tau: mean diagonal of H;
       the objectives with the smallest gradient are always kept), and the support of w
       without its weights below 1e-3 of the largest;
    3. on each face, the Newton step of the quadratic model of h with the weights off the
       face moved to zero: one bordered KKT system ``[[H_SS, 1], [1', 0]]`` per face, all
       faces and problems in one batched ``np.linalg.solve``; the step is then cut at the
       boundary of the simplex (ratio test), so every candidate stays feasible;
    4. the face whose cut step has the lowest model value is kept; its step is tried at
       lengths 1, 1/4, ..., 1/4^18, next to a Frank-Wolfe step of length ``min(1, gap / L)``
       towards the minimisers of the gradient (L >= the curvature of h along it), and the
       candidate with the lowest h wins (h is compared exactly, without cancellation).

    Why it converges: the Frank-Wolfe candidate alone lowers h by at least
    ``gap * min(1, gap / L) / 2``, and the chosen candidate is never worse, so h decreases
    monotonically and the gap goes to zero at least as fast as for Frank-Wolfe with short
    steps. Near the optimum the optimal face is among the candidates (the rules keep the
    objectives with positive weight and drop those whose gradient stays above the minimum),
    the unit Newton step on it wins, and the convergence is quadratic: at lam = 1 a problem
    takes 3 to 8 iterations, at lam = 1000 tens. The short lengths handle a nearly
    piecewise-linear h (lam times the value spread in the millions). A problem leaves the
    batch when its gap is below ``tol``, when no candidate lowers h any more, or when 32
    iterations lowered ``lam * h`` by less than 1e-12 relative: h is then optimal to rounding,
    which only happens when ``tol`` is below what float64 can resolve (values ~1e3 with lam
    ~1e3).
    """
    P, K, G = A.shape
    out = np.empty((P, G))
    w = w0.copy()
    idx = np.arange(P)
    lAt = np.ascontiguousarray((lam * A).transpose(0, 2, 1))  # [P, G, K]
    Ac = A - A.mean(1, keepdims=True)
    bd = (0.5 * lam) * (Ac * Ac).sum(1)
    inv_L = 0.5 / np.maximum(bd.sum(1, keepdims=True), 1e-300)
    span = A.max((1, 2)) - A.min((1, 2))
    reg = (1e-12 * bd.max(1) + 1e-8 * span + 1e-300)[:, None, None] * np.eye(G)
    border = np.zeros((G + 1, G + 1))
    border[G, :G] = border[:G, G] = 1.0
    eye_b = np.eye(G + 1)
    eye_b[G, G] = 0.0
    stop = np.zeros(P, dtype=bool)
    h_then = None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf / nan are handled below
        for it in range(max_iter + 1):
            z = (w[:, None, :] @ lAt)[:, 0, :]
            zm = z.max(1, keepdims=True)
            e = np.exp(z - zm)
            se = e.sum(1, keepdims=True)
            p = e / se
            logp = (z - zm) - np.log(se)
            lg = (lAt @ p[:, :, None])[:, :, 0]
            g = lg / lam
            gmin = g.min(1, keepdims=True)
            gap = (g * w).sum(1, keepdims=True) - gmin
            stop |= gap[:, 0] < tol
            if it % 32 == 0:
                h_now = z[:, 0] - logp[:, 0]  # lam * h + log K
                stop |= _no_progress(h_then, h_now)
                h_then = h_now
            if it == max_iter or stop.all():
                out[idx] = w
                break
            nd = int(stop.sum())
            if nd and (2 * nd >= len(idx) or nd * K * G >= 4096):  # drop finished problems in bulk
                out[idx[stop]] = w[stop]
                keep = ~stop
                idx, lAt, inv_L, reg, w, logp, p, lg, g, gmin, gap, stop, h_then = (
                    t[keep] for t in (idx, lAt, inv_L, reg, w, logp, p, lg, g, gmin, gap, stop, h_then)
                )
            n = len(idx)
            C = lAt - lg[:, :, None]
            H = (C * p[:, None, :]) @ C.transpose(0, 2, 1) / lam + reg
            tau = np.einsum("pii->p", H)[:, None] / G
            vertex = g == gmin
            S = np.concatenate(
                ((_CS * (tau * w)[:, None, :] > (g - gmin)[:, None, :]) | vertex[:, None, :],
                 (w > 1e-3 * w.max(1, keepdims=True))[:, None, :]),
                1,
            )  # [n, 3, G]: the candidate faces
            Se = np.concatenate((S, np.ones((n, 3, 1), dtype=bool)), 2)
            Hb = np.zeros((n, G + 1, G + 1))
            Hb[:, :G, :G] = H
            Hb += border
            Kt = np.where(Se[:, :, :, None] & Se[:, :, None, :], Hb[:, None], eye_b)
            wW = w[:, None, :] * ~S  # the weight each face moves to zero
            rhs = np.concatenate((np.where(S, wW @ H - g[:, None, :], -wW), wW.sum(2, keepdims=True)), 2)
            try:
                d = np.linalg.solve(Kt, rhs[..., None])[..., :G, 0]  # Newton step on each face
            except np.linalg.LinAlgError:  # a singular system (not seen in the tests): least squares for all
                d = np.linalg.pinv(Kt) @ rhs[..., None]
                d = d[..., :G, 0]
            d = d * np.minimum(np.where(d < 0, w[:, None, :] / -d, 1.0).min(2, keepdims=True), 1.0)  # ratio test
            model = ((g[:, None, :] + 0.5 * (d @ H)) * d).sum(2)
            model[np.isnan(model)] = np.inf
            ar = np.arange(n)
            dn = d[ar, model.argmin(1)]
            vf = vertex.astype(float)  # Frank-Wolfe target: the minimisers of the gradient alike (keeps ties symmetric)
            fw = np.minimum(gap * inv_L, 1.0) * (vf / vf.sum(1, keepdims=True) - w)
            # exp(lam * (h(w + u) - h(w))) = sum_k p_k exp(lam * (A u)_k): the change of h without cancellation.
            # The unit Newton step and the Frank-Wolfe step first; the shorter Newton steps only when needed.
            U = np.stack((dn, fw), 1)
            s = np.exp(logp[:, None, :] + U @ lAt).sum(2)
            s[np.isnan(s)] = np.inf
            if ((~(s[:, 0] < s[:, 1])) & ~stop).any():
                Us = dn[:, None, :] * _SHORT_STEPS
                U = np.concatenate((U, Us), 1)
                s2 = np.exp(logp[:, None, :] + Us @ lAt).sum(2)
                s2[np.isnan(s2)] = np.inf
                s = np.concatenate((s, s2), 1)
            best = s.argmin(1)
            stop |= ~(s[ar, best] < 1.0)
            w = np.where(stop[:, None], w, w + U[ar, best])
    return out


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
    project promises); ``reference`` runs the reference implementation's 10 steps.
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
        if G == 2:
            with torch.inference_mode():  # no autograd bookkeeping: many tiny ops
                w = _solve_pair(A, lam, tol, max_iter)
            w = w.clone()  # a normal tensor again, outside inference mode
        else:
            An = A.cpu().numpy()
            if An.size < 2048:  # a small batch costs per call, not per value: three faces per iteration are free
                wn = _solve_faces(An, lam, tol, max_iter, np.full((An.shape[0], G), 1.0 / G))
            else:
                wn = _solve_newton(An, lam, tol, max_iter)
            w = torch.from_numpy(wn).to(A.device)
    else:
        w = _solve_reference(A, lam)
    return w.reshape(*lead, G).to(values.dtype if values.is_floating_point() else torch.float32)
