"""Prompt sets: the shipped JSONL files, any JSONL/JSON/Parquet file, or a hub dataset.

Every source becomes a list of :class:`Prompt` (an id, a conversation ending with the
user's turn, a category and a split). Column names are mapped by :class:`PromptsConfig`;
empty prompts, missing columns and duplicate ids are errors that name the source.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rmod_distill.artifacts import is_local_path
from rmod_distill.errors import UserError

DEFAULT_PROMPTS = "data/prompts/default.jsonl"


@dataclass
class PromptsConfig:
    """Where prompts come from and how their columns map."""

    path: str = field(
        default=DEFAULT_PROMPTS,
        metadata={"help": "A .jsonl/.json/.parquet file, or a hub dataset name (loaded with `datasets`)."},
    )
    split: str | None = field(
        default="train", metadata={"help": "Keep rows whose split column equals this (null: all rows)."}
    )
    split_column: str = field(default="split", metadata={"help": "Column holding the train/eval split."})
    dataset_split: str = field(default="train", metadata={"help": "Hub datasets: the split to load."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub datasets: the config name."})
    id_column: str | None = field(
        default="id", metadata={"help": "Column of unique ids (null: ids from row numbers)."}
    )
    text_column: str = field(default="prompt", metadata={"help": "Column with the prompt text."})
    messages_column: str = field(
        default="messages", metadata={"help": "Column with a list of {role, content} turns (used when present)."}
    )
    text_format: str = field(
        default="plain",
        metadata={
            "help": "plain | hh_first_turn | hh_dialogue: read text as an Anthropic HH transcript "
            "('\\n\\nHuman: ... \\n\\nAssistant: ...') and keep its first human turn, or the dialogue "
            "up to its last assistant turn."
        },
    )
    category_column: str = field(default="category", metadata={"help": "Optional column with a category."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "Path to a text file used as the system message of every prompt."}
    )
    limit: int | None = field(default=None, metadata={"help": "Keep only the first N prompts after filtering."})
    subset: str = field(
        default="all",
        metadata={"help": "all | fit | validation: carve a validation split out of the selected prompts by a "
                          "stable hash of the id (held_out; the same split distill holds out for its eval loss), "
                          "so settings are chosen without touching the eval split."},
    )
    validation_fraction: float = field(default=0.15, metadata={"help": "subset: share of prompts in validation."})

    def __post_init__(self):
        if self.subset not in ("all", "fit", "validation"):
            raise ValueError(f"prompts.subset must be all, fit or validation, got {self.subset!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"prompts.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.text_format not in ("plain", "hh_first_turn", "hh_dialogue"):
            raise ValueError(f"prompts.text_format must be plain, hh_first_turn or hh_dialogue, got {self.text_format!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"prompts.limit must be a positive integer or null, got {self.limit}")


@dataclass
class Prompt:
    """One prompt: a conversation that ends with the user's turn."""

    id: str
    messages: list[dict]
    category: str = ""
    split: str = ""

    @property
    def text(self) -> str:
        """The last user turn."""
        return self.messages[-1]["content"]


def with_samples(prompts: list[Prompt], n: int) -> list[Prompt]:
    """``n`` rows per prompt: sample j > 0 of a prompt is ``<id>#s<j>`` (its own seed, the same base id)."""
    return [Prompt(p.id if j == 0 else f"{p.id}#s{j}", p.messages, p.category, p.split) for p in prompts
            for j in range(n)]


def base_prompt_id(prompt_id: str) -> str:
    """The prompt a row answers: stages store extra samples of one prompt as ``<id>#<suffix>``
    (generate's ``#s1``, normalisation's ``#calibration-0``, values' ``#rollout-1``), which is
    why ``#`` is refused in prompt ids."""
    return prompt_id.split("#")[0]


def held_out(prompt_id: str, fraction: float) -> bool:
    """The one held-out split (distill's eval loss, values' validation, choosing settings).

    A stable hash of the prompt's base id, so every sample of a prompt falls on one side,
    whatever the row order, the process count or the other prompts in the file.
    """
    h = int.from_bytes(hashlib.sha256(base_prompt_id(prompt_id).encode()).digest()[:8], "little")
    return (h % 10_000) < fraction * 10_000


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str, mode: str) -> list[dict]:
    """Turn an HH transcript into messages ending with a human turn (see ``text_format``)."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": body.strip()}
        for who, body in zip(parts[1::2], parts[2::2])
    ]
    if not turns or turns[0]["role"] != "user":
        raise UserError("not an HH transcript (expected it to start with '\\n\\nHuman: ')")
    if mode == "hh_first_turn":
        return turns[:1]
    last_assistant = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
    return turns[:last_assistant]


def _first_bad_line(path: Path, kind: str) -> str | None:
    """Where a prompt file stops being readable: its first line that is not UTF-8 or not JSON."""
    data = path.read_bytes()
    if kind == "parquet":
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return f"line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
    if not text.strip():
        return "the file is empty; expected one JSON object per line"
    if path.suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno} is not valid JSON ({exc.msg})"
        return None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number} is not valid JSON ({exc.msg}, column {exc.colno}); expected one JSON object per line"
        if not isinstance(row, dict):
            return f"line {number} is not a JSON object (got {type(row).__name__}); expected one object per line"
    return None


def _read_rows(cfg: PromptsConfig) -> tuple[list[dict], str]:
    path = Path(cfg.path)
    if path.suffix in (".jsonl", ".json", ".parquet") or is_local_path(cfg.path):
        if path.is_dir():
            raise UserError(f"prompts.path: {path} is a folder; expected a .jsonl, .json or .parquet prompt file")
        if not path.is_file():
            raise UserError(f"prompts.path: prompt file {path} does not exist")
        if path.suffix not in (".jsonl", ".json", ".parquet"):
            raise UserError(f"prompts.path: {path} is not a .jsonl, .json or .parquet file")
        import datasets

        kind = "parquet" if path.suffix == ".parquet" else "json"
        # datasets' own errors on a bad file are long and name no line: find the line first.
        bad = _first_bad_line(path, kind)
        if bad:
            raise UserError(f"prompt file {path}: {bad}")
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as exc:  # datasets wraps parse errors in several exception types
            message = " ".join(str(exc).split())[:300]
            raise UserError(f"prompt file {path} could not be read as {kind} ({type(exc).__name__}: {message})"
                            ) from None
        return list(ds), str(path)
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, cfg.dataset_config, split=cfg.dataset_split)
    except Exception as exc:  # not found, offline, wrong config or split: several exception types
        message = " ".join(str(exc).split())[:300]
        raise UserError(f"prompts.path: hub dataset {cfg.path!r} could not be loaded ({type(exc).__name__}: "
                        f"{message})") from None
    return list(ds), f"hub dataset {cfg.path} ({cfg.dataset_split})"


def load_prompts(cfg: PromptsConfig) -> list[Prompt]:
    """Load, validate and filter the prompts a config names."""
    rows, source = _read_rows(cfg)
    if not rows:
        raise UserError(f"{source}: no prompts")
    columns = set(rows[0])
    use_messages = cfg.messages_column in columns
    if not use_messages and cfg.text_column not in columns:
        raise UserError(
            f"{source}: no column {cfg.text_column!r} or {cfg.messages_column!r} for the prompt "
            f"(columns: {sorted(columns)}); set prompts.text_column or prompts.messages_column"
        )
    if cfg.id_column is not None and cfg.id_column not in columns:
        raise UserError(
            f"{source}: no id column {cfg.id_column!r} (columns: {sorted(columns)}); set prompts.id_column "
            "(null numbers the rows)"
        )
    if cfg.split is not None and cfg.split_column not in columns:
        raise UserError(
            f"{source}: no split column {cfg.split_column!r} to select split {cfg.split!r}; "
            "set prompts.split to null to use every row"
        )
    system = None
    if cfg.system_prompt:
        system_path = Path(cfg.system_prompt)
        if not system_path.is_file():
            raise UserError(f"prompts.system_prompt: file {system_path} does not exist")
        system = system_path.read_text().strip()

    prompts, seen = [], {}
    for i, row in enumerate(rows):
        if cfg.limit is not None and len(prompts) >= cfg.limit:
            break  # big hub datasets: stop reading once enough prompts are kept
        if cfg.id_column is not None and (row.get(cfg.id_column) is None or str(row[cfg.id_column]).strip() == ""):
            raise UserError(f"{source}: row {i + 1} has no {cfg.id_column!r} (missing, null or empty); every prompt "
                            "needs a unique id (or set prompts.id_column: null to number the rows)")
        pid = str(row[cfg.id_column]) if cfg.id_column is not None else f"row-{i:06d}"
        where = f"{source}: row {i + 1} (id {pid!r})"
        if "#" in pid:
            raise UserError(f"{where}: '#' is not allowed in prompt ids (the stages use '<id>#<suffix>' for "
                            "extra samples of a prompt)")
        if pid in seen:
            raise UserError(f"{where}: duplicate id, first seen at row {seen[pid] + 1}")
        seen[pid] = i
        messages = row.get(cfg.messages_column) if use_messages else None
        if messages:
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and "content" in m
                for m in messages
            ):
                raise UserError(f"{where}: {cfg.messages_column!r} must be a list of {{role, content}} messages")
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            if messages[-1]["role"] != "user":
                raise UserError(f"{where}: the conversation must end with a user turn")
        else:
            text = row.get(cfg.text_column)
            if text is None and use_messages and cfg.text_column not in row:
                raise UserError(f"{where}: neither {cfg.messages_column!r} nor {cfg.text_column!r} is set")
            if text is not None and not isinstance(text, str):
                raise UserError(f"{where}: {cfg.text_column!r} must be a string, got {type(text).__name__} "
                                f"{str(text)[:40]!r}")
            text = text or ""
            if cfg.text_format == "plain" or not text.strip():
                messages = [{"role": "user", "content": text}]
            else:
                try:
                    messages = parse_hh(text, cfg.text_format)
                except ValueError as exc:
                    raise UserError(f"{where}: {exc}") from exc
        if any(not (m["content"] or "").strip() for m in messages if m["role"] == "user"):
            raise UserError(f"{where}: empty prompt")
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        split = str(row.get(cfg.split_column, "")) if cfg.split_column in row else ""
        if cfg.split is not None and split != cfg.split:
            continue
        if cfg.subset != "all" and held_out(pid, cfg.validation_fraction) != (cfg.subset == "validation"):
            continue
        prompts.append(Prompt(pid, messages, str(row.get(cfg.category_column) or ""), split))
    if not prompts:
        raise UserError(f"{source}: no prompts with {cfg.split_column} == {cfg.split!r}"
                        + (f" in subset {cfg.subset}" if cfg.subset != "all" else ""))
    return prompts
