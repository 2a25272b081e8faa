"""A stage's cache key: everything that shapes its result, hashed part by part.

The key hashes the stage name, the settings that shape its result
(:meth:`gpt.config.Args.key_dict`), the *content digests* of its inputs, the fingerprint
of the code it runs and the versions of the third-party packages that code imports
(:mod:`tasks.store.fingerprint`), and the sha256 of the files it reads from the datasets
folder. The parts are kept apart (:class:`KeyParts`) so that a recomputation can say
which of them changed (:func:`key_changes`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


def stable_json(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces) for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(value: Any) -> str:
    """The sha256 (hex) of ``value``'s canonical JSON."""
    return hashlib.sha256(stable_json(value).encode()).hexdigest()


@dataclass(frozen=True)
class KeyParts:
    """Everything a stage's key hashes, part by part."""

    stage: str
    settings: dict[str, Any]
    """The settings that shape the result (:meth:`gpt.config.Args.key_dict`)."""
    inputs: dict[str, str | None]
    """Upstream stage -> the content digest of its result."""
    code: str
    """The fingerprint of the code the stage runs."""
    packages: dict[str, str | None] = field(default_factory=dict)
    """Distribution -> version of the third-party packages that code imports."""
    files: dict[str, str] = field(default_factory=dict)
    """Path under the datasets folder -> sha256 of each file the stage reads there."""

    @property
    def key(self) -> str:
        """The cache key (24 hex characters)."""
        return sha256_json(asdict(self))[:24]

    def summary(self) -> dict[str, Any]:
        """The parts as kept in the manifest and the stage's outputs: settings as a short
        digest, the others as they are (small)."""
        return {
            "settings": sha256_json(self.settings)[:16],
            "inputs": self.inputs,
            "code": self.code[:16],
            "packages": self.packages,
            "files": self.files,
        }


def key_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two :meth:`KeyParts.summary` values, one phrase per changed
    part, e.g. ``"packages (scikit-learn 1.4.2 -> 1.5.0)"`` or ``"inputs (tokenize)"``.
    A part the older summary lacks counts as unchanged (it was not recorded then)."""
    out = []
    for part in ("settings", "inputs", "code", "packages", "files"):
        if part not in before or before[part] == after.get(part):
            continue
        label = "input files" if part == "files" else part
        old, new = before[part], after.get(part)
        if isinstance(old, dict) and isinstance(new, dict):
            names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if part == "packages":
                names = [f"{k} {old.get(k) or 'absent'} -> {new.get(k) or 'absent'}" for k in names]
            out.append(f"{label} ({', '.join(names)})")
        else:
            out.append(label)
    return out
