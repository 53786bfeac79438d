"""docs/recipes.md, every key of every stage's recipe, written from the config dataclasses.

    make docs          # = python -m rmod_distill.recipe_docs
    python -m rmod_distill.recipe_docs --check   # exit 1 when docs/recipes.md is stale

The page is the same fields, types, defaults and help texts that ``rmod-distill <stage>
--help`` prints, as tables: one per stage, then one per section (``policy:``, ``decoding:``,
an item of ``objectives:``, ...), each written once and linked from every stage that has it.
Distill's config extends TRL's ``SFTConfig``: its own keys and its ``model:`` section are
listed in full, the inherited TRL / TrainingArguments keys only where the default recipe
sets them. ``tests/test_docs.py`` renders the page in memory and fails when the file differs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

# The type and default helpers of ``--help``, so that the page and the command line agree.
from rmod_distill.config import _describe, _hints, load_yaml, to_dict

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "recipes.md"
# Stage -> its config class; the command line reaches stages by name (rmod_distill.cli), and so
# does this page. ``download`` and ``compare`` take arguments, not a recipe.
STAGES = {
    "generate": "rmod_distill.generate:GenerateConfig",
    "distill": "rmod_distill.distill:DistillConfig",
    "eval": "rmod_distill.eval:EvalConfig",
    "iterate": "rmod_distill.iterate:IterateConfig",
    "values": "rmod_distill.values:ValuesConfig",
}
TRL_DOCS = "https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig"
TRAINING_ARGUMENTS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"


def config_class(stage: str) -> type:
    """The config dataclass of ``stage`` (imports its module)."""
    module, name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), name)


def _section_of(tp: Any) -> tuple[type | None, bool]:
    """``(dataclass, is_list)`` when the annotation is a section, a list of sections or an optional
    section; ``(None, False)`` otherwise."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0], False
    return None, False


def _inline(value: Any) -> str:
    """A value as a recipe writes it, on one line (``[rmod]``, ``null``, ``0.15``)."""
    plain = json.loads(json.dumps(to_dict(value), default=str))
    text = yaml.safe_dump(plain, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _changed(section: type, value: Any) -> dict[str, Any]:
    """The keys of a section instance (or of each item of a list of them) that differ from the
    section's own defaults."""
    out = {}
    for f in dataclasses.fields(section):
        if f.init and (_default(f) is dataclasses.MISSING or getattr(value, f.name) != _default(f)):
            out[f.name] = getattr(value, f.name)
    return out


def _cell(text: str) -> str:
    """Help text fit for a table cell: one line, pipes escaped, argparse's %% undone."""
    return " ".join(str(text).split()).replace("%%", "%").replace("|", "\\|")


def _summary(cls: type) -> str:
    """The first paragraph of a class's docstring, on one line, in markdown's backticks."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "`")


def anchor(title: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def rows(cls: type, names: list[str] | None = None, values: dict[str, Any] | None = None) -> list[str]:
    """A markdown table of ``cls``'s keys (all, or ``names``); ``values`` adds a column of the
    values a recipe gives them."""
    hints = _hints(cls)
    head = "| key | type | default | " + ("default recipe | " if values is not None else "") + "what it does |"
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for f in dataclasses.fields(cls):
        if not f.init or (names is not None and f.name not in names):
            continue
        tp = hints.get(f.name, Any)
        section, is_list = _section_of(tp)
        default = _default(f)
        text = f.metadata.get("help", "")
        if section is not None:
            link = f"[{section.__name__}](#{anchor(section.__name__)})"
            kind_cell = f"list of {link}" if is_list else (link if dataclasses.is_dataclass(tp) else f"{link} or null")
            if is_list:  # the items' keys that differ from the section's defaults: [{name: warmth}, ...]
                default_cell = f"`{_inline([_changed(section, v) for v in default])}`"
            elif default is None:
                default_cell = "`null`"
            else:
                changed = _changed(section, default)
                default_cell = "the section's defaults" + (f", but `{_inline(changed)}`" if changed else "")
            text = text or _summary(section)
        else:
            kind_cell = _cell(_describe(tp))
            if default is dataclasses.MISSING:
                default_cell = "required"
            else:
                try:
                    default_cell = f"`{_inline(default)}`"
                except Exception:  # a library default that does not print as a value
                    default_cell = "(computed)"
        given = [f"`{_inline(values[f.name])}`"] if values is not None else []
        lines.append(" | ".join(["| `" + f.name + "`", kind_cell, default_cell, *given, _cell(text)]) + " |")
    return lines


def _sections(cls: type, where: str, found: dict[type, list[str]], names: list[str] | None = None) -> None:
    """Every section reachable from ``cls`` (from its keys ``names``, or all), with the keys
    (``stage: key``) it is found under."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        section, is_list = _section_of(hints.get(f.name, Any))
        if section is None or not f.init or (names is not None and f.name not in names):
            continue
        key = f"{where}{f.name}" + ("[i]" if is_list else "")
        if key not in found.setdefault(section, []):
            found[section].append(key)
        _sections(section, key + ".", found)


def _own_keys(cls: type) -> list[str]:
    """The keys a class declares itself (not those it inherits)."""
    return list(cls.__dict__.get("__annotations__", {}))


def render() -> str:
    """The whole page."""
    out = [
        "# Recipe reference: every key of every stage",
        "",
        "<!-- Written by `make docs` (python -m rmod_distill.recipe_docs) from the config dataclasses; do not edit.",
        "     tests/test_docs.py fails when this file is stale. -->",
        "",
        "What you get here: every key a stage's recipe takes, with its type, its default and what it does,",
        "as `rmod-distill <stage> --help` prints them. How recipes are written, overridden and checked",
        "(`--dry-run`): the README's \"Recipes\" section. A section's keys are nested in YAML",
        "(`decoding: {num_candidates: 8}`) and dotted on the command line (`--decoding.num_candidates 8`).",
        "",
        "Stages: " + ", ".join(f"[{s}](#{anchor(s)})" for s in STAGES) + "; then the [sections](#sections) they share.",
    ]
    found: dict[type, list[str]] = {}
    for stage in STAGES:
        cls = config_class(stage)
        out += ["", f"## {stage}", "", f"`rmod-distill {stage} --config recipes/default/{stage}.yaml` "
                f"(`{cls.__name__}`, `{cls.__module__.replace('.', '/')}.py`). {_summary(cls)}", ""]
        own = _own_keys(cls) if stage == "distill" else None
        out += rows(cls, own)
        _sections(cls, f"{stage}: ", found, own)
        if stage == "distill":
            recipe = load_yaml(ROOT / "recipes" / "default" / "distill.yaml")
            inherited = [k for k in recipe if k not in own]
            out += ["", "### Inherited keys (TRL's SFTConfig and transformers' TrainingArguments)", "",
                    f"Every key of TRL's [`SFTConfig`]({TRL_DOCS}) and transformers' "
                    f"[`TrainingArguments`]({TRAINING_ARGUMENTS_DOCS}) is a key of this recipe too (`rmod-distill "
                    "distill --help` lists them all with the installed versions' help). The ones "
                    "`recipes/default/distill.yaml` sets:", ""]
            out += rows(cls, inherited, {k: recipe[k] for k in inherited})
    out += ["", "## Sections", "", "Each section once, with the stages and keys it is found under."]
    for section, keys in found.items():
        out += ["", f"### {section.__name__}", "",
                f"{_summary(section)} Found under: " + ", ".join(f"`{k}`" for k in keys) + ".", ""]
        out += rows(section)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Write docs/recipes.md, or with ``--check`` exit 1 when it differs from what would be written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    text = render()
    if "--check" in argv:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run `make docs`", file=sys.stderr)
            raise SystemExit(1)
        print(f"{PAGE.relative_to(ROOT)} is current")
        return
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
