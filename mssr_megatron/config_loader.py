"""Generic machinery behind `mssr_megatron.config`: YAML files with `base:` inheritance, dotted `key=value` overrides,
typed conversion of plain dicts into nested dataclasses, per-field docstrings, and dumping back to YAML.

The machinery is schema-free (it reads dataclass type hints). `config.py` holds the dataclasses, `config_checks.py` the
cross-field checks behind `RunConfig.validate()`.

Rules worth knowing:
- Every value is checked against its field's type hint: `bool` takes only true/false, `int` takes no bools or floats,
  `float` takes ints (stored as floats) and numeric strings such as `1e-6` (PyYAML reads an exponent without a dot as a
  string), `Literal[...]` takes only its listed values, `X | None` also takes null, `list[str]` takes a list of strings.
- `base: other.yaml` in a file (a path relative to that file) loads `other.yaml` first, then deep-merges this file
  over it: mappings merge key by key, everything else (lists included) is replaced. Bases may have bases (cycles are an
  error).
- An override `a.b.c=value` parses `value` with YAML rules (`null`, `3`, `1e-6`, `[a, b]`, `{k: v}`) and is applied
  after all files. For a string field, a value that YAML would read as anything but a string or null is kept as the
  literal text (`logging.run_name=123` is the string "123").
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
import textwrap
import types
import typing
from typing import Any, Iterator, Literal, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one actionable line."""


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


# --------------------------------------------------------------------------------------------------- field docstrings
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the string literal on the line right after its annotation ('' if none)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # inherited fields first, so subclasses can re-document
        if dataclasses.is_dataclass(klass):
            docs.update(_class_field_docs(klass))
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def _class_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # the ClassDef's statements
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted key, type hint, default, docstring) for every leaf field under dataclass `cls`, depth first."""
    docs, hints = field_docs(cls), _hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = prefix + f.name, hints[f.name]
        if _is_dataclass_type(hint):
            yield from iter_fields(hint, key + ".")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield key, hint, default, docs[f.name]


def help_text(cls: type) -> str:
    """Every leaf field of `cls` as `key = default  (type)` plus an indented docstring line, for `--help-fields`."""
    lines = []
    for key, hint, default, doc in iter_fields(cls):
        shown = json.dumps(default)  # JSON is YAML flow syntax, on one line
        lines += [f"{key} = {shown}  ({_type_name(hint)})", f"    {doc}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- YAML files
class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so an edited
    config could hold two values of a setting and run with the one further down)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name} line {key_node.start_mark.line + 1}: key {key!r} is "
                                  f"given twice in one mapping (first on line {seen[key] + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict:
    """Read a YAML mapping from `path`, resolving `base:` recursively (relative to the file that names it)."""
    path = os.path.abspath(os.fspath(path))
    if path in _seen:
        raise ConfigError(f"config files inherit in a cycle: {' -> '.join(_seen + (path,))}")
    if not os.path.isfile(path):
        via = f" (base of {_seen[-1]})" if _seen else ""
        raise ConfigError(f"config file not found: {path}{via}")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" line {where.line + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"cannot parse {path}{line}: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping of config sections, not {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"'base' in {path} must be a path to another YAML file, not {base!r}")
    parent = load_yaml_file(os.path.join(os.path.dirname(path), base), _seen + (path,))
    return deep_merge(parent, data)


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: `update` over `base`, merging nested mappings key by key and replacing everything else."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------- overrides
def apply_overrides(cls: type, data: dict, overrides: Sequence[str]) -> dict:
    """A new dict: `data` with each `dotted.key=value` override applied in order (keys checked against `cls`)."""
    data = dict(data)
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or not all(p.strip() for p in parts):
            raise ConfigError(f"malformed override {item!r}: expected key=value, e.g. optimizer.lr=1e-6")
        hint = _lookup(cls, [p.strip() for p in parts])
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"override {item!r}: cannot parse the value as YAML ({problem})") from None
        if _accepts_str(hint) and value is not None and not isinstance(value, str):
            value = text.strip()  # `run_name=123` means the string "123", `hf_path=a: b` the string "a: b"
        node = data
        for part in parts[:-1]:
            part = part.strip()
            node[part] = dict(node[part]) if isinstance(node.get(part), dict) else {}
            node = node[part]
        last = parts[-1].strip()
        merge = isinstance(value, dict) and isinstance(node.get(last), dict)
        node[last] = deep_merge(node[last], value) if merge else value
    return data


def _lookup(cls: type, parts: list[str]) -> Any:
    """The type hint of the field at `parts` under `cls`; unknown keys raise ConfigError with a suggestion."""
    hint: Any = cls
    for i, part in enumerate(parts):
        if not _is_dataclass_type(hint):
            raise ConfigError(f"'{'.'.join(parts[:i])}' is a value, not a section; cannot set '{'.'.join(parts)}'")
        fields = _hints(hint)
        if part not in fields:
            raise ConfigError(unknown_key_message(cls, ".".join(parts[:i]), part))
        hint = fields[part]
    return hint


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key under dataclass `cls`, sections included."""
    keys = []
    for name, hint in _hints(cls).items():
        keys.append(prefix + name)
        if _is_dataclass_type(hint):
            keys.extend(all_keys(hint, prefix + name + "."))
    return keys


def unknown_key_message(root: type, section: str, name: str) -> str:
    """'unknown config key ...' with the full dotted key and the closest valid key (same section first, then any)."""
    full = f"{section}.{name}" if section else name
    cls = _lookup(root, section.split(".")) if section else root
    close = difflib.get_close_matches(name, list(_hints(cls)), n=1)
    if close:
        suggestion = f"{section}.{close[0]}" if section else close[0]
    else:
        everywhere = all_keys(root)
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in everywhere}
        leaf = difflib.get_close_matches(name, list(by_leaf), n=1, cutoff=0.75)
        suggestion = by_leaf[leaf[0]] if leaf else None
    if suggestion:
        return f"unknown config key {full!r} (did you mean {suggestion!r}?)"
    where = f"'{section}'" if section else "the top level"
    return f"unknown config key {full!r}; valid keys at {where}: {', '.join(_hints(cls))}"


# ------------------------------------------------------------------------------------------------- dict -> dataclass
def from_dict(cls: type, data: Any, prefix: str = "", root: type | None = None) -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and value; missing keys keep their defaults.

    `prefix` is the dotted path of `cls` inside `root` (the top-level dataclass), used in messages and suggestions.
    """
    root = root or cls
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'}={data!r} must be a mapping of keys to values")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(unknown_key_message(root, prefix.rstrip("."), str(key)))
        kwargs[key] = convert(value, hints[key], prefix + str(key), root)
    return cls(**kwargs)


def convert(value: Any, hint: Any, key: str, root: type | None = None) -> Any:
    """`value` checked against (and normalised to) type `hint`; `key` names the field in error messages."""
    if _is_dataclass_type(hint):
        return from_dict(hint, value, key + ".", root)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if any(value is a or (type(value) is type(a) and value == a) for a in args):
            return value
        choices = ", ".join("null" if a is None else str(a) for a in args)
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {choices}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return convert(value, option, key, root)
            except ConfigError:
                if len(options) == 1:
                    raise ConfigError(f"{key}={value!r} must be {_type_name(hint)}") from None
        raise ConfigError(f"{key}={value!r} must be {_type_name(hint)}")
    if origin is list:
        (item,) = args or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be {_type_name(hint)}, e.g. [a, b]")
        return [convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint is Any:
        return value
    raise ConfigError(f"{key}={value!r} must be {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of: " + ", ".join("null" if a is None else str(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    return typing.get_origin(hint) in (Union, types.UnionType) and str in typing.get_args(hint)


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


# ------------------------------------------------------------------------------------------------- dataclass -> YAML
def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists/scalars (what `from_dict` reads back)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | os.PathLike | None = None) -> str:
    """The config as YAML text, in field order; also written to `path` (parent folders created) when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=120)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text
