"""Run folders: one lifecycle for every stage, provenance, atomic writes and shard files.

Every stage writes into a :class:`RunFolder`: one completion marker (``run.json`` with
``complete: true``), one rule for overwrite and resume, and provenance (the resolved
config, the git revision and the package versions). Inputs are validated before a run
folder is touched; ``--overwrite`` writes the new run beside the old one and swaps it in
only when it completes, so a failed run never destroys a good one.

Rows are appended to per-process shards one whole line per ``write`` and fsynced, so a
run killed at any point loses at most the batch in flight and a rerun picks up exactly
where it stopped. Only those append-only shards tolerate a torn last line; every other
JSONL file is written atomically and read strictly.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from rmod_distill.errors import UserError

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


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Versions of the packages a result depends on (``names``: the project's by default)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    """The machine a run ran on: CPU model and cores, the GPU (if torch sees one), the platform."""
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # no torch, or a driver that cannot be asked: the record says none
        gpu = None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()}


def command() -> list[str]:
    """This process's command line as a user would retype it (the program's name, its arguments),
    with the value after a secret flag (``--hub_token``) hidden."""
    from rmod_distill.config import to_dict  # a list is written with its secrets hidden

    return to_dict([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else []


def provenance(config: dict) -> dict:
    """What any artefact records about how it was made."""
    return {
        "config": config,
        "git_revision": git_revision(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "command": command(),
        "machine": machine(),
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


def json_safe(value):
    """``value`` with every NaN or infinite float (numpy's too) replaced by None, tuples as lists: what JSON can
    hold (``json.dumps`` would write a bare ``NaN``, which strict parsers refuse)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) or type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        if getattr(value, "dtype", None) is not None and value.dtype.kind in "iu":
            return int(value)
        if getattr(value, "dtype", None) is not None and value.dtype.kind == "b":
            return bool(value)
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def write_json(path: str | Path, data) -> None:
    """Atomically write indented JSON; NaN and infinities are written as null (see :func:`json_safe`)."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Atomically write one JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path, shard: bool = False) -> list[dict]:
    """Read JSONL rows; a missing file is an error naming it, and so is any line that is not JSON.

    ``shard=True`` (append-only shards only) tolerates a torn last line: a write cut off by
    a kill, which the rerun writes again.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = shard and not data.endswith(b"\n")
    if torn:
        lines = lines[:-1]
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: line {number} is not valid JSON ({exc}); the file is damaged") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def read_json(path: str | Path, what: str = "file") -> dict:
    """Read a JSON object; a missing or damaged file is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


class ShardWriter:
    """Append-only JSONL shard of one process; repairs a torn last line on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            read_jsonl(self.path, shard=True)  # a damaged row before the end is an error, not data
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


def is_local_path(name: str) -> bool:
    """True when ``name`` means a local path rather than a hub id like ``org/model``: it exists,
    starts like a path, or its first component is a folder here (``runs/distil`` is a typo)."""
    if Path(name).exists() or name.startswith((".", "/", "~")):
        return True
    parts = Path(name).parts
    return len(parts) > 1 and Path(parts[0]).is_dir()


MARKER = "run.json"
# Keys that name where and how a run is logged or written, not what its rows are: a rerun
# that changes only these resumes the run.
NOT_RECIPE = ("output_dir", "overwrite", "wandb", "logging_dir", "report_to", "run_name", "push_to_hub", "hub_token",
              "hub_model_id", "hub_private_repo", "hub_strategy", "hub_always_push", "hub_revision")


def recipe_key(config: dict) -> dict:
    """What decides a run's contents: the resolved config without where it is written or logged.

    Of the ``backend`` section only its kind counts: which servers sample (their URLs, a
    launched one's port) changes from run to run, and a run resumes on new ones.
    """
    key = {k: v for k, v in config.items() if k not in NOT_RECIPE}
    if isinstance(key.get("backend"), dict):
        key["backend"] = {"kind": key["backend"].get("kind")}
    return key


TOOL_FOLDERS = ("wandb",)  # written into a run folder after it completes (W&B's offline runs): never a user's


def _files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` as a sorted list of relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` (or ``path`` itself) that is a file, not a folder."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _now() -> str:
    """The time now, UTC, to the second (ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def read_run(path: str | Path, stage: str, key: str) -> dict:
    """The ``run.json`` of the complete ``stage`` run that recipe key (or argument) ``key`` names;
    anything else (missing, a file, another tool's folder, another stage's run, an unfinished run)
    is refused in one line naming ``key`` and the folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{key} {path} does not exist; run `rmod-distill {stage}` first (or fix the path)")
    if not path.is_dir():
        raise UserError(f"{key} {path} is a file, not a {stage} run folder")
    marker = path / MARKER
    info = read_json(marker, f"{key} run marker") if marker.is_file() else {}
    found = info.get("stage")
    if not isinstance(found, str):
        raise UserError(f"{key} {path} is not a {stage} run (no rmod-distill {MARKER} there); give the output_dir "
                        f"of `rmod-distill {stage}`")
    if found != stage:
        raise UserError(f"{key} {path} holds {_a(found)} {found} run, not {_a(stage)} {stage} run; give the "
                        f"output_dir of `rmod-distill {stage}`")
    if info.get("complete") is not True:
        raise UserError(f"{key} {path} is an unfinished {stage} run; rerun that `rmod-distill {stage}` command to "
                        "complete it")
    return info


class RunFolder:
    """A stage's output folder and its lifecycle.

    ``check()`` (before anything is loaded or removed) refuses a complete run without
    ``overwrite``, an unfinished run made with another recipe without ``overwrite``, a
    folder holding files that no rmod-distill stage wrote (a ``run.json`` without a
    ``stage`` is another tool's), and, when overwriting a complete run, any file in it that
    the run did not write (its ``run.json`` lists them under ``files``): nothing of a user's
    is deleted. ``begin()`` returns the folder to write into (a staging folder beside the old
    run when overwriting a complete one) and marks it unfinished; ``finish(info)`` marks it
    complete, records its files and swaps it in.
    """

    def __init__(self, path: str | Path, stage: str, config: dict, overwrite: bool):
        self.path = Path(path)
        self.stage, self.config, self.overwrite = stage, config, overwrite
        self.staging = self.path.parent / f".{self.path.name}.overwrite"
        self.work = self.path
        self.began = time.time()  # this session's start (begin() sets it again): run.json's elapsed_s counts from it
        self.resumed = False

    def _marker(self, folder: Path) -> dict | None:
        """The folder's run marker; None without one. Another tool's ``run.json`` (not JSON, or
        without this project's ``stage`` and ``complete`` keys) counts as a user's file."""
        marker = folder / MARKER
        if not marker.is_file():
            return None
        try:
            info = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(info, dict) or not isinstance(info.get("stage"), str) or "complete" not in info:
            return None
        return info

    def _foreign(self, info: dict) -> list[str]:
        """Files in the complete run at ``self.path`` that it did not write (a user's notes, a compare)."""
        if "files" in info:
            written = set(info["files"])
            return [f for f in _files_under(self.path) if f != MARKER and f not in written
                    and f.split("/")[0] not in TOOL_FOLDERS]
        # A run made before runs recorded their files: what changed after it completed is not its own (but
        # a distill run's model card, which eval writes again with its figures).
        done = (self.path / MARKER).stat().st_mtime
        return [f for f in _files_under(self.path) if f.split("/")[0] not in TOOL_FOLDERS and f != "README.md"
                and (self.path / f).stat().st_mtime > done + 1]

    def check(self) -> None:
        """Refuse what would lose or mix up a user's files; see the class docstring."""
        blocker = blocking_file(self.path)
        if blocker is not None:
            what = "is a file, not a folder" if blocker == self.path else \
                f"cannot be made: {blocker} is a file, not a folder"
            raise UserError(f"output_dir {self.path} {what}; choose another output_dir")
        info = self._marker(self.path)
        if info is None:
            if self.path.is_dir() and any(self.path.iterdir()):
                why = f"{MARKER} is not an rmod-distill run marker" if (self.path / MARKER).exists() else \
                    f"no {MARKER}"
                raise UserError(
                    f"output_dir {self.path} holds files that no rmod-distill run wrote ({why}); "
                    "choose another output_dir (it is refused with --overwrite too)"
                )
            return
        if info["stage"] != self.stage:
            raise UserError(f"output_dir {self.path} holds a {info['stage']} run, not a {self.stage} run; "
                            "choose another output_dir")
        if info.get("complete"):
            if not self.overwrite:
                raise UserError(f"{self.path} already holds a complete {self.stage} run; pass --overwrite to "
                                "replace it (it is kept until the new run completes) or set output_dir")
            foreign = self._foreign(info)
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise UserError(f"{self.path} holds files the {self.stage} run did not write ({shown}); --overwrite "
                                "would delete them: move them out of the folder, or choose another output_dir")
            return
        old, new = recipe_key(info.get("config", {})), recipe_key(self.config)
        # A key added to the recipe since the run was made, at its off value (False / null), changes nothing.
        old = dict({k: v for k, v in new.items() if k not in old and (v is None or v is False)}, **old)
        if old != new and not self.overwrite:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(
                f"{self.path} holds an unfinished {self.stage} run made with a different recipe (keys differ: "
                f"{changed}); rerun with the same recipe to resume, or pass --overwrite to start again"
            )

    def begin(self, is_main: bool = True) -> Path:
        """Choose and mark the folder to write into; returns it (the same on every process)."""
        info = self._marker(self.path)
        replacing = info is not None and info.get("complete") and self.overwrite
        self.work = self.staging if replacing else self.path
        if not is_main:
            return self.work
        current = self._marker(self.work) if self.work.is_dir() else None
        same = current is not None and not current.get("complete") and (
            recipe_key(current.get("config", {})) == recipe_key(self.config))
        if self.work.exists() and not same and (replacing or self.overwrite):
            if replacing:  # the staging folder of an overwrite that was interrupted: the tool's own
                shutil.rmtree(self.work)
            else:  # an unfinished run the user asked to replace: kept aside, as a user's file may be in it
                aside = self._aside("unfinished")
                self.work.rename(aside)
                print(f"{self.stage}: the unfinished run in {self.path} is kept in {aside} (--overwrite starts "
                      "again; delete it once nothing in it is needed)")
        self.work.mkdir(parents=True, exist_ok=True)
        self.began = time.time()
        if not same:
            write_json(self.work / MARKER, dict(provenance(self.config), stage=self.stage, complete=False,
                                                started_at=_now()))
        self.resumed = same
        return self.work

    def finish(self, info: dict, swap: bool = True) -> Path:
        """Mark the run complete with ``info`` and the list of the files it wrote, then (unless
        ``swap=False``, for a last step inside the new folder) swap it in for the old one;
        returns where the run now is."""
        files = [f for f in _files_under(self.work) if f != MARKER]
        started = (self._marker(self.work) or {}).get("started_at")
        timing = {"started_at": started, "finished_at": _now(), "elapsed_s": round(time.time() - self.began, 1),
                  "resumed": self.resumed}
        write_json(self.work / MARKER, dict(provenance(self.config), stage=self.stage, complete=True, **info,
                                            **timing, files=files))
        return self.swap() if swap else self.work

    def swap(self) -> Path:
        """When overwriting, put the new run where the old one was; returns the run's folder."""
        if self.work != self.path:
            info = self._marker(self.path)
            foreign = self._foreign(info) if info is not None and info.get("complete") else []
            old = self._aside("replaced")
            self.path.rename(old)
            self.work.rename(self.path)
            if foreign:  # written into the old run while the new one was made: never deleted
                print(f"{self.stage}: {self.path} was replaced; the old run is kept in {old}, as it holds files "
                      f"the run did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})")
            else:
                shutil.rmtree(old)
            self.work = self.path
        return self.path

    def _aside(self, why: str) -> Path:
        """A new name beside the run folder for a run set aside (``.<name>.<why>-<time>``)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        candidate, n = self.path.parent / f".{self.path.name}.{why}-{stamp}", 1
        while candidate.exists():
            candidate, n = self.path.parent / f".{self.path.name}.{why}-{stamp}-{n}", n + 1
        return candidate


BLOCK_PAIRINGS = ("blocks", "reference-all+blocks")  # distill's pairs that need generate's keep_candidates


def dpo_pairs_problem(objective: str, pairs: str, samples_kept: int | None, methods: list[str],
                      samples_made: int, candidates: bool = True) -> str | None:
    """Why a generate run made with ``methods`` and ``samples_made`` answers per prompt cannot give
    a distill's DPO pairs (``pairs``, keeping ``samples_kept`` answers a prompt; None: all); None
    when it can, or when ``objective`` trains no DPO. Distill checks its generate run with it, and
    iterate its final DPO's before the first round runs. ``candidates``: whether the run kept its
    block candidates (generate's ``keep_candidates``), which block pairs need."""
    if "dpo" not in objective:
        return None
    if pairs in ("reference", "reference-all", "both", "reference-all+blocks") and "reference" not in methods:
        return (f"DPO pairs '{pairs}' need reference answers; generate with `reference` among its methods "
                f"(methods there: {methods}) or set pairs: samples")
    if pairs in BLOCK_PAIRINGS and not candidates:
        return f"DPO pairs '{pairs}' need each block's candidates; generate with keep_candidates: true"
    if pairs in ("samples", "both") and min(samples_made, samples_kept or samples_made) < 2:
        where = f"samples_per_prompt {samples_kept} keeps one" if samples_made >= 2 else "generate with samples_per_prompt >= 2"
        return f"DPO pairs '{pairs}' need several samples per prompt ({where}); or set pairs: reference"
    return None
