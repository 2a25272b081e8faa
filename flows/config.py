"""The pipeline's typed configuration: one section per stage, named profiles, and the
``--set stage.field=value`` override parser.

Profiles are TOML files in ``flows/profiles/`` holding only the fields they change from
the defaults below; every value is validated here, so a typo in a profile or an override
is an error naming the field, never silently ignored.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpt.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "cpu"

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


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False
    )


class DownloadConfig(_Section):
    mirror: str | None = None
    """Local folder or http(s) base URL laid out like the remote files (GPTFLOW_MIRROR
    overrides when unset). Only where bytes come from: checksums are verified either way."""
    retries: int = Field(3, ge=0, le=10)
    """Prefect-level retries of the download task on network failure."""


class TokenizeConfig(_Section):
    train_ratio: float = Field(0.9, gt=0, lt=1)
    """Pretraining text split by characters: this share is train, the rest validation."""
    text_chars: int | None = Field(None, gt=0)
    """Use only the first N characters of the pretraining text (smoke runs)."""
    spam_seed: int = 123
    """Seed of ham undersampling and of the shuffle before the 70/10/20 split."""
    spam_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    """Train/validation/test shares of the balanced SMS set."""
    spam_limit: int | None = Field(None, gt=0)
    """Keep at most N examples per spam split (smoke runs); None keeps all."""
    instruct_train: float = Field(0.85, gt=0, lt=1)
    """Share of instruction records for training (in file order unless shuffled)."""
    instruct_test: float = Field(0.10, gt=0, lt=1)
    """Share for the test split; the rest is validation."""
    instruct_shuffle_seed: int | None = None
    """Shuffle instruction records with this seed before splitting; None keeps file order."""
    instruct_limit: int | None = Field(None, gt=0)
    """Keep at most N records per instruction split (smoke runs)."""


class ModelSpec(_Section):
    name: str = "gpt2-small-256"
    """A name from gpt.model.CONFIGS."""
    overrides: dict[str, int | float | bool | str] = Field(default_factory=dict)
    """GPTConfig fields to change, e.g. {"n_layers": 2, "emb_dim": 64}."""


class PretrainConfig(_Section):
    model: ModelSpec = Field(default_factory=ModelSpec)
    """Architecture of the model trained from scratch."""
    max_length: int = Field(256, gt=1)
    """Window length in tokens (the reference uses the context length, 256)."""
    stride: int = Field(256, gt=0)
    """Step between window starts."""
    epochs: int = Field(10, gt=0)
    """Passes over the training windows."""
    batch_size: int = Field(2, gt=0)
    """Windows per step."""
    lr: float = Field(4e-4, gt=0)
    """AdamW peak learning rate."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps (0 = none, as in the reference)."""
    cosine: bool = False
    """Cosine decay to min_lr after warmup."""
    min_lr: float = Field(0.0, ge=0)
    """Floor of the cosine schedule."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradient norm to this value; None disables."""
    eval_every: int = Field(5, gt=0)
    """Evaluate train/val loss every N steps."""
    eval_batches: int = Field(5, gt=0)
    """Batches per evaluation."""
    checkpoint_every: int = Field(50, ge=0)
    """Write a resumable checkpoint every N steps (0 = only at the end)."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after N optimizer steps (smoke runs)."""
    seed: int = 123
    """Seed of model init, data order and dropout."""
    sample_prompt: str = "Every effort moves you"
    """Prompt of the greedy sample generated after each epoch."""
    sample_tokens: int = Field(50, gt=0)
    """Tokens in each sample."""


class LoadGPT2Config(_Section):
    base_model: Literal["gpt2", "scratch"] = "gpt2"
    """'gpt2': download and import OpenAI's weights; 'scratch': use the pretrain
    checkpoint as the base of the finetune stages (explicit, recorded in runs)."""
    spam_size: Literal["124M", "355M", "774M", "1558M"] = "124M"
    """GPT-2 release size the spam classifier starts from when base_model is 'gpt2'."""
    instruct_size: Literal["124M", "355M", "774M", "1558M"] = "355M"
    """GPT-2 release size the instruction finetune starts from when base_model is 'gpt2'."""
    source: Literal["openai", "hf"] = "openai"
    """Where the GPT-2 weights come from: 'openai' = OpenAI's TensorFlow release (needs
    TensorFlow, as in the reference); 'hf' = the same weights in the Hugging Face
    safetensors layout (openai-community/gpt2*, no TensorFlow). Same downloader, mirror
    (gpt2-hf/<size>/) and checksum rules."""
    sample_prompt: str = "Every effort moves you"
    """Prompt of the greedy sample recorded for the base model."""
    sample_tokens: int = Field(25, gt=0)
    """Tokens in that sample."""


class SpamConfig(_Section):
    trainable_blocks: int = Field(1, ge=0)
    """How many of the last transformer blocks train (the rest stay frozen)."""
    train_final_norm: bool = True
    """Train the final LayerNorm too (the reference does)."""
    epochs: int = Field(5, gt=0)
    """Passes over the training split."""
    batch_size: int = Field(8, gt=0)
    """Messages per step."""
    lr: float = Field(5e-5, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""
    max_length: int | None = Field(None, gt=0)
    """Pad/truncate messages to N tokens; None pads to the longest training message."""
    pool: Literal["last", "last_real"] = "last"
    """Which position's logits classify: the last (padded) one as in the reference, or the
    last real token."""
    prefix_cache: bool = True
    """Compute the frozen blocks' activations once instead of every epoch."""
    seed: int = 123
    """Seed of the head init and batch order."""


class BaselineConfig(_Section):
    C: float = Field(1.0, gt=0)
    """Inverse regularisation strength of the logistic regression."""
    max_iter: int = Field(1000, gt=0)
    """Solver iterations."""
    seed: int = 123
    """Solver seed."""


class InstructConfig(_Section):
    epochs: int = Field(2, gt=0)
    """Passes over the training records."""
    batch_size: int = Field(8, gt=0)
    """Records per step."""
    lr: float = Field(5e-5, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""
    max_length: int = Field(1024, gt=8)
    """Truncate prompt+response to N tokens."""
    mask_prompt: bool = False
    """Ignore the prompt tokens in the loss (the reference does not)."""
    length_bucketing: bool = False
    """Group records of similar length into batches to cut padding."""
    eval_every: int = Field(5, gt=0)
    """Evaluate train/val loss every N steps."""
    eval_batches: int = Field(5, gt=0)
    """Batches per evaluation."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after N steps (smoke runs)."""
    seed: int = 123
    """Seed of batch order."""


class ExtractConfig(_Section):
    max_new_tokens: int = Field(256, gt=0)
    """Greedy tokens generated per test example at most (stops at end-of-text)."""
    batch_size: int = Field(8, gt=0)
    """Prompts generated together."""


class JudgeSection(_Section):
    required: bool = False
    """If true, an unreachable Ollama or missing model fails the flow; else the stage is
    Skipped with the fix recorded."""
    host: str | None = None
    """Ollama URL; None uses OLLAMA_HOST or http://localhost:11434."""
    model: str = "llama3"
    """Judge model name on the Ollama server."""
    concurrency: int = Field(4, gt=0, le=64)
    """Requests in flight at once."""
    timeout_s: float = Field(120.0, gt=0)
    """Per-request timeout."""
    retries: int = Field(3, ge=0)
    """Retries on connection errors and 5xx replies."""
    auto_pull: bool = False
    """Pull the model if the server lacks it."""
    seed: int = 123
    """Sampling seed sent to Ollama."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature sent to Ollama."""
    num_ctx: int = Field(2048, gt=0)
    """Context window asked of Ollama."""


class PipelineConfig(_Section):
    """Everything one pipeline run depends on."""

    profile: str = DEFAULT_PROFILE
    """Name of the profile these values came from (recorded in `runs`)."""
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    load_gpt2: LoadGPT2Config = Field(default_factory=LoadGPT2Config)
    finetune_spam: SpamConfig = Field(default_factory=SpamConfig)
    baseline_spam: BaselineConfig = Field(default_factory=BaselineConfig)
    finetune_instruct: InstructConfig = Field(default_factory=InstructConfig)
    extract_responses: ExtractConfig = Field(default_factory=ExtractConfig)
    judge: JudgeSection = Field(default_factory=JudgeSection)


def available_profiles() -> list[str]:
    """Names of the profiles shipped in flows/profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``stage.field[.sub]=value``; the value is read as JSON when it parses
    (numbers, true/false, null, lists, objects), else taken as a plain string."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} must look like stage.field=value")
    key, _, raw = item.partition("=")
    path = key.strip().split(".")
    if len(path) < 2 or not all(p.isidentifier() for p in path):
        raise ConfigError(
            f"override {item!r}: key {key!r} must be dotted identifiers, e.g. pretrain.epochs"
        )
    raw = raw.strip()
    try:
        value: Any = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        value = raw
    return path, value


def _format_validation(exc: ValidationError, origin: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    return f"invalid configuration ({origin}): " + "; ".join(parts)


def load_profile_dict(name: str) -> dict[str, Any]:
    """The raw values of profile ``name``."""
    path = PROFILES_DIR / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"unknown profile {name!r}; available: {', '.join(available_profiles())}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile file {path} is not valid TOML: {exc}") from exc


def build_config(
    profile: str = DEFAULT_PROFILE,
    overrides: list[str] | None = None,
    *,
    base: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Defaults, then the profile (or ``base``, e.g. a stored run's config), then each
    ``--set`` override, validated as a whole."""
    values = base if base is not None else load_profile_dict(profile)
    values = _deep_merge(values, {"profile": values.get("profile", profile)})
    for item in overrides or []:
        path, value = parse_override(item)
        if path[0] not in PipelineConfig.model_fields or path[0] == "profile":
            raise ConfigError(
                f"override {item!r}: unknown stage {path[0]!r}; stages: {', '.join(STAGES)}"
            )
        patch: dict[str, Any] = {path[-1]: value}
        for part in reversed(path[:-1]):
            patch = {part: patch}
        values = _deep_merge(values, patch)
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, f"profile {profile!r}")) from exc


def config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """A JSON-able dict of the config (for the catalog and cache keys)."""
    return cfg.model_dump(mode="json")
