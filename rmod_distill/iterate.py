"""Iterated distillation: ``rmod-distill iterate --config recipes/default/iterate.yaml``.

Round 1 is the pipeline as it is: RMOD over the base policy (generate), an adapter learnt
from it (distill). Round r > 1 runs RMOD with round r-1's student as the policy (the adapter
folded into the weights, ``policy.merge_adapter``), keeps round 1's normalisation so every
round scores on one scale, and distils again: continuing round r-1's adapter
(``start: continue``, distill's ``init_adapter``) or a fresh one from the base policy
(``start: restart``). With ``final_dpo``, the last round's adapter is then trained further by
DPO on round 1's pairs (its RMOD answers over its ``reference`` answers). Then every student
is evaluated on the same held-out prompts and seeds, beside round 1's teacher (``rmod``) and
``reference``, and ``report.md`` puts them side by side with paired intervals.

Each stage writes its usual run folder under ``output_dir/round-<r>/``; a complete one made
with the same recipe is kept, an unfinished one resumes, so a killed ``iterate`` picks up
where it stopped. Round 1 can be an existing generate run and adapter (``from_generate``,
``from_adapter``: ``make demo``'s, say). The stage recipes are the recipe folder's own ``generate.yaml``, ``distill.yaml``
and ``eval.yaml``, with ``generate_args``, ``distill_args`` and ``eval_args`` applied to every
round (and to the final DPO and its eval), ``later_generate_args`` and ``later_distill_args`` to
rounds 2 and later only, and ``dpo_args`` to the final DPO only. The on-policy round is
``later_generate_args: [--methods, "[rmod, reference]"]`` with ``later_distill_args:
[--objective, sft+dpo, --pairs, reference]``: over the merged student, ``reference`` is the
student's own plain sample, so each pair is RMOD's answer over what the student would have said.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path

from rmod_distill.artifacts import (NOT_RECIPE, RunFolder, dpo_pairs_problem, provenance, read_json, read_run,
                                    recipe_key, write_json)
from rmod_distill.config import ConfigError, load_yaml, parse_config, stage_main, to_dict
from rmod_distill.errors import UserError
from rmod_distill.objectives import Normalizer, scorer_id
from rmod_distill.comparison import compare_students, intro, table_lines
from rmod_distill.metrics import format_recovery

STARTS = ("continue", "restart")
STAGES = ("generate", "distill", "eval")
STAGE_CONFIGS = {"generate": "GenerateConfig", "distill": "DistillConfig", "eval": "EvalConfig"}
# The final DPO's training and its eval are a distill and an eval run of their own.
KINDS = {"dpo": "distill", "dpo-eval": "eval"}
ARG_KEYS = ("generate_args", "later_generate_args", "distill_args", "later_distill_args", "dpo_args", "eval_args")


@dataclass
class IterateConfig:
    """Rounds of RMOD over the latest student, each distilled again."""

    recipe: str = field(default="recipes/default", metadata={
        "help": "Folder with the stage recipes (generate.yaml, distill.yaml, eval.yaml) every round uses."})
    rounds: int = field(default=2, metadata={"help": "Rounds of generate + distill (1 is the plain pipeline)."})
    start: str = field(default="continue", metadata={
        "help": "continue (round r trains round r-1's adapter further) | restart (a fresh adapter on the base)."})
    generate_args: list[str | int | float | bool | None] = field(default_factory=list, metadata={
        "help": "Overrides for every round's generate, as on its command line: [--prompts.subset, fit]."})
    later_generate_args: list[str | int | float | bool | None] = field(default_factory=list, metadata={
        "help": "Overrides for the generate of rounds 2 and later, after generate_args: [--samples_per_prompt, 1]."})
    distill_args: list[str | int | float | bool | None] = field(default_factory=list, metadata={"help": "Overrides for every round's distill."})
    later_distill_args: list[str | int | float | bool | None] = field(default_factory=list, metadata={
        "help": "Overrides for the distill of rounds 2 and later, after distill_args: the on-policy round's "
                "[--objective, sft+dpo, --pairs, reference] (RMOD over the student against the student's own sample)."})
    final_dpo: bool = field(default=False, metadata={
        "help": "After the last round, train its adapter further by DPO on round 1's generate run (RMOD's answers "
                "over its reference answers: round 1 needs reference among its methods); evaluated as round-N+dpo."})
    dpo_args: list[str | int | float | bool | None] = field(default_factory=list, metadata={
        "help": "Overrides for that DPO, after distill_args: [--pair_margin, 0.5, --dpo_learning_rate, 5.0e-4]."})
    eval_args: list[str | int | float | bool | None] = field(default_factory=list, metadata={
        "help": "Overrides for every round's eval (e.g. [--prompts.split, train, --prompts.subset, validation])."})
    from_generate: str | None = field(default=None, metadata={
        "help": "A complete generate run to use as round 1's (e.g. runs/default/generate from make demo)."})
    from_adapter: str | None = field(default=None, metadata={
        "help": "A complete distill run, made from from_generate, to use as round 1's adapter."})
    bootstrap_resamples: int = field(default=2000, metadata={"help": "Resamples for the report's paired intervals."})
    output_dir: str = field(default="runs/default/iterate", metadata={"help": "Where the rounds are written."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a complete iterate run in output_dir."})

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        if self.from_adapter and not self.from_generate:
            raise ValueError("from_adapter needs from_generate (the generate run it was distilled from: round 2 "
                             "keeps its normalisation)")
        if self.dpo_args and not self.final_dpo:
            raise ValueError("dpo_args are overrides for the final DPO; set final_dpo: true to run it")
        if "--objective" in [str(a) for a in self.dpo_args]:
            raise ValueError("dpo_args: the final DPO's objective is dpo; set the other DPO keys there "
                             "(--pairs, --pair_margin, --dpo_learning_rate, ...)")
        for key in ARG_KEYS:
            args = getattr(self, key)
            if args and not str(args[0]).startswith("--"):
                raise ValueError(f"{key} must be a list of command-line overrides starting with a --key, got {args}")


def _args(values: list) -> list[str]:
    """Overrides as a command line: YAML scalars back to text (true, not True)."""
    return ["null" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in values]


def generate_dir(cfg: IterateConfig, out: Path, round_: int) -> Path:
    """Round ``round_``'s generate run (round 1's may be an existing one, ``from_generate``)."""
    if round_ == 1 and cfg.from_generate:
        return Path(cfg.from_generate)
    return out / f"round-{round_}" / "generate"


def adapter_dir(cfg: IterateConfig, out: Path, round_: int) -> Path:
    """Round ``round_``'s adapter (round 1's may be an existing one, ``from_adapter``)."""
    if round_ == 1 and cfg.from_adapter:
        return Path(cfg.from_adapter)
    return out / f"round-{round_}" / "distill"


def stage_argv(cfg: IterateConfig, round_: int, stage: str, out: Path) -> list[str]:
    """The command line of one round's stage (what ``rmod-distill <stage>`` would be given);
    ``dpo`` and ``dpo-eval`` are the final DPO (a distill run) and its eval, after the last round."""
    argv = ["--config", str(Path(cfg.recipe) / f"{KINDS.get(stage, stage)}.yaml")]
    if stage == "generate":
        argv += _args(cfg.generate_args)
        if round_ > 1:
            argv += [*_args(cfg.later_generate_args),
                     "--policy.adapter", str(adapter_dir(cfg, out, round_ - 1)), "--policy.merge_adapter", "true",
                     "--normalization", str(generate_dir(cfg, out, 1) / "normalization.json")]
        argv += ["--output_dir", str(generate_dir(cfg, out, round_))]
    elif stage == "dpo":
        argv += [*_args(cfg.distill_args), *_args(cfg.dpo_args), "--objective", "dpo",
                 "--generate_dir", str(generate_dir(cfg, out, 1)), "--init_adapter", str(adapter_dir(cfg, out, cfg.rounds)),
                 "--output_dir", str(out / "dpo" / "distill")]
    elif stage == "dpo-eval":
        argv += _eval_argv(cfg, out, out / "dpo" / "distill", "[distilled, reference]", out / "dpo" / "eval")
    elif stage == "distill":
        argv += [*_args(cfg.distill_args), *(_args(cfg.later_distill_args) if round_ > 1 else []),
                 "--generate_dir", str(generate_dir(cfg, out, round_)), "--output_dir", str(adapter_dir(cfg, out, round_))]
        if round_ > 1 and cfg.start == "continue":
            argv += ["--init_adapter", str(adapter_dir(cfg, out, round_ - 1))]
    else:
        # Later rounds add only their student; eval always needs `reference` (win rates), which
        # costs one plain sample a prompt and comes out the same in every round (same seeds).
        methods = "[distilled, rmod, reference]" if round_ == 1 else "[distilled, reference]"
        argv += _eval_argv(cfg, out, adapter_dir(cfg, out, round_), methods, out / f"round-{round_}" / "eval")
    return argv


def _eval_argv(cfg: IterateConfig, out: Path, adapter: Path, methods: str, folder: Path) -> list[str]:
    """An eval of one student on round 1's normalisation, into ``folder``."""
    return [*_args(cfg.eval_args), "--adapter", str(adapter), "--generate_dir", str(generate_dir(cfg, out, 1)),
            "--methods", methods, "--output_dir", str(folder)]


def _stage(stage: str):
    """The stage's config class and ``run``, reached by name as the CLI reaches them (no stage
    imports another)."""
    kind = KINDS.get(stage, stage)
    module = importlib.import_module(f"rmod_distill.{kind}")
    return getattr(module, STAGE_CONFIGS[kind]), module.run


def _normalised(value):
    """A recorded config value made comparable: paths that exist resolved to absolute ones."""
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _differences(recorded, wanted, where: str = "") -> list[str]:
    """Dotted keys whose values differ. A key the recorded run does not have counts only when
    this recipe sets it to something (a run made before the key existed had its default)."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(recorded) | set(wanted)):
            if not where and key in NOT_RECIPE:
                continue
            if key not in recorded:
                if wanted[key] not in (None, False, [], {}, ""):
                    out.append(f"{where}{key}")
                continue
            out += _differences(recorded[key], wanted.get(key), f"{where}{key}.")
        return out
    if isinstance(recorded, list) and isinstance(wanted, list) and len(recorded) == len(wanted):
        return [d for i, (a, b) in enumerate(zip(recorded, wanted)) for d in _differences(a, b, f"{where}{i}.")]
    return [] if recorded == wanted else [where.rstrip(".")]


def _kept(cfg: IterateConfig, round_: int, stage: str, out: Path) -> Path | None:
    """The stage's run folder when it is complete and made with the recipe this round would use
    (then it is kept); None when it still has to run (or resume, or be redone: ``overwrite``).
    A complete run made with another recipe is an error: iterate never mixes recipes."""
    cls, _ = _stage(stage)
    argv = stage_argv(cfg, round_, stage, out)
    folder = Path(argv[argv.index("--output_dir") + 1])
    marker = folder / "run.json"
    if not marker.is_file():
        return None
    info = read_json(marker, f"{stage} run marker")
    if not info.get("complete"):
        return None
    given = (round_ == 1 and ((stage == "generate" and cfg.from_generate) or (stage == "distill" and cfg.from_adapter)))
    if cfg.overwrite and not given:
        return None
    stage_cfg = parse_config(cls, argv)
    wanted = _normalised(recipe_key(to_dict(stage_cfg)))
    changed = _differences(_normalised(recipe_key(info.get("config", {}))), wanted)
    if changed:
        what = "from_generate / from_adapter" if given else "another output_dir, or --overwrite to redo the rounds"
        raise UserError(f"{folder} holds a complete {stage} run made with another recipe (keys differ: {changed}); "
                        f"use {what}")
    if getattr(stage_cfg, "push_to_hub", False):
        from rmod_distill.adapters import hub_repo_id, push_later_hint

        print(f"iterate: {folder} is kept as it is and not pushed again; "
              f"{push_later_hint(folder, hub_repo_id(stage_cfg), stage_cfg.hub_private_repo, stage_cfg.hub_revision)}")
    return folder


def check(cfg: IterateConfig, dry_run: bool = False) -> None:
    """Every stage recipe exists and parses with its overrides, before any model loads (``--dry-run``
    makes the same checks)."""
    RunFolder(cfg.output_dir, "iterate", to_dict(cfg), cfg.overwrite).check()
    for stage in STAGES:
        path = Path(cfg.recipe) / f"{stage}.yaml"
        if not path.is_file():
            raise UserError(f"recipe: {path} does not exist (iterate needs {', '.join(s + '.yaml' for s in STAGES)} "
                            f"in {cfg.recipe})")
        load_yaml(path)
    for key, stage in (("from_generate", "generate"), ("from_adapter", "distill")):
        path = getattr(cfg, key)
        if path is None:
            continue
        read_run(path, stage, key)
    if cfg.from_adapter:
        made_from = read_json(Path(cfg.from_adapter) / "run.json", "from_adapter run marker").get("generate_dir")
        if made_from and Path(made_from).resolve() != Path(cfg.from_generate).resolve():
            raise UserError(f"from_adapter: {cfg.from_adapter} was distilled from {made_from}, not from_generate "
                            f"{cfg.from_generate}")
    out = Path(cfg.output_dir)
    # Round 1's and round 2's command lines name every key a round uses.
    steps = [(1, "generate", "generate_args"), (1, "distill", "distill_args"), (1, "eval", "eval_args")]
    if cfg.rounds > 1:
        steps += [(2, "generate", "generate_args / later_generate_args"), (2, "distill", "distill_args / later_distill_args")]
    if cfg.final_dpo:
        steps += [(cfg.rounds, "dpo", "distill_args / dpo_args"), (cfg.rounds, "dpo-eval", "eval_args")]
    parsed = {}
    for r, stage, keys in steps:
        try:
            parsed[r, stage] = parse_config(_stage(stage)[0], stage_argv(cfg, r, stage, out))
        except (ConfigError, ValueError) as exc:
            raise UserError(f"{keys}: {' '.join(str(exc).split())}") from None
        if getattr(parsed[r, stage], "push_to_hub", False):  # a round's distill pushes at its end: say now it cannot
            from rmod_distill.adapters import hub_push_problem, hub_repo_id

            if problem := hub_push_problem(parsed[r, stage].hub_token, hub_repo_id(parsed[r, stage])):
                raise UserError(f"{keys}: {problem}")
    # Every later round and eval is normalised by round 1's statistics: refuse stale ones (an earlier
    # scorer version) now, not once round 2's policy has loaded.
    first = generate_dir(cfg, out, 1)
    if (first / "normalization.json").is_file() and (cfg.from_generate or not cfg.overwrite):
        specs = parsed[1, "generate"].objectives
        Normalizer.load(first / "normalization.json").check_names(
            [s.name for s in specs], str(first / "normalization.json"), [scorer_id(s) for s in specs])
    # A DPO's pairs come from a generate run made earlier in the chain: say now that they cannot,
    # not hours later when that DPO starts.
    made = {}  # round -> (methods, samples per prompt, where they are set)
    if cfg.from_generate:
        recorded = read_json(Path(cfg.from_generate) / "run.json", "from_generate run marker").get("config", {})
        made[1] = (recorded.get("methods", []), recorded.get("samples_per_prompt", 1), f"from_generate {cfg.from_generate}",
                   recorded.get("keep_candidates", False))
    else:
        made[1] = (parsed[1, "generate"].methods, parsed[1, "generate"].samples_per_prompt, "generate_args",
                   parsed[1, "generate"].keep_candidates)
    if cfg.rounds > 1:
        made[2] = (parsed[2, "generate"].methods, parsed[2, "generate"].samples_per_prompt,
                   "generate_args / later_generate_args", parsed[2, "generate"].keep_candidates)
    checks = [(r, parsed[r, "distill"], "distill_args" if r == 1 else "distill_args / later_distill_args")
              for r in made if not (r == 1 and cfg.from_adapter)]
    if cfg.final_dpo:
        checks.append((1, parsed[cfg.rounds, "dpo"], "final_dpo, distill_args / dpo_args"))
    for r, dist, keys in checks:
        methods, samples, where, candidates = made[r]
        problem = dpo_pairs_problem(dist.objective, dist.pairs, dist.samples_per_prompt, list(methods), samples,
                                    candidates)
        if problem:
            raise UserError(f"{keys}: round {r}'s generate ({where}): {problem}")
    # The first stage that will run makes every check of its own now (its prompts, policy, chat template,
    # objectives): the later rounds' inputs are the earlier rounds' outputs.
    if not cfg.from_generate and _kept(cfg, 1, "generate", out) is None:
        first_generate = dataclasses.replace(parsed[1, "generate"], overwrite=cfg.overwrite)  # as run() runs it
        importlib.import_module("rmod_distill.generate").check(first_generate, dry_run=True)


def round_table(out: Path, rounds: int, resamples: int, final_dpo: bool = False) -> tuple[list[dict], dict]:
    """Per student (each round's, and ``round-N+dpo`` with ``final_dpo``): its worst case (mean
    with interval, median, tail) and its paired difference from round 1's teacher and recovery of
    the teacher's lift over ``reference`` (:func:`rmod_distill.comparison.compare_students`)."""
    evals = [(f"round-{r}", out / f"round-{r}" / "eval") for r in range(1, rounds + 1)]
    evals += [(f"round-{rounds}+dpo", out / "dpo" / "eval")] if final_dpo else []
    # Round 1's reference and teacher are the ones every round is compared with.
    return compare_students(evals[0][1], evals, resamples, strict=False)


def write_report(cfg: IterateConfig, out: Path, table: list[dict], info: dict) -> Path:
    """``report.md``: the rounds side by side."""
    dpo = (f" `round-{cfg.rounds}+dpo` is the last student trained further by DPO on round 1's pairs."
           if cfg.final_dpo else "")
    lines = [f"# Iterated distillation: {cfg.rounds} round(s), start: {cfg.start}"
             + (", then DPO" if cfg.final_dpo else ""), "",
             "Held-out answers, every round on round 1's normalisation. `rmod` is round 1's teacher (K samples a "
             "block over the base policy); `round-r` is the student after r rounds." + dpo + " " + intro(info), "",
             *table_lines(table)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _name(round_: int, stage: str) -> str:
    """How the log names a stage: ``round 2 distill``, ``final dpo``, ``final dpo-eval``."""
    return f"final {stage}" if stage in KINDS else f"round {round_} {stage}"


def run(cfg: IterateConfig, checked: bool = False) -> Path:
    """Run (or resume) every round, then evaluate every student (after :func:`check`, unless
    ``checked``); returns the output folder."""
    resolved = to_dict(cfg)
    if not checked:
        check(cfg)
    # The rounds are written in place, never in a staging folder (every stage records the paths
    # of the others); with --overwrite each stage redoes its own run, which it replaces only
    # once the new one is complete.
    folder = RunFolder(cfg.output_dir, "iterate", resolved, False)
    out = folder.begin()
    work = [(r, stage) for r in range(1, cfg.rounds + 1) for stage in ("generate", "distill")]
    work += [(cfg.rounds, "dpo")] if cfg.final_dpo else []
    work += [(r, "eval") for r in range(1, cfg.rounds + 1)]  # every student once all are trained
    work += [(cfg.rounds, "dpo-eval")] if cfg.final_dpo else []
    for r, stage in work:
        kept = _kept(cfg, r, stage, out)
        if kept is not None:
            print(f"iterate: {_name(r, stage)}: complete, kept ({kept})")
            continue
        argv = stage_argv(cfg, r, stage, out) + (["--overwrite"] if cfg.overwrite else [])
        print(f"iterate: {_name(r, stage)} -> {argv[argv.index('--output_dir') + 1]}", flush=True)
        cls, stage_run = _stage(stage)
        stage_run(parse_config(cls, argv))
    table, info = round_table(out, cfg.rounds, cfg.bootstrap_resamples, cfg.final_dpo)
    write_json(out / "metrics.json", dict(provenance(resolved), rounds=table, **info))
    report = write_report(cfg, out, table, info)
    path = folder.finish({"rounds": table})
    for r in table:
        extra = f", recovery {format_recovery(r['recovery']['mean'], interval=False)} (mean)" if "recovery" in r else ""
        print(f"iterate: {r['method']}: worst case {r['worst_case']:+.3f}{extra}")
    print(f"iterate: report -> {path / report.name}")
    return path


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``rmod-distill iterate``."""
    stage_main(IterateConfig, argv, check, lambda cfg, _: run(cfg, checked=True))


if __name__ == "__main__":
    main()
