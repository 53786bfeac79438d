"""Adapters you can hand to someone: verify, stage, and fetch them from any source.

    rmod-distill download SOURCE --to DIR

SOURCE is a local PEFT folder, a W&B offline run folder (the server-free route: distill
keeps a hashed copy of the adapter in the run's files), a W&B artifact path
``entity/project/name:alias``, or a hub repo id ``org/name``. Every fetched adapter is
checked: the config parses, the safetensors file opens and every tensor reads, and where a
manifest exists every file's sha256 matches. A corrupt or missing file is an error, never
a half-loaded model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"
# The model card's results line until the eval stage fills in its figures (evaluate.update_model_card).
CARD_PLACEHOLDER = "- Worst-case reward against RMOD and the baselines: see the eval stage's report.md."


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
        raise FileNotFoundError(f"adapter folder {path} does not exist")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"adapter folder {path} is missing {', '.join(missing)}")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}/adapter_config.json is corrupt: {exc}") from exc
    if "peft_type" not in config:
        raise ValueError(f"{path}/adapter_config.json is not a PEFT adapter config (no peft_type)")
    manifest = path / MANIFEST
    if manifest.exists():
        for name, digest in json.loads(manifest.read_text())["sha256"].items():
            if not (path / name).is_file():
                raise FileNotFoundError(f"adapter folder {path} is missing {name} (listed in {MANIFEST})")
            if _sha256(path / name) != digest:
                raise ValueError(f"{path}/{name} is corrupt: its sha256 does not match {MANIFEST}")
    try:
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"{path}/adapter_model.safetensors is corrupt: {exc}") from exc
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


def fetch_adapter(source: str, to: str | Path | None = None) -> Path:
    """Resolve an adapter source to a verified local folder (copied to ``to`` when given)."""
    path = Path(source)
    if path.exists():
        staged = _offline_run_adapter(path) if not (path / "adapter_config.json").exists() else path
        if staged is None:
            raise FileNotFoundError(
                f"{source}: not a PEFT adapter folder (missing adapter_config.json), nor a W&B run folder "
                "holding a staged adapter"
            )
        check_adapter_folder(staged)
        if to is None:
            return staged
        to = Path(to)
        if to.exists() and any(to.iterdir()):
            raise FileExistsError(f"--to {to} exists and is not empty")
        shutil.copytree(staged, to, dirs_exist_ok=True)
        return check_adapter_folder(to)
    if to is None:
        raise ValueError(f"adapter {source!r} is not a local folder; download it first with `rmod-distill download`")
    to = Path(to)
    if source.count("/") == 2 and ":" in source:
        import wandb  # needs a W&B server and login

        wandb.Api().artifact(source, type="model").download(root=str(to))
    elif source.count("/") == 1:
        from huggingface_hub import snapshot_download  # needs the hub

        snapshot_download(repo_id=source, local_dir=str(to))
    else:
        raise ValueError(
            f"adapter source {source!r}: expected a local folder, a W&B offline run folder, a W&B artifact "
            "'entity/project/name:alias' or a hub repo id 'org/name'"
        )
    return check_adapter_folder(to)


def main(argv: list[str] | None = None) -> None:
    """``rmod-distill download SOURCE --to DIR``."""
    parser = argparse.ArgumentParser(prog="rmod-distill download", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="PEFT folder, W&B offline run folder, W&B artifact path or hub repo id")
    parser.add_argument("--to", required=True, help="Folder to write the adapter to (must be empty or new)")
    args = parser.parse_args(argv)
    dest = fetch_adapter(args.source, args.to)
    config = json.loads((dest / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path") or "BASE_MODEL"
    print(f"adapter verified -> {dest}")
    print("use it:")
    print(f"  rmod-distill eval --config recipes/default/eval.yaml --adapter {dest}")
    print(f"  python -c \"from rmod_distill.policy import load_policy; load_policy('{base}', adapter='{dest}')\"")


if __name__ == "__main__":
    main(sys.argv[1:])
