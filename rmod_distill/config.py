"""Typed recipes: YAML files parsed into dataclasses, with command-line overrides.

``parse_config(GenerateConfig, ["--config", "recipes/default/generate.yaml",
"--decoding.num_candidates", "8"])`` reads the YAML, applies the overrides (dotted keys
reach nested sections; values are read as YAML, so ``8`` is an int and ``[a, b]`` a
list), and builds the dataclass strictly: an unknown key, a value of the wrong type or a
missing file fails with the file, the key and what was expected.

Stages whose config extends a TRL/transformers config (distill extends ``SFTConfig``)
go through the same function; fields whose annotation is too loose to check are left to
that class's own ``__post_init__`` validation.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rmod_distill.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A recipe or command-line override that does not fit its config class."""


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 scalars: only true/false are booleans (``eval_strategy: no`` stays the
    string "no") and ``5e-3`` is a float, as users of TRL recipes expect."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    """Parse YAML with 1.2 scalars (see :class:`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_describe(arg)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and build nested dataclasses."""
    if tp is Any or isinstance(tp, str) or isinstance(tp, typing.TypeVar):
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        return {_convert(k, key_t, where): _convert(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, Path):
        return Path(value)
    # Enums and other library types: let the class's own validation handle them.
    return value


def _hints(cls) -> dict[str, Any]:
    hints = {}
    for klass in reversed(cls.__mro__):
        try:
            hints.update(typing.get_type_hints(klass))
        except Exception:  # library classes with unresolvable forward references
            hints.update({k: Any for k in getattr(klass, "__annotations__", {})})
    return hints


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} for {cls.__name__}; {hint}valid keys are: {', '.join(sorted(fields))}"
        )
    hints = _hints(cls)
    kwargs = {k: _convert(v, hints.get(k, Any), f"{where}: key {k!r}") for k, v in data.items()}
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def load_yaml(path: str | Path) -> dict:
    """Read a recipe file, which must hold a YAML mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        data = yaml_load(path.read_text())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        # An empty file (or only comments) is almost always a wrong path or a lost edit, not "all defaults".
        raise ConfigError(f"recipe file {path} is empty (no keys); expected a YAML mapping of keys to values "
                          "(leave out --config to use every default)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of keys to values, got {type(data).__name__}")
    return data


def parse_config(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse ``--config FILE`` plus ``--key value`` / ``--key=value`` overrides into ``cls``.

    A bare ``--flag`` sets a boolean to true. ``--help`` prints every key with its help.
    ``--dry-run`` parses and validates the recipe (types, unknown keys, each section's own
    checks), prints it resolved as YAML and exits 0: no model loads, no folder is written.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(config_help(cls))
        raise SystemExit(0)
    if "--dry-run" in argv:
        cfg = _parse(cls, [a for a in argv if a != "--dry-run"])
        # Through JSON so that library enums and paths print as the plain values a recipe holds.
        resolved = json.loads(json.dumps(to_dict(cfg), default=str))
        print(f"# {cls.__name__}, resolved (--dry-run: nothing loaded, nothing written)")
        print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), end="")
        raise SystemExit(0)
    return _parse(cls, argv)


def _parse(cls: type[T], argv: list[str]) -> T:
    data: dict = {}
    source = "command line"
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --config FILE and --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        i += 1
        if key == "config":
            data = load_yaml(value)
            source = value
            continue
        overrides.append((key.replace("-", "_"), yaml_load(value) if value != "" else ""))
    if not overrides:
        return from_dict(cls, data, source)
    recipe, merged = data, copy.deepcopy(data)
    for key, value in overrides:
        _set_dotted(merged, key, value)
    try:
        return from_dict(cls, merged, source)
    except ConfigError as merged_error:
        if source == "command line":
            raise
        # Blame the recipe file only when it fails on its own; otherwise an override broke it.
        try:
            from_dict(cls, copy.deepcopy(recipe), source)
        except ConfigError:
            raise merged_error from None
        # Name the override at fault: the first that breaks the recipe on its own.
        culprit = "overrides"
        for key, value in overrides:
            trial = copy.deepcopy(recipe)
            try:
                _set_dotted(trial, key, value)
                from_dict(cls, trial, source)
            except ConfigError:
                culprit = f"--{key}"
                break
        message = str(merged_error)
        raise ConfigError(f"command line ({culprit})" + message[len(source):] if message.startswith(source)
                          else f"command line ({culprit}): {message}") from None


def config_help(cls, prefix: str = "") -> str:
    """One line per key (nested sections dotted) with its default and help text."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, Any)
        if dataclasses.is_dataclass(tp):
            lines.append(config_help(tp, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            try:
                default = _show_default(f.default_factory())
            except Exception:  # a library factory that needs more than a call
                default = "(computed)"
        else:
            default = "<required>"
        (item,) = typing.get_args(tp) if typing.get_origin(tp) is list and typing.get_args(tp) else (None,)
        text = f.metadata.get("help", "")
        if not text and dataclasses.is_dataclass(item):
            text = f"A list of {item.__name__} mappings; the keys of each item follow."
        lines.append(f"  --{prefix}{f.name}  ({_describe(tp)}, default {default}): {text}")
        if dataclasses.is_dataclass(item):
            lines.append(config_help(item, f"{prefix}{f.name}[i].").replace(f"  --{prefix}{f.name}[i].",
                                                                            f"      {prefix}{f.name}[i]."))
    return "\n".join(lines)


def _show_default(value: Any) -> str:
    """A default as a user would write it: lists of sections show only their keys that differ
    from the section's defaults (``[{name: harmlessness}, ...]``)."""
    if isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
        items = []
        for v in value:
            keys = {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.init and (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                or getattr(v, f.name) != (f.default if f.default is not dataclasses.MISSING else f.default_factory()))}
            items.append("{" + ", ".join(f"{k}: {to_dict(x)}" for k, x in keys.items()) + "}")
        return "[" + ", ".join(items) + "]"
    return repr(to_dict(value))


SECRET_KEYS = ("hub_token",)  # recipe keys whose values never reach run.json or model cards
SECRET_FLAGS = tuple(f"--{k}" for k in SECRET_KEYS)  # the same keys on a command line inside a recipe
HIDDEN = "<hidden>"  # what run.json shows for a secret that was set


def to_dict(config: Any) -> Any:
    """A JSON-ready copy of a config (for run.json and model cards)."""
    if dataclasses.is_dataclass(config):  # a secret (hub_token) is named, never written (run.json goes to the hub)
        return {f.name: HIDDEN if f.name in SECRET_KEYS and getattr(config, f.name) else
                to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, (list, tuple)):  # a command line inside a recipe (iterate's *_args) hides its secrets too
        return [HIDDEN if i and config[i - 1] in SECRET_FLAGS else to_dict(v)
                for i, v in enumerate(config)]
    if isinstance(config, dict):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, (str, int, float, bool)) or config is None:
        return config
    return str(config)
