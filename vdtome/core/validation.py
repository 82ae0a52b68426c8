"""Checking values as clients send them: each refusal is a :class:`RequestError` naming its field.

Low in the package (no torch, no diffusers) so that method forms, the engine, the app and the CLI
share one set of rules and messages.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_TEXT_CHARS = 1000


class RequestError(ValueError):
    """A request the engine refuses; the message names the rule that was broken.

    ``field``: the request (and form) field at fault, so a form can show the message beside it;
    ``fields``: every field the message names, ``field`` first (see :func:`all_refused`).
    """

    def __init__(self, message: str, field: str | None = None, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.fields = fields or ((field,) if field is not None else ())


def all_refused(errors: list[RequestError]) -> RequestError:
    """One refusal naming every broken rule of a form, in the form's order: a visitor who typed
    two values out of range reads both at once rather than one per Run."""
    if len(errors) == 1:
        return errors[0]
    return RequestError("; ".join(str(error) for error in errors), errors[0].field,
                        tuple(name for error in errors for name in error.fields))


def whole_number(name: str, value: Any, low: int, high: int, field: str | None = None) -> int:
    """``value`` as an int in [low, high] (integral floats such as 3.0 accepted: JSON clients send
    them); anything else, text, booleans, 1.5 or NaN included, is a RequestError naming it."""
    sent = value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be a whole number, got {shown(sent)}", field)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {shown(sent)}", field)
    return value


def finite_number(name: str, value: Any, low: float, high: float, field: str | None = None) -> float:
    """``value`` as a float in [low, high]; booleans, text and NaN are refused, never coerced."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {shown(value)}", field)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low:g} and {high:g}, got {value:g}", field)
    return float(value)


def text(name: str, value: Any, field: str | None = None, limit: int = MAX_TEXT_CHARS) -> str:
    """``value`` stripped, if it is a string of valid Unicode within the length limit (None is empty)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be text, got {shown(value)}", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(f"{name} is not valid Unicode: it holds a lone surrogate at character "
                           f"{error.start + 1}; send UTF-8 text", field) from None
    value = value.strip()
    if len(value) > limit:
        raise RequestError(f"{name} is {len(value)} characters; the limit is {limit}", field)
    return value


def choice(name: str, value: Any, options: tuple[str, ...], field: str | None = None) -> str:
    if not isinstance(value, str) or value not in options:
        raise RequestError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {shown(value)}", field)
    return value


def choices(name: str, value: Any, options: tuple[str, ...], field: str | None = None) -> tuple[str, ...]:
    """A list of names from ``options`` (a name listed twice is refused, not silently dropped)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise RequestError(f"{name} must be a list of names such as [{json.dumps(options[0])}], got {shown(value)}",
                           field)
    unknown = [item for item in value if item not in options]
    if unknown:
        raise RequestError(f"unknown {name} {unknown[0]!r}; choose from {', '.join(options)}", field)
    if len(set(value)) != len(value):
        raise RequestError(f"{name} lists a name twice: {shown(list(value))}", field)
    return tuple(value)


TEXT_LIMIT = 300


def plain_text(name: str, value: Any, field: str | None = None) -> str:
    """One line of printable text (a pattern, a file name), stripped; at most :data:`TEXT_LIMIT` characters."""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be text, got {shown(value)}", field)
    value = value.strip()
    if len(value) > TEXT_LIMIT or not value.isprintable():
        raise RequestError(f"{name} must be one line of printable text of at most {TEXT_LIMIT} characters", field)
    return value


def boolean(name: str, value: Any, field: str | None = None) -> bool:
    """Only true and false: the string "false" is not a boolean (it would read as true)."""
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {shown(value)}", field)
    return value


# A number as a person types it: 0.25, .5, 1 (no exponents, underscores, other digit sets or nan).
PLAIN_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def decimal_list(name: str, value: Any, field: str | None, limit: int) -> tuple[float, ...]:
    """Numbers from "0, 0.25, 0.5" (commas, semicolons or spaces) in the order given; a value listed
    twice is refused rather than silently run once. Ranges are the caller's to check."""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be text such as \"0.1, 0.3, 0.5\", got {shown(value)}", field)
    parts = [p for p in re.split(r"[,\s;]+", value.strip()) if p]
    if not parts:
        raise RequestError(f"{name} are empty: list values such as 0.1, 0.3, 0.5", field)
    values: dict[float, str] = {}
    for part in parts:
        if not PLAIN_DECIMAL.fullmatch(part):
            raise RequestError(f"{name}: {part[:40]!r} is not a number written like 0.25", field)
        number = round(float(part), 4) + 0.0  # -0 is 0
        if number in values:
            also = "" if values[number] == part else f" (also as {values[number]})"
            raise RequestError(f"{name}: {part} is listed twice{also}", field)
        values[number] = part
    if len(values) > limit:
        raise RequestError(f"{name}: at most {limit} values, got {len(values)}", field)
    return tuple(values)


def shown(value: Any) -> str:
    """A client's value as it would have typed it: null, a list or 'text', never a Python repr dump."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        kind = "list" if isinstance(value, (list, tuple)) else "JSON object"
        return f"a {kind} ({_clipped(json.dumps(value, default=str), 60)})"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"{value:.3g}"  # 1e+300, not three hundred digits
    return _clipped(repr(value), 80)


def _clipped(shown_text: str, limit: int) -> str:
    return shown_text if len(shown_text) <= limit else shown_text[: limit - 3] + "..."
