"""Iterated distillation on the tiny policy: two rounds, the student as round 2's policy, one
normalisation, a continued adapter, resume, and the report."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rmod_distill.artifacts import read_jsonl
from rmod_distill.config import parse_config
from rmod_distill.errors import UserError
from rmod_distill.iterate import IterateConfig, run, stage_argv
from rmod_distill.policy import load_policy

from conftest import write_prompts

OBJECTIVES = [{"name": "harmlessness"}, {"name": "concision"}]
DECODING = {"num_candidates": 2, "block_size": 4, "max_new_tokens": 8}


def write_recipe(folder: Path, policy: Path) -> Path:
    """generate.yaml, distill.yaml and eval.yaml for the tiny policy (12 train, 4 eval prompts)."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(folder / "prompts.jsonl", n_train=12, n_eval=4)
    recipes = {
        "generate": {"policy": {"model": str(policy)}, "prompts": {"path": str(prompts), "split": "train"},
                     "objectives": OBJECTIVES, "decoding": DECODING, "methods": ["rmod"], "normalization_prompts": 4},
        "distill": {"model": {"model_name_or_path": str(policy), "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                    "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "use_cpu": True,
                    "eval_strategy": "no", "save_steps": 2, "activation_checkpointing": False, "sample_prompts": 1,
                    "eval_fraction": 0.25, "wandb": {"mode": "disabled"}},
        "eval": {"policy": {"model": str(policy)}, "prompts": {"path": str(prompts), "split": "eval"},
                 "objectives": OBJECTIVES, "decoding": DECODING, "bootstrap_resamples": 100,
                 "wandb": {"mode": "disabled"}},
    }
    for stage, data in recipes.items():
        (folder / f"{stage}.yaml").write_text(yaml.safe_dump(data))
    return folder


@pytest.fixture(scope="module")
def two_rounds(tiny_policy_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("iterate")
    recipe = write_recipe(root / "recipe", tiny_policy_dir)
    out = run(parse_config(IterateConfig, ["--recipe", str(recipe), "--rounds", "2", "--output_dir", str(root / "it")]))
    return recipe, out


def test_two_rounds_write_every_stage_and_the_report(two_rounds):
    _, out = two_rounds
    for r in (1, 2):
        for stage in ("generate", "distill", "eval"):
            assert json.loads((out / f"round-{r}" / stage / "run.json").read_text())["complete"], (r, stage)
    metrics = json.loads((out / "metrics.json").read_text())
    names = [row["method"] for row in metrics["rounds"]]
    assert names == ["reference", "rmod", "round-1", "round-2"]
    for row in metrics["rounds"][2:]:
        assert set(row["recovery"]) == {"mean", "median"} and "minus_rmod" in row
    report = (out / "report.md").read_text()
    assert "`round-2`" in report and "recovery" in report
    # Round 2's eval decodes its student (and reference, which eval needs); rmod comes from round 1's.
    rows2 = read_jsonl(out / "round-2" / "eval" / "generations" / "samples.jsonl")
    assert {row["method"] for row in rows2} == {"distilled", "reference"}
    rows1 = read_jsonl(out / "round-1" / "eval" / "generations" / "samples.jsonl")
    ref1 = {r["prompt_id"]: r["completion"] for r in rows1 if r["method"] == "reference"}
    assert ref1 == {r["prompt_id"]: r["completion"] for r in rows2 if r["method"] == "reference"}


def test_round_two_decodes_with_the_student_on_round_one_scale(two_rounds):
    _, out = two_rounds
    gen2 = json.loads((out / "round-2" / "generate" / "run.json").read_text())
    policy = gen2["config"]["policy"]
    assert policy["merge_adapter"] is True and Path(policy["adapter"]) == out / "round-1" / "distill"
    assert Path(gen2["config"]["normalization"]) == out / "round-1" / "generate" / "normalization.json"
    gen1 = json.loads((out / "round-1" / "generate" / "run.json").read_text())
    assert gen2["normalization"]["mean"] == gen1["normalization"]["mean"]
    assert gen2["normalization"]["std"] == gen1["normalization"]["std"]
    dist2 = json.loads((out / "round-2" / "distill" / "run.json").read_text())
    assert Path(dist2["config"]["init_adapter"]) == out / "round-1" / "distill"


def test_continued_adapter_starts_from_round_one(tiny_policy_dir, two_rounds):
    """Round 2 trained round 1's adapter further: the same tensors, moved."""
    _, out = two_rounds
    from safetensors.torch import load_file

    a1 = load_file(out / "round-1" / "distill" / "adapter_model.safetensors")
    a2 = load_file(out / "round-2" / "distill" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys()
    assert any(not torch.equal(a1[k], a2[k]) for k in a1)
    # lora_B starts at zero in a fresh adapter; continued, it starts at round 1's (non-zero) values.
    b_keys = [k for k in a1 if "lora_B" in k]
    assert b_keys and all(a1[k].abs().sum() > 0 for k in b_keys)


def test_merged_policy_equals_the_adapter_switched_on(tiny_policy_dir, two_rounds):
    _, out = two_rounds
    adapter = out / "round-1" / "distill"
    peft_model, tok = load_policy(str(tiny_policy_dir), device="cpu", adapter=str(adapter))
    merged, _ = load_policy(str(tiny_policy_dir), device="cpu", adapter=str(adapter), merge_adapter=True)
    assert not hasattr(merged, "disable_adapter")
    ids = torch.tensor([tok("tell me a kind thing")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-5)


def test_rerun_keeps_every_round(two_rounds, capsys):
    recipe, out = two_rounds
    stamp = (out / "round-2" / "distill" / "adapter_model.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError, match="--overwrite"):
        run(parse_config(IterateConfig, ["--recipe", str(recipe), "--rounds", "2", "--output_dir", str(out)]))
    assert (out / "round-2" / "distill" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_resume_skips_complete_stages(tiny_policy_dir, two_rounds, tmp_path, capsys):
    """An iterate killed after round 1's distill: the rerun keeps round 1 and does the rest."""
    import shutil

    recipe, out = two_rounds
    partial = tmp_path / "it"
    (partial / "round-1").mkdir(parents=True)

    for stage in ("generate", "distill"):
        shutil.copytree(out / "round-1" / stage, partial / "round-1" / stage)
    made = json.loads((partial / "round-1" / "distill" / "run.json").read_text())  # as the killed run made it
    made["config"]["generate_dir"] = str(partial / "round-1" / "generate")
    (partial / "round-1" / "distill" / "run.json").write_text(json.dumps(made))
    marker = json.loads((out / "run.json").read_text())
    marker["complete"] = False
    (partial / "run.json").write_text(json.dumps(marker))
    run(parse_config(IterateConfig, ["--recipe", str(recipe), "--rounds", "2", "--output_dir", str(partial)]))
    log = capsys.readouterr().out
    assert "round 1 generate: complete, kept" in log and "round 1 distill: complete, kept" in log
    assert "round 2 generate ->" in log
    assert (partial / "report.md").is_file()


def test_restart_and_overrides_reach_the_stage_command_lines(tmp_path):
    cfg = parse_config(IterateConfig, ["--rounds", "3", "--start", "restart", "--output_dir", str(tmp_path / "it"),
                                       "--eval_args", "[--prompts.split, train, --prompts.subset, validation]"])
    d3 = stage_argv(cfg, 3, "distill", tmp_path / "it")
    assert "--init_adapter" not in d3
    e3 = stage_argv(cfg, 3, "eval", tmp_path / "it")
    assert e3[e3.index("--prompts.subset") + 1] == "validation"
    assert e3[e3.index("--generate_dir") + 1] == str(tmp_path / "it" / "round-1" / "generate")
    g3 = stage_argv(cfg, 3, "generate", tmp_path / "it")
    assert g3[g3.index("--policy.adapter") + 1] == str(tmp_path / "it" / "round-2" / "distill")


def test_final_dpo_and_later_generate_args_reach_the_stage_command_lines(tmp_path):
    out = tmp_path / "it"
    cfg = parse_config(IterateConfig, ["--rounds", "2", "--output_dir", str(out), "--final_dpo", "true",
                                       "--generate_args", "[--methods, '[rmod, reference]']",
                                       "--later_generate_args", "[--methods, '[rmod]', --samples_per_prompt, 1]",
                                       "--distill_args", "[--eval_fraction, 0.15]", "--dpo_args", "[--pair_margin, 0.5]"])
    g1, g2 = stage_argv(cfg, 1, "generate", out), stage_argv(cfg, 2, "generate", out)
    assert "--samples_per_prompt" not in g1 and g1[g1.index("--methods") + 1] == "[rmod, reference]"
    assert g2[g2.index("--samples_per_prompt") + 1] == "1"
    assert g2[len(g2) - 1 - g2[::-1].index("--methods") + 1] == "[rmod]"  # the later override wins
    d = stage_argv(cfg, 2, "dpo", out)
    assert d[d.index("--config") + 1].endswith("distill.yaml") and d[d.index("--objective") + 1] == "dpo"
    assert d[d.index("--init_adapter") + 1] == str(out / "round-2" / "distill")
    assert d[d.index("--generate_dir") + 1] == str(out / "round-1" / "generate")
    assert d[d.index("--pair_margin") + 1] == "0.5" and d[d.index("--eval_fraction") + 1] == "0.15"
    e = stage_argv(cfg, 2, "dpo-eval", out)
    assert e[e.index("--adapter") + 1] == str(out / "dpo" / "distill")
    assert e[e.index("--output_dir") + 1] == str(out / "dpo" / "eval")


def test_final_dpo_after_two_rounds(tiny_policy_dir, tmp_path):
    """Round 1 with reference rows, round 2 RMOD only (later_generate_args), then DPO from round
    2's adapter on round 1's pairs, evaluated beside the rounds."""
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "recipe", tiny_policy_dir)
    out = run(parse_config(IterateConfig, [
        "--recipe", str(recipe), "--rounds", "2", "--output_dir", str(tmp_path / "it"),
        "--generate_args", "[--methods, '[rmod, reference]']", "--later_generate_args", "[--methods, '[rmod]']",
        "--final_dpo", "true", "--dpo_args", "[--pair_margin, -100]"]))
    gen2 = json.loads((out / "round-2" / "generate" / "run.json").read_text())
    assert gen2["config"]["methods"] == ["rmod"]
    dpo = json.loads((out / "dpo" / "distill" / "run.json").read_text())
    assert dpo["complete"] and dpo["config"]["objective"] == "dpo" and dpo["metrics"]["dpo_pairs"] > 0
    assert Path(dpo["config"]["init_adapter"]) == out / "round-2" / "distill"
    assert Path(dpo["config"]["generate_dir"]) == out / "round-1" / "generate"
    a2 = load_file(out / "round-2" / "distill" / "adapter_model.safetensors")
    a3 = load_file(out / "dpo" / "distill" / "adapter_model.safetensors")
    assert a2.keys() == a3.keys() and any(not torch.equal(a2[k], a3[k]) for k in a2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in metrics["rounds"]] == ["reference", "rmod", "round-1", "round-2", "round-2+dpo"]
    assert set(metrics["rounds"][-1]["recovery"]) == {"mean", "median"}
    assert "`round-2+dpo`" in (out / "report.md").read_text()
    rows = read_jsonl(out / "dpo" / "eval" / "generations" / "samples.jsonl")
    assert {row["method"] for row in rows} == {"distilled", "reference"}


def test_an_on_policy_round_trains_on_rmod_over_the_students_own_answers(tiny_policy_dir, tmp_path):
    """later_distill_args: round 1 SFT; round 2 SFT + DPO on its own generate run, whose `reference` is
    the merged student's plain sample, so every pair is RMOD over the student against the student."""
    recipe = write_recipe(tmp_path / "recipe", tiny_policy_dir)
    cfg = parse_config(IterateConfig, [
        "--recipe", str(recipe), "--rounds", "2", "--output_dir", str(tmp_path / "it"),
        "--later_generate_args", "[--methods, '[rmod, reference]']",
        "--later_distill_args", "[--objective, sft+dpo, --pairs, reference, --pair_margin, -100]"])
    assert "--objective" not in stage_argv(cfg, 1, "distill", tmp_path / "it")
    out = run(cfg)
    d1 = json.loads((out / "round-1" / "distill" / "run.json").read_text())
    d2 = json.loads((out / "round-2" / "distill" / "run.json").read_text())
    assert d1["config"]["objective"] == "sft" and d2["config"]["objective"] == "sft+dpo"
    assert d2["metrics"]["dpo_pairs"] > 0 and Path(d2["config"]["generate_dir"]) == out / "round-2" / "generate"
    gen2 = json.loads((out / "round-2" / "generate" / "run.json").read_text())
    assert gen2["config"]["policy"]["merge_adapter"] and gen2["config"]["methods"] == ["rmod", "reference"]


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "rounds must be >= 1"),
    (["--later_generate_args", "[--methods, '[rmod]']", "--later_distill_args", "[--objective, sft+dpo]"],
     r"distill_args / later_distill_args: round 2's generate \(generate_args / later_generate_args\): DPO pairs"),
    (["--later_distill_args", "[--learning_rate, fast]"], "distill_args / later_distill_args: "),
    (["--dpo_args", "[--pair_margin, 0.5]"], "set final_dpo: true"),
    (["--final_dpo", "true", "--generate_args", "[--methods, '[rmod]']", "--distill_args", "[--objective, sft]"],
     r"final_dpo, distill_args / dpo_args: round 1's generate \(generate_args\): DPO pairs 'reference' need reference"),
    (["--final_dpo", "true", "--dpo_args", "[--objective, sft]"], "the final DPO's objective is dpo"),
    (["--generate_args", "[--methods, '[rmod]']", "--distill_args", "[--objective, sft+dpo]"],
     r"distill_args: round 1's generate \(generate_args\): DPO pairs"),
    (["--generate_args", "[--methods, '[rmod, reference]']", "--later_generate_args", "[--methods, '[rmod]']",
      "--distill_args", "[--objective, sft+dpo]"], r"distill_args: round 2's generate \(generate_args / later_generate_args\)"),
    (["--rounds", "2", "--generate_args", "[--decoding.num_candidates, many]",
      "--later_generate_args", "[--decoding.num_candidates, 2]"], "generate_args: "),
    (["--final_dpo", "true", "--dpo_args", "[--pairs, neither]"], "distill_args / dpo_args: .*pairs must be"),
    (["--final_dpo", "true", "--dpo_args", "[--pairs, blocks]"],
     r"round 1's generate \(generate_args\): DPO pairs 'blocks' need each block's candidates; .*keep_candidates"),
    (["--later_generate_args", "[--decoding.num_candidates, many]"], "later_generate_args"),
    (["--start", "resume"], "start must be one of"),
    (["--recipe", "no/such/folder"], "no/such/folder/generate.yaml does not exist"),
    (["--generate_args", "[--decoding.num_candidates, many]"], "generate_args"),
    (["--distill_args", "[--push_to_hub, 'true']"], "distill_args: push_to_hub: true, but HF_HUB_OFFLINE is set"),
])
def test_bad_iterate_recipes(argv, message, tmp_path):
    with pytest.raises(UserError, match=message):
        run(parse_config(IterateConfig, argv + ["--output_dir", str(tmp_path / "it")]))
    assert not (tmp_path / "it").exists()


def test_round_one_from_an_existing_run(two_rounds, tmp_path, capsys):
    """from_generate / from_adapter: round 1 is make demo's run, nothing of it is redone."""
    recipe, out = two_rounds
    new = tmp_path / "it"
    run(parse_config(IterateConfig, ["--recipe", str(recipe), "--rounds", "2", "--output_dir", str(new),
                                     "--from_generate", str(out / "round-1" / "generate"),
                                     "--from_adapter", str(out / "round-1" / "distill")]))
    log = capsys.readouterr().out
    assert "round 1 generate: complete, kept" in log and "round 1 distill: complete, kept" in log
    assert not (new / "round-1" / "generate").exists() and not (new / "round-1" / "distill").exists()
    gen2 = json.loads((new / "round-2" / "generate" / "run.json").read_text())
    assert Path(gen2["config"]["policy"]["adapter"]) == out / "round-1" / "distill"
    assert [r["method"] for r in json.loads((new / "metrics.json").read_text())["rounds"]] == [
        "reference", "rmod", "round-1", "round-2"]


def test_a_kept_adapter_is_not_pushed_again_and_says_so(two_rounds, tmp_path, capsys, monkeypatch):
    """push_to_hub added after a round's distill completed: the push keys are not recipe keys, so the round is
    kept, and iterate says it was not pushed and how to push it (it never pushes silently or not at all)."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("a kept round was pushed"))
    recipe, out = two_rounds
    new = tmp_path / "it"
    run(parse_config(IterateConfig, ["--recipe", str(recipe), "--rounds", "1", "--output_dir", str(new),
                                     "--from_generate", str(out / "round-1" / "generate"),
                                     "--from_adapter", str(out / "round-1" / "distill"),
                                     "--distill_args", "[--push_to_hub, 'true', --hub_token, hf_secret]"]))
    log = capsys.readouterr().out
    assert "round 1 distill: complete, kept" in log
    assert f"iterate: {out / 'round-1' / 'distill'} is kept as it is and not pushed again" in log
    assert "hf_secret" not in (new / "run.json").read_text()  # iterate's own run.json hides the token too


def test_a_kept_round_must_match_the_recipe(two_rounds, tmp_path):
    """A complete round made with other settings (the stage recipe edited since) is an error,
    not silently reused."""
    import shutil

    recipe, out = two_rounds
    partial = tmp_path / "it"
    shutil.copytree(out / "round-1" / "generate", partial / "round-1" / "generate")
    made = json.loads((partial / "round-1" / "generate" / "run.json").read_text())
    made["config"]["decoding"]["lam"] = 3.0
    (partial / "round-1" / "generate" / "run.json").write_text(json.dumps(made))
    marker = json.loads((out / "run.json").read_text())
    marker["complete"] = False
    (partial / "run.json").write_text(json.dumps(marker))
    with pytest.raises(UserError, match="another recipe.*decoding"):
        run(parse_config(IterateConfig, ["--recipe", str(recipe), "--rounds", "2", "--output_dir", str(partial)]))


def test_final_dpo_checks_from_generate_for_reference_rows(two_rounds, tmp_path):
    recipe, out = two_rounds  # its round 1 generated rmod only
    with pytest.raises(UserError, match="round 1's generate \\(from_generate .*need reference answers"):
        run(parse_config(IterateConfig, ["--recipe", str(recipe), "--output_dir", str(tmp_path / "it"), "--final_dpo",
                                         "true", "--from_generate", str(out / "round-1" / "generate")]))
    assert not (tmp_path / "it").exists()


def test_from_adapter_must_come_from_from_generate(two_rounds, tmp_path):
    recipe, out = two_rounds
    with pytest.raises(UserError, match="from_generate"):
        run(parse_config(IterateConfig, ["--recipe", str(recipe), "--output_dir", str(tmp_path / "a"),
                                         "--from_adapter", str(out / "round-1" / "distill")]))
    with pytest.raises(UserError, match="distilled from"):
        run(parse_config(IterateConfig, ["--recipe", str(recipe), "--output_dir", str(tmp_path / "b"),
                                         "--from_generate", str(out / "round-2" / "generate"),
                                         "--from_adapter", str(out / "round-1" / "distill")]))
    with pytest.raises(UserError, match="holds a distill run, not a generate run"):
        run(parse_config(IterateConfig, ["--recipe", str(recipe), "--output_dir", str(tmp_path / "c"),
                                         "--from_generate", str(out / "round-1" / "distill")]))


def test_a_run_made_before_a_key_existed_is_kept(two_rounds, tmp_path, capsys):
    """make demo's run from before merge_adapter existed has no such key: still round 1."""
    import shutil

    recipe, out = two_rounds
    old = tmp_path / "old-generate"
    shutil.copytree(out / "round-1" / "generate", old)
    made = json.loads((old / "run.json").read_text())
    del made["config"]["policy"]["merge_adapter"]
    (old / "run.json").write_text(json.dumps(made))
    run(parse_config(IterateConfig, ["--recipe", str(recipe), "--rounds", "1", "--output_dir", str(tmp_path / "it"),
                                     "--from_generate", str(old)]))
    assert "round 1 generate: complete, kept" in capsys.readouterr().out


def test_overwrite_redoes_the_rounds_in_place(two_rounds, tmp_path, capsys):
    recipe, out = two_rounds
    args = ["--recipe", str(recipe), "--rounds", "2", "--output_dir", str(tmp_path / "it"),
            "--from_generate", str(out / "round-1" / "generate"), "--from_adapter", str(out / "round-1" / "distill")]
    first = run(parse_config(IterateConfig, args))
    stamp = (first / "round-2" / "distill" / "adapter_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = run(parse_config(IterateConfig, args + ["--overwrite"]))
    log = capsys.readouterr().out
    assert again == first and "round 1 generate: complete, kept" in log and "round 2 generate ->" in log
    assert (first / "round-2" / "distill" / "adapter_model.safetensors").stat().st_mtime_ns != stamp
    gen2 = json.loads((first / "round-2" / "generate" / "run.json").read_text())
    assert Path(gen2["config"]["policy"]["adapter"]) == out / "round-1" / "distill"  # no staging path recorded
    assert not list(tmp_path.glob(".*overwrite*")) and not list(first.glob(".*"))


def test_stale_round_one_statistics_are_refused_before_any_round_runs(two_rounds, tmp_path, monkeypatch):
    """Round 1's normalisation scales every later round: one of an earlier scorer version is refused
    by iterate's check, before a policy loads, whether round 1 is from_generate or a kept round."""
    recipe, out = two_rounds
    stale = tmp_path / "generate"
    shutil.copytree(out / "round-1" / "generate", stale)
    norm = json.loads((stale / "normalization.json").read_text())
    (stale / "normalization.json").write_text(json.dumps(dict(norm, scorers=["harmlessness/v1", "concision/v1"])))
    monkeypatch.setattr("rmod_distill.policy.load_policy", lambda *a, **k: pytest.fail("a policy loaded"))
    with pytest.raises(UserError, match="generate/normalization.json: objective 'harmlessness' was normalised with "
                                        "scorer 'harmlessness/v1', the recipe's is 'harmlessness/v2'"):
        run(parse_config(IterateConfig, ["--recipe", str(recipe), "--output_dir", str(tmp_path / "it"),
                                         "--from_generate", str(stale)]))
    assert not (tmp_path / "it").exists()
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    shutil.copy(stale / "normalization.json", kept / "round-1" / "generate" / "normalization.json")
    marker = json.loads((kept / "run.json").read_text())
    (kept / "run.json").write_text(json.dumps(dict(marker, complete=False)))  # an unfinished chain, resumed
    with pytest.raises(UserError, match="round-1/generate/normalization.json: objective 'harmlessness'"):
        run(parse_config(IterateConfig, ["--recipe", str(recipe), "--rounds", "2", "--output_dir", str(kept)]))


def test_iterate_best_runs_the_validation_splits_best_chain(tmp_path, monkeypatch):
    """recipes/default/iterate-best.yaml is student GE15 of docs/log/2026-12-06.md: two answers of each of rmod
    and reference, SFT then one DPO epoch at lr 2e-3 and beta 0.02 on every RMOD answer over every
    reference answer of its prompt (E15), then one GRPO pass at lr 5e-4, scored on the eval split."""
    from rmod_distill.distill import DistillConfig
    from rmod_distill.generate import GenerateConfig

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = parse_config(IterateConfig, ["--config", "recipes/default/iterate-best.yaml", "--output_dir", str(tmp_path)])
    gen = parse_config(GenerateConfig, stage_argv(cfg, 1, "generate", tmp_path))
    dist = parse_config(DistillConfig, stage_argv(cfg, 1, "distill", tmp_path) + ["--bf16", "false"])
    assert cfg.rounds == 1 and not cfg.final_dpo
    assert gen.samples_per_prompt == 2 and gen.methods == ["rmod", "reference"]
    assert (dist.objective, dist.pairs, dist.dpo_learning_rate, dist.dpo_epochs) == ("sft+dpo+grpo", "reference-all", 2e-3, 1)
    assert dist.dpo_beta == 0.02 and dist.dpo_restarts == 3  # DPO's seeds 0, 1, 2; the best on held-out train prompts
    assert (dist.grpo_learning_rate, dist.grpo_epochs, dist.grpo_beta, dist.grpo_num_generations) == (5e-4, 1, 0.04, 4)
    assert dist.grpo_prompts == "data/prompts/extra-train.jsonl"  # GRPO also samples the 300 extra train prompts
    assert dist.samples_per_prompt is None  # every generated answer
