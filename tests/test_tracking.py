"""The W&B tracker: W&B's own disabled run is the no-op; offline runs land in the stage's folder."""

from pathlib import Path

from rmod_distill.tracking import Tracker, WandbConfig


def _use_every_method(tracker, tmp_path):
    tracker.log({"loss": 1.0}, step=1)
    tracker.table("samples", ["a", "b"], [[1, "x"]])
    tracker.summary({"score": 0.5})
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights.bin").write_bytes(b"123")
    tracker.artifact(tmp_path / "adapter", "adapter-test", "model", {"note": 1})
    tracker.finish()


def test_disabled_tracker_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "stage"
    tracker = Tracker(WandbConfig(mode="disabled"), "test", {"k": 1}, out, "test")
    assert tracker.mode == "disabled" and tracker.run_dir is None
    _use_every_method(tracker, tmp_path)
    assert list(out.iterdir()) == []  # nothing written


def test_offline_tracker_writes_under_the_stage_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "stage"
    tracker = Tracker(WandbConfig(mode="disabled"), "test", {"k": 1}, out, "test")  # the env wins
    assert tracker.mode == "offline"
    run_dir = tracker.run_dir
    tracker.log({"loss": 1.0}, step=1)
    tracker.summary({"score": 0.5})
    tracker.finish()
    assert run_dir.is_relative_to(out) and list(run_dir.glob("*.wandb"))


def test_a_finished_tracker_leaves_wandb_reading_the_environment(tmp_path, monkeypatch):
    """The Trainer's W&B integration starts its run from WANDB_* variables set after a stage ran."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    Tracker(WandbConfig(), "test", {}, tmp_path / "a", "test").finish()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "b"))
    run = wandb.init(project="rmod-distill-test")
    try:
        assert run.settings.mode == "offline" and Path(run.dir).is_relative_to(tmp_path / "b")
    finally:
        run.finish()
        wandb.teardown()


def test_secrets_on_the_command_line_are_hidden_from_what_reads_it_later(monkeypatch):
    """W&B records sys.argv in its run metadata: the values of secret flags are <hidden> there, in each form a
    command line gives them (iterate's *_args hold a YAML list in one argument); the flags themselves stay."""
    import sys

    from rmod_distill.tracking import hide_secrets, masked_argv, secret_values

    argv = ["distill", "--hub_token", "hf_aaaaaaaa", "--hub-token=hf_bbbbbbbb", "--output_dir", "out",
            "--distill_args", "[--hub_token, hf_cccccccc, --max_steps, 3]", "--x", "hf_dddddddd"]
    assert secret_values(argv) == {"hf_aaaaaaaa", "hf_bbbbbbbb", "hf_cccccccc"}
    assert masked_argv(argv, ["hf_dddddddd"]) == [
        "distill", "--hub_token", "<hidden>", "--hub-token=<hidden>", "--output_dir", "out",
        "--distill_args", "[--hub_token, <hidden>, --max_steps, 3]", "--x", "<hidden>"]
    assert masked_argv(["--hub_token", "--push_to_hub"]) == ["--hub_token", "--push_to_hub"]  # no value given

    monkeypatch.setattr(sys, "argv", ["rmod-distill", *argv])
    monkeypatch.setattr(sys, "orig_argv", ["python", "rmod-distill", *argv])
    hide_secrets("hf_dddddddd")
    for line in (sys.argv, sys.orig_argv):
        assert not any("hf_" in a for a in line) and sum(a.count("<hidden>") for a in line) == 4, line


def test_an_error_message_never_shows_a_secret(monkeypatch, capsys):
    """A library's error quoted in the one-line message (a failed push, say) has the token <hidden>."""
    from rmod_distill import cli
    from rmod_distill.errors import UserError

    def fail(argv):
        raise UserError(f"pushing failed: 401 for token hf_fromthecommandline and hf_fromtheenvironment ({argv[0]})")

    monkeypatch.setenv("HF_TOKEN", "hf_fromtheenvironment")
    monkeypatch.setattr("rmod_distill.compare.main", fail)
    try:
        cli.main(["compare", "--hub_token", "hf_fromthecommandline"])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err
    assert "hf_from" not in err and err.count("<hidden>") == 2, err
