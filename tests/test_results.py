"""Issue 46: every reported figure is rendered from a record, at a stated revision, and a stale one says so."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from rmod_distill import cli, results

ROOT = Path(__file__).resolve().parents[1]


def test_committed_pages_are_what_the_records_render():
    """The README's result blocks and docs/results.md are `make results`' output: a hand edit of a figure, or
    a code change after a record's revision that was not rendered as stale, fails here."""
    records = results.load_records()
    assert "demo" in records, "the README's demo block needs results/demo.json"
    for record in records.values():
        for rev in record["revisions"]:
            if results.changes_since(rev, record["depends_on"]) is None:
                pytest.skip(f"revision {rev[:7]} is not in this clone's history (a shallow clone): cannot say stale")
    for path, text in results.rendered().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} differs from what results/*.json render: " \
                                         "run `make results` (a figure is never edited by hand)"


def test_a_hand_edit_of_a_rendered_block_is_put_back():
    records = results.load_records()
    readme = (ROOT / "README.md").read_text()
    edited = readme.replace("| `rmod` | ", "| `rmod` | 9", 1)
    assert edited != readme
    assert results.render_readme(edited, records) == results.render_readme(readme, records)


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}).stdout.strip()


def test_state_says_stale_when_the_code_changed_after_the_revision(tmp_path):
    repo = tmp_path / "repo"
    (repo / "rmod_distill").mkdir(parents=True)
    (repo / "recipes" / "default").mkdir(parents=True)
    (repo / "rmod_distill" / "a.py").write_text("x = 1\n")
    (repo / "recipes" / "default" / "eval.yaml").write_text("seed: 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first")
    rev = _git(repo, "rev-parse", "HEAD")
    record = {"revisions": [rev], "depends_on": ["rmod_distill", "recipes/default"], "clean": True}
    (repo / "README.md").write_text("docs only\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "docs")
    assert results.state(record, repo).startswith("current: no commit changed")
    (repo / "recipes" / "default" / "eval.yaml").write_text("seed: 2\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "a recipe changed")
    assert results.state(record, repo).startswith("**stale**: 1 commit changed `rmod_distill/`, "
                                                  "`recipes/default/` since (newest: ")
    assert "a recipe changed" in results.state(record, repo)
    assert "treat as stale" in results.state(dict(record, revisions=["0" * 40]), repo)
    assert "treat as stale" in results.state(dict(record, revisions=[]), repo)


def test_a_record_of_a_tiny_eval_holds_what_the_issue_asks(tiny_policy_dir, tiny_generate_dir, tmp_path,
                                                            monkeypatch):
    from test_bad_inputs import eval_args

    out = tmp_path / "eval"
    with _no_exit():
        cli.main(["eval", *eval_args(tiny_policy_dir, tiny_generate_dir, out)])
    record = results.make_record("tiny", out, "rmod-distill eval ...", wall_s=12.5, title="A tiny eval")
    json.dumps(record, allow_nan=False)  # strict JSON
    assert [r["stage"] for r in record["runs"]] == ["generate", "eval"]
    for run in record["runs"]:
        assert run["config"] and run["git_revision"] and run["machine"]["cores"] >= 1
        assert run["elapsed_s"] is not None and run["started_at"] and run["packages"]["torch"]
    assert record["depends_on"][0] == "rmod_distill" and record["revisions"]
    assert set(record["shown"]["methods"]) == {"reference"}
    text = results.block(record)
    assert "| `reference` |" in text and "Record `results/tiny.json`" in text and "12.5 s" not in text
    assert "took 12 s in all" in text
    # Not an eval or compare run: one line.
    with pytest.raises(results.UserError, match="is not a finished eval or compare run"):
        results.make_record("x", tiny_generate_dir, "make generate")
    monkeypatch.setattr(results, "RECORDS", tmp_path / "records")
    results.main(["record", "tiny", str(out), "--command", "rmod-distill eval"])
    assert json.loads((tmp_path / "records" / "tiny.json").read_text())["name"] == "tiny"
    shutil.rmtree(tmp_path / "records")


class _no_exit:
    """A stage's main may end with SystemExit(0) (dry-run) or return: both are success here."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is SystemExit:
            assert value.code in (0, None), value.code
            return True
        return False
