"""One validation helper for every config and hyperparameter: finite, in range, right type.

Every check raises `ConfigError` (a `ValueError`) whose message names the field, so that a bad value is
refused at once with one clear line instead of turning into a silent NaN or a traceback deep in a
jitted program. NaN and inf fail every numeric check (comparisons with NaN are false, so checks written
as `x > 0` alone would let NaN through); booleans are not accepted as numbers.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator
from typing import Any


class ConfigError(ValueError):
    """A config field or hyperparameter with a bad value; the message names the field."""


class _Deferred(Exception):  # noqa: N818  (not a ValueError, so that command-line parsers let it through)
    pass


_raise_as: contextvars.ContextVar[type[Exception]] = contextvars.ContextVar("raise_as", default=ConfigError)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside this block the checks raise an exception that is not a ValueError (parsers such as tyro
    catch ValueErrors and print their own multi-line report); it leaves the block as a `ConfigError`."""
    token = _raise_as.set(_Deferred)
    try:
        yield
    except _Deferred as error:
        raise ConfigError(str(error)) from None
    finally:
        _raise_as.reset(token)


def fail(message: str) -> None:
    """Raise a `ConfigError(message)` (deferred inside `deferred()`)."""
    raise _raise_as.get()(message)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        fail(f"{name} must be finite, got {value!r}")
    return float(value)


def finite(name: str, value: Any) -> float:
    """`value` is a finite real number."""
    return _number(name, value)


def positive(name: str, value: Any) -> float:
    """`value` is finite and > 0."""
    if _number(name, value) <= 0:
        fail(f"{name} must be > 0, got {value!r}")
    return value


def non_negative(name: str, value: Any) -> float:
    """`value` is finite and >= 0."""
    if _number(name, value) < 0:
        fail(f"{name} must be >= 0, got {value!r}")
    return value


def greater(name: str, value: Any, bound: float) -> float:
    """`value` is finite and > `bound`."""
    if _number(name, value) <= bound:
        fail(f"{name} must be > {bound}, got {value!r}")
    return value


def in_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> float:
    """`value` is finite and in the interval from `low` to `high` (closed unless `*_open`)."""
    x = _number(name, value)
    if (x < low or (low_open and x == low)) or (x > high or (high_open and x == high)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        fail(f"{name} must be in {interval}, got {value!r}")
    return value


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` is an int (not a bool) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        fail(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        fail(f"{name} must be <= {maximum}, got {value}")
    return value


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        fail(f"{name} must be one of {choices}, got {value!r}")
    return value


def check(ok: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `ok` (for relations between fields)."""
    if not ok:
        fail(message)
