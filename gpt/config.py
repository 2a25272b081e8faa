"""The base of every settings model the library takes.

Each stage's settings are declared once, as a subclass of :class:`Args` next to the code
that uses them (``gpt.recipes.pretrain.PretrainArgs``, ``gpt.eval.judge.settings.JudgeConfig``,
…). The pipeline's config is built from these same classes, so a profile value, a
``--set`` override, a flow parameter and a cache key all mean one field of one type.

Construction is strict: an unknown field, a wrong type or an out-of-range value raises
:class:`~gpt.errors.ConfigError` naming the field; nothing is dropped or coerced
silently. Instances are frozen (hashable settings, no mutation after validation).

Strict means no coercion: ``true`` is not an integer, ``"3"`` is not a number, ``3.0``
is not an integer (an integer is accepted where a float is expected: it is the same
number). Settings arrive as JSON or TOML (profiles, ``--set``, a past run's stored
config, Prefect flow parameters, a distributed worker's arguments), which have no tuple
and no path: a list where a field is a tuple and a string where a field is a path are
the faithful spelling of that value and are taken as such (:func:`faithful`); a string
is also how JSON spells a ``Literal`` choice. Nothing else is converted.

Rules between fields are checked when the settings are built, never later in the stage
that uses them: a rule is a pydantic ``@model_validator(mode="after")`` (or a
``@field_validator``) on the settings class that raises :class:`FieldError` naming the
field it refuses (``raise FieldError("min_lr", "must not exceed lr (…)")``); the error
then names the full path (``pretrain.min_lr: …``). A rule between sections lives on the
pipeline's config class (``flows.config.PipelineConfig``). Every entry point builds the
settings through these classes, so every rule holds for ``gptflow run``, ``rerun``,
deployment runs and the library alike.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import PurePath
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticUndefined

from gpt.errors import ConfigError

__all__ = [
    "Args",
    "ArgsError",
    "FieldError",
    "describe_problems",
    "faithful",
    "format_validation_error",
    "operational",
]


def operational(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A field that changes how a result is computed (where, how fast, how patiently)
    but not the result itself — a server address, a timeout, a concurrency limit. Such
    fields reach the library call like any other but stay out of cache keys."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["operational"] = True
    return Field(default, json_schema_extra=extra, **kwargs)


class ArgsError(ConfigError, ValueError):
    """Invalid settings; ``problems`` holds ``(field path, message)`` pairs. A ValueError
    too, so that settings nested in other settings report the full field path."""

    def __init__(self, message: str, problems: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.problems = problems


class FieldError(ArgsError):
    """A rule between settings refuses ``field`` (a dotted path relative to the settings
    class whose validator raises it): the error names the field's full path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", [(field, message)])


def _problems(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ArgsError):
            out += [(".".join(p for p in (path, q) if p), m) for q, m in inner.problems]
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] not in _NO_INPUT and isinstance(err.get("input"), _SHOWN):
                msg += f", got {err['input']!r}"[:120]
            out.append((path, msg))
    return out


#: Errors whose message says all (the input is a whole section, or absent).
_NO_INPUT = frozenset({"value_error", "assertion_error", "missing", "extra_forbidden"})
#: Inputs short enough to repeat in an error.
_SHOWN = (bool, int, float, str, type(None))


def describe_problems(problems: list[tuple[str, str]]) -> str:
    """``a.b: msg; c: msg`` (a problem of the whole value has no path)."""
    return "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems)


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line naming each bad field: ``where: a.b: msg; c: msg``."""
    return f"{where}: " + describe_problems(_problems(exc))


def faithful(annotation: Any, value: Any) -> Any:
    """``value`` with the JSON/TOML spelling of a tuple (a list) or of a path (a string)
    turned into that type where ``annotation`` expects it, items included; every other
    value is returned unchanged, for strict validation to accept or refuse."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return faithful(args[0], value)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            new = faithful(arm, value)
            if new is not value:
                return new
        return value
    if isinstance(value, list) and (annotation is tuple or origin is tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(faithful(args[0], v) for v in value)
        if len(args) == len(value):
            return tuple(faithful(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)  # the wrong length: validation names it
    if isinstance(value, list) and origin is list and args:
        return [faithful(args[0], v) for v in value]
    if isinstance(value, dict) and origin is dict and len(args) == 2:
        return {k: faithful(args[1], v) for k, v in value.items()}
    if isinstance(value, str) and isinstance(annotation, type) and issubclass(annotation, PurePath):
        return annotation(value)
    return value


class Args(BaseModel):
    """Frozen, strict settings with documented fields (attribute docstrings)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        validate_default=True,
        strict=True,
    )

    renamed: ClassVar[dict[str, str]] = {}
    """Old field names → their new names. Input that uses an old name fails with
    "renamed to …" (one name per setting); :meth:`upgrade` maps stored settings (a past
    run's ``runs.config``) to the new names."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ArgsError(
                format_validation_error(exc, f"invalid {type(self).__name__}"), _problems(exc)
            ) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        """Validate a dict (or an instance); errors are :class:`ArgsError` naming fields."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise ArgsError(
                format_validation_error(exc, f"invalid {cls.__name__}"), _problems(exc)
            ) from None

    @model_validator(mode="before")
    @classmethod
    def _faithful_values(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {
                k: faithful(fields[k].annotation, v) if k in fields else v for k, v in data.items()
            }
        return data

    @model_validator(mode="before")
    @classmethod
    def _refuse_old_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in cls.renamed.items():
                if old in data:
                    raise FieldError(old, f"renamed to {new}; use {new}")
        return data

    @classmethod
    def upgrade(cls, data: Any) -> Any:
        """``data`` (stored settings, possibly written before a field was renamed) with
        every old name of this class and its nested settings replaced by the new one."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for old, new in cls.renamed.items():
            if old in out and new not in out:
                out[new] = out.pop(old)
        for name, f in cls.model_fields.items():
            sub = f.annotation
            if name in out and isinstance(sub, type) and issubclass(sub, Args):
                out[name] = sub.upgrade(out[name])
        return out

    @model_validator(mode="after")
    def _finite(self) -> Self:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise FieldError(name, f"must be a finite number, got {value!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict of every field."""
        return self.model_dump(mode="json")

    @classmethod
    def operational_fields(cls) -> frozenset[str]:
        """Fields declared with :func:`operational`."""
        return frozenset(
            name
            for name, f in cls.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("operational")
        )

    def key_dict(self) -> dict[str, Any]:
        """The fields that shape the result (for cache keys), nested settings included."""
        out: dict[str, Any] = {}
        skip = self.operational_fields()
        for name in type(self).model_fields:
            if name in skip:
                continue
            value = getattr(self, name)
            out[name] = (
                value.key_dict()
                if isinstance(value, Args)
                else self.model_dump(mode="json", include={name})[name]
            )
        return out

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied."""
        return type(self)(**{**self.model_dump(), **changes})
