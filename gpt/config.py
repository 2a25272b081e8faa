"""The base of every settings model the library takes.

Each stage's settings are declared once, as a subclass of :class:`Args` next to the code
that uses them (``gpt.recipes.pretrain.PretrainArgs``, ``gpt.eval.judge.settings.JudgeConfig``,
…). The pipeline's config is built from these same classes, so a profile value, a
``--set`` override, a flow parameter and a cache key all mean one field of one type.

Construction is strict: an unknown field, a wrong type or an out-of-range value raises
:class:`~gpt.errors.ConfigError` naming the field; nothing is dropped or coerced
silently. Instances are frozen (hashable settings, no mutation after validation).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticUndefined

from gpt.errors import ConfigError

__all__ = ["Args", "ArgsError", "format_validation_error", "operational"]


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


def _problems(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ArgsError):
            out += [(".".join(p for p in (path, q) if p), m) for q, m in inner.problems]
        else:
            out.append((path or "(value)", err["msg"]))
    return out


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line naming each bad field: ``where: a.b: msg; c: msg``."""
    return f"{where}: " + "; ".join(f"{loc}: {msg}" for loc, msg in _problems(exc))


class Args(BaseModel):
    """Frozen, strict settings with documented fields (attribute docstrings)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        validate_default=True,
        strict=False,
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
    def _refuse_old_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in cls.renamed.items():
                if old in data:
                    msg = f"renamed to {new}; use {new}"
                    raise ArgsError(f"{old}: {msg}", [(old, msg)])
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
                raise ValueError(f"{name} must be a finite number, got {value!r}")
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
