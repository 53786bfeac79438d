"""Recipes: strict parsing, overrides, clear errors, and every shipped recipe loads."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from rmod_distill.config import ConfigError, parse_config
from rmod_distill.distill import DistillConfig
from rmod_distill.eval import EvalConfig
from rmod_distill.generate import GenerateConfig
from rmod_distill.iterate import IterateConfig
from rmod_distill.values import ValuesConfig

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = {"generate": GenerateConfig, "distill": DistillConfig, "eval": EvalConfig, "values": ValuesConfig,
                 "iterate": IterateConfig}


@dataclass
class Inner:
    k: int = 4
    name: str = "x"


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    items: list[str] = field(default_factory=list)
    ratio: float = 0.5
    flag: bool = False
    maybe: int | None = None


def test_yaml_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inner: {k: 8}\nitems: [a, b]\nratio: 1\n")
    cfg = parse_config(Outer, ["--config", str(recipe), "--inner.name", "y", "--flag", "--maybe=3"])
    assert cfg == Outer(Inner(8, "y"), ["a", "b"], 1.0, True, 3)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("inner: {kk: 8}\n", "unknown key 'kk' for Inner; did you mean 'k'? valid keys are: k, name"),
        ("ratio: fast\n", "key 'ratio': expected a number, got 'fast'"),
        ("inner: {k: 1.5}\n", "key 'k': expected an integer, got 1.5"),
        ("items: a\n", "key 'items': expected a list of str"),
        ("flag: 3\n", "expected true or false"),
        ("- a\n- b\n", "expected a YAML mapping"),
    ],
)
def test_errors_name_the_key(tmp_path, yaml_text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        parse_config(Outer, ["--config", str(recipe)])
    assert message in str(err.value) and str(recipe) in str(err.value)


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="recipe file nope.yaml does not exist"):
        parse_config(Outer, ["--config", "nope.yaml"])


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit):
        parse_config(GenerateConfig, ["--help"])
    assert "--decoding.num_candidates" in capsys.readouterr().out


def shipped_recipes():
    return sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate_configs")


@pytest.mark.parametrize("recipe", shipped_recipes(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_loads(recipe, monkeypatch):
    stage = recipe.stem.split("-")[0]  # <stage>.yaml, or a variant <stage>-<name>.yaml
    assert stage in STAGE_CONFIGS, f"{recipe}: no config class for stage {stage!r}"
    overrides = []
    if stage == "distill" and not torch.cuda.is_available():
        overrides = ["--bf16", "false"]  # TrainingArguments refuses bf16 without a GPU; every other key is checked
    cfg = parse_config(STAGE_CONFIGS[stage], ["--config", str(recipe), *overrides])
    if stage == "iterate":  # its stage recipes and overrides parse together too
        from rmod_distill.iterate import check

        monkeypatch.chdir(ROOT)
        check(cfg)
    prompts = getattr(cfg, "prompts", None)
    if prompts is not None and prompts.path.endswith((".jsonl", ".parquet", ".json")):
        assert (ROOT / prompts.path).is_file(), f"{recipe}: prompt file {prompts.path} is missing"


def test_dry_run_prints_the_resolved_recipe_and_writes_nothing(tmp_path, capsys, tiny_policy_dir):
    from rmod_distill import cli

    out = tmp_path / "run"
    argv = ["--config", str(ROOT / "recipes/default/generate.yaml"), "--decoding.num_candidates", "8",
            "--output_dir", str(out), "--policy.model", str(tiny_policy_dir)]
    with pytest.raises(SystemExit) as done:
        cli.main(["generate", *argv[:2], "--dry-run", *argv[2:]])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# GenerateConfig, resolved and checked")
    from rmod_distill.config import yaml_load

    resolved = yaml_load(printed)
    assert resolved["decoding"]["num_candidates"] == 8 and resolved["methods"] == ["rmod", "reference"]
    assert not out.exists()
    # What it prints is a recipe: it parses back into the same config.
    again = tmp_path / "resolved.yaml"
    again.write_text(printed)
    assert parse_config(GenerateConfig, ["--config", str(again)]) == parse_config(GenerateConfig, argv)


def test_dry_run_of_a_bad_key_fails_with_exit_2_naming_it():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rmod_distill.cli", "eval", "--config", "recipes/default/eval.yaml",
                           "--decoding.num_candidatez", "8", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown key 'num_candidatez' for DecodingConfig; did you mean 'num_candidates'?" in proc.stderr
    assert proc.stdout == ""


def test_a_command_line_in_a_recipe_hides_every_spelling_of_a_secret():
    """Issue 43, item 4: iterate's *_args and run.json's `command` hide a token however it is written."""
    from rmod_distill.config import to_dict

    written = to_dict(["--hub_token=hf_PLANTEDaaaa1", "--hub-token", "hf_PLANTEDbbbb2", "--distill_args",
                       "[--hub_token, hf_PLANTEDcccc3]", "--seed", "3"])
    assert "PLANTED" not in str(written), written
    assert written[-2:] == ["--seed", "3"] and written[0] == "--hub_token=<hidden>"
