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

import netrc
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rmod_distill.config import HIDDEN, SECRET_FLAGS, SECRET_KEYS
from rmod_distill.errors import UserError

# A secret flag and its value inside one argument too: iterate's `--distill_args "[--hub_token, hf_x]"`.
_SECRET_IN_TEXT = re.compile("--(?:" + "|".join(re.escape(k).replace("_", "[_-]") for k in SECRET_KEYS)
                             + r""")(?:\s*[=,]\s*|\s+)['"]?([^\s,'"\]}]+)""")
_secrets: set[str] = set()  # every secret value seen in this process: hidden wherever it appears later


def _is_secret_flag(arg: str) -> bool:
    return arg.startswith("--") and "--" + arg[2:].replace("-", "_") in SECRET_FLAGS


def secret_values(argv: list[str]) -> set[str]:
    """The values of the secret flags (``--hub_token X``, ``--hub-token=X``, or inside a YAML list)
    on a command line."""
    found = set()
    for i, arg in enumerate(argv):
        arg = str(arg)
        key, eq, value = arg.partition("=")
        if _is_secret_flag(key) and eq:
            found.add(value)
        elif _is_secret_flag(arg) and i + 1 < len(argv) and not str(argv[i + 1]).startswith("--"):
            found.add(str(argv[i + 1]))
        found.update(m.group(1) for m in _SECRET_IN_TEXT.finditer(arg))
    return {v for v in found if v and v != HIDDEN}


def masked_argv(argv: list[str], secrets=()) -> list[str]:
    """``argv`` with every secret value (those of :func:`secret_values` and ``secrets``) replaced by
    ``<hidden>``, wherever it stands: the flags stay, so the command line still says a token was given."""
    values = secret_values(argv) | {str(s) for s in secrets if s}
    values.discard(HIDDEN)
    out = []
    for arg in argv:
        arg = str(arg)
        for value in sorted(values, key=len, reverse=True):
            if arg == value or len(value) >= 6:  # a substring only for a real secret's length, not "x"
                arg = arg.replace(value, HIDDEN)
        out.append(arg)
    return out


def hide_secrets(*values: str | None) -> None:
    """Hide the secret values on this process's command line (``sys.argv`` and ``sys.orig_argv``, in
    place) and ``values`` (secrets known otherwise, e.g. a parsed hub token) from whatever reads the
    command line later: W&B records it in its run metadata. Call it before W&B starts; the command
    line has been parsed by then, and the stages take their arguments as a list, not from sys.argv."""
    for argv in (sys.argv, getattr(sys, "orig_argv", None)):
        if argv:
            _secrets.update(secret_values(argv))
    _secrets.update(v for v in values if v and v != HIDDEN)
    for argv in (sys.argv, getattr(sys, "orig_argv", None)):
        if argv:
            argv[:] = masked_argv(argv, _secrets)


@dataclass
class WandbConfig:
    """Where and whether a stage logs to Weights & Biases."""

    mode: str = field(default="auto", metadata={"help": "auto | online | offline | disabled"})
    project: str = field(default="rmod-distill", metadata={"help": "W&B project."})
    entity: str | None = field(default=None, metadata={"help": "W&B entity (user or team); null: your default."})
    run_name: str | None = field(default=None, metadata={"help": "Run name (null: the stage and output folder)."})

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


def scrub(text: str) -> str:
    """``text`` with every secret this process has seen (:func:`hide_secrets`) and the hub token of the
    environment (``HF_TOKEN``) replaced by ``<hidden>``: for a message that quotes a library's error."""
    env = {os.environ.get(v, "") for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    for value in sorted((_secrets | env) - {"", HIDDEN}, key=len, reverse=True):
        if len(value) >= 6:
            text = text.replace(value, HIDDEN)
    return text


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


class Tracker:
    """A W&B run; with ``mode: disabled`` W&B's no-op run, so every method is safe to call."""

    def __init__(self, cfg: WandbConfig, name: str, config: dict, directory: str | Path, job_type: str):
        # Imported here, not at module level: `rmod-distill --help` should not pay for W&B.
        import wandb

        from rmod_distill.quiet import quiet_wandb

        self.mode = cfg.resolved_mode()
        hide_secrets()  # W&B records the command line
        quiet_wandb()
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.run_name or name, config=config,
            dir=str(directory), mode=self.mode, job_type=job_type, reinit="finish_previous",
        )

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

    def finish(self) -> None:
        """Close the run and end W&B's session in this process.

        W&B reads its ``WANDB_*`` variables once per session, even for a disabled run; a later
        stage in the same process (distill's Trainer integration sets ``WANDB_MODE`` and
        ``WANDB_DIR``) must start a fresh session that sees them.
        """
        import wandb

        self.run.finish()
        wandb.teardown()
