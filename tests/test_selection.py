"""Every method's selection rule on numbers alone: no model is needed."""

import numpy as np
import pytest
import torch
from scipy import stats

from rmod_distill.engine.selection import parse_method, select
from rmod_distill.weights import kkt_gap, worst_case_weights

NAMES = ["x", "y", "z"]


def random_values(n=5, K=6, G=3, seed=0, scale=1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, K, G)) * scale


@pytest.mark.parametrize("solver", ["exact", "reference"])
@pytest.mark.parametrize("lam", [0.5, 1.0, 4.0])
def test_rmod_argmax_takes_the_best_candidate_under_worst_case_weights(solver, lam):
    A = random_values()
    chosen, w = select(A, parse_method("rmod", NAMES), lam=lam, solver=solver)
    expected_w = worst_case_weights(torch.as_tensor(A), lam, solver)
    assert w.shape == (5, 3)
    assert torch.allclose(w, expected_w, atol=1e-12)
    scores = np.einsum("nkg,ng->nk", A, w.numpy())
    assert chosen == scores.argmax(-1).tolist()
    if solver == "exact":
        assert float(kkt_gap(torch.as_tensor(A), w, lam).max()) < 1e-6


def test_rmod_weights_move_towards_the_weak_objective():
    """Worst-case weights are not uniform: they lean on the objective every candidate scores low on."""
    A = np.array([[[1.0, -2.0], [0.5, -1.5], [1.5, -2.5]]])
    chosen, w = select(A, parse_method("rmod", ["a", "b"]))
    assert w[0, 1] > 0.9  # the weak objective b
    assert chosen == [1]  # the candidate best on b; uniform weights would tie, argmax(a) would pick 2


def test_rmod_sample_follows_the_tilted_softmax():
    """Draws with fresh per-prompt generators follow ``softmax_k(lam * A @ w*)`` for each prompt."""
    lam, draws, n, K = 2.0, 4000, 3, 6
    A = random_values(n=n, K=K, scale=0.7, seed=1)
    w = worst_case_weights(torch.as_tensor(A), lam)
    target = torch.softmax(lam * torch.einsum("nkg,ng->nk", torch.as_tensor(A), w), -1).numpy()
    # The target is neither uniform nor one-hot, so the check below can tell a wrong rule apart.
    assert np.abs(target - 1 / K).max() > 0.1 and target.max() < 0.9
    # Every prompt repeated `draws` times, each copy with its own seeded generator: one call.
    tiled = np.repeat(A, draws, axis=0)
    gens = [torch.Generator().manual_seed(s) for s in range(n * draws)]
    chosen, weights = select(tiled, parse_method("rmod", NAMES), lam=lam, selection="sample", generators=gens)
    assert torch.allclose(weights[::draws], w, atol=1e-9)
    counts = np.zeros((n, K))
    for i, k in enumerate(chosen):
        counts[i // draws, k] += 1
    empirical = counts / draws
    assert np.abs(empirical - target).max() < 0.03, (empirical, target)
    for j in range(n):
        assert stats.chisquare(counts[j], target[j] * draws).pvalue > 1e-3


def test_rmod_sample_is_reproducible_and_needs_one_generator_per_prompt():
    A = random_values()
    method = parse_method("rmod", NAMES)

    def draw(seed0):
        gens = [torch.Generator().manual_seed(seed0 + j) for j in range(5)]
        return select(A, method, selection="sample", generators=gens)[0]

    assert draw(0) == draw(0)
    assert any(draw(0) != draw(s) for s in range(1, 10))
    with pytest.raises(ValueError, match="one generator per prompt"):
        select(A, method, selection="sample", generators=[torch.Generator()] * 4)
    with pytest.raises(ValueError, match="one generator per prompt"):
        select(A, method, selection="sample")


# Candidates where the rules disagree (objectives x, y):
#   c0 [0, 0], c1 [3, -2] best on x, c2 [-2, 4] best on y and on the mean, c3 [0.8, 0.6] best minimum.
HAND = np.array([[[0.0, 0.0], [3.0, -2.0], [-2.0, 4.0], [0.8, 0.6]]])


@pytest.mark.parametrize("name, cd_weights, chosen, weights", [
    ("best-of-n", None, 2, None),
    ("best-of-n-maxmin", None, 3, None),
    ("cd", None, 2, [0.5, 0.5]),
    ("cd", {"x": 3.0, "y": 1.0}, 1, [0.75, 0.25]),
    ("cd-x", None, 1, [1.0, 0.0]),
    ("cd-y", None, 2, [0.0, 1.0]),
])
def test_fixed_rules_on_a_hand_made_block(name, cd_weights, chosen, weights):
    got, w = select(HAND, parse_method(name, ["x", "y"], cd_weights))
    assert got == [chosen]
    if weights is None:
        assert w is None
    else:
        assert w.tolist() == [weights]


def test_fixed_rules_on_random_blocks():
    A = random_values(n=50, seed=2)
    rules = {
        "best-of-n": A.mean(-1),
        "best-of-n-maxmin": A.min(-1),
        "cd": A.mean(-1),  # uniform weights rank like the mean
        "cd-y": A[:, :, 1],
    }
    for name, score in rules.items():
        assert select(A, parse_method(name, NAMES))[0] == score.argmax(-1).tolist(), name


@pytest.mark.parametrize("name", ["reference", "distilled"])
def test_plain_methods_keep_candidate_zero(name):
    A = random_values()
    assert A.sum(-1).argmax(-1).tolist() != [0] * 5  # candidate 0 is not simply the best
    assert select(A, parse_method(name, NAMES)) == ([0] * 5, None)


@pytest.mark.parametrize("name", ["rmod", "cd", "cd-z", "best-of-n", "best-of-n-maxmin"])
def test_one_candidate_is_kept_without_weights(name):
    assert select(random_values(K=1), parse_method(name, NAMES), selection="sample") == ([0] * 5, None)
