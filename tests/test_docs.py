"""The documentation cannot drift: docs/recipes.md is what the config dataclasses say, and every
command of the README runs (when cheap) or names things that exist (when not)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    from rmod_distill.recipe_docs import PAGE, render

    assert PAGE.is_file() and PAGE.read_text() == render(), (
        "docs/recipes.md is stale (a recipe key, default or help text changed): run `make docs` "
        "(python -m rmod_distill.recipe_docs) and commit docs/recipes.md")


def test_recipe_reference_covers_every_stage_and_key():
    from test_architecture import recipe_keys

    from rmod_distill.cli import STAGES
    from rmod_distill.recipe_docs import STAGES as DOCUMENTED, config_class

    assert set(DOCUMENTED) == set(STAGES) - {"download", "compare", "init"}
    page = (ROOT / "docs" / "recipes.md").read_text()
    for stage in DOCUMENTED:
        cls = config_class(stage)
        own = set(cls.__dict__.get("__annotations__", {})) if stage == "distill" else None
        for key in recipe_keys(cls):
            top = key[2:].split(".")[0]
            if own is not None and top not in own:
                continue  # inherited TRL keys: only those the default recipe sets are listed
            assert f"| `{key[2:].split('.')[-1]}` |" in page, f"docs/recipes.md does not list {key} of {stage}"


# ----------------------------------------------------------------------------- the README's commands
#
# Every line of a ```bash block of README.md is one simple command, checked by the rule for its
# first word. A command no rule knows fails the test: add it to a rule, deciding whether it is
# cheap enough to run.
#   rmod-distill <stage> ...       run in this process: as written with --help, otherwise its
#                                  recipe is parsed and validated (keys, types, each section's own
#                                  checks; not --dry-run, which also needs the files and runs the
#                                  command names, made by earlier stages); download, compare and
#                                  init, which take paths, only have their options checked against
#                                  --help; the own-model steps (recipes/mine/) run in test_own_model.py
#   make <target> [VAR=value ...]  `make -n` must succeed (the target exists), and every
#                                  rmod-distill or accelerate command it would run is checked as here
#   accelerate launch ... -m rmod_distill.<stage> ...
#                                  its --config_file must exist; the stage's arguments are dry-run
# Every ```yaml block is a recipe, or part of one, whose first line names it
# (`# recipes/<experiment>/<stage>.yaml`): it is dry-run as that stage's recipe.

README = ROOT / "README.md"
SHELL_SYNTAX = {"|", "||", "&", "&&", ";", ">", ">>", "<"}


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the ```<language> blocks of a markdown text."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def readme_commands() -> list[list[str]]:
    """Each command of the README's bash blocks as its words (comments dropped, continuations joined)."""
    commands = []
    for block in fenced(README.read_text(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def run_stage(argv: list[str], capsys) -> None:
    """``rmod-distill <argv>``, cheaply, in this process (see the rules above)."""
    from rmod_distill.cli import STAGES, main

    assert argv and argv[0] in STAGES, f"no stage {argv[:1]} (stages: {', '.join(STAGES)})"
    if any(a.startswith("recipes/mine/") for a in argv):
        return  # a recipe the README's own-model steps make first: tests/test_own_model.py runs them as written
    if argv[0] in ("download", "compare", "init") and "--help" not in argv:  # they take arguments, not a recipe
        options = [a for a in argv if a.startswith("--")]
        argv = [argv[0], "--help"]
    elif "--help" not in argv:
        from rmod_distill.config import parse_config
        from rmod_distill.recipe_docs import config_class

        parse_config(config_class(argv[0]), [a for a in argv[1:] if a != "--dry-run"])
        return
    else:
        options = []
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(argv)
    out, err = capsys.readouterr()
    assert done.value.code == 0, f"rmod-distill {shlex.join(argv)} exited {done.value.code}:\n{err[-2000:]}"
    missing = [o for o in options if o not in out]
    assert not missing, f"rmod-distill {argv[0]} takes no {missing}:\n{out}"


def run_accelerate(words: list[str], capsys) -> None:
    """``accelerate launch [--config_file F] ... -m rmod_distill.<stage> ARGS``: F exists, ARGS dry-run."""
    assert words[:2] == ["accelerate", "launch"] and "-m" in words, f"not an accelerate launch of a stage: {words}"
    if "--config_file" in words:
        config = ROOT / words[words.index("--config_file") + 1]
        assert config.is_file(), f"accelerate launcher {config} does not exist"
    module = words[words.index("-m") + 1]
    assert module.startswith("rmod_distill."), f"accelerate launches {module}, not a stage"
    run_stage([module.removeprefix("rmod_distill."), *words[words.index("-m") + 2:]], capsys)


def run_make(args: list[str], capsys) -> None:
    """``make -n ARGS`` must succeed; the stage commands it prints are checked too."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "-n", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"make -n {shlex.join(args)} failed:\n{proc.stderr[-2000:]}"
    for line in proc.stdout.splitlines():
        program = line.split(maxsplit=1)[0] if line.strip() else ""
        if program.endswith("/rmod-distill"):
            run_stage(shlex.split(line)[1:], capsys)
        elif program.endswith("/accelerate"):
            run_accelerate(["accelerate", *shlex.split(line)[1:]], capsys)


RULES = {"rmod-distill": lambda words, capsys: run_stage(words[1:], capsys),
         "make": lambda words, capsys: run_make(words[1:], capsys),
         "accelerate": run_accelerate}


@pytest.mark.parametrize("words", readme_commands(), ids=lambda w: shlex.join(w)[:80])
def test_readme_command(words, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    syntax = SHELL_SYNTAX & set(words)
    assert not syntax, f"README: one simple command per line, without {syntax}: {shlex.join(words)}"
    assert words[0] in RULES, (f"README command {shlex.join(words)!r}: no rule in tests/test_docs.py says how to check "
                               f"it (rules for: {', '.join(RULES)})")
    RULES[words[0]](words, capsys)


def test_readme_has_commands_of_every_rule():
    """Guards the test above against passing vacuously on a README it no longer reads."""
    assert {w[0] for w in readme_commands()} == set(RULES)


@pytest.mark.parametrize("block", fenced(README.read_text(), "yaml"), ids=lambda b: b.splitlines()[0][:60])
def test_readme_recipe_parses(block, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    named = re.match(r"# recipes/[\w.-]+/([a-z]+)(?:-[\w-]+)?\.yaml\b", block)
    assert named, ("README: a yaml block starts with the recipe it belongs to "
                   f"(# recipes/<experiment>/<stage>.yaml):\n{block}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(block)
    run_stage([named.group(1), "--config", str(recipe)], capsys)


# ----------------------------------------------------------------------------- the README's tables and links


def stage_key_tables() -> list[tuple[str, str, str]]:
    """``(stage, key, value cell)`` for each row of the key tables under the README's stage headings
    (``### 1. generate: ...``)."""
    rows = []
    for stage, section in re.findall(r"^### \d\. (\w+):.*?\n(.*?)(?=^##)", README.read_text(), re.M | re.S):
        cells = re.findall(r"^\| `([\w.]+)` \|([^|]*)\|", section, re.M)
        rows += [(stage, key, value.strip()) for key, value in cells]
    return rows


def test_readme_key_tables_name_real_keys_with_the_default_recipes_values():
    """A key the README names is a key of that stage, and the value it shows is the default recipe's."""
    from rmod_distill.config import parse_config, to_dict, yaml_load
    from rmod_distill.recipe_docs import config_class

    rows = stage_key_tables()
    assert {stage for stage, _, _ in rows} == {"generate", "distill", "eval"}
    resolved = {}
    for stage, key, cell in rows:
        if stage not in resolved:
            cfg = parse_config(config_class(stage), ["--config", str(ROOT / "recipes" / "default" / f"{stage}.yaml")])
            resolved[stage] = to_dict(cfg)
        node = resolved[stage]
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"README: {stage} has no key {key}"
            node = node[part]
        if cell.startswith("`") and cell.endswith("`"):  # a value; other cells describe it in words
            assert yaml_load(cell.strip("`")) == node, (f"README: {stage}'s {key} shows {cell}; the default recipe "
                                                        f"has {node!r}")


def test_links_point_at_files_and_every_page_is_named_in_the_readme():
    pages = sorted((ROOT / "docs").glob("*.md"))
    for page in [README, *pages, *sorted((ROOT / "recipes").glob("*/README.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}: no such file"
    readme = README.read_text()
    unnamed = [p.name for p in pages if f"docs/{p.name}" not in readme]
    assert not unnamed, f"README.md does not point to docs/{unnamed}; add it to 'Where to read more'"


def test_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 300, f"README.md has {lines} lines; it is the newcomer's page (<= 300): move detail to docs/"
