"""One way to check a JSON document (the sidecar, its execution block, the policy file): a record
type is the schema, msgspec checks it, and a failure becomes one line naming the key, what was
expected and what was there (``policy.json: training.worker_job_timeout_s must be a positive number, got 0``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import operator
import re
import sys
import types
import typing
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType
from msgspec import inspect as mi

from step5.errors import SchemaError

_MAX = sys.float_info.max
Number = Annotated[float, Meta(ge=-_MAX, le=_MAX, description="a finite number")]  # NaN and inf fail both bounds
PositiveNumber = Annotated[float, Meta(gt=0, le=_MAX, description="a positive number")]
NonNegativeNumber = Annotated[float, Meta(ge=0, le=_MAX, description="a non-negative number")]
NonNegativeInt = Annotated[int, Meta(ge=0, description="a non-negative int")]


def one_of(values: tuple[Any, ...]) -> Any:
    """The type of a key that takes one of ``values``; its message lists them in this order."""
    return Annotated[Literal[values], Meta(description="one of " + ", ".join(json.dumps(v) for v in values))]


def convert(obj: Any, schema: Any, *, source: str | None = None, at: str = "", quote: bool = True) -> Any:
    """``obj`` as an instance of ``schema`` (strictly: ``"3"`` is no int, ``true`` no number).

    Messages name the key as ``at`` plus its path, in backticks when ``quote``, after
    ``source:`` when given (the policy's style: ``policy.json: training.x must be ...``).
    """
    try:
        return msgspec.convert(obj, schema, strict=True)
    except msgspec.ValidationError as exc:
        message = _explain(str(exc), obj, schema, at, quote)
        raise SchemaError(f"{source}: {message}" if source else message) from None


def convert_map(obj: Any, value_type: Any, *, source: str | None = None, at: str = "",
                quote: bool = True) -> dict[str, Any]:
    """A JSON object whose keys are data (msgspec names no key of a map), each value converted to
    ``value_type`` and named by its key; ``_``-prefixed keys are comments and left out."""
    convert(obj, dict, source=source, at=at, quote=quote)
    return {key: convert(value, value_type, source=source, at=f"{at}.{key}", quote=quote)
            for key, value in obj.items() if not key.startswith("_")}


def without_comments(obj: Any) -> Any:
    """``obj`` without the ``_``-prefixed keys of its objects (``"_comment"``: documentation)."""
    if isinstance(obj, dict):
        return {k: without_comments(v) for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(obj, list):
        return [without_comments(v) for v in obj]
    return obj


@functools.cache
def record_schema(cls: type, *, required: bool = True,
                  replace: tuple[tuple[Any, Any], ...] = ()) -> type[msgspec.Struct]:
    """The msgspec schema of dataclass ``cls`` (nested dataclasses likewise), no unknown key, every
    field ``required`` or else optional (absent: ``UNSET``, so the dataclass's default applies);
    ``replace`` swaps annotations (``((int, Count),)``: every int of the block is a count)."""
    swaps = dict(replace)

    def swap(t: Any) -> Any:
        if dataclasses.is_dataclass(t):
            return record_schema(t, required=required, replace=replace)
        return swaps.get(t, t)

    hints = typing.get_type_hints(cls, include_extras=True)
    fields: list[Any] = []
    for f in dataclasses.fields(cls):
        t = _map_type(hints[f.name], swap)
        fields.append((f.name, t) if required else (f.name, t | UnsetType, UNSET))
    return msgspec.defstruct(cls.__name__, fields, kw_only=True, forbid_unknown_fields=True)


def present(struct: msgspec.Struct) -> dict[str, Any]:
    """The fields of a converted :func:`record_schema` (``required=False``) the document gave."""
    return {k: v for k, v in msgspec.structs.asdict(struct).items() if v is not UNSET}


def _map_type(t: Any, fn: Any) -> Any:
    """``t`` with ``fn`` applied to every type inside it (unions, lists, dicts, Annotated)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is None:
        return fn(t)
    if origin is Annotated:
        return Annotated[(_map_type(args[0], fn), *t.__metadata__)]  # type: ignore[valid-type]
    if origin is Literal:
        return t
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, (_map_type(a, fn) for a in args))
    return origin[tuple(_map_type(a, fn) for a in args)]


_PATH = re.compile(r" - at `\$(.*)`$")
_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_WORDS = {
    mi.IntType: "an int", mi.FloatType: "a number", mi.StrType: "a string", mi.BoolType: "true or false",
    mi.DictType: "an object", mi.StructType: "an object", mi.DataclassType: "an object",
    mi.TypedDictType: "an object", mi.AnyType: "any value",
}
_OBJECTS = (mi.DictType, mi.StructType, mi.DataclassType, mi.TypedDictType)


def _explain(text: str, obj: Any, schema: Any, at: str, quote: bool) -> str:
    match = _PATH.search(text)
    path: list[str | int] = []
    if match:
        path = [name if name else int(index) for name, index in _PART.findall(match.group(1))]
        text = text[:match.start()]
    info = _type_at(mi.type_info(schema), path)
    if path and isinstance(path[-1], int) and not isinstance(_unwrap(info), _OBJECTS):
        path = path[:-1]  # a bad string in an array of strings: the array is what was expected
        info = _type_at(mi.type_info(schema), path)

    def key(parts: list[str | int]) -> str:
        dotted = at + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
        dotted = dotted.lstrip(".")
        return f"`{dotted}`" if quote else dotted

    if text.startswith("Object missing required field"):
        dotted = key([*path, text.split("`")[1]]).strip("`")
        return f"missing key `{dotted}`"
    if text.startswith("Object contains unknown field"):
        known = sorted(f.name for f in _unwrap(info).fields)
        return f"{key(path)}: unknown key `{text.split('`')[1]}`; expected one of {known}"
    value = obj
    for part in path:
        value = value[part]
    got = type(value).__name__ if isinstance(_unwrap(info), _OBJECTS) else f"{value!r:.80}"
    return f"{key(path)} must be {_describe(info)}, got {got}"


def _unwrap(t: Any) -> Any:
    """The container inside a Metadata or an optional union, to walk into or name."""
    if isinstance(t, mi.Metadata):
        return _unwrap(t.type)
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        return _unwrap(members[0]) if len(members) == 1 else t
    return t


def _type_at(t: Any, path: list[str | int]) -> Any:
    for part in path:
        t = _unwrap(t)
        if isinstance(part, int):
            t = t.item_type
        else:
            t = next(f.type for f in t.fields if f.name == part)
    return t


def _describe(t: Any) -> str:
    if isinstance(t, mi.Metadata):
        return (t.extra_json_schema or {}).get("description") or _describe(t.type)
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        text = " or ".join(_describe(m) for m in members)
        return text + " or null" if any(isinstance(m, mi.NoneType) for m in t.types) else text
    if isinstance(t, mi.LiteralType):
        if len(t.values) == 1:
            return repr(t.values[0])
        return "one of " + ", ".join(json.dumps(v) for v in t.values)
    if isinstance(t, mi.ListType):
        return "an array of strings" if isinstance(t.item_type, mi.StrType) else "an array"
    return _WORDS.get(type(t), "a valid value")
