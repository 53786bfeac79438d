"""Weights & Biases logging that degrades to a no-op with the same interface.

``mode: auto`` logs online when a W&B login is present (``WANDB_API_KEY`` or a netrc
entry) and offline otherwise: offline runs are written under the stage's output folder
and can be uploaded later with ``wandb sync``. ``mode: disabled`` logs nothing: it is
W&B's own ``wandb.init(mode="disabled")``, a run whose methods do nothing.

No secret reaches W&B: it records the process's command line (``sys.argv``) in the run's
metadata, which an offline run keeps in its ``.wandb`` file and ``wandb sync`` uploads, so every
place that starts W&B first hides the secrets in it (:func:`hide_secrets`). W&B records no
environment variables (``HF_TOKEN`` and a judge's API key stay in the environment).
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from rmod_distill.config import hide_secrets
from rmod_distill.errors import UserError

@dataclass
class WandbConfig:
    """Where and whether a stage logs to Weights & Biases."""

    mode: str = field(default="auto", metadata={"help": "auto | online | offline | disabled"})
    project: str = field(default="rmod-distill", metadata={"help": "W&B project."})
    entity: str | None = field(default=None, metadata={"help": "W&B entity (user or team); null: your default."})
    run_name: str | None = field(default=None, metadata={"help": "Run name (null: the stage and output folder)."})
    group: str | None = field(default=None, metadata={
        "help": "W&B group (null: the experiment, the folder above the stage's output_dir: runs/default/generate "
                "-> default; an iterate run's rounds -> its folder, e.g. default-iterate). The job type is the stage."})

    def __post_init__(self):
        if self.mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"wandb.mode must be auto, online, offline or disabled, got {self.mode!r}")

    def check(self) -> None:
        """Refuse ``online`` without a login before any work is done (not after it)."""
        if self.resolved_mode() == "online" and not _logged_in():
            raise UserError("wandb.mode online needs a W&B login (`wandb login` or WANDB_API_KEY); use auto, "
                            "offline or disabled")

    def resolved_mode(self) -> str:
        """``auto`` becomes online with a login, offline without; an env WANDB_MODE wins."""
        if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
            return os.environ["WANDB_MODE"]
        if self.mode != "auto":
            return self.mode
        return "online" if _logged_in() else "offline"


def _logged_in() -> bool:
    """A W&B key in the environment or in the netrc file."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai"))
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


_callback = None


def trainer_wandb() -> None:
    """Before Trainers that report to W&B start (distill's SFT, then DPO, then GRPO, into one run):
    the terminal noise of :func:`rmod_distill.quiet.quiet_wandb` off, and transformers' W&B callback
    one that records each trainer's parameter count as a change of ``model/num_parameters``. W&B refuses
    a changed config value unless told it may change, and transformers' own callback then logs
    "A ConfigError was raised whilst setting the number of model parameters" for every trainer after
    the first. Idempotent."""
    global _callback
    from transformers.integrations import WandbCallback, integration_utils

    from rmod_distill.quiet import quiet_wandb

    quiet_wandb()
    if _callback is None:
        class RunWandbCallback(WandbCallback):
            """transformers' WandbCallback; a later trainer's ``model/num_parameters`` replaces the earlier."""

            def setup(self, args, state, model, **kwargs):
                run = self._wandb.run if self._wandb is not None else None
                if run is not None and state.is_world_process_zero and hasattr(model, "num_parameters"):
                    run.config.update({"model/num_parameters": model.num_parameters()}, allow_val_change=True)
                super().setup(args, state, model, **kwargs)

        _callback = RunWandbCallback
    integration_utils.INTEGRATION_TO_CALLBACK["wandb"] = _callback


# ---------------------------------------------------------------------- a pipeline's group and lineage
_ROUND = re.compile(r"round-(\d+)")
_ITERATE_PARTS = ("dpo",)  # iterate's final DPO and its eval: <out>/dpo/<stage>


def experiment(output_dir: str | Path) -> tuple[str, int | str | None]:
    """The experiment a stage's ``output_dir`` belongs to and its iterate round (None outside iterate):
    ``runs/default/generate`` -> ``("default", None)``; iterate's ``runs/default/iterate/round-2/generate`` ->
    ``("default-iterate", 2)`` and its final DPO ``runs/default/iterate/dpo/distill`` -> ``("default-iterate",
    "dpo")``. Every stage of one pipeline (one recipe folder's ``make demo``, or one iterate run) gives the same
    experiment: W&B's default group."""
    parts = [p for p in Path(output_dir).parts if p not in ("", ".")]
    above = parts[:-1]  # the folder holding the stage's folder
    round_: int | str | None = None
    if above and (_ROUND.fullmatch(above[-1]) or above[-1] in _ITERATE_PARTS):
        m = _ROUND.fullmatch(above[-1])
        round_ = int(m.group(1)) if m else above[-1]
        root = above[:-1]
        name = "-".join(root[-2:]) if len(root) >= 2 and root[-2] not in ("/", "runs") else (root[-1] if root else "")
    else:
        name = above[-1] if above else ""
    return (safe_name(name.strip("/")) or "rmod-distill"), round_


def safe_name(text: str) -> str:
    """``text`` as a W&B artifact (or group) name: letters, digits, ``-``, ``_`` and ``.`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def run_output_dir(folder: str | Path) -> str:
    """The ``output_dir`` a finished run folder was made for (its run.json), else the folder itself: a folder
    moved after it ran keeps the names it was logged under."""
    try:
        return str(json.loads((Path(folder) / "run.json").read_text())["config"]["output_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return str(folder)


def files_digest(files: dict[str, Path]) -> str:
    """sha256 over ``files`` (name in the artifact -> local file), by name: the same on the side that logs an
    artifact and on the side that reads the folder it was logged from."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        with open(files[name], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def dataset_files(generate_dir: str | Path) -> dict[str, Path]:
    """What generate logs as its ``dataset`` artifact: samples.jsonl, normalization.json (when in the folder) and
    the TRL dataset folder, by name in the artifact."""
    root = Path(generate_dir)
    files = {n: root / n for n in ("samples.jsonl", "normalization.json") if (root / n).is_file()}
    if (root / "dataset").is_dir():
        files.update({f"dataset/{p.relative_to(root / 'dataset').as_posix()}": p
                      for p in sorted((root / "dataset").rglob("*")) if p.is_file()})
    return files


ADAPTER_WEIGHTS = ("adapter_config.json", "adapter_model.safetensors")  # what identifies an adapter (its card changes)


def adapter_files(adapter_dir: str | Path) -> dict[str, Path]:
    """The files that identify an adapter (config and weights; its README and run.json change after eval)."""
    return {n: Path(adapter_dir) / n for n in ADAPTER_WEIGHTS if (Path(adapter_dir) / n).is_file()}


def digest_alias(digest: str) -> str:
    """The W&B alias an artifact carries for its sha256 (:func:`files_digest`): ``sha256-<16 hex>``."""
    return f"sha256-{digest[:16]}"


def dataset_name(generate_dir: str | Path) -> str:
    """The ``dataset`` artifact of a generate run: ``dataset-<experiment>[-round-<r>]``."""
    name, round_ = experiment(run_output_dir(generate_dir))
    return safe_name(f"dataset-{name}" + (f"-round-{round_}" if round_ is not None else ""))


def adapter_name(adapter_dir: str | Path) -> str:
    """The ``model`` artifact of a distill run: ``adapter-<its output folder's name>`` (as distill has always
    named it)."""
    return safe_name(f"adapter-{Path(run_output_dir(adapter_dir)).name}")


def dataset_reference(generate_dir: str | Path) -> str:
    """``dataset-<experiment>:sha256-<digest>``: the dataset artifact a generate run logs (a W&B reference online;
    in an offline run's config, the lineage to read after ``wandb sync``)."""
    return f"{dataset_name(generate_dir)}:{digest_alias(files_digest(dataset_files(generate_dir)))}"


def adapter_reference(adapter_dir: str | Path) -> str:
    """``adapter-<name>:sha256-<digest>``: the model artifact a distill run logs."""
    return f"{adapter_name(adapter_dir)}:{digest_alias(files_digest(adapter_files(adapter_dir)))}"


def declare_upstream(run, upstream: dict[str, str], mode: str) -> None:
    """Record ``upstream`` (kind -> artifact reference) in ``run``'s config and, online, declare each with
    ``use_artifact`` so W&B draws the lineage. Offline W&B has no artifacts to use: the config keeps the names and
    digests, which read the same after ``wandb sync``. An upstream run never synced is only noted."""
    if run is None or not upstream:
        return
    run.config.update({"upstream": dict(upstream)}, allow_val_change=True)
    if mode != "online":
        return
    for kind, ref in upstream.items():
        try:
            run.use_artifact(ref)
        except Exception as exc:  # not logged (an offline upstream run not synced), no network: several types
            print(f"wandb: upstream {kind} {ref} is not on the server ({type(exc).__name__}); its name and digest are "
                  "in this run's config (upstream)")


class Tracker:
    """A W&B run; with ``mode: disabled`` W&B's no-op run, so every method is safe to call.

    ``output_dir`` (the stage's, as the recipe gives it): the run's default group (:func:`experiment`, unless
    ``wandb.group`` is set) and iterate round (config ``round``). ``upstream``: the artifacts the stage read
    (kind -> reference, :func:`declare_upstream`)."""

    def __init__(self, cfg: WandbConfig, name: str, config: dict, directory: str | Path, job_type: str,
                 output_dir: str | Path | None = None, upstream: dict[str, str] | None = None):
        # Imported here, not at module level: `rmod-distill --help` should not pay for W&B.
        import wandb

        from rmod_distill.quiet import quiet_wandb

        self.mode = cfg.resolved_mode()
        hide_secrets()  # W&B records the command line
        quiet_wandb()
        Path(directory).mkdir(parents=True, exist_ok=True)
        group, round_ = experiment(output_dir if output_dir is not None else directory)
        config = dict(config)
        if round_ is not None:
            config["round"] = round_
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.run_name or name, config=config,
            dir=str(directory), mode=self.mode, job_type=job_type, group=cfg.group or group,
            reinit="finish_previous",
        )
        if upstream and not self.run.disabled:
            declare_upstream(self.run, upstream, self.mode)

    @property
    def run_dir(self) -> Path | None:
        """The run's local folder (offline runs live here until synced); None when disabled."""
        return None if self.run.disabled else Path(self.run.dir).parent

    def log(self, data: dict, step: int | None = None) -> None:
        """Log scalars (and W&B media objects)."""
        self.run.log(data, step=step)

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """Log a table."""
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def images(self, paths: dict[str, str | Path]) -> None:
        """Log image files by key."""
        import wandb

        self.run.log({k: wandb.Image(str(p)) for k, p in paths.items()})

    def summary(self, data: dict) -> None:
        """Set run summary values."""
        self.run.summary.update(data)

    def artifact(self, path: str | Path, name: str, kind: str, metadata: dict | None = None) -> None:
        """Log a folder as an artifact (staged locally when offline)."""
        import wandb

        art = wandb.Artifact(name, type=kind, metadata=metadata or {})
        art.add_dir(str(path))
        self.run.log_artifact(art)

    def files_artifact(self, files: dict[str, Path], name: str, kind: str, metadata: dict | None = None,
                       digest_of: dict[str, Path] | None = None) -> str:
        """Log ``files`` (name in the artifact -> local file) as an artifact aliased by the sha256 of ``digest_of``
        (default: ``files``; :func:`digest_alias`); returns its reference ``name:sha256-<digest>``."""
        import wandb

        if self.run.disabled:
            return name  # nothing logged: nothing hashed
        digest = files_digest(files if digest_of is None else digest_of)
        art = wandb.Artifact(name, type=kind, metadata=dict(metadata or {}, sha256=digest))
        for key, path in sorted(files.items()):
            art.add_file(str(path), name=key)
        self.run.log_artifact(art, aliases=["latest", digest_alias(digest)])
        return f"{name}:{digest_alias(digest)}"

    def finish(self) -> None:
        """Close the run and end W&B's session in this process.

        W&B reads its ``WANDB_*`` variables once per session, even for a disabled run; a later
        stage in the same process (distill's Trainer integration sets ``WANDB_MODE`` and
        ``WANDB_DIR``) must start a fresh session that sees them.
        """
        import wandb

        self.run.finish()
        wandb.teardown()
