"""Field types of the recipe dataclasses: a YAML or command-line value to the declared
type (`coerce`), and a check that a constructed section holds what it declares
(`check_fields`).

YAML reads `1e-4` as a string and the command line gives strings for everything, so a
string becomes the field's type; anything else must already be it. A list where a
number is expected, a float for an integer (`seed: 1.5`), a number for a flag
(`bf16: 5`) or a non-finite number (`--learning_rate inf`) is a one-line ValueError
naming the field, never a TypeError deep inside training.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math
import typing

import yaml

from .errors import UserError


class Bare:
    """A command-line flag given without a value (`--bf16`): true for a flag, an error elsewhere."""

    def __repr__(self) -> str:
        return "<no value>"


BARE = Bare()
NULLS = ("none", "null", "~")


def unwrap_optional(hint) -> tuple[object, bool]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1 and len(typing.get_args(hint)) == 2:
        return args[0], True
    return hint, False


def is_list_hint(hint) -> bool:
    return hint is list or typing.get_origin(hint) in (list, collections.abc.Sequence)


def describe(hint) -> str:
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "a string"
    if hint is dict:
        return "a mapping"
    if is_list_hint(hint):
        return "a list"
    return getattr(hint, "__name__", str(hint))


def coerce(hint, value, where: str):
    """`value` (from YAML or the command line) as `hint` (a field's annotation)."""
    hint, optional = unwrap_optional(hint)
    if value is BARE:
        if hint is bool:
            return True
        raise UserError(f"{where}: no value after --{where.rsplit('.', 1)[-1]}; expected {describe(hint)}")
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in NULLS)):
        return None
    if isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"{where}={value!r}: not a valid value; expected {describe(hint)}") from None
        if optional and value is None:
            return None
    return _as(hint, value, where)


def _as(hint, value, where: str):
    wrong = UserError(f"{where}={value!r}: expected {describe(hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if hint is int:
        number = _number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise wrong
        return int(number)
    if hint is float:
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise wrong
        return float(number)
    if hint is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}={value!r}: expected a string (in YAML, quote it: '{value}')"
                        if isinstance(value, (int, float)) else f"{where}={value!r}: expected a string")
    if hint is dict:
        if isinstance(value, dict):
            return value
        raise wrong
    if is_list_hint(hint):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [value]
        raise wrong
    return value  # another annotation: the section's own validation decides


def _number(value):
    """int/float (never bool) or a string that reads as one; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_fields(section, prefix: str) -> None:
    """Every bool/int/float/str/list/dict field of a constructed dataclass holds that
    type (floats finite): a section built in code is checked like one read from YAML."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        hint, optional = unwrap_optional(hints[f.name])
        value = getattr(section, f.name)
        if optional and value is None:
            continue
        where = f"{prefix}.{f.name}"
        if hint is bool and not isinstance(value, bool):
            raise UserError(f"{where}={value!r}: expected true or false")
        if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{where}={value!r}: expected an integer")
        if hint is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise UserError(f"{where}={value!r}: expected a finite number")
        if hint is str and not isinstance(value, str):
            raise UserError(f"{where}={value!r}: expected a string")
        if hint is dict and not isinstance(value, dict):
            raise UserError(f"{where}={value!r}: expected a mapping")
        if hint is list and not isinstance(value, list):
            raise UserError(f"{where}={value!r}: expected a list")
