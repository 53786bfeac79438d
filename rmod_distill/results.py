"""Results records: every reported figure rebuilt from a record by one command, at a stated revision.

    python -m rmod_distill.results record demo runs/default/eval --command "make demo" --wall_s 1017
    python -m rmod_distill.results render          # = make results: the README's blocks and docs/results.md
    python -m rmod_distill.results check           # exit 1 when the committed pages differ from the records

A record (``results/<name>.json``) is written from a finished eval or compare folder: the metrics
its report shows, the resolved recipe, revision, command, machine and wall time of every run behind
it (the eval's generate run and adapter; a compare's eval runs), the package versions, and the
paths its figures depend on (``rmod_distill/`` and the recipes' folder). ``render`` writes each
record's table into ``docs/results.md`` and into the README's block for it (between
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``), each with its revision and date, and says
whether the code and recipes it depends on changed since (``git log REV..HEAD -- paths``): a
stale figure is marked stale, never shown as current. The dated findings that led to the shipped
recipes are in ``docs/log/``, written once and never edited.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from rmod_distill.artifacts import MARKER, read_json, read_run, write_json
from rmod_distill.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results"
README = ROOT / "README.md"
PAGE = ROOT / "docs" / "results.md"
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


# ----------------------------------------------------------------------------- records


def _run_entry(folder: Path, stage: str, key: str) -> dict:
    """What a record keeps of one run: where it was, its recipe, revision, command, machine and time."""
    info = read_run(folder, stage, key)
    return {"run": str(folder), "stage": stage, "config": info.get("config"), "git_revision": info.get("git_revision"),
            "command": info.get("command"), "machine": info.get("machine"), "packages": info.get("packages"),
            "started_at": info.get("started_at"), "finished_at": info.get("finished_at"),
            "elapsed_s": info.get("elapsed_s"), "resumed": info.get("resumed")}


def _recipe_dirs(runs: list[dict]) -> list[str]:
    """The recipe folders named by the runs' commands (``--config recipes/X/stage.yaml``)."""
    found = []
    for run in runs:
        words = run.get("command") or []
        for i, word in enumerate(words[:-1]):
            if word == "--config" and words[i + 1].startswith("recipes/"):
                folder = str(Path(words[i + 1]).parent)
                if folder not in found:
                    found.append(folder)
    return found


def make_record(name: str, folder: str | Path, command: str, wall_s: float | None = None,
                title: str | None = None) -> dict:
    """The record of the eval or compare run in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    marker = read_json(folder / MARKER, "run marker") if (folder / MARKER).is_file() else {}
    kind = marker.get("stage")
    if kind == "eval":
        info = read_run(folder, "eval", "the eval run")
        metrics = read_json(folder / "metrics.json", "eval metrics")
        runs = [_run_entry(Path(info["config"]["generate_dir"]), "generate", "its generate_dir")]
        adapter = info["config"].get("adapter")
        if adapter and "distilled" in info["config"].get("methods", []) and (Path(adapter) / MARKER).is_file():
            runs.append(_run_entry(Path(adapter), "distill", "its adapter"))
        runs.append(_run_entry(folder, "eval", "the eval run"))
        shown = {"objectives": metrics["objectives"], "methods": metrics["methods"], "paired": metrics.get("paired"),
                 "prompts": metrics["methods"]["reference"]["prompts"],
                 "split": info["config"]["prompts"].get("split"), "prompt_file": info["config"]["prompts"]["path"]}
    elif kind == "compare":
        info = read_run(folder, "compare", "the compare run")
        compare = read_json(folder / "compare.json", "compare table")
        runs = [_run_entry(Path(p), "eval", f"eval run {n}") for n, p in compare["sources"].items()]
        runs.append(_run_entry(folder, "compare", "the compare run"))
        shown = {k: v for k, v in compare.items() if k != "sources"}
    else:
        raise UserError(f"{folder} is not a finished eval or compare run (its {MARKER} says stage {kind!r})")
    revisions = sorted({r["git_revision"] for r in runs if r["git_revision"]})
    return {
        "name": name, "title": title or name, "kind": kind, "made_at": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": command, "wall_s": wall_s, "revisions": revisions,
        "clean": bool(revisions) and not any(r.endswith("-dirty") for r in revisions),
        "depends_on": ["rmod_distill", *_recipe_dirs(runs)], "runs": runs, "shown": shown,
    }


# ----------------------------------------------------------------------------- staleness


def changes_since(revision: str, paths: list[str], root: Path = ROOT) -> list[str] | None:
    """The commits after ``revision`` that touched ``paths`` (one line each, newest first), or None when
    git cannot say (no repository, a revision it does not have)."""
    rev = revision.removesuffix("-dirty")
    try:
        out = subprocess.run(["git", "log", "--format=%h %s", f"{rev}..HEAD", "--", *paths], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [line for line in out.stdout.splitlines() if line.strip()]


def state(record: dict, root: Path = ROOT) -> str:
    """One line: current, stale (and why), or unknown, for the code and recipes the record depends on."""
    if not record["revisions"]:
        return "revision unknown: treat as stale"
    changed, unknown = [], False
    for rev in record["revisions"]:
        since = changes_since(rev, record["depends_on"], root)
        if since is None:
            unknown = True
        else:
            changed += [c for c in since if c not in changed]
    paths = ", ".join(f"`{p}/`" for p in record["depends_on"])
    if changed:
        return (f"**stale**: {len(changed)} commit{'s' if len(changed) > 1 else ''} changed {paths} since "
                f"(newest: {changed[0]}); measure again")
    if unknown:
        return f"revision {record['revisions'][0][:7]} is not in this repository's history: treat as stale"
    dirty = "" if record["clean"] else " (made from a tree with uncommitted changes)"
    return f"current: no commit changed {paths} since{dirty}"


# ----------------------------------------------------------------------------- pages


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{int(seconds // 60)} min {int(round(seconds % 60))} s" if seconds >= 60 else f"{seconds:.0f} s"


def provenance_line(record: dict, root: Path = ROOT) -> str:
    """Where and when a record's runs were made, and whether its figures are current."""
    runs = record["runs"]
    machine = next((r["machine"] for r in runs if r.get("machine")), None) or {}
    where = f"{machine.get('cpu') or 'unknown CPU'}, {machine.get('cores', '?')} cores" + (
        f", {machine['gpu']}" if machine.get("gpu") else ", no GPU")
    times = ", ".join(f"{r['stage']} {_minutes(r.get('elapsed_s'))}" for r in runs if r["stage"] != "compare")
    total = f"; `{record['command']}` took {_minutes(record['wall_s'])} in all" if record.get("wall_s") else ""
    revs = ", ".join(f"`{r[:7]}`" for r in record["revisions"]) or "unknown"
    return (f"Record `results/{record['name']}.json`, made {record['made_at']} from runs at revision {revs} on "
            f"{where} ({times}{total}). State: {state(record, root)}.")


def record_table(record: dict) -> list[str]:
    """A record's figures as the report that made them shows them."""
    from rmod_distill.report import method_table, paired_lines

    shown = record["shown"]
    if record["kind"] == "compare":
        from rmod_distill.comparison import intro, table_lines

        return [intro(shown), "", *table_lines(shown["methods"])]
    lines = [f"{shown['prompts']} prompts ({shown['prompt_file']}, split {shown['split']}); objectives "
             f"{', '.join(shown['objectives'])}; worst case: each answer's lowest z-normalised objective.", "",
             method_table(shown["methods"], shown["objectives"]), ""]
    if shown.get("paired"):
        lines += paired_lines(shown["paired"])
    return lines


def summary_line(record: dict) -> str | None:
    """One sentence of an eval record's paired figures: RMOD's lift over ``reference`` and the adapter's share."""
    from rmod_distill.metrics import format_recovery
    from rmod_distill.report import signed

    paired = record["shown"].get("paired") or {}
    lift = paired.get("differences", {}).get("rmod - reference")
    if record["kind"] != "eval" or lift is None:
        return None
    text = f"RMOD - reference: {signed(lift['mean'])} [{signed(lift['ci'][0])}, {signed(lift['ci'][1])}] (paired)."
    recovery = paired.get("recovery")
    if recovery:
        text += (f" The adapter keeps {format_recovery(recovery['mean'])} / {format_recovery(recovery['median'])} of "
                 "RMOD's lift by mean / median.")
    return text


def block(record: dict, root: Path = ROOT) -> str:
    """A record's block for the README: the table, its paired figures in a sentence, where it comes from."""
    shown = record["shown"]
    if record["kind"] == "compare":
        lines = record_table(record)
    else:
        from rmod_distill.report import method_table

        lines = [method_table(shown["methods"], shown["objectives"])]
    summary = summary_line(record)
    return "\n".join([*lines, "", *([summary] if summary else []), provenance_line(record, root), ""])


def section(record: dict, root: Path = ROOT) -> str:
    """A record's section of docs/results.md: every figure its report shows, then where it comes from."""
    return "\n".join([*record_table(record), provenance_line(record, root), ""])


def load_records(folder: Path = RECORDS) -> dict[str, dict]:
    """Every record, by name, in name order."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


INTRO = """# Results: what the shipped recipes measure

Rendered by `make results` from the records in `results/` (do not edit: `tests/test_results.py` fails
when this page differs from what the records render). Each section is one record: the figures its
report shows, the revision, machine and time of the runs behind it, and whether the code and recipes
it depends on changed since. A record is made from a finished eval or compare folder with
`python -m rmod_distill.results record NAME FOLDER --command "..."`.

How the shipped settings were found (every run, dated, as written then, never edited since):
{logs}
"""


def render_page(records: dict[str, dict], root: Path = ROOT) -> str:
    """docs/results.md from the records."""
    logs = sorted((root / "docs" / "log").glob("*.md"))
    lines = [INTRO.format(logs="\n".join(f"- [log/{p.name}](log/{p.name})" for p in logs) or "- (none)")]
    for record in records.values():
        lines += [f"## {record['title']}", "", f"Made by `{record['command']}`.", "", section(record, root)]
    return "\n".join(lines).rstrip() + "\n"


def render_readme(text: str, records: dict[str, dict], root: Path = ROOT) -> str:
    """The README with each ``<!-- results:NAME -->`` block rendered from record NAME."""
    def fill(match):
        name = match.group(2)
        if name not in records:
            raise UserError(f"README.md has a block for record {name!r}, but results/{name}.json does not exist")
        return match.group(1) + block(records[name], root) + match.group(4)
    return BLOCK.sub(fill, text)


def rendered(root: Path = ROOT) -> dict[Path, str]:
    """What the records render: the README and docs/results.md, by path."""
    records = load_records(root / "results")
    readme = root / "README.md"
    return {readme: render_readme(readme.read_text(), records, root),
            root / "docs" / "results.md": render_page(records, root)}


def main(argv: list[str] | None = None) -> None:
    """``python -m rmod_distill.results record|render|check``."""
    parser = argparse.ArgumentParser(prog="python -m rmod_distill.results", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    rec = sub.add_parser("record", help="write results/NAME.json from a finished eval or compare folder")
    rec.add_argument("name")
    rec.add_argument("folder")
    rec.add_argument("--command", required=True, help="The command that made the runs, as a user would type it")
    rec.add_argument("--wall_s", type=float, help="Its wall time in seconds, measured around it (e.g. /usr/bin/time)")
    rec.add_argument("--title", help="The section's title in docs/results.md")
    sub.add_parser("render", help="write the README's result blocks and docs/results.md from results/*.json")
    sub.add_parser("check", help="exit 1 when the README or docs/results.md differ from what the records render")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.action == "record":
            if not re.fullmatch(r"[\w-]+", args.name):
                raise UserError(f"record name {args.name!r}: use letters, digits, - and _")
            record = make_record(args.name, args.folder, args.command, args.wall_s, args.title)
            write_json(RECORDS / f"{args.name}.json", record)
            print(f"results: results/{args.name}.json ({state(record)})")
            return
        pages = rendered()
        if args.action == "render":
            for path, text in pages.items():
                path.write_text(text)
            for name, record in load_records().items():
                print(f"results: {name}: {state(record)}")
            return
        stale = [str(p.relative_to(ROOT)) for p, text in pages.items() if p.read_text() != text]
        if stale:
            print(f"results: {', '.join(stale)} differ from what results/*.json render; run `make results`")
            raise SystemExit(1)
    except UserError as exc:
        print(f"results: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
