"""The pipeline's typed configuration: one section per stage, named profiles, and the
``--set stage.field=value`` override parser.

Profiles are TOML files in ``flows/profiles/`` holding only the fields they change from
the defaults below; every value is validated here, so a typo in a profile or an override
is an error naming the field, never silently ignored.
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from flows.profiles import DEFAULT_PROFILE, PROFILES_DIR, available_profiles
from gpt.config import Args, ArgsError, FieldError, describe_problems
from gpt.data.download import DownloadArgs
from gpt.data.parsing import SPLITS
from gpt.device import DeviceName
from gpt.distributed.settings import DistributedArgs
from gpt.errors import ConfigError
from gpt.eval.baseline import BaselineArgs
from gpt.eval.gates import GatesArgs
from gpt.eval.judge.settings import JudgeConfig
from gpt.model import GPTConfig, get_config
from gpt.recipes.base import LoadGPT2Args
from gpt.recipes.classifier import SpamArgs
from gpt.recipes.extract import ExtractArgs
from gpt.recipes.instruct import InstructArgs
from gpt.recipes.prepare import PrepareArgs
from gpt.recipes.pretrain import PretrainArgs, windows_problem
from tasks.catalog.settings import CatalogArgs
from tasks.stages import STAGES

#: The stage that cannot be placed on a work pool (see ``PipelineConfig.placement``).
UNPLACEABLE = "download"
#: What a work pool name in ``placement`` may look like.
POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class PipelineConfig(Args):
    """Everything one pipeline run depends on: one section per stage, each the settings
    class the stage's library code itself takes, plus the run-wide ``device``."""

    profile: str = DEFAULT_PROFILE
    """Name of the profile these values came from (recorded in `runs`)."""
    device: DeviceName = "auto"
    """Where every stage that runs a model computes: ``auto`` (CUDA, else MPS, else CPU),
    ``cpu``, ``cuda``, ``cuda:N`` (the GPU of index N; not with a multi-process
    ``distributed`` layout, whose ranks take one GPU each) or ``mps``. Recorded in ``runs.config`` and in each stage's
    outputs; not part of the cache keys (the same computation on another device is the
    same result up to floating-point rounding; use ``--force`` to recompute)."""
    catalog: CatalogArgs = Field(default_factory=CatalogArgs)
    """Which catalog the run's stages write: the DuckDB file (default) or a shared
    DuckLake (``url`` + ``data_path``). Unset fields come from the environment
    (``GPTFLOW_CATALOG_URL``, ``GPTFLOW_CATALOG_DATA_PATH``, ``GPTFLOW_DB``,
    ``GPTFLOW_DB_LOCK_TIMEOUT``); S3 credentials always do. Not part of any cache key
    (the catalog indexes results, it does not shape them)."""
    download: DownloadArgs = Field(default_factory=DownloadArgs)
    """Where the inputs come from."""
    tokenize: PrepareArgs = Field(default_factory=PrepareArgs)
    """Splits of the three datasets and the pretraining windows."""
    pretrain: PretrainArgs = Field(default_factory=PretrainArgs)
    """The GPT trained from scratch."""
    load_gpt2: LoadGPT2Args = Field(default_factory=LoadGPT2Args)
    """The base model of the finetunes."""
    finetune_spam: SpamArgs = Field(default_factory=SpamArgs)
    """The spam classifier finetune."""
    baseline_spam: BaselineArgs = Field(default_factory=BaselineArgs)
    """The scikit-learn baselines on the same splits."""
    finetune_instruct: InstructArgs = Field(default_factory=InstructArgs)
    """The instruction finetune."""
    extract_responses: ExtractArgs = Field(default_factory=ExtractArgs)
    """Greedy responses on the instruction test split."""
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """The Ollama judge."""
    gates: GatesArgs = Field(default_factory=GatesArgs)
    """Regression gates checked at the end of the run (``gates`` table)."""
    placement: dict[str, str] = Field(default_factory=dict)
    """Stages that run on a Prefect work pool instead of in the flow's own process:
    ``{stage: pool}``, e.g. ``{pretrain = "gpu", finetune_instruct = "gpu"}``. A placed
    stage runs as a flow run of the deployment ``gptflow-stage/<pool>`` on a worker of
    that pool, which must see the same artifacts folder (shared storage); its cache key,
    lease, rows and result are the same as in-process. Not part of any cache key (where a
    stage runs does not change its result). ``download`` always runs in the flow."""

    @field_validator("placement")
    @classmethod
    def _placement(cls, value: dict[str, str]) -> dict[str, str]:
        for stage_name, pool in value.items():
            if stage_name not in STAGES:
                raise ValueError(
                    f"placement names no stage {stage_name!r}; stages: {', '.join(STAGES)}"
                )
            if stage_name == UNPLACEABLE:
                raise ValueError(
                    f"placement: {UNPLACEABLE} runs in the flow's own process (its files are "
                    "the inputs every stage reads); place the stages after it"
                )
            if not isinstance(pool, str) or not POOL_NAME.fullmatch(pool):
                raise ValueError(
                    f"placement.{stage_name}: {pool!r} is not a work pool name (letters, "
                    "digits, '-', '_' and '.')"
                )
        return value

    def base_architecture(self, use: Literal["spam", "instruct"]) -> tuple[GPTConfig, str]:
        """The architecture the ``use`` finetune starts from and how to name it: the
        pretrained model (``load_gpt2.base_model = "scratch"``) or a GPT-2 release."""
        if self.load_gpt2.base_model == "scratch":
            return self.pretrain.model.build(), "the scratch base (pretrain.model)"
        size = self.load_gpt2.spam_size if use == "spam" else self.load_gpt2.instruct_size
        return get_config(size), f"GPT-2 {size} (load_gpt2.{use}_size)"

    @model_validator(mode="after")
    def _sections_agree(self) -> Self:
        """Rules between sections, checked with the settings rather than minutes later
        in the stage that would trip over them."""
        problem = windows_problem(self.tokenize.max_length, self.pretrain.model.build())
        if problem:
            raise FieldError("tokenize.max_length", problem)
        spam_base, which = self.base_architecture("spam")
        if self.finetune_spam.trainable_blocks > spam_base.n_layers:
            raise FieldError(
                "finetune_spam.trainable_blocks",
                f"{self.finetune_spam.trainable_blocks} but {which} has only "
                f"{spam_base.n_layers} blocks",
            )
        if self.baseline_spam.train_split not in SPLITS:
            raise FieldError(
                "baseline_spam.train_split",
                f"{self.baseline_spam.train_split!r} is not a split the tokenize stage "
                f"writes; use one of {', '.join(SPLITS)}",
            )
        if self.device.startswith("cuda:"):
            for name in STAGES:
                layout = getattr(getattr(self, name), "distributed", None)
                if isinstance(layout, DistributedArgs) and layout.is_distributed:
                    raise FieldError(
                        "device",
                        f"{self.device!r} pins one GPU but {name}.distributed runs "
                        f"{layout.world_size} processes (one GPU each); use device=cuda",
                    )
        return self


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``stage.field[.sub]=value`` (or ``field=value`` for a run-wide field such
    as ``device``); the value is read as JSON when it parses (numbers, true/false, null,
    lists, objects), else taken as a plain string."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} must look like stage.field=value")
    key, _, raw = item.partition("=")
    path = key.strip().split(".")
    if not all(p.isidentifier() for p in path):
        raise ConfigError(
            f"override {item!r}: key {key!r} must be dotted identifiers, e.g. pretrain.epochs"
        )
    raw = raw.strip()
    try:
        value: Any = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        value = raw
    return path, value


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
    # a stored config (a past run's) may use names since renamed: map them; profiles and
    # overrides must use the current names
    values = PipelineConfig.upgrade(base) if base is not None else load_profile_dict(profile)
    values = _deep_merge(values, {"profile": values.get("profile", profile)})
    for item in overrides or []:
        path, value = parse_override(item)
        if path[0] not in PipelineConfig.model_fields or path[0] == "profile":
            raise ConfigError(
                f"override {item!r}: unknown stage {path[0]!r}; stages: {', '.join(STAGES)}"
                f"; run-wide fields: {', '.join(_run_fields())}"
            )
        if len(path) == 1 and path[0] in STAGES:
            raise ConfigError(
                f"override {item!r}: name a field of the {path[0]} section, e.g. "
                f"{path[0]}.{next(iter(_section_fields(path[0])))}=…"
            )
        patch: dict[str, Any] = {path[-1]: value}
        for part in reversed(path[:-1]):
            patch = {part: patch}
        values = _deep_merge(values, patch)
    try:
        return PipelineConfig.model_validate(values)
    except ArgsError as exc:
        raise ConfigError(
            f"invalid configuration (profile {profile!r}): {describe_problems(exc.problems)}"
        ) from None


def _run_fields() -> list[str]:
    return [f for f in PipelineConfig.model_fields if f not in STAGES and f != "profile"]


def _section_fields(stage: str) -> list[str]:
    annotation = PipelineConfig.model_fields[stage].annotation
    return list(getattr(annotation, "model_fields", {}))


def config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """A JSON-able dict of the config (for the catalog and cache keys)."""
    return cfg.model_dump(mode="json")
