"""Names the command line needs before anything heavy is imported: the shipped profiles
(the TOML files in this folder) and the default one."""

from __future__ import annotations

from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent
DEFAULT_PROFILE = "cpu"


def available_profiles() -> list[str]:
    """Names of the profiles shipped in this folder."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
