"""Metrics of rmod.md, with 95% bootstrap intervals over prompts.

All functions take normalised rewards ``[n_prompts, G]`` whose rows are aligned by
prompt (row i of every method is the same prompt), so win rates compare paired answers.

Missing scores (NaN: a judge whose reply could not be parsed or whose request failed) are
never filled in. Each metric uses what it can honestly compare:
- per-objective means: over the prompts where that objective has a score;
- per-objective win rate: over the prompts where both the method and ``reference`` have
  that objective's score (the pair is left out for that objective);
- anything built on ``min_g`` (worst-case reward, the paper's WCWR, paired differences):
  over the prompts where every objective has a score (on both sides for WCWR), since the
  minimum of a row with a hole in it is not known;
- ``missing``: the count per objective, so the reader sees how much was left out.
With no missing score every figure is exactly what it was before this rule existed.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from rmod_distill.artifacts import json_safe  # noqa: F401 - also this module's: eval and compare use it
from rmod_distill.prompts import base_prompt_id


def complete(z: np.ndarray) -> np.ndarray:
    """Rows (prompts) where every objective has a score."""
    return ~np.isnan(z).any(1)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def objective_means(z: np.ndarray) -> np.ndarray:
    """Per objective, the mean over the prompts where it has a score."""
    if not np.isnan(z).any():
        return z.mean(0)
    return np.array([_mean(z[~np.isnan(z[:, g]), g]) for g in range(z.shape[1])])


def worst_case_reward(z: np.ndarray) -> float:
    """``mean_x min_g z[x, g]``: the headline metric (over prompts with every score)."""
    return _mean(z[complete(z)].min(1)) if np.isnan(z).any() else float(z.min(1).mean())


def median_worst_case(z: np.ndarray) -> float:
    """The median over answers of ``min_g z``: the typical answer, which a rare outlier cannot move."""
    worst = z[complete(z)].min(1)
    return float(np.median(worst)) if worst.size else float("nan")


TAIL_Z = -3.0


def tail_share(z: np.ndarray, threshold: float = TAIL_Z) -> float:
    """The share of answers whose lowest objective is below ``threshold`` (z = -3): the lower tail
    that owns a mean worst case and that a distilled student must remove."""
    worst = z[complete(z)].min(1)
    return float((worst < threshold).mean()) if worst.size else float("nan")


def worst_tail_mean(z: np.ndarray, share: float = 0.05) -> float:
    """The mean of the lowest ``share`` of answers' worst case (CVaR at 5%: at least one answer)."""
    worst = np.sort(z[complete(z)].min(1))
    return float(worst[: max(1, int(np.ceil(share * worst.size)))].mean()) if worst.size else float("nan")


def worst_objective(z: np.ndarray) -> float:
    """``min_g mean_x z[x, g]``: the weakest objective on average."""
    return float(objective_means(z).min())


def win_rates(z: np.ndarray, z_ref: np.ndarray) -> np.ndarray:
    """Per objective, the fraction of prompts where the method beats the reference (ties count half);
    a prompt missing that objective's score on either side is left out of that objective's rate."""
    wins = (z > z_ref) + 0.5 * (z == z_ref)
    both = ~(np.isnan(z) | np.isnan(z_ref))
    if both.all():
        return wins.mean(0)
    return np.array([_mean(wins[both[:, g], g]) for g in range(z.shape[1])])


def min_objective_win_rate(z: np.ndarray, z_ref: np.ndarray) -> float:
    """``min_g winrate_g``: the lowest per-objective win rate (this project's earlier "WCWR")."""
    return float(win_rates(z, z_ref).min())


def worst_case_win_rate(z: np.ndarray, z_ref: np.ndarray) -> float:
    """The paper's worst-case win rate (as the authors' notebook computes it): the share of prompts
    where the method's worst objective beats the reference's worst objective, ties counting half,
    ``mean(1{min_g z > min_g z_ref} + 0.5 * 1{tie})``."""
    keep = complete(z) & complete(z_ref)
    a, b = z[keep].min(1), z_ref[keep].min(1)
    return _mean((a > b) + 0.5 * (a == b))


def prompt_groups(prompt_ids: list[str]) -> np.ndarray | None:
    """The prompt each row answers (generate's and eval's ``<id>#s<j>`` are sample j of ``<id>``)
    when some prompt has several rows, for ``groups`` below; None when every prompt has one."""
    bases = np.array([base_prompt_id(i) for i in prompt_ids])
    return bases if len(set(bases.tolist())) < len(bases) else None


def bootstrap_interval(
    stat: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0, level: float = 0.95,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile interval of ``stat(idx)`` over prompt indices resampled with replacement.

    ``scipy.stats.bootstrap`` with ``paired=True`` resamples the indices themselves, so one
    statistic can read several aligned arrays (a method's rewards and the reference's).
    ``groups`` (one label per row, e.g. the prompt of each of several samples) resamples whole
    groups instead: several answers to one prompt are not independent evidence, and treating
    them as such would narrow the interval.
    """
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"groups: one label per row is needed, got {len(groups)} for {n} rows")
        members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]  # in order of appearance
        if len(members) < n:
            row_stat = stat

            def group_stat(gi):  # the statistic over the rows of the resampled groups
                return row_stat(np.concatenate([members[g] for g in gi]))

            stat, n = group_stat, len(members)
    if n < 2:  # scipy needs two observations; one prompt has no spread to resample
        value = float(stat(np.arange(n)))
        return value, value
    from scipy.stats import bootstrap

    result = bootstrap(
        (np.arange(n),), stat, n_resamples=resamples, vectorized=False, paired=True, confidence_level=level,
        method="percentile", rng=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if np.isnan(low) or np.isnan(high):
        # A ratio (recovery) is undefined on a resample where its denominator is 0: the interval
        # is taken over the resamples where it is defined (scipy's would be NaN).
        dist = np.asarray(result.bootstrap_distribution, dtype=float)
        if np.isfinite(dist).any():
            alpha = 100 * (1 - level) / 2
            low, high = (float(v) for v in np.nanpercentile(np.where(np.isfinite(dist), dist, np.nan),
                                                            [alpha, 100 - alpha]))
    return low, high


def method_metrics(
    z: np.ndarray, names: list[str], z_ref: np.ndarray | None = None, resamples: int = 1000, seed: int = 0,
    win_rate_intervals: bool = False, groups: np.ndarray | None = None,
) -> dict:
    """Every metric of one method, with intervals: a JSON-ready dict (``win_rate_intervals``: per objective too;
    ``groups``: the prompt of each row when a prompt has several, resampled together)."""
    n = z.shape[0]
    ci = partial(bootstrap_interval, n=n, resamples=resamples, seed=seed, groups=groups)
    out = {
        "prompts": n if groups is None else len(set(groups.tolist())),
        "answers": n,
        "worst_case_reward": worst_case_reward(z),
        "worst_case_reward_ci": ci(lambda i: worst_case_reward(z[i])),
        "median_worst_case": median_worst_case(z),
        "median_worst_case_ci": ci(lambda i: median_worst_case(z[i])),
        "tail_share": tail_share(z),
        "worst_5pct": worst_tail_mean(z),
        "worst_5pct_ci": ci(lambda i: worst_tail_mean(z[i])),
        "worst_objective": worst_objective(z),
        "worst_objective_ci": ci(lambda i: worst_objective(z[i])),
        "objective_means": dict(zip(names, map(float, objective_means(z)))),
        "objective_means_ci": {g: ci(lambda i, j=j: _nanmean(z[i, j])) for j, g in enumerate(names)},
        "average": float(np.nanmean(z)) if (~np.isnan(z)).any() else float("nan"),
        "average_ci": ci(lambda i: _nanmean(z[i].ravel())),  # the objectives' average, as "average" is computed
        "missing": dict(zip(names, map(int, np.isnan(z).sum(0)))),
        "complete_prompts": int(complete(z).sum()),
    }
    if z_ref is not None:
        out["win_rates"] = dict(zip(names, map(float, win_rates(z, z_ref))))
        if win_rate_intervals:
            out["win_rates_ci"] = {g: ci(lambda i, j=j: float(win_rates(z[i][:, [j]], z_ref[i][:, [j]])[0]))
                                   for j, g in enumerate(names)}
        for key, fn in (("worst_case_win_rate", worst_case_win_rate), ("min_objective_win_rate", min_objective_win_rate)):
            out[key] = fn(z, z_ref)
            out[f"{key}_ci"] = ci(lambda i, fn=fn: fn(z[i], z_ref[i]))
    return out


def _nanmean(x: np.ndarray) -> float:
    return float(x.mean()) if not np.isnan(x).any() else _mean(x[~np.isnan(x)])


def _share(got: float, lift: float) -> float:
    """``got / lift`` on a bootstrap resample (NaN where the lift is 0; a resample's negative lift is kept, so an
    interval whose lift crosses zero is what the resamples give)."""
    return got / lift if abs(lift) > LIFT_EPS else float("nan")


LIFT_EPS = 1e-12  # a lift of RMOD's over reference at or below this is no lift


def recovery(got: float, lift: float, what: str = "") -> tuple[float | None, str | None]:
    """The share of RMOD's lift over ``reference`` that a student keeps: ``got / lift``, where ``got`` is
    ``student - reference`` and ``lift`` is ``rmod - reference`` (of the mean, or the median, worst case).

    Returns ``(share, None)``, or ``(None, why)`` where the share is undefined: RMOD's lift is zero or
    negative (there is nothing to recover, and the ratio of two differences below zero would read as a
    large share), or a side is unknown (NaN). ``what`` names the aggregate in ``why`` (" by mean").
    Every recovery figure (eval's report and metrics.json, compare's and iterate's tables) is this one.
    """
    if np.isnan(got) or np.isnan(lift):
        return None, f"RMOD's lift over reference{what} or the student's is unknown (no complete answers)"
    if lift <= LIFT_EPS:
        return None, f"RMOD's lift over reference{what} is {lift:+.3f} <= 0: there is no lift to recover"
    return got / lift, None


def recovery_entry(got: float, lift: float, ci: tuple[float, float] | None = None, what: str = "") -> dict:
    """A recovery as metrics.json and compare.json hold it: ``{"value": share, "ci": [lo, hi]}``, or, where it is
    undefined (see :func:`recovery`), ``"value": null`` and ``"undefined"``: why. JSON-safe (no NaN)."""
    value, why = recovery(got, lift, what)
    out = {"value": value, "ci": json_safe(list(ci)) if ci is not None else None}
    if why is not None:
        out["undefined"] = why
    return out


def format_recovery(entry: dict, interval: bool = True) -> str:
    """A recovery entry of :func:`recovery_entry` for a report: ``58% [31%, 79%]``, or ``undefined (why)``."""
    if entry.get("value") is None:
        return f"undefined ({entry.get('undefined', 'RMOD has no lift over reference')})"
    ci = entry.get("ci")
    if not interval or ci is None:
        return f"{entry['value']:.0%}"
    lo, hi = ("?" if v is None else f"{v:.0%}" for v in ci)
    return f"{entry['value']:.0%} [{lo}, {hi}]"


def paired_comparisons(z: dict[str, np.ndarray], resamples: int = 1000, seed: int = 0,
                       groups: np.ndarray | None = None) -> dict:
    """Method against method on the same prompts, with paired bootstrap intervals (the same
    resampled prompts for both sides of every difference).

    - ``differences``: worst-case reward of A minus B for the pairs that matter (each method
      against ``reference``, ``rmod`` against ``cd``, ``distilled`` against ``rmod``);
    - ``recovery``: ``(distilled - reference) / (rmod - reference)``, the share of RMOD's
      worst-case lift the adapter keeps, by mean and by median of the per-prompt worst case
      (:func:`recovery_entry`: ``value`` null and ``undefined`` saying why where RMOD's lift is <= 0).

    JSON-safe: a figure that cannot be computed is None, never NaN.
    ``groups``: the prompt of each row when a prompt has several answers (resampled together).
    """
    # A prompt with a missing score on either side of a difference is left out of it (NaN-aware mean).
    worst = {m: v.min(1) for m, v in z.items()}
    n = len(next(iter(worst.values())))
    pairs = [(m, "reference") for m in z if m != "reference" and "reference" in z]
    pairs += [(a, b) for a, b in (("rmod", "cd"), ("distilled", "rmod")) if a in z and b in z]
    out: dict = {"differences": {}}
    for a, b in pairs:
        d = worst[a] - worst[b]
        out["differences"][f"{a} - {b}"] = {
            "mean": _nanmean(d), "ci": bootstrap_interval(lambda i, d=d: _nanmean(d[i]), n, resamples, seed,
                                                          groups=groups),
        }
    if {"distilled", "rmod", "reference"} <= set(z):
        d, r, ref = worst["distilled"], worst["rmod"], worst["reference"]
        keep = ~(np.isnan(d) | np.isnan(r) | np.isnan(ref))
        g = groups
        if not keep.all():  # a ratio of aggregates: over the prompts every side has every score
            d, r, ref, n = d[keep], r[keep], ref[keep], int(keep.sum())
            g = None if groups is None else groups[keep]
        out["recovery"] = {}
        for label, agg in (("mean", np.mean), ("median", np.median)):
            def stat(i, agg=agg):
                return _share(float(agg(d[i]) - agg(ref[i])), float(agg(r[i]) - agg(ref[i])))

            whole = np.arange(n)
            out["recovery"][label] = recovery_entry(
                float(agg(d[whole]) - agg(ref[whole])), float(agg(r[whole]) - agg(ref[whole])),
                bootstrap_interval(stat, n, resamples, seed, groups=g), f" by {label}")
    return json_safe(out)
