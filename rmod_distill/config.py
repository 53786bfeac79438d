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
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from rmod_distill.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A recipe or command-line override that does not fit its config class."""


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 scalars: only true/false are booleans (``eval_strategy: no`` stays the
    string "no") and ``5e-3`` is a float, as users of TRL recipes expect. A key given twice in
    one mapping is an error (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"key {key!r} is given twice (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


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
        shaped = []  # the errors of the branches whose shape the value has (a mapping for a section)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                if isinstance(value, dict) and (dataclasses.is_dataclass(arg) or typing.get_origin(arg) is dict) \
                        or isinstance(value, list) and typing.get_origin(arg) is list:
                    shaped.append(exc)
        if len(shaped) == 1:  # e.g. an unknown key inside an optional section: say which
            raise shaped[0]
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {_shown(value)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {_shown(value)}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        return {_convert(k, key_t, where): _convert(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {_shown(value)}")
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


def _field_type(cls, dotted: str) -> Any:
    """The annotation of a dotted key of dataclass ``cls`` (``decoding.num_candidates``); None when
    it names no field (that error is reported where the config is built)."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = _hints(tp).get(part)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
    return tp


SECRET_WORDS = ("token", "key", "secret", "password")  # keys whose values an error message never shows


def _looks_secret(key: Any) -> bool:
    return isinstance(key, str) and not key.endswith("_env") and any(
        part in SECRET_WORDS for part in key.lower().replace("-", "_").split("_"))


def _shown(value: Any) -> str:
    """``repr(value)`` for an error message, with the values of secret-looking keys hidden."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {HIDDEN!r}" if _looks_secret(k) else f"{k!r}: {_shown(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return repr(value)


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
    unknown = sorted(set(data) - set(fields), key=str)
    hints = _hints(cls)
    if unknown:
        name = unknown[0]
        if f"{name}_env" in fields:  # a secret put in a recipe where the name of its variable belongs
            raise ConfigError(f"{where}: unknown key {name!r} for {cls.__name__}: put the key in an environment "
                              f"variable and give its name as {name}_env (a recipe never holds a secret)")
        nested = [f"{k}.{name}" for k, tp in hints.items() if k in fields and dataclasses.is_dataclass(tp)
                  and name in {f.name for f in dataclasses.fields(tp)}]
        close = nested or difflib.get_close_matches(str(name), fields, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(
            f"{where}: unknown key {name!r} for {cls.__name__}; {hint}valid keys are: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for k, v in data.items():
        try:
            kwargs[k] = _convert(v, hints.get(k, Any), f"{where}: key {k!r}")
        except ConfigError:
            if _looks_secret(k):  # the message would show the secret itself
                raise ConfigError(f"{where}: key {k!r}: expected {_describe(hints.get(k, Any))}, got a value "
                                  "that is not shown (it may be a secret)") from None
            raise
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


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what went wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


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
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
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
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(config_help(cls))
        raise SystemExit(0)
    return _parse(cls, argv)


def stage_main(cls: type[T], argv: list[str] | None, check: Callable[[T, bool], Any],
               run: Callable[[T, Any], Any]) -> Any:
    """A recipe stage's ``main``: parse the recipe, then ``check(cfg, dry_run)`` (every check the
    stage makes before a model loads or its output folder is touched), then ``run(cfg, checked)``.

    With ``--dry-run`` the same checks run (those that would load a model, such as scoring with a
    reward model, are left out) and the resolved recipe is printed as YAML: exit 0, nothing written.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    hide_secrets(*secret_values(argv))  # whatever reads this process's command line later sees no secret  # also under `accelerate launch -m`, before run.json records the command
    dry_run = "--dry-run" in argv
    cfg = parse_config(cls, [a for a in argv if a != "--dry-run"])
    checked = check(cfg, dry_run)
    if not dry_run:
        return run(cfg, checked)
    # Through JSON so that library enums and paths print as the plain values a recipe holds.
    resolved = json.loads(json.dumps(to_dict(cfg), default=str))
    print(f"# {cls.__name__}, resolved and checked (--dry-run: no model loaded, nothing written)")
    print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), end="")
    raise SystemExit(0)


def _build(cls: type[T], data: dict, source: str) -> T:
    """:func:`from_dict` after the class's ``inherit(data)`` (where it has one) filled in the keys a
    recipe leaves to another run (eval: the decoding of its generate run)."""
    inherit = getattr(cls, "inherit", None)
    return from_dict(cls, inherit(copy.deepcopy(data)) if inherit else data, source)


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
        bare = False
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value, bare = "true", True
        i += 1
        if key == "config":
            data = load_yaml(value)
            source = value
            continue
        key = key.replace("-", "_")
        if bare and _field_type(cls, key) not in (bool, None):
            raise ConfigError(f"--{key} needs a value (expected {_describe(_field_type(cls, key))}); "
                              f"write --{key} VALUE")
        try:
            parsed = yaml_load(value) if value != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--{key}: the value {value!r} is not valid YAML: {_yaml_problem(exc)}; lists are "
                              "written [a, b] and mappings {key: value}, quoted for the shell") from None
        except ConfigError as exc:  # a key given twice inside the value
            raise ConfigError(f"--{key}: {exc}") from None
        overrides.append((key, parsed))
    if not overrides:
        return _build(cls, data, source)
    recipe, merged = data, copy.deepcopy(data)
    for key, value in overrides:
        _set_dotted(merged, key, value)
    try:
        return _build(cls, merged, source)
    except ConfigError as merged_error:
        if source == "command line":
            raise
        # Blame the recipe file only when it fails on its own; otherwise an override broke it.
        try:
            _build(cls, copy.deepcopy(recipe), source)
        except ConfigError:
            raise merged_error from None
        # Name the override at fault: the first that breaks the recipe on its own.
        culprit = "overrides"
        for key, value in overrides:
            trial = copy.deepcopy(recipe)
            try:
                _set_dotted(trial, key, value)
                _build(cls, trial, source)
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


# A secret flag and its value inside one argument too: iterate's `--distill_args "[--hub_token, hf_x]"`.
_SECRET_IN_TEXT = re.compile("--(?:" + "|".join(re.escape(k).replace("_", "[_-]") for k in SECRET_KEYS)
                             + r""")(?:\s*[=,]\s*|\s+)['"]?([^\s,'"\]}]+)""")


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


_secrets: set[str] = set()  # every secret value seen in this process: hidden wherever it appears later


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


def scrub(text: str) -> str:
    """``text`` with every secret this process has seen (:func:`hide_secrets`) and the hub token of the
    environment (``HF_TOKEN``) replaced by ``<hidden>``: for a message that quotes a library's error."""
    env = {os.environ.get(v, "") for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    for value in sorted((_secrets | env) - {"", HIDDEN}, key=len, reverse=True):
        if len(value) >= 6:
            text = text.replace(value, HIDDEN)
    return text


def to_dict(config: Any) -> Any:
    """A JSON-ready copy of a config (for run.json and model cards)."""
    if dataclasses.is_dataclass(config):  # a secret (hub_token) is named, never written (run.json goes to the hub)
        return {f.name: HIDDEN if f.name in SECRET_KEYS and getattr(config, f.name) else
                to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, (list, tuple)):
        if config and all(isinstance(v, str) for v in config):  # a command line (iterate's *_args) hides its secrets
            return masked_argv(list(config))
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, (str, int, float, bool)) or config is None:
        return config
    return str(config)
