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


def min_objective_win_rate(z: np.ndarray, z_ref: np.ndarray) -> float:
    """``min_g winrate_g``: the lowest per-objective win rate (this project's earlier "WCWR")."""
    return float(win_rates(z, z_ref).min())


def worst_case_win_rate(z: np.ndarray, z_ref: np.ndarray) -> float:
    """The paper's worst-case win rate (as the authors' notebook computes it): the share of prompts
    where the method's worst objective beats the reference's worst objective, ties counting half,
    ``mean(1{min_g z > min_g z_ref} + 0.5 * 1{tie})``."""
    a, b = z.min(1), z_ref.min(1)
    return float(((a > b) + 0.5 * (a == b)).mean())


def bootstrap_interval(
    stat: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``stat(idx)`` over prompt indices resampled with replacement.

    ``scipy.stats.bootstrap`` with ``paired=True`` resamples the indices themselves, so one
    statistic can read several aligned arrays (a method's rewards and the reference's).
    """
    if n < 2:  # scipy needs two observations; one prompt has no spread to resample
        value = float(stat(np.arange(n)))
        return value, value
    from scipy.stats import bootstrap

    result = bootstrap(
        (np.arange(n),), stat, n_resamples=resamples, vectorized=False, paired=True, confidence_level=level,
        method="percentile", rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


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
        for key, fn in (("worst_case_win_rate", worst_case_win_rate), ("min_objective_win_rate", min_objective_win_rate)):
            out[key] = fn(z, z_ref)
            out[f"{key}_ci"] = bootstrap_interval(lambda i, fn=fn: fn(z[i], z_ref[i]), n, resamples, seed)
    return out


def _share(got: float, lift: float) -> float:
    return got / lift if abs(lift) > 1e-12 else float("nan")


def paired_comparisons(z: dict[str, np.ndarray], resamples: int = 1000, seed: int = 0) -> dict:
    """Method against method on the same prompts, with paired bootstrap intervals (the same
    resampled prompts for both sides of every difference).

    - ``differences``: worst-case reward of A minus B for the pairs that matter (each method
      against ``reference``, ``rmod`` against ``cd``, ``distilled`` against ``rmod``);
    - ``recovery``: ``(distilled - reference) / (rmod - reference)``, the share of RMOD's
      worst-case lift the adapter keeps, by mean and by median of the per-prompt worst case.
    """
    worst = {m: v.min(1) for m, v in z.items()}
    n = len(next(iter(worst.values())))
    pairs = [(m, "reference") for m in z if m != "reference" and "reference" in z]
    pairs += [(a, b) for a, b in (("rmod", "cd"), ("distilled", "rmod")) if a in z and b in z]
    out: dict = {"differences": {}}
    for a, b in pairs:
        d = worst[a] - worst[b]
        out["differences"][f"{a} - {b}"] = {
            "mean": float(d.mean()), "ci": bootstrap_interval(lambda i, d=d: float(d[i].mean()), n, resamples, seed),
        }
    if {"distilled", "rmod", "reference"} <= set(z):
        d, r, ref = worst["distilled"], worst["rmod"], worst["reference"]
        out["recovery"] = {}
        for label, agg in (("mean", np.mean), ("median", np.median)):
            def stat(i, agg=agg):
                return _share(float(agg(d[i]) - agg(ref[i])), float(agg(r[i]) - agg(ref[i])))

            out["recovery"][label] = {"value": stat(np.arange(n)), "ci": bootstrap_interval(stat, n, resamples, seed)}
    return out
