"""Worst-case objective weights: the inner problem of RMOD (rmod.md, "The game, per block").

For candidate values ``A[k, g]`` (K candidates, G objectives, normalised) the worst-case
weights solve the convex problem

    w* = argmin_{w in simplex} log( (1/K) sum_k exp(lam * (A @ w)_k) ).

No library solves a batch of tiny simplex-constrained problems on tensors, so this is
written by hand. ``solver="exact"`` runs accelerated projected gradient (FISTA with
adaptive restart) in float64 on ``h(w) = f(w) / lam`` (the same minimiser, and a scale
that does not blow up with lam) until the Frank-Wolfe gap ``grad.w - min_g grad_g``, an
upper bound on ``h(w) - h(w*)``, is below ``tol`` for every problem.
``solver="reference"`` reproduces the public reference implementation's 10 steps of
clipped gradient descent on softmax logits, for reproducing published numbers.
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


def _solve_exact(A: torch.Tensor, lam: float, tol: float, max_iter: int) -> torch.Tensor:
    P, K, G = A.shape
    # Hessian of h = f/lam is lam * Cov_p(A) <= lam * max_k ||A_k - mean_k A||^2: a safe step.
    spread = (A - A.mean(1, keepdim=True)).pow(2).sum(-1).amax(1)
    step = 1.0 / (lam * spread).clamp_min(1e-12)  # [P]
    w = torch.full((P, G), 1.0 / G, dtype=A.dtype, device=A.device)
    y, t = w.clone(), torch.ones(P, dtype=A.dtype, device=A.device)
    active = torch.arange(P, device=A.device)
    for it in range(max_iter):
        Aa, ya = A[active], y[active]
        w_new = project_to_simplex(ya - step[active, None] * tilted_means(Aa, ya, lam))
        w_old = w[active]
        # Restart momentum where it points uphill (O'Donoghue & Candes' gradient test).
        restart = ((ya - w_new) * (w_new - w_old)).sum(-1) > 0
        ta = torch.where(restart, torch.ones_like(t[active]), t[active])
        t_new = (1 + torch.sqrt(1 + 4 * ta * ta)) / 2
        y[active] = w_new + ((ta - 1) / t_new)[:, None] * (w_new - w_old)
        w[active], t[active] = w_new, t_new
        if it % 5 == 4:
            done = kkt_gap(Aa, w_new, lam) < tol
            if done.all():
                break
            active = active[~done]
    return w


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
        w = _solve_exact(A, lam, tol, max_iter)
    else:
        w = _solve_reference(A, lam)
    return w.reshape(*lead, G).to(values.dtype if values.is_floating_point() else torch.float32)
