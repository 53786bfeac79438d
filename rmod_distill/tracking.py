"""Weights & Biases logging that degrades to a no-op with the same interface.

``mode: auto`` logs online when a W&B login is present (``WANDB_API_KEY`` or a netrc
entry) and offline otherwise: offline runs are written under the stage's output folder
and can be uploaded later with ``wandb sync``. ``mode: disabled`` logs nothing: it is
W&B's own ``wandb.init(mode="disabled")``, a run whose methods do nothing.
"""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path

from rmod_distill.errors import UserError


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


class Tracker:
    """A W&B run; with ``mode: disabled`` W&B's no-op run, so every method is safe to call."""

    def __init__(self, cfg: WandbConfig, name: str, config: dict, directory: str | Path, job_type: str):
        # Imported here, not at module level: `rmod-distill --help` should not pay for W&B.
        import wandb

        self.mode = cfg.resolved_mode()
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
