"""Worst-case objective weights: the inner problem of RMOD (rmod.md, "The game, per block").

For candidate values ``A[k, g]`` (K candidates, G objectives, normalised) the worst-case
weights solve the convex problem

    w* = argmin_{w in simplex} log( (1/K) sum_k exp(lam * (A @ w)_k) ).

No library solves a batch of tiny simplex-constrained problems on tensors, so this is
written by hand. ``solver="exact"`` works in float64 on ``h(w) = f(w) / lam`` (the same
minimiser, and a scale that does not blow up with lam) and uses how small the problem is:
G is 2 to 16, so second-order steps are cheap. G = 2 is a one-dimensional root search
(``_solve_pair``); G >= 3 is a batched active-set Newton method (``_solve_newton``). Both
stop a problem once its Frank-Wolfe gap ``grad.w - min_g grad_g``, an upper bound on
``h(w) - h(w*)``, is below ``tol``. ``solver="reference"`` reproduces the public reference
implementation's 10 steps of clipped gradient descent on softmax logits, for reproducing
published numbers.
"""

from __future__ import annotations

import math

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


def _solve_newton(A: torch.Tensor, lam: float, tol: float, max_iter: int) -> torch.Tensor:
    """Batched active-set Newton method on the simplex, for G >= 3.

    Each iteration, for every problem still in the batch:

    1. ``H = lam * Cov_p(A)``, the Hessian of h (G x G), plus a tiny ridge that keeps it
       invertible when objectives are identical, have no spread, or K is 1;
    2. three candidate faces of the simplex: the objectives kept by a primal-dual active-set
       rule ``c * tau * w_g > grad_g - min(grad)`` for c = 1 and 4 (tau: mean diagonal of H;
       the objectives with the smallest gradient are always kept), and the support of w
       without its weights below 1e-3 of the largest;
    3. on each face, the Newton step of the quadratic model of h with the weights off the
       face moved to zero: one bordered KKT system ``[[H_SS, 1], [1', 0]]`` per face, all
       faces and problems in one batched ``torch.linalg.solve``; the step is then cut at the
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
    batch when its gap is below ``tol``, or when 32 iterations lowered ``lam * h`` by less
    than 1e-12 relative: h is then optimal to rounding, which only happens when ``tol`` is
    below what float64 can resolve (values ~1e3 with lam ~1e3).
    """
    P, K, G = A.shape
    dev, dt = A.device, A.dtype
    out = torch.empty_like(A[:, 0])
    w = A.new_full((P, G), 1.0 / G)
    idx = torch.arange(P, device=dev)
    lAt = (lam * A).transpose(1, 2)  # [P, G, K]
    Ac = A - A.mean(1, keepdim=True)
    # Boehning's bound lam * Cov_p(A) <= lam/2 * Ac'Ac for every p: twice its trace bounds the
    # curvature of h along any e_g - w (squared length <= 2), hence the Frank-Wolfe step length.
    bd = (0.5 * lam) * Ac.pow(2).sum(1)  # diagonal of the bound, [P, G]
    inv_L = 0.5 / bd.sum(1, keepdim=True).clamp_min(1e-300)
    # A ridge on H: relative to its size, and to the spread of the values so that a flat direction
    # (identical objectives, one candidate) gives a long but finite step, not rounding noise.
    span = A.amax((1, 2)) - A.amin((1, 2))
    reg = (1e-12 * bd.amax(1) + 1e-8 * span + 1e-300).view(-1, 1, 1) * torch.eye(G, dtype=dt, device=dev)
    border = torch.zeros(G + 1, G + 1, dtype=dt, device=dev)
    border[G, :G] = border[:G, G] = 1.0
    eyeb = torch.eye(G + 1, dtype=dt, device=dev)
    eyeb[G, G] = 0.0
    cs = torch.tensor([1.0, 4.0], dtype=dt, device=dev).view(1, 2, 1)
    # Shorter Newton steps: 1/4, ..., 1/256, then 1/4^6 ... 1/4^18 for a nearly piecewise-linear h (lam * values ~ 1e6).
    steps = torch.tensor([4.0**-k for k in (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18)], dtype=dt, device=dev)
    steps = steps.view(1, -1, 1)
    stop = torch.zeros(P, dtype=torch.bool, device=dev)
    ar = torch.arange(P, device=dev)
    h_then = None
    for it in range(max_iter + 1):
        z = (lAt * w.unsqueeze(2)).sum(1)
        logp = torch.log_softmax(z, 1)
        p = logp.exp()
        lg = (lAt * p.unsqueeze(1)).sum(2)  # lam * gradient of h (the tilted means)
        g = lg / lam
        gmin = g.amin(1, keepdim=True)
        gap = (g * w).sum(1, keepdim=True) - gmin
        stop |= gap.squeeze(1) < tol
        if it % 32 == 0:  # at the rounding floor h 'improves' by noise only: stop when 32 steps gained nothing
            h_now = z[:, 0] - logp[:, 0]  # lam * h + log K
            if h_then is not None:
                stop |= h_then - h_now <= 1e-12 * (1.0 + h_now.abs())
            h_then = h_now
        if it == max_iter or bool(stop.all()):
            out[idx] = w
            break
        nd = int(stop.sum())
        if nd and (2 * nd >= len(idx) or nd * K * G >= 4096):  # drop finished problems in bulk
            out[idx[stop]] = w[stop]
            keep = (~stop).nonzero().squeeze(1)
            idx, lAt, inv_L, reg, w, logp, p, lg, g, gmin, gap, stop, h_then = (
                t[keep] for t in (idx, lAt, inv_L, reg, w, logp, p, lg, g, gmin, gap, stop, h_then)
            )
            ar = torch.arange(len(idx), device=dev)
        C = lAt - lg.unsqueeze(2)
        H = torch.baddbmm(reg, C * p.unsqueeze(1), C.transpose(1, 2), alpha=1.0 / lam)
        tau = torch.diagonal(H, dim1=1, dim2=2).mean(1, keepdim=True)
        vertex = g == gmin
        S = torch.cat(
            (
                (cs * (tau * w).unsqueeze(1) > (g - gmin).unsqueeze(1)) | vertex.unsqueeze(1),
                (w > 1e-3 * w.amax(1, keepdim=True)).unsqueeze(1),
            ),
            1,
        )  # [n, 3, G]: the candidate faces
        Se = torch.nn.functional.pad(S, (0, 1), value=True)
        Kt = torch.where(Se.unsqueeze(3) & Se.unsqueeze(2), (torch.nn.functional.pad(H, (0, 1, 0, 1)) + border).unsqueeze(1), eyeb)
        wW = w.unsqueeze(1) * ~S  # the weight each face moves to zero
        rhs = torch.cat((torch.where(S, wW @ H - g.unsqueeze(1), -wW), wW.sum(2, keepdim=True)), 2)
        d = torch.linalg.solve_ex(Kt, rhs.unsqueeze(3))[0][..., :G, 0]  # Newton step on each face
        d = d * torch.where(d < 0, w.unsqueeze(1) / -d, 1.0).amin(2, keepdim=True).clamp_max(1.0)  # cut: ratio test
        model = ((g.unsqueeze(1) + 0.5 * (d @ H)) * d).sum(2).nan_to_num(float("inf"))
        dn = d[ar, model.argmin(1)]
        vertex = vertex.to(dt)  # Frank-Wolfe target: the minimisers of the gradient alike (keeps ties symmetric)
        fw = (gap * inv_L).clamp_max(1.0) * (vertex / vertex.sum(1, keepdim=True) - w)
        # exp(lam * (h(w + u) - h(w))) = sum_k p_k exp(lam * (A u)_k): the change of h without cancellation.
        # The unit Newton step and the Frank-Wolfe step first; the shorter Newton steps only when needed.
        U = torch.stack((dn, fw), 1)
        s = (logp.unsqueeze(1) + U @ lAt).exp().sum(2).nan_to_num(float("inf"))
        if bool((~(s[:, 0] < s[:, 1]) & ~stop).any()):
            Us = dn.unsqueeze(1) * steps
            U = torch.cat((U, Us), 1)
            s = torch.cat((s, (logp.unsqueeze(1) + Us @ lAt).exp().sum(2).nan_to_num(float("inf"))), 1)
        sb, best = s.min(1)
        stop |= ~(sb < 1.0)
        w = torch.where(stop.unsqueeze(1), w, w + U[ar, best])
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
        with torch.inference_mode():  # no autograd bookkeeping: many tiny ops
            w = _solve_pair(A, lam, tol, max_iter) if G == 2 else _solve_newton(A, lam, tol, max_iter)
        w = w.clone()  # a normal tensor again
    else:
        w = _solve_reference(A, lam)
    return w.reshape(*lead, G).to(values.dtype if values.is_floating_point() else torch.float32)
