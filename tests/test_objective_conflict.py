"""scripts/objective_conflict.py: the average and the worst case as targets, from a run's scores."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from objective_conflict import main, mean_against_worst, read_samples  # noqa: E402

from rmod_distill.errors import UserError  # noqa: E402


def write_run(folder: Path, rewards: list[dict], per_prompt: int) -> Path:
    folder.mkdir()
    rows = [{"prompt_id": f"p{i // per_prompt}#calibration-{i % per_prompt}", "rewards": r} for i, r in enumerate(rewards)]
    (folder / "calibration.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_agreeing_objectives_pick_one_answer_and_conflicting_ones_do_not(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    same = mean_against_worst(np.c_[x, x], np.repeat(np.arange(50), 4))
    assert same["different_answers"] == 0 and same["worst_case_gain"] == 0 and same["average_cost"] == 0
    # a against b, plus a third independent objective: the best answer on average is often not the best worst case
    y = rng.normal(size=200)
    conflict = mean_against_worst(np.c_[x, -x + 0.3 * y, rng.normal(size=200)], np.repeat(np.arange(50), 4))
    assert conflict["different_answers"] > 0.3 and conflict["worst_case_gain"] > 0 and conflict["average_cost"] > 0
    lo, hi = conflict["worst_case_gain_ci"]
    assert lo <= conflict["worst_case_gain"] <= hi


def test_the_script_reads_a_generate_run(tmp_path, capsys):
    rewards = [{"a": float(i % 4), "b": float(-(i % 4) + (i % 3)), "c": None if i == 5 else 1.0 + i}
               for i in range(24)]
    run = write_run(tmp_path / "run", rewards, per_prompt=4)
    names, raw, groups = read_samples(run)
    assert names == ["a", "b", "c"] and raw.shape == (23, 3)  # the sample with a missing score is left out
    main([str(run), "--sets", "a,b"])
    out = capsys.readouterr().out
    assert "| a, b, c |" in out and "| a, b |" in out and "within-prompt correlations (23 samples, 6 prompts)" in out
    with pytest.raises(SystemExit, match=r"\['z'\] not among"):
        main([str(run), "--sets", "a,z"])
    single = write_run(tmp_path / "single", rewards[:6], per_prompt=1)
    with pytest.raises(UserError, match="normalization_samples >= 2"):
        read_samples(single)
