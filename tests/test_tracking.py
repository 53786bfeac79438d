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
