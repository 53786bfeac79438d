"""Issue 43, item 4: no secret reaches a file or a log.

A hub token given on the command line (``--hub_token``) and a judge's API key given in the
environment variable that ``judge.api_key_env`` names are planted in real stage runs with W&B
offline; then every byte of every file the run could have written (the run folder with W&B's
offline run in it, W&B's cache, data and config folders, the temporary folder) and everything
printed is searched for them. W&B records the process's command line (``sys.argv``) in its run
metadata, inside the ``.wandb`` file that ``wandb sync`` uploads: the command line here is the
one a user types, not pytest's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import run_cli

HUB_TOKEN = "hf_PLANTEDtoken0123456789"
ENV_TOKEN = "hf_PLANTEDenvtoken9876543210"
JUDGE_KEY = "sk-PLANTEDjudgekey0123456789"
OBJECTIVES = "[{name: harmlessness}, {name: concision}]"
SMALL = ["--decoding.num_candidates", "2", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8"]


def files_holding(secret: str, *roots: Path) -> list[str]:
    """Every file under ``roots`` (recursively, binary ones too) whose bytes hold ``secret``."""
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
                found.append(str(path))
    return found


@pytest.fixture
def sandbox(offline_wandb, monkeypatch):
    """W&B offline (conftest's ``offline_wandb``) with a hub login in the environment: W&B must not record it."""
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    return offline_wandb


def run_as_typed(monkeypatch, argv: list[str]) -> int:
    """``rmod-distill <argv>`` in-process, with ``sys.argv`` what the console script would see."""
    monkeypatch.setattr(sys, "argv", ["rmod-distill", *argv])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "/usr/bin/rmod-distill", *argv])
    return run_cli(argv)


def test_a_hub_token_on_the_command_line_reaches_no_file(tiny_policy_dir, tiny_generate_dir, tmp_path, sandbox,
                                                         monkeypatch, capfd):
    from test_distill import FakeHub, fake_hub  # noqa: F401 (the hub recorded; nothing is sent)

    import huggingface_hub
    from huggingface_hub import constants
    from transformers import Trainer

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("init_hf_repo", "push_to_hub", "_push_from_checkpoint"):
        monkeypatch.setattr(Trainer, name, lambda *a, _name=name, **k: pytest.fail(f"a trainer called {_name}"))
    FakeHub.calls, FakeHub.fail = [], False

    out = tmp_path / "adapter"
    assert run_as_typed(monkeypatch, [
        "distill", "--model.model_name_or_path", str(tiny_policy_dir), "--generate_dir", str(tiny_generate_dir),
        "--output_dir", str(out), "--objective", "sft", "--max_steps", "2", "--save_steps", "1", "--use_cpu",
        "--activation_checkpointing", "false", "--hub_model_id", "me/adapter", "--push_to_hub", "true",
        "--hub_token", HUB_TOKEN, "--wandb.mode", "offline",
    ]) == 0
    assert [c[0] for c in FakeHub.calls][-1] == "upload_folder" and FakeHub.calls[-1][3] == HUB_TOKEN  # it was used
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb")), "W&B wrote no offline run"
    assert (out / "training_args.bin").is_file() and list(out.glob("checkpoint-*/training_args.bin"))
    printed = capfd.readouterr()
    for secret in (HUB_TOKEN, ENV_TOKEN):
        assert files_holding(secret, tmp_path) == [], f"{secret} was written"
        assert secret not in printed.out + printed.err, f"{secret} was printed"
    # what W&B records as the command line still says a token was given
    assert b"<hidden>" in next(runs[0].glob("*.wandb")).read_bytes()


def test_a_judge_key_in_the_environment_reaches_no_file(tiny_policy_dir, tiny_generate_dir, tmp_path, sandbox,
                                                        monkeypatch, capfd):
    from test_judge import RUBRIC, Endpoint, judge_script

    monkeypatch.setenv("RMOD_TEST_JUDGE_KEY", JUDGE_KEY)
    rubric = tmp_path / "rubric.txt"
    rubric.write_text(RUBRIC)
    endpoint = Endpoint(judge_script)
    try:
        judges = (f"[{{name: quality, kind: judge, model: scripted, judge: {{base_url: '{endpoint.url}', "
                  f"rubric: '{rubric}', cache: '{tmp_path / 'judge.sqlite'}', api_key_env: RMOD_TEST_JUDGE_KEY, "
                  "parse_retries: 0, backoff: 0.01}}]")
        out = tmp_path / "eval"
        assert run_as_typed(monkeypatch, [
            "eval", "--policy.model", str(tiny_policy_dir), "--adapter", "null", "--generate_dir",
            str(tiny_generate_dir), "--prompts.path", str(tiny_generate_dir.parent / "prompts.jsonl"),
            "--prompts.split", "eval", "--objectives", OBJECTIVES, "--methods", "[reference]", *SMALL,
            "--bootstrap_resamples", "20", "--judges", judges, "--wandb.mode", "offline", "--output_dir", str(out),
        ]) == 0
        assert endpoint.headers and all(h["Authorization"] == f"Bearer {JUDGE_KEY}" for h in endpoint.headers)
    finally:
        endpoint.close()
    assert list((out / "wandb").glob("offline-run-*/*.wandb")), "W&B wrote no offline run"
    printed = capfd.readouterr()
    for secret in (JUDGE_KEY, ENV_TOKEN):
        assert files_holding(secret, tmp_path) == [], f"{secret} was written"
        assert secret not in printed.out + printed.err, f"{secret} was printed"
