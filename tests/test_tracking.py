"""The W&B tracker: W&B's own disabled run is the no-op; offline runs land in the stage's folder."""

from pathlib import Path

import pytest

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

    from rmod_distill.config import hide_secrets, masked_argv, secret_values

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


# ---------------------------------------------------------------------------- a tiny pipeline, offline (issue 47)

def read_wandb_records(path: Path) -> list:
    """Every record of an offline run's ``.wandb`` file (W&B's own writer: a LevelDB-style log of protobuf
    ``Record``s in 32 KiB blocks, after a 7-byte ``:W&B`` header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(folder: Path) -> tuple[dict, list]:
    """The one offline W&B run under a stage's folder: its config (the run record's, then each config update, as
    `wandb sync` uploads them) and its records."""
    import json

    runs = sorted(folder.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    (log,) = runs[0].glob("*.wandb")
    records = read_wandb_records(log)
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({u.key: json.loads(u.value_json) for u in updates})
    return config, records


def _run_record(records):
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


def _artifacts(records) -> list:
    """The dataset and model artifacts (tables and images are artifacts too)."""
    return [r.artifact for r in records
            if r.WhichOneof("record_type") == "artifact" and r.artifact.type in ("dataset", "model")]


@pytest.fixture(scope="module")
def offline_pipeline(tiny_policy_dir, tmp_path_factory):
    """generate -> distill -> eval of the tiny policy into one experiment folder, each logging to W&B offline."""
    from conftest import write_prompts
    from rmod_distill.config import parse_config
    from rmod_distill.distill import DistillConfig
    from rmod_distill.distill import run as distill_run
    from rmod_distill.eval import EvalConfig
    from rmod_distill.eval import run as eval_run
    from rmod_distill.generate import GenerateConfig
    from rmod_distill.generate import run as generate_run

    root = tmp_path_factory.mktemp("w") / "exp"
    prompts = write_prompts(tmp_path_factory.mktemp("p") / "prompts.jsonl", n_train=6, n_eval=2)
    tiny = ["--objectives", "[{name: harmlessness}, {name: concision}]", "--wandb.mode", "offline"]
    decoding = ["--decoding.num_candidates", "2", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8"]
    with pytest.MonkeyPatch.context() as mp:
        # distill's Trainer integration reads W&B's settings from the environment: restored afterwards
        for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_NAME"):
            mp.setenv(var, "x")
            mp.delenv(var)
        gen = generate_run(parse_config(GenerateConfig, [
            "--policy.model", str(tiny_policy_dir), "--prompts.path", str(prompts), *tiny, *decoding,
            "--methods", "[reference, rmod]", "--normalization_prompts", "4", "--output_dir", str(root / "generate")]))
        adapter = distill_run(parse_config(DistillConfig, [
            "--model.model_name_or_path", str(tiny_policy_dir), "--generate_dir", str(gen), "--output_dir",
            str(root / "distill"), "--max_steps", "2", "--per_device_train_batch_size", "4", "--model.lora_r", "4",
            "--use_cpu", "--eval_strategy", "no", "--activation_checkpointing", "false", "--sample_prompts", "1",
            "--wandb.mode", "offline"]))
        ev = eval_run(parse_config(EvalConfig, [
            "--policy.model", str(tiny_policy_dir), "--adapter", str(adapter), "--generate_dir", str(gen),
            "--prompts.path", str(prompts), "--prompts.split", "eval", *tiny, *decoding,
            "--methods", "[distilled, reference]", "--bootstrap_resamples", "50", "--output_dir", str(root / "eval")]))
    return gen, adapter, ev


def test_a_pipeline_reads_as_one_group_with_its_lineage(offline_pipeline):
    """Issue 47: generate, distill and eval of one experiment (runs/<experiment>/<stage>) are one W&B group, each
    its stage as job type; distill and eval record the artifacts they read (names and digests) in their config."""
    from rmod_distill.tracking import adapter_reference, dataset_reference

    gen, adapter, ev = offline_pipeline
    runs = {stage: offline_run(folder) for stage, folder in (("generate", gen), ("distill", adapter), ("eval", ev))}
    for stage, (config, records) in runs.items():
        run = _run_record(records)
        assert (run.run_group, run.job_type) == ("exp", stage), (stage, run.run_group, run.job_type)
        assert run.display_name == f"{stage}-exp"
    dataset = dataset_reference(gen)
    assert dataset.startswith("dataset-exp:sha256-")
    model = adapter_reference(adapter)
    assert model.startswith("adapter-distill:sha256-")
    assert runs["distill"][0]["upstream"] == {"dataset": dataset}
    assert runs["eval"][0]["upstream"] == {"dataset": dataset, "model": model}
    assert "upstream" not in runs["generate"][0] and "round" not in runs["eval"][0]


def test_the_dataset_and_the_adapter_are_logged_as_artifacts(offline_pipeline):
    """W&B's own offline writer holds generate's `dataset` artifact (samples, normalisation, the TRL dataset) and
    distill's `model` artifact, each aliased by the digest its downstream runs record."""
    gen, adapter, ev = offline_pipeline
    (dataset,) = _artifacts(offline_run(gen)[1])
    assert (dataset.type, dataset.name) == ("dataset", "dataset-exp")
    paths = {e.path for e in dataset.manifest.contents}
    assert {"samples.jsonl", "normalization.json", "dataset/state.json"} <= paths, paths
    assert offline_run(ev)[0]["upstream"]["dataset"] == f"dataset-exp:{next(a for a in dataset.aliases if a != 'latest')}"
    (model,) = _artifacts(offline_run(adapter)[1])
    assert (model.type, model.name) == ("model", "adapter-distill")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {e.path for e in model.manifest.contents}
    assert offline_run(ev)[0]["upstream"]["model"] == f"adapter-distill:{next(a for a in model.aliases if a != 'latest')}"
    assert not _artifacts(offline_run(ev)[1])  # eval reads artifacts; it logs none


def test_the_experiment_and_round_come_from_output_dir():
    """The default group: the folder above the stage's; iterate's rounds share their iterate folder's group."""
    from rmod_distill.tracking import experiment

    assert experiment("runs/default/generate") == ("default", None)
    assert experiment("runs/default/iterate/round-2/generate") == ("default-iterate", 2)
    assert experiment("runs/default/iterate/round-1/eval") == ("default-iterate", 1)
    assert experiment("runs/default/iterate/dpo/distill") == ("default-iterate", "dpo")
    assert experiment("generate") == ("rmod-distill", None)


def test_wandb_group_and_round_reach_the_run(tmp_path, monkeypatch):
    """wandb.group wins over the default; a round folder puts its number in the config."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "it" / "round-3" / "eval"
    tracker = Tracker(WandbConfig(group="mine"), "eval-round-3", {"k": 1}, out, "eval", out)
    tracker.finish()
    config, records = offline_run(out)
    assert config["round"] == 3 and _run_record(records).run_group == "mine"


def test_online_runs_declare_their_upstream_with_use_artifact(capsys):
    """Online, each upstream artifact is declared with use_artifact (one not on the server is only noted); offline
    W&B refuses use_artifact, so the config alone keeps the names and digests."""
    from rmod_distill.tracking import declare_upstream

    class Run:
        def __init__(self):
            self.config, self.used = Config(), []

        def use_artifact(self, ref):
            if ref.startswith("adapter"):
                raise ValueError("not found")
            self.used.append(ref)

    class Config(dict):
        def update(self, data, allow_val_change=False):
            super().update(data)

    upstream = {"dataset": "dataset-exp:sha256-0123456789abcdef", "model": "adapter-distill:sha256-fedcba9876543210"}
    for mode, used in (("online", ["dataset-exp:sha256-0123456789abcdef"]), ("offline", [])):
        run = Run()
        declare_upstream(run, upstream, mode)
        assert run.config["upstream"] == upstream and run.used == used
    assert "upstream model adapter-distill:sha256-fedcba9876543210 is not on the server" in capsys.readouterr().out
