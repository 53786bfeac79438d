"""The worst-case weight solvers against scipy and a hand-written reference procedure."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from rmod_distill.weights import kkt_gap, log_mean_exp_objective, project_to_simplex, worst_case_weights


def scipy_argmin(A: np.ndarray, lam: float) -> torch.Tensor:
    """The best SLSQP point over the simplex from several starts (it may miss the simplex slightly)."""
    K, G = A.shape

    def f(w):
        return (np.logaddexp.reduce(lam * A @ w) - math.log(K)) / lam

    starts = [np.full(G, 1 / G)] + [0.9 * np.eye(G)[g] + 0.1 / G for g in range(G)]
    cons = [{"type": "eq", "fun": lambda w: w.sum() - 1}]
    runs = [minimize(f, x0, method="SLSQP", bounds=[(0, 1)] * G, constraints=cons, options={"ftol": 1e-14, "maxiter": 500})
            for x0 in starts]
    return torch.as_tensor(min(runs, key=lambda r: r.fun).x, dtype=torch.float64)


def scipy_minimum(A: np.ndarray, lam: float) -> float:
    """Best SLSQP value of f/lam over the simplex from several starts."""
    K, G = A.shape

    def f(w):
        z = lam * A @ w
        return (np.logaddexp.reduce(z) - math.log(K)) / lam

    starts = [np.full(G, 1 / G)] + [0.9 * np.eye(G)[g] + 0.1 / G for g in range(G)]
    cons = [{"type": "eq", "fun": lambda w: w.sum() - 1}]
    return min(
        minimize(f, x0, method="SLSQP", bounds=[(0, 1)] * G, constraints=cons, options={"ftol": 1e-14, "maxiter": 500}).fun
        for x0 in starts
    )


@pytest.mark.parametrize("lam", [1e-3, 0.3, 1.0, 10.0, 300.0])
@pytest.mark.parametrize("K,G", [(1, 3), (4, 2), (8, 4), (16, 10)])
def test_exact_matches_scipy(lam, K, G):
    gen = torch.Generator().manual_seed(K * 100 + G)
    A = torch.randn(K, G, generator=gen, dtype=torch.float64)
    w = worst_case_weights(A, lam)
    assert w.shape == (G,)
    assert torch.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-9
    ours = float(log_mean_exp_objective(A, w, lam)) / lam
    assert ours <= scipy_minimum(A.numpy(), lam) + 1e-6
    assert float(kkt_gap(A, w, lam)) < 1e-6


def test_g1_and_ties():
    A = torch.randn(5, 1)
    assert torch.equal(worst_case_weights(A, 1.0), torch.ones(1))
    # Two identical objectives: any split is optimal, and the value equals that of either alone.
    B = torch.randn(6, 1, dtype=torch.float64).repeat(1, 2)
    w = worst_case_weights(B, 2.0)
    assert float(kkt_gap(B, w, 2.0)) < 1e-6
    assert float(log_mean_exp_objective(B, w, 2.0)) == pytest.approx(
        float(log_mean_exp_objective(B, torch.tensor([1.0, 0.0], dtype=torch.float64), 2.0)), abs=1e-9
    )


def test_small_lambda_weights_lowest_mean_objective():
    A = torch.tensor([[0.0, 1.0, 2.0], [0.2, 1.2, 1.8], [-0.1, 0.9, 2.2]], dtype=torch.float64)
    w = worst_case_weights(A, 1e-4)
    assert torch.allclose(w, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-6)


def test_large_lambda_mixes_conflicting_objectives():
    # Candidate 0 is good for objective 0 only, candidate 1 for objective 1 only.
    A = torch.tensor([[2.0, -2.0], [-2.0, 2.0]], dtype=torch.float64)
    w = worst_case_weights(A, 50.0)
    assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-4)


def test_batched_equals_one_by_one():
    A = torch.randn(2, 3, 8, 4, generator=torch.Generator().manual_seed(1))
    batched = worst_case_weights(A, 1.0)
    assert batched.shape == (2, 3, 4)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(batched[i, j], worst_case_weights(A[i, j], 1.0), atol=1e-5)


def reference_by_autograd(A: torch.Tensor, lam: float) -> torch.Tensor:
    """The public implementation's procedure, written with autograd (independent of ours)."""
    u = torch.zeros(A.shape[-1], dtype=A.dtype, requires_grad=True)
    for i in range(10):
        loss = torch.exp(lam * A @ torch.softmax(u, 0)).mean()
        (grad,) = torch.autograd.grad(loss, u)
        with torch.no_grad():
            u -= torch.clamp(grad, -10, 10) / math.sqrt(i + 1)
    return torch.softmax(u, 0).detach()


@pytest.mark.parametrize("lam", [0.5, 1.0, 5.0])
def test_reference_solver_reproduces_procedure(lam):
    A = torch.randn(16, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.allclose(worst_case_weights(A, lam, solver="reference"), reference_by_autograd(A, lam), atol=1e-10)


def test_reference_solver_is_not_the_argmin():
    A = torch.randn(64, 16, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = log_mean_exp_objective(A, worst_case_weights(A, 1.0), 1.0)
    ref = log_mean_exp_objective(A, worst_case_weights(A, 1.0, solver="reference"), 1.0)
    assert torch.all(ref >= exact - 1e-9)
    assert float((ref - exact).mean()) > 1e-4


def test_projection_onto_simplex():
    v = torch.tensor([[0.5, 0.5, 0.5], [3.0, -1.0, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    p = project_to_simplex(v)
    assert torch.allclose(p.sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(p[1], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(p[2], v[2])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_bad_lambda_raises(bad):
    with pytest.raises(ValueError, match="lambda"):
        worst_case_weights(torch.randn(4, 2), bad)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="solver"):
        worst_case_weights(torch.randn(4, 2), 1.0, solver="adam")
    with pytest.raises(ValueError, match="NaN"):
        worst_case_weights(torch.tensor([[float("nan"), 0.0]]), 1.0)


# --- The exact solver on degenerate problems, against scipy ------------------------------------

LAMS = [1e-3, 1e-1, 1.0, 10.0, 1e3]


def degenerate_case(name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if name == "ties":  # two objectives with equal values for every candidate
        base = rand(6, 1)
        return torch.cat((base, rand(6, 1), base, rand(6, 1)), 1)
    if name == "K=1":
        return rand(1, 5)
    if name == "K=1 tied minimum":
        return torch.tensor([[0.3, 0.1, 0.1, 0.5]], dtype=torch.float64)
    if name == "identical candidates":
        return rand(1, 4).repeat(5, 1)
    if name == "zero-spread objective":
        A = rand(8, 4)
        A[:, 2] = 0.4
        return A
    if name == "zero-spread objective is the minimum":
        A = rand(8, 4)
        A[:, 1] = -3.0
        return A
    if name == "two distinct candidates":
        return rand(2, 5).repeat(3, 1)
    if name == "all equal":
        return torch.full((4, 3), 0.7, dtype=torch.float64)
    if name == "G=2":
        return rand(8, 2)
    if name == "G=2 identical objectives":
        return rand(8, 1).repeat(1, 2)
    if name == "G=16":
        return rand(16, 16)
    if name == "G=16 K=3":
        return rand(3, 16)
    raise KeyError(name)


DEGENERATE = [
    "ties", "K=1", "K=1 tied minimum", "identical candidates", "zero-spread objective",
    "zero-spread objective is the minimum", "two distinct candidates", "all equal", "G=2",
    "G=2 identical objectives", "G=16", "G=16 K=3",
]


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("case", DEGENERATE)
def test_exact_on_degenerate_problems_matches_scipy(case, lam):
    A = degenerate_case(case)
    w = worst_case_weights(A, lam)
    assert torch.isfinite(w).all() and torch.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-12
    ours = float(log_mean_exp_objective(A, w, lam)) / lam
    assert ours <= scipy_minimum(A.numpy(), lam) + 1e-9
    assert float(kkt_gap(A, w, lam)) < 1e-7


def test_exact_g1():
    for lam in LAMS:
        assert torch.equal(worst_case_weights(torch.randn(3, 1), lam), torch.ones(1))


@pytest.mark.parametrize("lam", LAMS)
def test_exact_keeps_exact_ties_split_evenly(lam):
    # Where the optimum is not unique because objectives are tied, the old solver (FISTA from
    # the uniform start) split the weight evenly between them; so does the new one.
    w = worst_case_weights(degenerate_case("K=1 tied minimum"), lam)
    assert torch.allclose(w, torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64), atol=1e-9)
    w = worst_case_weights(degenerate_case("G=2 identical objectives"), lam)
    assert torch.allclose(w, torch.full((2,), 0.5, dtype=torch.float64), atol=1e-12)
    A = degenerate_case("ties")  # objectives 0 and 2 are identical
    w = worst_case_weights(A, lam)
    assert abs(float(w[0] - w[2])) < 1e-7


@pytest.mark.parametrize("lam", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("K,G", [(4, 4), (16, 10), (3, 16), (8, 2)])
def test_exact_on_extreme_values(lam, K, G):
    # Values of magnitude 1e3: with lam = 1e3 the problem is nearly a linear program and the
    # absolute gap 1e-7 is below what float64 resolves (1e-10 of the values); the solver must
    # still be finite, on the simplex and optimal to about that precision.
    A = 1e3 * torch.randn(6, K, G, generator=torch.Generator().manual_seed(K + G), dtype=torch.float64)
    w = worst_case_weights(A, lam)
    assert torch.isfinite(w).all() and torch.all(w >= 0)
    assert torch.allclose(w.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    scale = A.abs().amax((1, 2))
    assert torch.all(kkt_gap(A, w, lam) <= 1e-8 * scale)
    for i in range(2):  # scipy's points can miss the simplex by 1e-6, worth 1e-3 here: project them first
        ours = float(log_mean_exp_objective(A[i], w[i], lam)) / lam
        theirs = float(log_mean_exp_objective(A[i], project_to_simplex(scipy_argmin(A[i].numpy(), lam)), lam)) / lam
        assert ours <= theirs + 1e-9 * float(scale[i])


# --- Agreement with the solver this one replaced ------------------------------------------------


def old_fista_weights(A: torch.Tensor, lam: float, tol: float, max_iter: int = 200000) -> torch.Tensor:
    """ORACLE: the project's previous exact solver (FISTA with adaptive restart), kept verbatim
    in substance. ``A [P, K, G]`` float64, ``G >= 2``."""
    P, K, G = A.shape
    spread = (A - A.mean(1, keepdim=True)).pow(2).sum(-1).amax(1)
    step = 1.0 / (lam * spread).clamp_min(1e-12)
    w = torch.full((P, G), 1.0 / G, dtype=A.dtype)
    y, t = w.clone(), torch.ones(P, dtype=A.dtype)
    active = torch.arange(P)
    for it in range(max_iter):
        Aa, ya = A[active], y[active]
        p = torch.softmax(lam * (Aa * ya.unsqueeze(-2)).sum(-1), dim=-1)
        grad = (p.unsqueeze(-1) * Aa).sum(-2)
        w_new = project_to_simplex(ya - step[active, None] * grad)
        w_old = w[active]
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_agrees_with_old_fista_on_the_default_shape(seed):
    # The default recipe's shape: 64 prompts, K = 4 candidates, G = 4 objectives, lam = 1.
    A = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # At a tight tolerance both converge to the same (unique) optimum.
    new, old = worst_case_weights(A, 1.0, tol=1e-12), old_fista_weights(A, 1.0, tol=1e-12)
    assert float((new - old).abs().max()) < 1e-6
    # At the default tolerance the weights may differ by what a gap of 1e-7 allows (up to
    # ~1e-4 on flat problems, for both solvers), but the candidate each picks does not.
    new, old = worst_case_weights(A, 1.0), old_fista_weights(A, 1.0, tol=1e-7)
    assert torch.equal((A @ new.unsqueeze(-1)).argmax(1), (A @ old.unsqueeze(-1)).argmax(1))


# --- One problem at a time: batching changes nothing ------------------------------------------


@pytest.mark.parametrize("lam", [1e-3, 1.0, 30.0])
@pytest.mark.parametrize("K,G", [(16, 5), (4, 4), (8, 2)])
def test_a_problem_gets_the_same_weights_in_any_batch(lam, K, G):
    # Each problem is solved on its own (weights.py), so its weights do not depend on which
    # problems share its batch or how many there are: bit for bit, not only within the gap.
    A = torch.randn(300, K, G, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batched = worst_case_weights(A, lam)
    assert torch.all(kkt_gap(A, batched, lam) < 1e-7)
    assert torch.equal(worst_case_weights(A[7:11], lam), batched[7:11])
    assert torch.equal(worst_case_weights(A[123], lam), batched[123])
    assert torch.equal(worst_case_weights(A.flip(0), lam), batched.flip(0))


def test_float32_values_are_solved_in_float64():
    A = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    w32 = worst_case_weights(A.float(), 1.0)
    assert w32.dtype == torch.float32
    assert torch.allclose(w32.double(), worst_case_weights(A.float().double(), 1.0), atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 4, 2), (3, 4, 4), (200, 16, 5)])
def test_weights_are_ordinary_tensors(shape):
    w = worst_case_weights(torch.randn(*shape, dtype=torch.float64), 1.0)
    assert not w.is_inference()
    w.add_(1.0)  # an inference tensor would refuse this


def test_values_too_large_for_float64_are_refused():
    with pytest.raises(ValueError, match="too large"):
        worst_case_weights(1e200 * torch.randn(2, 4, 3, dtype=torch.float64), 1e200)


@pytest.mark.parametrize("lam", [1e5, 1e9, 1e20, 1e99])
@pytest.mark.parametrize("K,G", [(16, 10), (4, 4), (8, 2), (3, 16)])
def test_huge_lambda_solves_the_linear_program(lam, K, G):
    # As lam grows, h = f / lam tends to max_k (A w)_k: the weights must solve that linear
    # program (continuation; the old batched solver was off by 0.25 of the values at 1e20).
    from scipy.optimize import linprog

    A = torch.randn(8, K, G, generator=torch.Generator().manual_seed(K * G), dtype=torch.float64)
    w = worst_case_weights(A, lam)
    assert torch.isfinite(w).all() and torch.all(w >= 0)
    assert torch.allclose(w.sum(-1), torch.ones(8, dtype=torch.float64), atol=1e-12)
    for a, wi in zip(A.numpy(), w.numpy()):
        res = linprog(np.r_[np.zeros(G), 1.0], A_ub=np.c_[a, -np.ones(K)], b_ub=np.zeros(K),
                      A_eq=np.r_[np.ones(G), 0.0][None], b_eq=[1.0], bounds=[(0, None)] * G + [(None, None)],
                      method="highs")
        slack = math.log(K) / lam  # f / lam lies within log(K) / lam of max_k (A w)_k
        assert (a @ wi).max() <= res.fun + slack + 1e-12 * np.abs(a).max()


def test_values_near_the_float64_limit_stay_finite():
    # Per-objective means of values near 1e308 would overflow a plain sum.
    A = torch.tensor([[1e308, -1e308, 0.0], [1e308, 1e308, 1.0]], dtype=torch.float64)
    assert torch.equal(worst_case_weights(A, 1e-300), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_values_that_require_grad():
    A = torch.randn(5, 4, 2, dtype=torch.float64, requires_grad=True)
    w = worst_case_weights(A, 1.0)
    assert torch.all(kkt_gap(A.detach(), w, 1.0) < 1e-7)
