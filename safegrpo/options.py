"""Typed, checked options on dataclasses: the machinery behind config.py.

    opt(default, rule, help)   a field: its default, its rule (ge, gt, within, each: an error
                               text or None) and its description
    build(cls, tree, where)    a dataclass tree from nested dicts: unknown keys, types and rules
                               checked, errors naming the key, the value and what was expected
    describe(cls)              every option with its type, default and description, by section
    differences(a, b)          the leaf options where two trees differ

Types: bool, int, float, str, Literal choices, tuples and lists of these. Nothing is converted
but a float written as a YAML string such as `1e-4` (YAML 1.1 reads exponents without a dot as
strings), so `trust_remote_code: "false"` is an error, not a truthy string.
"""
from __future__ import annotations

import dataclasses
import math
import textwrap
import typing
from dataclasses import field
from typing import Literal

import yaml


def ge(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def gt(lo):
    return lambda v: None if v > lo else f"must be > {lo}"


def within(lo, hi, lo_open=False, hi_open=False):
    def check(v):
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return check


def each(rule):
    return lambda vs: next((f"item {i} {m}" for i, v in enumerate(vs) if (m := rule(v))), None)


def opt(default, check=None, help: str = ""):
    """A config field: its default, optionally a rule returning an error text or None, and the
    one description of what it does (shown by `train.py --help`)."""
    kind = "default_factory" if isinstance(default, list) else "default"
    value = (lambda d=default: list(d)) if kind == "default_factory" else default
    return field(metadata={"check": check, "help": help}, **{kind: value})


def section(cls):
    """A nested section (a dataclass of options)."""
    return field(default_factory=cls)


# ----------------------------------------------------------------------------- building a tree
def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(value, hint, key: str):
    """value as the declared type `hint`, or ValueError naming key, value and type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = ValueError(f"config key {key} must be {_type_name(hint) if origin is not tuple else 'a list of ' + str(len(args)) + ' numbers'}, "
                     f"got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in args:
            raise bad
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise bad
        items = [_coerce(v, args[i] if origin is tuple else args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)       # YAML 1.1 reads 1e-4 (no dot) as a string
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(out):       # .inf / .nan pass every range rule, then fail deep inside a run
            raise ValueError(f"config key {key} must be a finite number, got {value!r}")
        return out
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"config key {key}: unsupported declared type {hint}")


def build(cls, values: dict, where: str, moved: dict | None = None):
    if not isinstance(values, dict):
        raise ValueError(f"config section {where or '(top level)'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            if moved and name in moved:
                raise ValueError(f"config key {name} is now {moved[name]}")
            raise ValueError(f"unknown config key {name} (known: {', '.join(sorted(fields))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, {} if value is None else value, name, moved)
            continue
        value = _coerce(value, hint, name)
        check = fields[key].metadata.get("check")
        if check is not None and (msg := check(value)):
            raise ValueError(f"config key {name} {msg}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, raw: str):
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = read_yaml(raw, f"--set {dotted}={raw}")


class _StrictLoader(yaml.SafeLoader):
    """YAML as a config needs it: a key given twice is an error (PyYAML keeps the last one
    silently: `grpo:` twice lost the first block), and dates stay text (`2026-12-03` as an
    out_dir is a folder name, not a date)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def read_yaml(text: str, where: str):
    """Parse YAML text (a config file, or a --set value); one ValueError naming `where`, the line
    and the problem (a tab, an unclosed bracket, a duplicate key) instead of a traceback."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None and not where.startswith("--set") \
            else ""
        what = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ValueError(f"{where}:{line} not valid YAML ({what})") from None


def differences(a, b, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: a -> b' for every leaf field where two trees differ (dotted keys in `ignore` skipped)."""
    out = []

    def walk(x, y, prefix):
        for f in dataclasses.fields(x):
            key = f"{prefix}{f.name}"
            u, v = getattr(x, f.name), getattr(y, f.name)
            if dataclasses.is_dataclass(u):
                walk(u, v, key + ".")
            elif key not in ignore and u != v:
                out.append(f"{key}: {u!r} -> {v!r}")
    walk(a, b, "")
    return out




def sections(cls, prefix: str = ""):
    """The dataclass tree `cls`, section by section: (dotted prefix, the section's docstring on one
    line, [(key, type name, default, description)] of its own options); what describe and
    markdown print."""
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested.append((f.name, hint))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append((prefix + f.name, _type_name(hint), default, f.metadata.get("help", "")))
    if rows:
        yield prefix, " ".join((cls.__doc__ or "").split()), rows
    for name, sub in nested:
        yield from sections(sub, f"{prefix}{name}.")


def describe(cls) -> str:
    """Every option of the dataclass tree `cls` as text: a heading per section (its docstring),
    then `key  type = default` and the option's description, indented."""
    parts = []
    for prefix, doc, rows in sections(cls):
        lines = [f"{prefix.rstrip('.')}: {doc}" if prefix else doc]
        for key, kind, default, text in rows:
            lines.append(f"  {key}  {kind} = {default!r}")
            lines += textwrap.wrap(text, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def markdown(cls) -> str:
    """Every option of the dataclass tree `cls` as Markdown, the same declarations as `describe`:
    a heading per section (its docstring), then a table of key, type, default and description.
    docs/OPTIONS.md is config.options_doc(), this text for Config (`make options-doc`;
    tests/test_readme.py keeps the two equal)."""
    cell = lambda x: str(x).replace("|", "\\|")                     # noqa: E731
    return "\n".join(
        f"## {prefix.rstrip('.') or '(top level)'}\n\n{doc}\n\n| key | type | default | description |\n|---|---|---|---|\n"
        + "".join(f"| `{key}` | {cell(kind)} | `{cell(repr(default))}` | {cell(text)} |\n" for key, kind, default, text in rows)
        for prefix, doc, rows in sections(cls))
