"""Run folders: provenance, atomic writes and append-only shard files.

Every artefact carries its resolved config, the git revision and the package versions
(:func:`provenance`). Rows are appended to per-process shards one whole line per
``write`` and fsynced, so a run killed at any point loses at most the batch in flight
and a rerun picks up exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGES = ("rmod-distill", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "wandb")


def git_revision() -> str | None:
    """The current commit of the source tree (with ``-dirty`` when it has changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a result depends on."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(config: dict) -> dict:
    """What any artefact records about how it was made."""
    return {
        "config": config,
        "git_revision": git_revision(),
        "packages": package_versions(),
        "python": platform.python_version(),
    }


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file through a temporary beside it and a rename: readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data) -> None:
    """Atomically write indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read complete JSONL rows; a trailing partial line (a write cut off by a kill) is ignored."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n")[:-1] if not data.endswith(b"\n") else data.split(b"\n"):
        if line.strip():
            rows.append(json.loads(line))
    return rows


class ShardWriter:
    """Append-only JSONL shard of one process; repairs a torn last line on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                # A kill in the middle of a write left part of a row: drop it, keep the rest.
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, rows: list[dict]) -> None:
        """Append rows in one write and fsync them."""
        if not rows:
            return
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        os.write(self._fd, payload)
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)
