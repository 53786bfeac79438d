"""Adapters you can hand to someone: verify, stage, and fetch them from any source.

A source (``rmod-distill download SOURCE``, ``policy.adapter``, eval's ``adapter``) is a local PEFT folder, a W&B offline run folder (the server-free route: distill
keeps a hashed copy of the adapter in the run's files), a W&B artifact path
``entity/project/name:alias``, or a hub repo id ``org/name``. Every fetched adapter is
checked: the config parses, the safetensors file opens and every tensor reads, and where a
manifest exists every file's sha256 matches. A corrupt or missing file is an error, never
a half-loaded model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from rmod_distill.artifacts import blocking_file, is_local_path
from rmod_distill.config import HIDDEN
from rmod_distill.errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"
# What a copy of an adapter carries: the weights, the tokenizer, the card and the run marker
# (eval reads the adapter's training prompts from it); never checkpoints or W&B folders.
PORTABLE_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "run.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_adapter_folder(path: str | Path) -> Path:
    """Return ``path`` if it holds a whole, readable PEFT adapter; else raise naming the problem."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"adapter folder {path} does not exist")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(f"adapter folder {path} is missing {', '.join(missing)}")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}/adapter_config.json is corrupt: {exc}") from exc
    if "peft_type" not in config:
        raise UserError(f"{path}/adapter_config.json is not a PEFT adapter config (no peft_type)")
    manifest = path / MANIFEST
    if manifest.exists():
        for name, digest in json.loads(manifest.read_text())["sha256"].items():
            if not (path / name).is_file():
                raise UserError(f"adapter folder {path} is missing {name} (listed in {MANIFEST})")
            if _sha256(path / name) != digest:
                raise UserError(f"{path}/{name} is corrupt: its sha256 does not match {MANIFEST}")
    try:
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserError(f"{path}/adapter_model.safetensors is corrupt: {exc}") from exc
    return path


def stage_adapter_copy(src: Path, dst: Path, files: list[str]) -> Path:
    """Copy an adapter's files with a sha256 manifest (the server-free download route)."""
    dst.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name in files:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            digests[name] = _sha256(dst / name)
    (dst / MANIFEST).write_text(json.dumps({"sha256": digests}, indent=2) + "\n")
    return dst


def hub_repo_id(cfg) -> str:
    """The hub repo a distill recipe's ``push_to_hub`` publishes to: ``hub_model_id``, else its output folder's name."""
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name


def hub_push_problem(token: str | None, repo_id: str) -> str | None:
    """Why ``push_to_hub`` cannot publish to ``repo_id`` (offline mode, a repo id the hub refuses, no hub
    token: ``hub_token``, ``HF_TOKEN`` or a saved login); None when it can. Checked before any model
    loads, so that a long run does not end without its upload."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if constants.is_offline_mode():
        return "push_to_hub: true, but HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it or set push_to_hub: false"
    if token == HIDDEN:
        return (f"hub_token is {HIDDEN!r} (copied from a run.json or --dry-run?); give the token itself, or use "
                "HF_TOKEN or `hf auth login`")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return (f"push_to_hub: {repo_id!r} is not a hub repo id ({' '.join(str(exc).split())[:160]}); set "
                "hub_model_id: org/name")
    if token or get_token():
        return None
    return ("push_to_hub: true needs a hub token; log in with `hf auth login`, set HF_TOKEN, or set hub_token "
            "(or set push_to_hub: false)")


def publish_adapter(path: Path, repo_id: str, token: str | None = None, private: bool | None = None,
                    revision: str | None = None) -> str:
    """Upload a finished adapter folder's portable files (weights, tokenizer, model card, run.json; never
    checkpoints, DPO's or GRPO's training folders, or W&B runs) to the hub model repo ``repo_id`` (on branch
    ``revision``), creating it when new, and remove the portable files an earlier push left there that this
    adapter does not have (a stale manifest would fail `download`); returns the repo id."""
    from huggingface_hub import HfApi

    check_adapter_folder(path)
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo.repo_id, branch=revision, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(path), repo_type="model", revision=revision,
                          allow_patterns=[name for name in PORTABLE_FILES if (path / name).is_file()],
                          delete_patterns=[*PORTABLE_FILES, "training_args.bin"],
                          commit_message=f"rmod-distill adapter from {path.name}")
    except Exception as exc:  # no network, bad token, no rights: several types; the adapter is saved either way
        raise UserError(f"the adapter is saved in {path} but pushing it to hub repo {repo_id!r} failed "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                        f"{push_later_hint(path, repo_id, private, revision)}") from None
    return repo.repo_id


def push_later_hint(path: Path, repo_id: str, private: bool | None = None, revision: str | None = None) -> str:
    """How to push an adapter folder by hand, its portable files only (what :func:`publish_adapter` uploads)."""
    return (f"push it later: `rmod-distill download {path} --to DIR` copies its portable files, then "
            f"`hf upload {repo_id} DIR{' --private' if private else ''}{f' --revision {revision}' if revision else ''}`")


def _offline_run_adapter(path: Path) -> Path | None:
    """The staged adapter inside a W&B offline run folder (or the newest run under a wandb/ folder)."""
    for candidate in (path / "files" / "adapter", path / "adapter"):
        if (candidate / MANIFEST).exists():
            return candidate
    runs = sorted(path.glob("offline-run-*"), key=lambda p: p.name) + sorted(
        path.glob("wandb/offline-run-*"), key=lambda p: p.name
    )
    for run in reversed(runs):
        if (run / "files" / "adapter" / MANIFEST).exists():
            return run / "files" / "adapter"
    return None


def check_destination(to: Path) -> None:
    """``--to`` must be able to be a folder: refuse an existing file there, or a file where a folder above it
    would go, before anything is fetched or written."""
    blocker = blocking_file(to)
    if blocker is not None:
        where = "is a file" if blocker == to else f"is below {blocker}, a file"
        raise UserError(f"--to {to} {where}, not a folder; give a new or empty folder")


def fetch_adapter(source: str, to: str | Path | None = None) -> Path:
    """Resolve an adapter source to a verified local folder (copied to ``to`` when given)."""
    if to is not None:
        check_destination(Path(to))
    path = Path(source)
    if path.exists():
        staged = _offline_run_adapter(path) if not (path / "adapter_config.json").exists() else path
        if staged is None:
            raise UserError(
                f"{source}: not a PEFT adapter folder (missing adapter_config.json), nor a W&B run folder "
                "holding a staged adapter"
            )
        check_adapter_folder(staged)
        if to is None:
            return staged
        to = Path(to)
        if to.exists() and any(to.iterdir()):
            raise UserError(f"--to {to} exists and is not empty")
        to.mkdir(parents=True, exist_ok=True)
        for name in PORTABLE_FILES:
            if (staged / name).is_file():
                shutil.copy2(staged / name, to / name)
        return check_adapter_folder(to)
    # "runs/distil" is a typo of a local folder, not a hub repo: its first component exists here.
    if is_local_path(source):
        raise UserError(f"adapter folder {source} does not exist")
    if to is None:
        raise UserError(f"adapter {source!r} is not a local folder; fetch it first with "
                        f"`rmod-distill download {source} --to DIR` and pass DIR")
    to = Path(to)
    if source.count("/") == 2 and ":" in source:
        import wandb  # needs a W&B server and login

        try:
            wandb.Api().artifact(source, type="model").download(root=str(to))
        except Exception as exc:  # no login, no such artifact, no network: several types
            raise UserError(f"W&B artifact {source!r} could not be fetched ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from None
    elif source.count("/") == 1:
        from huggingface_hub import snapshot_download  # needs the hub

        try:
            snapshot_download(repo_id=source, local_dir=str(to))
        except Exception as exc:  # no such repo, offline, gated: several types
            raise UserError(f"adapter {source!r} is not a local folder and could not be fetched from the hub as a "
                            f"repo id ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    else:
        raise UserError(
            f"adapter source {source!r}: expected a local folder, a W&B offline run folder, a W&B artifact "
            "'entity/project/name:alias' or a hub repo id 'org/name'"
        )
    return check_adapter_folder(to)
