"""Students side by side: ``rmod-distill compare BASE_EVAL NAME=EVAL_DIR ... [--out DIR] [--overwrite]``.

Choosing a distillation recipe means training several students and scoring each on the same
validation prompts. Decoding the teacher (``rmod``) and the baselines once is enough: every
eval run decodes a prompt's ``reference`` (and any method) from a seed of the run seed, the
prompt id and the method, so the student-only evals (``--methods '[distilled, reference]'``)
share their baselines with one full eval. This command reads the baselines (every method but
``distilled``) from ``BASE_EVAL`` and the ``distilled`` rows of each ``NAME=EVAL_DIR`` (BASE_EVAL's
own student too, as ``base``, when it has one), checks that every run answered the same prompts
with the same ``reference`` answers (else the seeds, the decoding or the prompts differ, and
the comparison would not be paired), and writes ``compare.md`` and ``compare.json``: per method
the worst case (mean with interval, median, the share of answers below z = -3, the mean of the
worst 5%), and per student its paired difference from ``rmod`` and its recovery of RMOD's lift
over ``reference``, by mean and by median, with paired intervals (prompts resampled with all
their answers; undefined where RMOD's lift is <= 0).

Its output is a run folder like every stage's (:class:`rmod_distill.artifacts.RunFolder`):
every input is checked first (each folder a complete eval run, ``--out`` a folder that is new,
empty or a compare run's, ``--resamples`` >= 1), a complete compare is replaced only with
``--overwrite``, and never a folder holding a user's files or another stage's run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rmod_distill.artifacts import RunFolder, atomic_write_text, read_run, write_json
from rmod_distill.comparison import compare_students, eval_rows, intro, table_lines
from rmod_distill.errors import UserError
from rmod_distill.metrics import json_safe


def main(argv: list[str] | None = None) -> None:
    """``rmod-distill compare BASE_EVAL NAME=EVAL_DIR ... [--out DIR] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="rmod-distill compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="An eval run with `reference` and `rmod` (and any baselines) on the prompts")
    parser.add_argument("students", nargs="*", metavar="NAME=EVAL_DIR",
                        help="Eval runs whose `distilled` rows are the student NAME")
    parser.add_argument("--out", help="Folder for compare.md and compare.json (default: BASE_EVAL/compare); new, "
                                      "empty, or a compare run's")
    parser.add_argument("--resamples", type=int, default=2000, help="Bootstrap resamples for the intervals (>= 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace a complete compare run in --out (kept until the new one is written)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    # ------------------------------------------------------------------ check every input first
    if args.resamples < 1:
        raise UserError(f"--resamples {args.resamples}: expected a number of bootstrap resamples >= 1")
    students = []
    for item in args.students:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"student {item!r}: expected NAME=EVAL_DIR")
        students.append((name, Path(folder)))
    base = Path(args.base)
    for folder in [base, *(folder for _, folder in students)]:
        read_run(folder, "eval", "eval run")
    out = Path(args.out) if args.out else base / "compare"
    config = {"base": str(base), "students": {name: str(folder) for name, folder in students},
              "resamples": args.resamples, "output_dir": str(out), "overwrite": args.overwrite}
    run = RunFolder(out, "compare", config, args.overwrite)
    try:
        run.check()
    except UserError as exc:  # RunFolder names the stages' recipe key; compare's is --out
        raise UserError(str(exc).replace("output_dir", "--out")) from None
    if any(r["method"] == "distilled" for r in eval_rows(base)):
        students.insert(0, ("base", base))
    table, info = compare_students(base, students, args.resamples)

    # ------------------------------------------------------------------ write
    work = run.begin()
    sources = {"base": str(base), **{name: str(folder) for name, folder in students}}
    write_json(work / "compare.json", json_safe({"sources": sources, "methods": table, **info}))
    text = "\n".join(["# Students side by side", "", intro(info), "", *table_lines(table), ""])
    atomic_write_text(work / "compare.md", text)
    path = run.finish({"sources": sources})
    print(text)
    print(f"compare: -> {path / 'compare.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
