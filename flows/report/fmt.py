"""Numbers, times and text formatted for people: ``1 min 3 s``, ``95.7 %``, ``46,080``,
``0.633``; a missing value is an em dash, never ``nan``, ``None`` or ``<NA>``; long text
is shortened at a word boundary, never inside a word."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

#: What a missing value looks like.
MISSING = "—"


def is_missing(value: Any) -> bool:
    """None, NaN, pandas' NA/NaT, or an empty string."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or array: not a missing scalar
        return False


def _float(value: Any) -> float | None:
    if is_missing(value):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def number(value: Any) -> str:
    """A measurement with a sensible number of digits: ``1,234``, ``147``, ``12.5``,
    ``6.37``, ``0.633``, ``0.0042``."""
    f = _float(value)
    if f is None:
        return MISSING
    if f == int(f) and abs(f) < 1e15:
        return f"{int(f):,}"
    a = abs(f)
    if a >= 100:
        return f"{f:,.0f}"
    if a >= 10:
        return f"{f:.1f}"
    if a >= 1:
        return f"{f:.2f}"
    return f"{f:.3g}"


def loss(value: Any) -> str:
    """A loss with three decimals below 10 (``0.633``, ``6.368``), two above (``10.98``)."""
    f = _float(value)
    if f is None:
        return MISSING
    return f"{f:.3f}" if abs(f) < 10 else f"{f:,.2f}"


def plural(n: Any, word: str) -> str:
    """``1 window``, ``17 windows`` (count formatted)."""
    f = _float(n)
    return f"{count(n)} {word}" + ("" if f is not None and round(f) == 1 else "s")


def count(value: Any) -> str:
    """An integer count with thousands separators."""
    f = _float(value)
    return MISSING if f is None else f"{round(f):,}"


def percent(value: Any, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage: ``0.9567`` → ``95.7 %``."""
    f = _float(value)
    return MISSING if f is None else f"{100 * f:.{digits}f} %"


def duration(seconds: Any) -> str:
    """``0.6 s``, ``12 s``, ``1 min 3 s``, ``2 h 5 min``."""
    f = _float(seconds)
    if f is None or f < 0:
        return MISSING
    if f < 10:
        return f"{f:.1f} s"
    s = round(f)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m} min {s} s" if s else f"{m} min"
    h, rest = divmod(s, 3600)
    m = rest // 60
    return f"{h} h {m} min" if m else f"{h} h"


def timestamp(value: Any) -> str:
    """A UTC time to the second: ``2026-11-29 03:00:12 UTC``."""
    if is_missing(value):
        return MISSING
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return value if isinstance(value, str) else MISSING


def size(nbytes: Any) -> str:
    """Bytes in kB / MB / GB (powers of 1000)."""
    f = _float(nbytes)
    if f is None:
        return MISSING
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if f >= scale:
            return f"{f / scale:.1f} {unit}"
    return f"{int(f)} B"


def shorten(text: Any, width: int = 120) -> str:
    """``text`` on one line, cut at the last word boundary before ``width`` characters
    with an ellipsis; a first word longer than ``width`` is kept whole."""
    if is_missing(text):
        return MISSING
    flat = " ".join(str(text).split())
    if len(flat) <= width:
        return flat
    cut = flat.rfind(" ", 0, width)
    if cut <= 0:
        cut = flat.find(" ")
        if cut < 0:
            return flat
    return flat[:cut].rstrip(" ,;:") + " …"


def yes_no(value: Any) -> str:
    """``yes`` / ``no`` (missing → em dash)."""
    return MISSING if is_missing(value) else ("yes" if bool(value) else "no")
