"""`rmod-distill compare`: students from several eval runs against one run's baselines."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

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
    (folder / "run.json").write_text(json.dumps({"stage": "eval", "complete": True}))
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


# ----------------------------------------------------------------------------- issue 43: compare's output and inputs




def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) under ``root``."""
    if not root.exists():
        return {str(root): "<absent>"}
    return {str(p): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted([root, *root.rglob("*")])}


def one_error(capsys, stage: str = "compare") -> str:
    """The single ``rmod-distill <stage>: error:`` line a refused command printed (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rmod-distill ")]
    assert "Traceback" not in err and len(lines) == 1, err
    prefix = f"rmod-distill {stage}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


def strict_json(path: Path):
    """A JSON file read the way other tools do: a bare NaN or Infinity is an error."""
    def refuse(name):
        raise AssertionError(f"{path} holds a bare {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_compare_output_is_a_run_folder(tmp_path, capsys):
    """A complete compare is replaced only with --overwrite; a user's compare.md, or a generate run, never."""
    base = write_eval(tmp_path / "base", {"reference": REF, "rmod": RMOD, "distilled": RMOD})
    student = write_eval(tmp_path / "s", {"reference": REF, "distilled": REF})
    out = tmp_path / "out"
    argv = ["compare", str(base), f"sft={student}", "--out", str(out), "--resamples", "50"]
    assert run_cli(argv) == 0
    marker = json.loads((out / "run.json").read_text())
    assert marker["stage"] == "compare" and marker["complete"] is True
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli(argv) == 2
    assert "--overwrite" in one_error(capsys) and snapshot(out) == before
    assert run_cli([*argv, "--overwrite"]) == 0
    assert json.loads((out / "compare.json").read_text())["sources"]["sft"] == str(student)
    # The default out is BASE_EVAL/compare, a run folder too.
    assert run_cli(["compare", str(base), "--resamples", "50"]) == 0
    assert json.loads((base / "compare" / "run.json").read_text())["stage"] == "compare"


def _user_files(tmp: Path, base: Path) -> tuple[list[str], Path]:
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "compare.md").write_text("my notes\n")
    (mine / "compare.json").write_text("{}\n")
    return ["--out", str(mine)], mine


def _generate_run(tmp: Path, base: Path) -> tuple[list[str], Path]:
    gen = tmp / "gen"
    (gen / "dataset").mkdir(parents=True)
    (gen / "dataset" / "train.jsonl").write_text("{}\n")
    (gen / "run.json").write_text(json.dumps({"stage": "generate", "complete": True}))
    return ["--out", str(gen), "--overwrite"], gen


def _out_is_a_file(tmp: Path, base: Path) -> tuple[list[str], Path]:
    path = tmp / "out.md"
    path.write_text("my report\n")
    return ["--out", str(path)], path


def _out_below_a_file(tmp: Path, base: Path) -> tuple[list[str], Path]:
    path = tmp / "out.md"
    path.write_text("my report\n")
    return ["--out", str(path / "sub")], path


def _resamples(n: int):
    return lambda tmp, base: (["--out", str(tmp / "new"), "--resamples", str(n)], tmp / "new")


def _unfinished(which: str):
    def build(tmp: Path, base: Path) -> tuple[list[str], Path]:
        folder = base if which == "base" else write_eval(tmp / "half", {"reference": REF, "distilled": RMOD})
        (folder / "run.json").write_text(json.dumps({"stage": "eval", "complete": False}))
        return ([] if which == "base" else [f"half={folder}"]) + ["--out", str(tmp / "new")], folder
    return build


def _not_an_eval(which: str):
    def build(tmp: Path, base: Path) -> tuple[list[str], Path]:
        folder = base if which == "base" else write_eval(tmp / "gen", {"reference": REF, "distilled": RMOD})
        (folder / "run.json").write_text(json.dumps({"stage": "generate", "complete": True}))
        return ([] if which == "base" else [f"g={folder}"]) + ["--out", str(tmp / "new")], folder
    return build


COMPARE_ROWS = [
    # item 3: a user's files in --out, a generate run's folder (even with --overwrite)
    ("user-files-in-out", _user_files, r"mine holds files that no rmod-distill run wrote"),
    ("out-is-a-generate-run", _generate_run, r"gen holds a generate run, not a compare run"),
    # item 11
    ("resamples-0", _resamples(0), r"^--resamples 0: expected a number of bootstrap resamples >= 1$"),
    ("resamples-negative", _resamples(-3), r"^--resamples -3: expected .* >= 1$"),
    # item 12
    ("out-is-a-file", _out_is_a_file, r"--out .*out\.md is a file, not a folder"),
    ("out-below-a-file", _out_below_a_file, r"--out .*out\.md/sub cannot be made: .*out\.md is a file, not a folder"),
    # item 17
    ("unfinished-base", _unfinished("base"), r"base is an unfinished eval run; rerun that `rmod-distill eval` command to complete it$"),
    ("unfinished-student", _unfinished("student"), r"half is an unfinished eval run; rerun that `rmod-distill eval` command to complete it$"),
    ("base-is-a-generate-run", _not_an_eval("base"), r"base holds a generate run, not an eval run"),
    ("student-is-a-generate-run", _not_an_eval("student"), r"gen holds a generate run, not an eval run"),
]


@pytest.mark.parametrize("name, build, expect", COMPARE_ROWS, ids=[r[0] for r in COMPARE_ROWS])
def test_compare_bad_input(name, build, expect, tmp_path, capsys):
    """Exit 2, one `rmod-distill compare: error:` line naming what is wrong, no traceback, inputs unchanged,
    nothing written (not even BASE_EVAL/compare)."""
    base = write_eval(tmp_path / "base", {"reference": REF, "rmod": RMOD, "distilled": RMOD})
    extra, watched = build(tmp_path, base)
    before = {**snapshot(base), **snapshot(watched)}
    capsys.readouterr()
    assert run_cli(["compare", str(base), *extra]) == 2
    message = one_error(capsys)
    assert re.search(expect, message), message
    assert {**snapshot(base), **snapshot(watched)} == before
    assert not (base / "compare").exists() and not (tmp_path / "new").exists()


def _adapter(folder: Path) -> Path:
    """A tiny valid PEFT adapter folder."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1}))
    save_file({"w": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("where", ["file", "below-file"])
def test_download_to_a_file(where, tmp_path, capsys):
    """Item 12: `download --to FILE` is one line, and the file is left as it was."""
    adapter = _adapter(tmp_path / "adapter")
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    to = path if where == "file" else path / "adapter"
    capsys.readouterr()
    assert run_cli(["download", str(adapter), "--to", str(to)]) == 2
    message = one_error(capsys, "download")
    assert re.search(r"--to .*notes\.txt.* a file, not a folder", message), message
    assert path.read_text() == "mine\n"
    for source in ("some-org/some-adapter", "entity/project/name:v0"):  # checked before anything is fetched
        assert run_cli(["download", source, "--to", str(to)]) == 2
        assert "a file, not a folder" in one_error(capsys, "download")


def test_recovery_is_undefined_when_rmod_has_no_lift(tmp_path):
    """Item 19: RMOD below reference: the student's "recovery" is undefined in compare.md and null in compare.json
    (it was (student - reference) / (rmod - reference) of two negative lifts, a large share)."""
    worse = [r - 0.5 for r in REF]
    base = write_eval(tmp_path / "base", {"reference": REF, "rmod": worse, "distilled": [r - 1.0 for r in REF]})
    assert run_cli(["compare", str(base), "--out", str(tmp_path / "out"), "--resamples", "50"]) == 0
    md = (tmp_path / "out" / "compare.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `base` |"))
    assert "200%" not in row and row.count("undefined (RMOD's lift over reference by") == 2, row
    data = strict_json(tmp_path / "out" / "compare.json")
    rec = next(m for m in data["methods"] if m["method"] == "base")["recovery"]
    assert rec["mean"]["value"] is None and "is -0.500 <= 0" in rec["mean"]["undefined"]
    assert rec["median"]["value"] is None and "by median" in rec["median"]["undefined"]
    assert data["paired"]["base"]["recovery"]["mean"]["value"] is None
