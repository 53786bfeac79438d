"""The worst-case weight solvers against scipy and a hand-written reference procedure."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from rmod_distill.weights import kkt_gap, log_mean_exp_objective, project_to_simplex, worst_case_weights


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
