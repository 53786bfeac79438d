"""The generate stage end to end on the tiny policy: outputs, resume, overwrite, processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from rmod_distill.errors import UserError
from rmod_distill.artifacts import read_jsonl
from rmod_distill.config import ConfigError, parse_config
from rmod_distill.generate import GenerateConfig, run

ROOT = Path(__file__).resolve().parents[1]
def strip(rows):
    """Rows without wall-clock timings, which differ between runs."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


OBJECTIVES = (
    "[{name: kind, kind: python, model: 'helpers_objectives:kindness'}, "
    "{name: brief, kind: python, model: 'helpers_objectives:brevity'}, {name: harmlessness}]"
)


def args(tiny_policy_dir, prompt_file, out, *extra):
    return [
        "--policy.model", str(tiny_policy_dir), "--prompts.path", str(prompt_file),
        "--objectives", OBJECTIVES, "--methods", "[reference, rmod, cd-kind]",
        "--decoding.num_candidates", "3", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8",
        "--batch_size", "4", "--normalization_prompts", "4", "--output_dir", str(out), *extra,
    ]


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_generate_writes_rows_dataset_and_provenance(tiny_policy_dir, prompt_file, tmp_path):
    out = run(parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, tmp_path / "gen")))
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 3 * 6  # three methods x six train prompts
    assert [r["method"] for r in rows[:6]] == ["reference"] * 6
    required = {"prompt_id", "prompt", "completion", "method", "rewards", "normalized", "block_weights",
                "tokens_sampled", "seconds", "seed", "worst_case"}
    for r in rows:
        assert required <= set(r)
        assert set(r["rewards"]) == {"kind", "brief", "harmlessness"}
        assert r["worst_case"] == pytest.approx(min(r["normalized"].values()))
        assert (r["block_weights"] == []) == (r["method"] == "reference")
        assert r["split"] == "train"
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert len(ds) == 18 and ds[0]["prompt"][-1]["role"] == "user"
    assert ds[0]["completion"] == [{"role": "assistant", "content": rows[0]["completion"]}]
    info = json.loads((out / "run.json").read_text())
    assert info["complete"] and info["packages"]["torch"] and info["config"]["decoding"]["num_candidates"] == 3
    assert info["normalization"]["names"] == ["kind", "brief", "harmlessness"]
    assert len(read_jsonl(out / "calibration.jsonl")) == 8  # 4 prompts x 2 samples


def test_several_samples_per_prompt(tiny_policy_dir, prompt_file, tmp_path):
    """Extra samples are rows of their own, with their own seeds; distill keeps a prompt's samples together."""
    from rmod_distill.prompts import base_prompt_id, held_out

    one = read_jsonl(run(parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, tmp_path / "one",
                                                           "--methods", "[rmod]"))) / "samples.jsonl")
    out = run(parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, tmp_path / "two", "--methods", "[rmod]",
                                                 "--samples_per_prompt", "2")))
    rows = read_jsonl(out / "samples.jsonl")
    assert [r["prompt_id"] for r in rows[:4]] == ["p00", "p00#s1", "p01", "p01#s1"] and len(rows) == 12
    assert strip(rows[::2]) == strip(one)  # the first sample is the one-sample run's
    assert len({r["seed"] for r in rows}) == 12 and rows[0]["completion"] != rows[1]["completion"]
    assert len(read_jsonl(out / "calibration.jsonl")) == 8  # normalisation is measured on the prompts, not samples
    assert base_prompt_id("p00#s1") == "p00"
    assert all(held_out(f"q{i}", 0.5) == held_out(f"q{i}#s1", 0.5) for i in range(50))


def test_complete_run_is_not_overwritten(tiny_policy_dir, prompt_file, tmp_path):
    a = args(tiny_policy_dir, prompt_file, tmp_path / "gen", "--methods", "[reference]")
    run(parse_config(GenerateConfig, a))
    before = read_jsonl(tmp_path / "gen" / "samples.jsonl")
    with pytest.raises(UserError, match="--overwrite"):
        run(parse_config(GenerateConfig, a))
    assert read_jsonl(tmp_path / "gen" / "samples.jsonl") == before
    run(parse_config(GenerateConfig, a + ["--overwrite"]))
    assert strip(read_jsonl(tmp_path / "gen" / "samples.jsonl")) == strip(before)  # same seeds, same rows


def test_resume_after_kill_equals_uninterrupted(tiny_policy_dir, prompt_file, tmp_path):
    full = run(parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, tmp_path / "full")))
    part = tmp_path / "part"
    a = args(tiny_policy_dir, prompt_file, part)
    run(parse_config(GenerateConfig, a))
    # Simulate a kill -9 in the middle of the run: keep 7 rows and half of the 8th, no final files.
    shard = part / "shards" / "rank-00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:7]) + lines[7][:25])
    info = json.loads((part / "run.json").read_text())
    (part / "run.json").write_text(json.dumps(dict(info, complete=False)))
    for name in ("samples.jsonl",):
        (part / name).unlink()
    run(parse_config(GenerateConfig, a))
    assert strip(read_jsonl(part / "samples.jsonl")) == strip(read_jsonl(full / "samples.jsonl"))
    assert len(read_jsonl(shard)) == 18  # nothing lost, nothing duplicated


def test_resume_refuses_a_different_recipe(tiny_policy_dir, prompt_file, tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"stage": "generate", "complete": False, "config": {"seed": 123}}))
    with pytest.raises(ValueError, match="different recipe"):
        run(parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, out)))


def test_resume_tolerates_a_key_added_since_at_its_off_value(tmp_path):
    """A run made before a recipe key existed resumes when the key is at its off value (False / null),
    and is refused, naming the key, when the key is set."""
    from rmod_distill.artifacts import RunFolder

    out = tmp_path / "gen"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"stage": "generate", "complete": False, "config": {"seed": 0}}))
    RunFolder(out, "generate", {"seed": 0, "keep_candidates": False, "normalization": None}, False).check()
    with pytest.raises(UserError, match="keys differ: \\['keep_candidates'\\]"):
        RunFolder(out, "generate", {"seed": 0, "keep_candidates": True}, False).check()


def test_bad_recipe_values_name_the_key(tiny_policy_dir, prompt_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'beam'"):
        parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, tmp_path) + ["--methods", "[beam]"])
    with pytest.raises(ConfigError, match="num_candidates"):
        parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, tmp_path) + ["--decoding.num_candidates", "0"])


def test_nan_reward_names_the_objective(tiny_policy_dir, prompt_file, tmp_path):
    bad = "[{name: broken, kind: python, model: 'helpers_objectives:broken_nan'}]"
    cfg = parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, tmp_path / "g") + ["--objectives", bad, "--methods", "[rmod]"])
    with pytest.raises(ValueError, match="objective 'broken' returned nan"):
        run(cfg)


def test_two_processes_equal_one(tiny_policy_dir, prompt_file, tmp_path):
    single = run(parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, tmp_path / "one")))
    env = dict(os.environ, PYTHONPATH=f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "rmod_distill.generate", *args(tiny_policy_dir, prompt_file, tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "two" / "shards").glob("*.jsonl"))) == 2
    assert strip(read_jsonl(tmp_path / "two" / "samples.jsonl")) == strip(read_jsonl(single / "samples.jsonl"))


def test_an_objective_that_never_varies_is_named(tiny_policy_dir, prompt_file, tmp_path, capsys):
    """Issue 44, item 3: a reward that scores every reference sample alike is warned about by name and
    listed in run.json; the run's JSON files hold no bare NaN (the correlations are null)."""
    out = tmp_path / "gen"
    run(parse_config(GenerateConfig, args(tiny_policy_dir, prompt_file, out, "--objectives",
                                          "[{name: harmlessness}, {name: flat, kind: python, "
                                          "model: 'helpers_objectives:constant'}]", "--methods",
                                          "[reference, rmod]")))
    printed = capsys.readouterr().out
    assert "generate: warning: objective 'flat' gave every one of the" in printed
    info = json.loads((out / "run.json").read_text(), parse_constant=lambda t: pytest.fail(f"bare {t}"))
    assert info["degenerate_objectives"] == ["flat"]
    assert info["objective_correlations"]["pooled"]["flat"]["harmlessness"] is None
