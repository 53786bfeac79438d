"""How far apart the average and the worst case are as targets, for sets of objectives.

    python scripts/objective_conflict.py RUN_DIR [--sets "a,b,c" "a,c,d" ...]

RUN_DIR is a generate run; its ``calibration.jsonl`` holds reference samples, several per
prompt with ``normalization_samples`` >= 2. For the run's own objectives and for each subset
given, with every objective z-normalised on those samples, the script prints:

- the within-prompt correlations (each reward minus its prompt's mean: the trade-off a
  decoder faces between candidates for one prompt);
- among each prompt's samples, the answer best on average (uniform weights, what `cd` and
  `best-of-n` aim at) against the answer best in the worst case (`best-of-n-maxmin`): the share
  of prompts where they are different answers, the worst case gained by choosing for the worst
  case (mean over prompts, with a 95% bootstrap interval) and the average given up for it.

A set whose objectives barely conflict picks the same answer both ways, and there RMOD has
nothing to add over fixed-weight CD; this is how the embedded default's set was chosen, on the
validation prompts (docs/objectives.md). No model is loaded: it reads the run's scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rmod_distill.errors import UserError
from rmod_distill.metrics import bootstrap_interval
from rmod_distill.prompts import base_prompt_id


def read_samples(run_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The objectives, raw rewards ``[n, G]`` and prompt of each reference sample of a generate run."""
    path = run_dir / "calibration.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no calibration.jsonl (expected a generate run folder)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = list(rows[0]["rewards"])
    raw = np.array([[np.nan if r["rewards"][g] is None else r["rewards"][g] for g in names] for r in rows])
    groups = np.array([base_prompt_id(r["prompt_id"]) for r in rows])
    keep = ~np.isnan(raw).any(1)
    if np.bincount(np.unique(groups[keep], return_inverse=True)[1]).max() < 2:
        raise UserError(f"{path}: one sample per prompt; generate with normalization_samples >= 2")
    return names, raw[keep], groups[keep]


def within_prompt_correlations(raw: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Pearson correlations of the rewards minus their prompt's mean."""
    centred = raw.copy()
    for g in np.unique(groups):
        centred[groups == g] -= raw[groups == g].mean(0)
    return np.corrcoef(centred.T)


def mean_against_worst(raw: np.ndarray, groups: np.ndarray, resamples: int = 1000) -> dict:
    """Per prompt, its answer best on average against its answer best in the worst case (z-scores)."""
    z = (raw - raw.mean(0)) / raw.std(0)
    differ, gain, cost = [], [], []
    for g in dict.fromkeys(groups.tolist()):
        zz = z[groups == g]
        if len(zz) < 2:
            continue
        by_mean, by_min = zz.mean(1).argmax(), zz.min(1).argmax()
        differ.append(by_mean != by_min)
        gain.append(zz[by_min].min() - zz[by_mean].min())
        cost.append(zz[by_mean].mean() - zz[by_min].mean())
    gain_arr = np.array(gain)
    return {"prompts": len(gain), "different_answers": float(np.mean(differ)),
            "worst_case_gain": float(gain_arr.mean()),
            "worst_case_gain_ci": bootstrap_interval(lambda i: float(gain_arr[i].mean()), len(gain_arr), resamples),
            "average_cost": float(np.mean(cost))}


def main(argv: list[str] | None = None) -> None:
    """Print the figures for the run's objectives and each subset."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="A generate run (its calibration.jsonl)")
    parser.add_argument("--sets", nargs="*", default=[], help="Subsets of the run's objectives, comma-separated")
    args = parser.parse_args(argv)
    names, raw, groups = read_samples(args.run_dir)
    sets = [names] + [[n.strip() for n in s.split(",")] for s in args.sets]
    for subset in sets:
        unknown = [n for n in subset if n not in names]
        if unknown:
            raise SystemExit(f"--sets: {unknown} not among the run's objectives {names}")
    corr = within_prompt_correlations(raw, groups)
    width = max(len(n) for n in names) + 2
    print(f"within-prompt correlations ({len(raw)} samples, {len(set(groups.tolist()))} prompts):")
    print(" " * width + "".join(f"{n:>{width}}" for n in names))
    for i, a in enumerate(names):
        print(f"{a:<{width}}" + "".join(f"{corr[i, j]:>+{width}.2f}" for j in range(len(names))))
    print()
    print("| objectives | different answers | worst case gained by choosing for it [95% CI] | average given up |")
    print("|---|---|---|---|")
    for subset in sets:
        cols = [names.index(n) for n in subset]
        m = mean_against_worst(raw[:, cols], groups)
        lo, hi = m["worst_case_gain_ci"]
        print(f"| {', '.join(subset)} | {m['different_answers']:.0%} | {m['worst_case_gain']:+.3f} [{lo:+.3f}, "
              f"{hi:+.3f}] | {m['average_cost']:+.3f} |")


if __name__ == "__main__":
    main()
