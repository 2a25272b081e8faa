"""Values as plain JSON: the one conversion every record, row buffer, typed stage result
and printed table uses, so a value reads the same wherever it was written."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

_MISSING_TYPES = ("NaTType", "NAType")


def plain(value: Any) -> Any:
    """``value`` as plain JSON values, nested: numpy scalars and arrays as Python numbers
    and lists; missing values (NaN, inf, pandas' NaT and NA) as None; datetimes as ISO
    text in UTC (``2024-05-01 12:00:00``, as the catalog stores them: naive = UTC); dates
    and times as ISO text; pydantic models and dataclasses as their fields; mapping keys
    and anything else (paths, …) as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if type(value).__name__ in _MISSING_TYPES:
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if hasattr(value, "model_dump"):  # a pydantic model
        return plain(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if hasattr(value, "tolist") and not isinstance(value, PurePath):  # numpy arrays, scalars
        return plain(value.tolist())
    return str(value)


def plain_rows(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame's rows as plain dicts (:func:`plain`)."""
    return plain(frame.to_dict("records"))
