"""`rmod-distill compare`: students from several eval runs against one run's baselines."""

import json

import numpy as np
import pytest

from rmod_distill.cli import main as cli
from rmod_distill.comparison import compare_students, intro
from rmod_distill.errors import UserError

NAMES = ["a", "b"]


def write_eval(folder, methods: dict, answers: int = 2, reference_text: str = "ref"):
    """An eval run's generations: ``methods`` maps a method to one worst case per prompt (objective a holds it,
    b is 1); each prompt has ``answers`` answers, the j-th shifted by 0.1 j."""
    rows = []
    for method, worst in methods.items():
        for p, w in enumerate(worst):
            for j in range(answers):
                pid = f"p{p}" if j == 0 else f"p{p}#s{j}"
                text = f"{reference_text} {pid}" if method == "reference" else f"{method} {pid}"
                rows.append({"prompt_id": pid, "method": method, "completion": text, "tokens_sampled": 10,
                             "normalized": {"a": w + 0.1 * j, "b": 1.0}})
    (folder / "generations").mkdir(parents=True)
    (folder / "generations" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


REF, RMOD = [-2.0, -1.0, -4.0, 0.0], [0.0, 0.5, -0.5, 0.5]


def test_students_against_one_base(tmp_path):
    base = write_eval(tmp_path / "base", {"reference": REF, "rmod": RMOD, "cd": [0.0] * 4, "distilled": REF})
    half = [(r + m) / 2 for r, m in zip(REF, RMOD)]
    other = write_eval(tmp_path / "half", {"reference": REF, "distilled": half})
    table, info = compare_students(base, [("base", base), ("half", other)], resamples=200)
    assert [r["method"] for r in table] == ["reference", "rmod", "cd", "base", "half"]
    assert info["prompts"] == 4 and info["answers"] == 8
    rows = {r["method"]: r for r in table}
    assert rows["half"]["recovery"]["mean"]["value"] == pytest.approx(0.5)
    assert rows["base"]["recovery"]["mean"]["value"] == pytest.approx(0.0)
    # Two reference answers in eight are below z = -3 (prompt p2: -4 and -3.9); the worst 5% is the single -4.
    assert rows["reference"]["tail_share"] == pytest.approx(2 / 8)
    assert rows["reference"]["worst_5pct"] == pytest.approx(-4.0)
    assert rows["rmod"]["median"] == pytest.approx(np.median([v + 0.1 * j for v in RMOD for j in (0, 1)]))


def test_a_student_decoded_with_other_seeds_or_prompts_is_refused(tmp_path):
    base = write_eval(tmp_path / "base", {"reference": REF, "rmod": RMOD})
    other_seed = write_eval(tmp_path / "seed", {"reference": REF, "distilled": RMOD}, reference_text="other")
    with pytest.raises(UserError, match=r"reference` answer to p0 \(text or normalised scores\) differs"):
        compare_students(base, [("s", other_seed)])
    # The same answers, a score moved by float noise (a scorer batched with other answers): accepted; by 0.01: refused.
    for shift, accepted in ((1e-6, True), (1e-2, False)):
        moved = write_eval(tmp_path / f"moved{shift}", {"reference": [r + shift for r in REF], "distilled": RMOD})
        if accepted:
            assert compare_students(base, [("s", moved)], resamples=50)[1]["prompts"] == 4
        else:
            with pytest.raises(UserError, match=r"reference` answer to p0 \(text or normalised scores\) differs"):
                compare_students(base, [("s", moved)])
    # iterate's rounds ran one recipe: a differing reference answer is counted, not fatal
    _, info = compare_students(base, [("s", other_seed)], resamples=50, strict=False)
    assert info["reference_differs"] == {"s": 8}
    assert "differ from the first run's (a backend not bitwise reproducible?): s 8;" in intro(info)
    same = write_eval(tmp_path / "same", {"reference": REF, "distilled": RMOD})
    assert "differ" not in intro(compare_students(base, [("s", same)], resamples=50, strict=False)[1])
    other_objectives = write_eval(tmp_path / "objectives", {"reference": REF, "distilled": RMOD})
    rows = (other_objectives / "generations" / "samples.jsonl").read_text().replace('"b": 1.0', '"c": 1.0')
    (other_objectives / "generations" / "samples.jsonl").write_text(rows)
    with pytest.raises(UserError, match=r"scored on objectives \['a', 'c'\]"):
        compare_students(base, [("s", other_objectives)])
    fewer = write_eval(tmp_path / "fewer", {"reference": REF, "distilled": RMOD}, answers=1)
    with pytest.raises(UserError, match=r"other prompts .*\(4 answers against 8\)"):
        compare_students(base, [("s", fewer)])
    with pytest.raises(UserError, match=r"no `distilled` rows"):
        compare_students(base, [("s", base)])
    with pytest.raises(UserError, match="already taken"):
        compare_students(base, [("rmod", other_seed)])


def test_the_command_writes_the_table(tmp_path, capsys):
    base = write_eval(tmp_path / "base", {"reference": REF, "rmod": RMOD, "distilled": RMOD})
    student = write_eval(tmp_path / "s", {"reference": REF, "distilled": REF})
    cli(["compare", str(base), f"sft={student}", "--out", str(tmp_path / "out"), "--resamples", "100"])
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| `base` |" in md and "| `sft` |" in md and "recovery by mean" in md
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert data["sources"]["sft"] == str(student)
    with pytest.raises(SystemExit) as exc:
        cli(["compare", str(base), "no-equals-sign"])
    assert exc.value.code == 2 and "expected NAME=EVAL_DIR" in capsys.readouterr().err
