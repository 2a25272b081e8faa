"""Names the command line needs before anything heavy is imported: the stages in DAG
order, the shipped profiles (the TOML files in this folder) and the default one."""

from __future__ import annotations

from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent
DEFAULT_PROFILE = "cpu"

#: The pipeline's stages in DAG order (the config has one section per stage; a test
#: checks that the two agree).
STAGES = (
    "download",
    "tokenize",
    "pretrain",
    "load_gpt2",
    "finetune_spam",
    "baseline_spam",
    "finetune_instruct",
    "extract_responses",
    "judge",
)


def available_profiles() -> list[str]:
    """Names of the profiles shipped in this folder."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
