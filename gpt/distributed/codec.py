"""JSON for what crosses a process boundary: a distributed run's keyword arguments
(going in) and rank 0's result (coming back), and a placed stage's run context and
inputs (a Prefect flow run's parameters, :mod:`tasks.stages.placement`).

Plain JSON values pass as they are; a few types are tagged so they come back as the
same type: paths (``{"__path__": "..."}``), pydantic models (``{"__args__":
"module:Class", "value": model_dump}``, rebuilt with ``model_validate``), dataclasses
(``{"__dataclass__": "module:Class", "fields": {...}}``) and tuples. Anything else is
refused with the argument's name. Decoding rebuilds only pydantic models and
dataclasses (a tag naming any other class is refused), and a dataclass field the
receiving side does not know is refused with the fix (the same version on both sides).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel

from gpt.errors import ConfigError

__all__ = ["decode", "encode", "import_target", "target_path"]

_PATH, _ARGS, _DATACLASS, _TUPLE = "__path__", "__args__", "__dataclass__", "__tuple__"
_TAGS = {_PATH, _ARGS, _DATACLASS, _TUPLE}


def target_path(obj: Any) -> str:
    """``module:qualname`` of an importable function or class."""
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qual or "<" in qual or module == "__main__":
        raise ConfigError(
            f"{obj!r} is not importable by name; pass a module-level function "
            "as 'package.module:function'"
        )
    return f"{module}:{qual}"


def import_target(path: str) -> Any:
    """The object named ``package.module:attr.attr`` (ConfigError when missing)."""
    module, sep, qual = path.partition(":")
    if not sep or not module or not qual:
        raise ConfigError(f"target {path!r} is not 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"target {path!r} cannot be imported: {exc}") from exc
    return obj


def encode(obj: Any, where: str = "value") -> Any:
    """A JSON-able form of ``obj`` (see the module docstring); ``where`` names it in
    errors."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, PurePath):
        return {_PATH: str(obj)}
    if isinstance(obj, BaseModel):
        return {_ARGS: target_path(type(obj)), "value": obj.model_dump(mode="json")}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            _DATACLASS: target_path(type(obj)),
            "fields": {
                f.name: encode(getattr(obj, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(obj)
                if f.init
            },
        }
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str) or k in _TAGS:
                raise ConfigError(f"{where}: dict key {k!r} cannot cross a process boundary")
            out[k] = encode(v, f"{where}.{k}")
        return out
    raise ConfigError(
        f"{where}: a {type(obj).__name__} cannot be passed to or returned from a distributed "
        "run (use JSON values, paths, settings models or dataclasses of those)"
    )


def decode(obj: Any, where: str = "value") -> Any:
    """The inverse of :func:`encode`; ``where`` names the value in errors."""
    if isinstance(obj, list):
        return [decode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if _PATH in obj:
        return Path(obj[_PATH])
    if _ARGS in obj:
        model = import_target(obj[_ARGS])
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError(f"{where}: {obj[_ARGS]} is not a settings model")
        return model.model_validate(obj["value"])
    if _DATACLASS in obj:
        cls = import_target(obj[_DATACLASS])
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"{where}: {obj[_DATACLASS]} is not a dataclass")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(obj["fields"]) - known)
        if unknown:
            raise ConfigError(
                f"{where} fields {unknown} are unknown to this {cls.__qualname__}: run the "
                "same gptflow version on both sides"
            )
        return cls(**{k: decode(v, f"{where}.{k}") for k, v in obj["fields"].items()})
    if _TUPLE in obj:
        return tuple(decode(v, f"{where}[{i}]") for i, v in enumerate(obj[_TUPLE]))
    return {k: decode(v, f"{where}.{k}") for k, v in obj.items()}
