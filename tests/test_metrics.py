"""Metrics against hand-computed cases."""

import numpy as np
import pytest

from rmod_distill.metrics import (
    bootstrap_interval, median_worst_case, method_metrics, min_objective_win_rate, paired_comparisons, tail_share,
    win_rates, worst_case_reward, worst_case_win_rate, worst_objective, worst_tail_mean,
)

# Three prompts, two objectives.
Z = np.array([[1.0, -1.0], [0.0, 2.0], [3.0, 0.5]])
REF = np.array([[0.0, -1.0], [1.0, 1.0], [2.0, 1.0]])


def test_hand_computed_values():
    assert worst_case_reward(Z) == pytest.approx((-1 + 0 + 0.5) / 3)
    assert worst_objective(Z) == pytest.approx(min(4 / 3, 1.5 / 3))
    # objective 0: win, loss, win -> 2/3; objective 1: tie, win, loss -> 1.5/3
    assert win_rates(Z, REF).tolist() == pytest.approx([2 / 3, 0.5])
    assert min_objective_win_rate(Z, REF) == pytest.approx(0.5)
    # The paper's WCWR compares worst objectives: minima -1, 0, 0.5 against -1, 1, 1: tie, loss, loss.
    assert worst_case_win_rate(Z, REF) == pytest.approx(0.5 / 3)


def test_tail_figures_by_hand():
    # Worst cases -1, 0, 0.5 (Z) and, with two flagged answers, -5 and -3.5 beside them.
    assert median_worst_case(Z) == pytest.approx(0.0)
    assert tail_share(Z) == 0.0
    flagged = np.vstack([Z, [[-5.0, 1.0], [2.0, -3.5]], [[np.nan, -9.0]]])  # the NaN row has no known minimum
    assert tail_share(flagged) == pytest.approx(2 / 5)
    assert worst_tail_mean(flagged) == pytest.approx(-5.0)  # 5% of 5 answers: the single worst one
    assert worst_tail_mean(flagged, share=0.4) == pytest.approx((-5.0 - 3.5) / 2)
    m = method_metrics(flagged[:5], ["a", "b"], resamples=200)
    assert m["tail_share"] == pytest.approx(0.4) and m["median_worst_case"] == pytest.approx(-1.0)
    lo, hi = m["worst_5pct_ci"]
    assert lo <= m["worst_5pct"] <= hi


def test_paired_comparisons_and_recovery():
    ref = np.array([[0.0, -2.0], [1.0, -1.0], [0.0, 0.0], [-3.0, 1.0]])
    rmod = ref + 1.0
    half = ref + 0.5
    out = paired_comparisons({"reference": ref, "rmod": rmod, "distilled": half, "cd": ref}, resamples=200)
    assert out["recovery"]["mean"]["value"] == pytest.approx(0.5)
    assert out["recovery"]["median"]["value"] == pytest.approx(0.5)
    # Every prompt moves by the same amount, so every paired resample gives the same answer.
    assert out["recovery"]["mean"]["ci"] == pytest.approx((0.5, 0.5))
    assert out["differences"]["rmod - reference"]["mean"] == pytest.approx(1.0)
    assert out["differences"]["rmod - reference"]["ci"] == pytest.approx((1.0, 1.0))
    assert out["differences"]["distilled - rmod"]["mean"] == pytest.approx(-0.5)
    assert set(out["differences"]) == {"rmod - reference", "distilled - reference", "cd - reference",
                                       "rmod - cd", "distilled - rmod"}


def test_intervals_contain_the_estimate():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 3))
    ref = rng.normal(size=(60, 3))
    m = method_metrics(z, ["a", "b", "c"], ref, resamples=300)
    for key in ("worst_case_reward", "worst_objective", "worst_case_win_rate", "min_objective_win_rate"):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi and hi - lo > 0
    for g in "abc":
        lo, hi = m["objective_means_ci"][g]
        assert lo <= m["objective_means"][g] <= hi


def test_bootstrap_is_seeded_and_narrows_with_data():
    x = np.random.default_rng(1).normal(size=400)
    a = bootstrap_interval(lambda i: float(x[i].mean()), 400, seed=3)
    assert a == bootstrap_interval(lambda i: float(x[i].mean()), 400, seed=3)
    small = bootstrap_interval(lambda i: float(x[:25][i].mean()), 25, seed=3)
    assert (a[1] - a[0]) < (small[1] - small[0])


def test_bootstrap_of_one_prompt_is_the_point():
    # scipy's bootstrap needs two observations; a single prompt gives a zero-width interval.
    assert bootstrap_interval(lambda i: float(Z[:1][i, 0].mean()), 1) == (1.0, 1.0)


def test_a_ratio_undefined_on_some_resamples_still_gets_an_interval():
    from rmod_distill.metrics import _share, bootstrap_interval

    x = np.array([0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 1.0])  # the median is 0 on many resamples
    low, high = bootstrap_interval(lambda i: _share(1.0, float(np.median(x[i]))), len(x), 400)
    assert np.isfinite(low) and np.isfinite(high) and low <= high


def test_groups_resample_prompts_with_all_their_answers():
    # Four copies of each of 30 prompts' answers are not 120 independent answers: resampled by
    # prompt, the interval is the one of the 30 (the same draws), and wider than a row bootstrap.
    rng = np.random.default_rng(4)
    z, ref = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    z4, ref4 = np.repeat(z, 4, 0), np.repeat(ref, 4, 0)
    groups = np.repeat([f"p{i}" for i in range(30)], 4)
    one = method_metrics(z, ["a", "b", "c"], ref, resamples=300)
    grouped = method_metrics(z4, ["a", "b", "c"], ref4, resamples=300, groups=groups)
    rows = method_metrics(z4, ["a", "b", "c"], ref4, resamples=300)
    assert grouped["prompts"] == 30 and grouped["answers"] == 120 and rows["prompts"] == 120
    assert grouped["worst_case_reward"] == pytest.approx(one["worst_case_reward"])
    assert grouped["worst_case_reward_ci"] == pytest.approx(one["worst_case_reward_ci"])
    lo, hi = rows["worst_case_reward_ci"]
    assert hi - lo < 0.7 * (grouped["worst_case_reward_ci"][1] - grouped["worst_case_reward_ci"][0])
    paired = paired_comparisons({"reference": ref4, "rmod": ref4 + 1.0, "distilled": z4}, resamples=300, groups=groups)
    alone = paired_comparisons({"reference": ref, "rmod": ref + 1.0, "distilled": z}, resamples=300)
    assert paired["recovery"]["mean"]["ci"] == pytest.approx(alone["recovery"]["mean"]["ci"])


def test_recovery_is_undefined_without_a_lift():
    """Issue 43 item 19: RMOD at or below reference leaves nothing to recover: the share is null with the reason
    (it was a ratio of two negative lifts, e.g. 200%, or NaN, which JSON cannot hold)."""
    import json

    ref = np.array([[0.0, -2.0], [1.0, -1.0], [0.0, 0.0], [-3.0, 1.0]])
    for rmod_shift in (-0.5, 0.0):
        out = paired_comparisons({"reference": ref, "rmod": ref + rmod_shift, "distilled": ref - 1.0}, resamples=100)
        for label in ("mean", "median"):
            entry = out["recovery"][label]
            assert entry["value"] is None, (rmod_shift, label, entry)
            assert f"by {label} is {rmod_shift:+.3f} <= 0" in entry["undefined"]
        json.dumps(out, allow_nan=False)  # no bare NaN anywhere
    from rmod_distill.metrics import format_recovery, recovery

    assert recovery(0.5, 1.0) == (0.5, None)
    for lift in (0.0, -0.25):
        value, why = recovery(-0.5, lift, " by mean")
        assert value is None and why.startswith(f"RMOD's lift over reference by mean is {lift:+.3f} <= 0")
    assert format_recovery(out["recovery"]["mean"]).startswith("undefined (RMOD's lift over reference by mean is")
    good = paired_comparisons({"reference": ref, "rmod": ref + 1.0, "distilled": ref + 0.5}, resamples=100)
    assert "undefined" not in good["recovery"]["mean"] and format_recovery(good["recovery"]["mean"]) == "50% [50%, 50%]"
