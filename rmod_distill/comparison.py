"""Students side by side: the ``distilled`` rows of several eval runs against one run's baselines.

Used by ``rmod-distill compare`` (choosing a distillation recipe on validation prompts) and by
``rmod-distill iterate`` (every round's student against round 1's teacher). Every eval run
decodes a prompt's ``reference`` (and any method) from a seed of the run seed, the prompt id and
the method, so student-only evals share their baselines with one full eval; the ``reference``
answers are checked identical, else the comparison would not be paired.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rmod_distill.artifacts import read_jsonl, read_run
from rmod_distill.errors import UserError
from rmod_distill.metrics import (TAIL_Z, bootstrap_interval, format_recovery, paired_comparisons, prompt_groups,
                                  tail_share, worst_tail_mean)
from rmod_distill.prompts import base_prompt_id
from rmod_distill.report import signed


def eval_rows(folder: Path) -> list[dict]:
    """The rows of a complete eval run's ``generations/samples.jsonl`` (every method's answers)."""
    read_run(folder, "eval", "eval run")
    path = folder / "generations" / "samples.jsonl"
    if not path.is_file():
        raise UserError(f"{folder}: not a complete eval run (no generations/samples.jsonl)")
    return read_jsonl(path)


SCORE_TOLERANCE = 1e-4  # a scorer batched with other answers (MiniLM's padding) moves its score by ~1e-6


def same_answer(a: tuple[list, dict], b: tuple[list, dict]) -> bool:
    """The same answer text, and normalised scores equal up to :data:`SCORE_TOLERANCE` (None: missing on both)."""
    (text_a, z_a), (text_b, z_b) = a, b
    if text_a != text_b or list(z_a) != list(z_b):
        return False
    return all((z_a[g] is None) == (z_b[g] is None) and (z_a[g] is None or abs(z_a[g] - z_b[g]) <= SCORE_TOLERANCE)
               for g in z_a)


def compare_students(base: Path, students: list[tuple[str, Path]], resamples: int = 2000,
                     strict: bool = True) -> tuple[list[dict], dict]:
    """The baselines of ``base`` (every method but ``distilled``) and the ``distilled`` rows of each
    ``(name, eval folder)`` in ``students``, on the prompts every one of them has whole.

    Returns one row per method (baselines first, then the students in order) and the shared facts
    (prompts, answers, objectives, the paired comparisons of every student). A student eval whose
    ``reference`` answers (text or normalised scores) differ from ``base``'s is refused; with
    ``strict=False`` (iterate, whose rounds ran the same recipe: a backend that is not bitwise
    reproducible can differ in a few answers) it is counted in ``reference_differs`` and warned of.
    """
    by_method: dict[str, dict[str, dict]] = {}
    for row in eval_rows(base):
        if row["method"] != "distilled":
            by_method.setdefault(row["method"], {})[row["prompt_id"]] = row
    for method in ("reference", "rmod"):
        if method not in by_method:
            raise UserError(f"{base}: the base eval has no `{method}` rows; it needs --methods with {method}")
    by_method = {m: by_method[m] for m in sorted(by_method, key=lambda m: (m != "reference", m != "rmod"))}
    reference = {i: (r["completion"], r["normalized"]) for i, r in by_method["reference"].items()}
    objectives = list(next(iter(by_method["reference"].values()))["normalized"])
    differs_count = {}
    for name, folder in students:
        if name in by_method:
            raise UserError(f"student name {name!r} is already taken by a method or another student")
        rows = eval_rows(folder)
        got = {r["prompt_id"]: r for r in rows if r["method"] == "distilled"}
        if not got:
            raise UserError(f"{folder}: no `distilled` rows (evaluated without an adapter?)")
        if list(next(iter(got.values()))["normalized"]) != objectives:
            raise UserError(f"{folder}: scored on objectives {list(next(iter(got.values()))['normalized'])}, {base} on "
                            f"{objectives}; evaluate both with the same objectives and generate_dir")
        theirs = {r["prompt_id"]: (r["completion"], r["normalized"]) for r in rows if r["method"] == "reference"}
        differ = [i for i in theirs if i in reference and not same_answer(reference[i], theirs[i])]
        if differ and strict:
            raise UserError(f"{folder}: its `reference` answer to {differ[0]} (text or normalised scores) differs from "
                            f"{base}'s: the two evals were decoded with other seeds, decoding keys, policy or "
                            "normalisation, so they cannot be compared pairwise")
        if differ:
            print(f"warning: {folder}: {len(differ)} of its {len(theirs)} `reference` answers differ from {base}'s "
                  "(a backend that is not bitwise reproducible?); the comparison uses the base's", file=sys.stderr)
        differs_count[name] = len(differ)
        by_method[name] = got
    ids = sorted(by_method["reference"])
    for name, rows in by_method.items():
        if sorted(rows) != ids:
            raise UserError(f"{name} was evaluated on other prompts than {base}'s reference ({len(rows)} answers "
                            f"against {len(ids)}); evaluate it with the same prompts and samples_per_prompt")
    z = {name: np.array([[np.nan if rows[i]["normalized"][g] is None else rows[i]["normalized"][g]
                          for g in objectives] for i in ids], dtype=float) for name, rows in by_method.items()}
    # A judge objective can leave a score missing: compare on the answers every method has whole.
    whole = np.all([~np.isnan(v).any(1) for v in z.values()], axis=0)
    ids = [i for i, ok in zip(ids, whole) if ok]
    z = {name: v[whole] for name, v in z.items()}
    if not ids:
        raise UserError(f"{base}: no answer has every score for every method; see each eval's report")
    groups = prompt_groups(ids)  # several answers per prompt (eval's samples_per_prompt): resampled together
    table, paired = [], {}
    for name, v in z.items():
        worst = v.min(1)
        row = {"method": name, "worst_case": float(worst.mean()), "median": float(np.median(worst)),
               "ci": bootstrap_interval(lambda i, w=worst: float(w[i].mean()), len(ids), resamples, 0, groups=groups),
               "tail_share": tail_share(v), "worst_5pct": worst_tail_mean(v),
               "tokens": float(np.mean([by_method[name][i].get("tokens_sampled", 0) for i in ids]))}
        if name in dict(students):
            p = paired_comparisons({"distilled": v, "rmod": z["rmod"], "reference": z["reference"]}, resamples,
                                   groups=groups)
            paired[name] = p
            row["minus_rmod"] = p["differences"]["distilled - rmod"]
            row["recovery"] = p["recovery"]
        table.append(row)
    prompts = len({base_prompt_id(i) for i in ids})
    return table, {"prompts": prompts, "answers": len(ids), "answers_left_out": int((~whole).sum()),
                   "objectives": objectives, "paired": paired, "reference_differs": differs_count}


def table_lines(table: list[dict]) -> list[str]:
    """The markdown table of :func:`compare_students`' rows."""
    lines = ["| method | worst case [95% CI] | median | below z=-3 | worst 5% | student - rmod [95% CI] "
             "| recovery by mean [95% CI] | recovery by median [95% CI] | tokens/resp |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        ci = f"{r['worst_case']:+.3f} [{signed(r['ci'][0])}, {signed(r['ci'][1])}]"
        if "recovery" in r:
            d = r["minus_rmod"]
            diff = f"{signed(d['mean'])} [{signed(d['ci'][0])}, {signed(d['ci'][1])}]"
            rec = [format_recovery(v) for v in (r["recovery"]["mean"], r["recovery"]["median"])]
        else:
            diff, rec = "-", ["-", "-"]
        lines.append(f"| `{r['method']}` | {ci} | {r['median']:+.3f} | {100 * r['tail_share']:.1f}% | "
                     f"{r['worst_5pct']:+.2f} | {diff} | {rec[0]} | {rec[1]} | {r['tokens']:.0f} |")
    return lines


def intro(info: dict) -> str:
    """The sentence under a comparison's title: what was compared and how to read it."""
    answers = f" ({info['answers']} answers)" if info["answers"] != info["prompts"] else ""
    return (f"{info['prompts']} prompts{answers}; objectives {', '.join(info['objectives'])}. Students are sampled "
            "plainly. Recovery: `(student - reference) / (rmod - reference)` of the per-answer worst case, by mean "
            "and by median, with paired 95% bootstrap intervals (prompts resampled with all their answers), "
            "undefined where RMOD's lift is <= 0; the "
            f"tail: the share of answers whose lowest objective is below z = {TAIL_Z:g}, and the mean of the worst 5%."
            + _differs_note(info.get("reference_differs", {})))


def _differs_note(differs: dict[str, int]) -> str:
    """What ``strict=False`` let through: students whose eval decoded some ``reference`` answers otherwise."""
    named = [f"{name} {n}" for name, n in differs.items() if n]
    if not named:
        return ""
    return (f" `reference` answers that differ from the first run's (a backend not bitwise reproducible?): "
            f"{', '.join(named)}; every student is compared with the first run's.")
