"""Typed settings: dataclasses whose field docstrings are their documentation, filled from
mappings (a YAML file, `section.option=value` overrides, a task's options) with every value
coerced to its field's type and every unknown name answered with "did you mean".

The run's config (gpg_vl.config) and each task's options (Task.Options) are both made here,
so the two take values, report mistakes and print their help the same way.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal


class ConfigError(ValueError):
    """A setting that cannot be used; the message says how to fix it."""


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`: the one-line form of every validation."""
    if not ok:
        raise ConfigError(message)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of the dataclasses it extends), read
    from their source."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # defined where there is no source (an interactive session)
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def type_name(tp: Any) -> str:
    """A field's type as help text shows it: int, float | None, list[str], base | instruct."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, doc) of every field of a dataclass, in order."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    return [(f.name, type_name(hints[f.name]), default_of(f), docs.get(f.name, "")) for f in dataclasses.fields(cls)]


def suggest(name: str, options, prefix: str = "") -> str:
    """' (did you mean PREFIX.closest?)', or nothing when no name is close."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp` (the types settings use), or a ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        check(value in allowed, f"{where} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        check(not isinstance(value, bool) and isinstance(value, (int, float)) and int(value) == value,
              f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        check(not isinstance(value, bool) and isinstance(value, (int, float)), f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML reads `true` as a bool; string settings take words
            return "true" if value else "false"
        if value is None:
            return ""
        check(isinstance(value, (str, int, float)), f"{where} must be a string, got {value!r}")
        return str(value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # a command line: "a,b"
            value = [v.strip() for v in value.split(",") if v.strip()]
        check(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        return [coerce(v, inner, where) for v in value]
    if origin is tuple:
        args = typing.get_args(tp)
        check(isinstance(value, (list, tuple)) and len(value) == len(args),
              f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        check(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):  # only `X | None` is used
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return coerce(value, inner, where)
    return value


def fill(cls: type, values: dict[str, Any], where: str, noun: str = "option"):
    """An instance of the dataclass `cls` from `values` (coerced; the others at their
    defaults). An unknown name says which are known and which is closest; the dataclass's own
    checks (__post_init__, raising ValueError) are reported under `where`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            known = ", ".join(names) or "none"
            raise ConfigError(f"{where}: unknown {noun} {name!r}{suggest(name, names)}; known: {known}")
        kwargs[name] = coerce(value, hints[name], f"{where}: {noun} {name}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # ConfigError included
        raise ConfigError(f"{where}: {err}") from err
