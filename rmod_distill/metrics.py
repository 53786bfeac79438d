"""Metrics of rmod.md, with 95% bootstrap intervals over prompts.

All functions take normalised rewards ``[n_prompts, G]`` whose rows are aligned by
prompt (row i of every method is the same prompt), so win rates compare paired answers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def worst_case_reward(z: np.ndarray) -> float:
    """``mean_x min_g z[x, g]``: the headline metric."""
    return float(z.min(1).mean())


def worst_objective(z: np.ndarray) -> float:
    """``min_g mean_x z[x, g]``: the weakest objective on average."""
    return float(z.mean(0).min())


def win_rates(z: np.ndarray, z_ref: np.ndarray) -> np.ndarray:
    """Per objective, the fraction of prompts where the method beats the reference (ties count half)."""
    return ((z > z_ref) + 0.5 * (z == z_ref)).mean(0)


def worst_case_win_rate(z: np.ndarray, z_ref: np.ndarray) -> float:
    """``WCWR = min_g winrate_g``."""
    return float(win_rates(z, z_ref).min())


def bootstrap_interval(
    stat: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``stat(idx)`` over prompt indices resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def method_metrics(
    z: np.ndarray, names: list[str], z_ref: np.ndarray | None = None, resamples: int = 1000, seed: int = 0
) -> dict:
    """Every metric of one method, with intervals: a JSON-ready dict."""
    n = z.shape[0]
    out = {
        "prompts": n,
        "worst_case_reward": worst_case_reward(z),
        "worst_case_reward_ci": bootstrap_interval(lambda i: worst_case_reward(z[i]), n, resamples, seed),
        "worst_objective": worst_objective(z),
        "worst_objective_ci": bootstrap_interval(lambda i: worst_objective(z[i]), n, resamples, seed),
        "objective_means": dict(zip(names, map(float, z.mean(0)))),
        "objective_means_ci": {
            g: bootstrap_interval(lambda i, j=j: float(z[i, j].mean()), n, resamples, seed) for j, g in enumerate(names)
        },
        "average": float(z.mean()),
    }
    if z_ref is not None:
        out["win_rates"] = dict(zip(names, map(float, win_rates(z, z_ref))))
        out["worst_case_win_rate"] = worst_case_win_rate(z, z_ref)
        out["worst_case_win_rate_ci"] = bootstrap_interval(
            lambda i: worst_case_win_rate(z[i], z_ref[i]), n, resamples, seed
        )
    return out
