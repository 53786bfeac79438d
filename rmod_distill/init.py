"""A new experiment's recipes, consistent across stages: ``rmod-distill init NAME --policy ...``.

    rmod-distill init mine --policy models/my-llama --prompts data/prompts/mine.jsonl \\
        --objectives '[{name: length, kind: python, model: "my_rewards:length"}, {name: concision}]'

writes ``recipes/mine/generate.yaml``, ``distill.yaml`` and ``eval.yaml`` from the default
experiment's recipes (``--from``), with the keys that must agree between stages set once: the
policy (generate's ``policy.model``, distill's ``model.model_name_or_path``, eval's
``policy.model``), the objectives (generate's and eval's, in one order), the prompt file
(generate's train split, eval's eval split) and every run folder (``runs/mine/<stage>``,
distill's ``generate_dir``, eval's ``generate_dir`` and ``adapter``). Eval's decoding is left to
the generate run. Every input is checked first (the policy folder and its chat template, the
prompt file's train and eval rows, each objective: a python reward must import); nothing is
written when one fails, and an existing recipe folder is never overwritten.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from rmod_distill.config import ConfigError, load_yaml, parse_config, to_dict, yaml_load
from rmod_distill.engine.decoding import REFERENCE_DECODING
from rmod_distill.errors import UserError

STAGES = ("generate", "distill", "eval")


def experiment_recipes(name: str, policy: str, template: dict[str, dict], prompts: str | None = None,
                       objectives: list | None = None, runs: str = "runs") -> dict[str, dict]:
    """The three recipes of experiment ``name``: ``template`` (stage -> recipe mapping) with the keys
    that tie the stages together set from ``policy``, ``prompts``, ``objectives`` and ``runs``."""
    out = {stage: dict(template[stage]) for stage in STAGES}
    folder = {stage: f"{runs}/{name}/{stage}" for stage in STAGES}
    gen, dis, ev = out["generate"], out["distill"], out["eval"]
    gen["policy"] = dict(gen.get("policy") or {}, model=policy)
    ev["policy"] = dict(ev.get("policy") or {}, model=policy)
    dis["model"] = dict(dis.get("model") or {}, model_name_or_path=policy)
    if prompts is not None:
        gen["prompts"] = dict(gen.get("prompts") or {}, path=prompts)
        ev["prompts"] = dict(ev.get("prompts") or {}, path=prompts)
        if dis.get("grpo_prompts") is not None:  # more prompts of the template's own kind: not this experiment's
            dis["grpo_prompts"] = None
    if objectives is not None:
        gen["objectives"] = ev["objectives"] = objectives
    else:
        ev["objectives"] = gen.get("objectives", ev.get("objectives"))
    decoding = {k: v for k, v in (ev.get("decoding") or {}).items() if k not in REFERENCE_DECODING}
    if decoding:
        ev["decoding"] = decoding
    else:
        ev.pop("decoding", None)
    gen["output_dir"] = folder["generate"]
    dis.update(generate_dir=folder["generate"], output_dir=folder["distill"])
    ev.update(generate_dir=folder["generate"], adapter=folder["distill"], output_dir=folder["eval"])
    return out


def check_experiment(folder: Path, shown: Path) -> None:
    """Parse the recipes written in ``folder`` (``shown``: the folder they are for, named in errors) and
    make the checks that need no earlier run: the policy, its chat template, the prompt file's train
    and eval rows, each objective."""
    import importlib

    from rmod_distill.objectives import ObjectiveSet
    from rmod_distill.policy import load_tokenizer
    from rmod_distill.prompts import load_prompts

    parsed = {}
    for stage in STAGES:
        # Each stage's recipe class, read as the stage reads it (a stage module is imported by name, as cli does).
        cls = getattr(importlib.import_module(f"rmod_distill.{stage}"), f"{stage.capitalize()}Config")
        try:
            parsed[stage] = parse_config(cls, ["--config", str(folder / f"{stage}.yaml")])
        except ConfigError as exc:
            raise UserError(str(exc).replace(str(folder), str(shown))) from None
    gen, ev = parsed["generate"], parsed["eval"]
    gen.policy.check()
    load_tokenizer(gen.policy.model)  # a policy without a chat template fails here
    load_prompts(gen.prompts)
    load_prompts(ev.prompts)
    ObjectiveSet.from_specs(gen.objectives, load=False)


def main(argv: list[str] | None = None) -> None:
    """``rmod-distill init NAME --policy PATH_OR_ID [--prompts FILE] [--objectives YAML] ...``."""
    parser = argparse.ArgumentParser(prog="rmod-distill init", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="Experiment name: recipes/NAME/ and runs/NAME/")
    parser.add_argument("--policy", required=True, help="The policy: a hub id, a local model folder or `embedded`")
    parser.add_argument("--prompts", help="Prompt file (JSONL, JSON or parquet rows with id, prompt or messages, and "
                                          "split: train or eval); default: the template's")
    parser.add_argument("--objectives", help="YAML list of objectives, as in a recipe: "
                                             "'[{name: mine, kind: python, model: \"my_rewards:mine\"}, "
                                             "{name: concision}]'; default: the template's")
    parser.add_argument("--from", dest="template", default="recipes/default",
                        help="Folder of the recipes to start from (default: recipes/default)")
    parser.add_argument("--recipes", default="recipes", help="Where the experiment's folder is made (default: recipes)")
    parser.add_argument("--runs", default="runs", help="Where its runs go (default: runs)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if not args.name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"experiment name {args.name!r}: use letters, digits, - and _ (it names folders)")
    target = Path(args.recipes) / args.name
    if target.exists():
        raise UserError(f"{target} already exists; choose another name (init never overwrites a recipe)")
    template = {}
    for stage in STAGES:
        path = Path(args.template) / f"{stage}.yaml"
        if not path.is_file():
            raise UserError(f"--from {args.template}: no {stage}.yaml there (run from the repository's folder, or "
                            "give --from the folder of an experiment's recipes)")
        template[stage] = load_yaml(path)
    objectives = None
    if args.objectives is not None:
        try:
            objectives = yaml_load(args.objectives)
        except yaml.YAMLError as exc:
            raise UserError(f"--objectives: not valid YAML ({' '.join(str(exc).split())[:160]})") from None
        if not isinstance(objectives, list) or not objectives:
            raise UserError(f"--objectives: expected a YAML list of objectives, got {args.objectives!r}")
    recipes = experiment_recipes(args.name, args.policy, template, args.prompts, objectives, args.runs)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.name}.", dir=target.parent))
    try:
        for stage in STAGES:
            header = (f"# Written by `rmod-distill init {args.name}` from {args.template}/{stage}.yaml. The policy, "
                      "the objectives (in this order),\n# the prompt file and the run folders are set alike in "
                      "generate.yaml, distill.yaml and eval.yaml: change them in all three.\n")
            body = yaml.safe_dump(to_dict(recipes[stage]), sort_keys=False, allow_unicode=True, width=110)
            (staging / f"{stage}.yaml").write_text(header + body)
        check_experiment(staging, target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"init: {target}/generate.yaml, distill.yaml, eval.yaml (runs in {args.runs}/{args.name}/)")
    print("next:")
    print(f"  rmod-distill generate --config {target}/generate.yaml --dry-run")
    print(f"  make demo RECIPE={args.name}      # generate -> distill -> eval")


if __name__ == "__main__":
    main(sys.argv[1:])
