"""The documentation cannot drift: docs/recipes.md is what the config dataclasses say, and every
command of the README runs (when cheap) or names things that exist (when not)."""

from __future__ import annotations

from pathlib import Path

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

    assert set(DOCUMENTED) == set(STAGES) - {"download"}
    page = (ROOT / "docs" / "recipes.md").read_text()
    for stage in DOCUMENTED:
        cls = config_class(stage)
        own = set(cls.__dict__.get("__annotations__", {})) if stage == "distill" else None
        for key in recipe_keys(cls):
            top = key[2:].split(".")[0]
            if own is not None and top not in own:
                continue  # inherited TRL keys: only those the default recipe sets are listed
            assert f"| `{key[2:].split('.')[-1]}` |" in page, f"docs/recipes.md does not list {key} of {stage}"
