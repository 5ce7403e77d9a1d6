"""Subscription matchers: data, never code.

A matcher is a dict of field -> value. A field may be a dotted path into nested records
(``"home.city"``). A value matches a field that equals it (after conversion to the field's
declared type, so ``"2024-01-01T00:00:00Z"`` matches a ``datetime``); ``True`` alone means the
field is present (not None) and ``False`` that it is absent or None; ``{"==": value}`` compares
with ``True``/``False`` themselves (a ``bool`` field). All entries must match. A matcher is
checked against the declared record types when it is made: a field no type has, or a value
that cannot be the field's type, is a ``MatcherError`` that says so. Records of a type that
lacks a field, bytes and other objects never match a matcher with entries.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, Union

import msgspec

from mzconnector import RecordCodec, type_name

_PRESENT, _ABSENT, _EQUAL = "present", "absent", "equal"


class MatcherError(ValueError):
    """A matcher that cannot be used, and why."""


class Matcher:
    """A compiled matcher: ``matcher(record)`` is whether the record matches."""

    def __init__(self, spec: Mapping[str, Any] | None, codec: RecordCodec) -> None:
        if not isinstance(spec, Mapping) and spec is not None:
            raise MatcherError(f"a matcher is a dict of field -> value, not {spec!r}")
        self.spec = dict(spec or {})
        # Record class -> its checks: (attribute path, mode, expected value); a class that
        # lacks a field of the matcher has no entry and never matches.
        self._plans: dict[type, list[tuple[tuple[str, ...], str, Any]]] = {}
        entries = []
        for path, value in self.spec.items():
            if not isinstance(path, str) or not path:
                raise MatcherError(f"a matcher's field is a name or a dotted path, not {path!r}")
            entries.append((tuple(path.split(".")), value))
        for cls in codec.types.values():
            plan = []
            for attrs, value in entries:
                kind = _field_type(cls, attrs)
                check = None if kind is None else _check(attrs, kind, value)
                if check is None:  # it lacks the field, or the field cannot hold the value
                    break
                plan.append(check)
            else:
                self._plans[cls] = plan
        for attrs, value in entries:
            _require_somewhere(attrs, value, codec)
        self.matches_all = not entries

    def __call__(self, record: Any) -> bool:
        if self.matches_all:
            return True
        plan = self._plans.get(type(record))
        if plan is None:
            return False
        for attrs, mode, expected in plan:
            value = record
            for attr in attrs:
                value = getattr(value, attr)
                if value is None:
                    break
            if mode is _PRESENT:
                if value is None:
                    return False
            elif mode is _ABSENT:
                if value is not None:
                    return False
            elif value != expected:
                return False
        return True


def _field_type(cls: type, attrs: tuple[str, ...]) -> Any | None:
    """The declared type of a dotted path in a record class, or None if it has no such field."""
    kind: Any = cls
    for attr in attrs:
        kind = _unwrap_optional(kind)
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
            return None
        fields = {f.name: f.type for f in msgspec.structs.fields(kind)}
        if attr not in fields:
            return None
        kind = fields[attr]
    return kind


def _unwrap_optional(kind: Any) -> Any:
    if typing.get_origin(kind) is Union:
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _check(
    attrs: tuple[str, ...], kind: Any, value: Any
) -> tuple[tuple[str, ...], str, Any] | None:
    if value is True:
        return attrs, _PRESENT, None
    if value is False:
        return attrs, _ABSENT, None
    if isinstance(value, Mapping) and list(value) == ["=="]:
        value = value["=="]
    try:
        return attrs, _EQUAL, msgspec.convert(value, _unwrap_optional(kind), strict=False)
    except msgspec.ValidationError:
        return None


def _require_somewhere(attrs: tuple[str, ...], value: Any, codec: RecordCodec) -> None:
    """A field some record type has, and a value one of them can hold."""
    path = ".".join(attrs)
    kinds = {
        name: kind
        for name, cls in codec.types.items()
        if (kind := _field_type(cls, attrs)) is not None
    }
    if not kinds:
        raise MatcherError(f"no record type has a field {path!r}")
    if value is True or value is False:
        return
    if isinstance(value, Mapping) and list(value) == ["=="]:
        value = value["=="]
    for kind in kinds.values():
        try:
            msgspec.convert(value, _unwrap_optional(kind), strict=False)
            return
        except msgspec.ValidationError:
            continue
    declared = ", ".join(f"{name}.{path} is {type_name(kind)}" for name, kind in kinds.items())
    raise MatcherError(f"{value!r} cannot match field {path!r} ({declared})")
