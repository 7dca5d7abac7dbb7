"""Settings dataclasses from job arguments: one place for each default, unknown names refused by name.

A use case's settings (``TrainConfig``, ``TrunkConfig``, ``LoRASettings``, ...) are dataclasses; a job passes
only what it chooses differently (``training: {"dropout": 0.5}``) and ``settings`` builds the dataclass from that,
with values converted to the fields' types (a JSON list becomes a tuple, an int a float where a float is due).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass

from pharmafl.core.errors import InputError


def field_types(settings_class: type) -> dict[str, object]:
    """The fields of a settings dataclass and their types."""
    hints = typing.get_type_hints(settings_class)
    return {f.name: hints.get(f.name, object) for f in fields(settings_class)}


def settings(settings_class: type, values: Mapping | None, group: str):
    """``settings_class`` built from ``values``; an unknown or mistyped setting is one sentence naming it."""
    if values is not None and not isinstance(values, Mapping):
        raise InputError(f"the {group} settings must be a mapping of names to values, got {values!r}.")
    values = dict(values or {})
    types_ = field_types(settings_class)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise InputError(
            f"unknown {group} setting {', '.join(unknown)}; the {group} settings are: {', '.join(sorted(types_))}."
        )
    typed = {name: typed_value(value, types_[name], f"{group}.{name}") for name, value in values.items()}
    return settings_class(**typed)


def non_default(instance) -> dict:
    """The fields of a settings dataclass instance that differ from their defaults (what a job states)."""
    assert is_dataclass(instance)
    out = {}
    for f in fields(instance):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(instance, f.name)
        if default is MISSING or value != default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def typed_value(value, hint, name: str):
    """``value`` as type ``hint``; a value of another type is one sentence naming the setting and its type."""
    try:
        return _convert(value, hint)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not a valid {type_name(hint)}.") from None


def _convert(value, hint):
    """``value`` as ``hint`` (int, float, str, bool, list[...], tuple[...], dict, X | None); TypeError if it is not."""
    origin, members = typing.get_origin(hint), typing.get_args(hint)
    if hint is object or hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is not type(None):
                try:
                    return _convert(value, member)
                except (TypeError, ValueError):
                    continue
        raise TypeError(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise TypeError(value)
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple) or str(origin) == "collections.abc.Sequence":
        if not isinstance(value, list | tuple):
            raise TypeError(value)
        if members and members[-1] is not Ellipsis and origin is tuple:
            items = [_convert(v, m) for v, m in zip(value, members, strict=True)]
        else:
            items = [_convert(v, members[0]) for v in value] if members else list(value)
        return items if origin is list or hint is list else tuple(items)
    if origin in (dict, Mapping) or hint is dict or str(origin) == "collections.abc.Mapping":
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    return value


def type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(m) for m in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint)


def apply_settings(
    args: dict, values: Mapping, groups: Mapping[str, Mapping[str, object]], plain: Mapping[str, object], owner: str
) -> dict:
    """``args`` (a component's arguments: one dict per setting group, plain arguments beside) with ``values`` set.

    A key of ``values`` is ``GROUP.NAME`` (a field of a group) or ``NAME``: a field of exactly one group or a plain
    argument. ``groups`` maps each group to its fields' types, ``plain`` the plain arguments to theirs. An unknown
    or ambiguous name, or a value of the wrong type, is one sentence naming it and the valid names.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in args.items()}
    valid = ", ".join([f"{g}.{f}" for g, types_ in groups.items() for f in types_] + list(plain))
    for key, value in values.items():
        group, _, name = key.rpartition(".")
        if not group:
            owners = [g for g, types_ in groups.items() if key in types_] + ([""] if key in plain else [])
            if len(owners) > 1:
                spelled = " or ".join(f"{g}.{key}" if g else key for g in owners)
                raise InputError(f"the setting {key} is ambiguous in {owner}: write {spelled}.")
            group = owners[0] if owners else None
        if group is None or (group and name not in groups.get(group, {})):
            raise InputError(f"{owner} has no setting {key}; its settings are: {valid}.")
        if not group:
            out[key] = typed_value(value, plain[key], key)
        else:
            typed = typed_value(value, groups[group][name], key)
            out.setdefault(group, {})
            out[group] = {**(out[group] or {}), name: list(typed) if isinstance(typed, tuple) else typed}
    return out


def parsed_value(text: str) -> object:
    """A ``--set NAME=VALUE`` value: JSON when it is JSON (numbers, true/false, lists, dicts), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
