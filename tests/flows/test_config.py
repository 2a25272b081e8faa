"""flows.config: profiles, ``--set`` overrides and validation."""

from __future__ import annotations

import math
import tomllib

import pytest

from flows.config import PipelineConfig, build_config, config_to_dict, parse_override
from flows.profiles import PROFILES_DIR, available_profiles
from gpt.errors import ConfigError
from tasks.stages import STAGES


def _leaves(d: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out: dict[tuple[str, ...], object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(_leaves(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def test_profiles_are_the_toml_files() -> None:
    names = available_profiles()
    assert {"smoke", "cpu", "book"} <= set(names)
    assert names == sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


@pytest.mark.parametrize("profile", ["smoke", "cpu", "book"])
def test_profile_loads_validates_and_holds_its_toml_values(profile: str) -> None:
    cfg = build_config(profile)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.profile == profile
    dumped = config_to_dict(cfg)
    raw = tomllib.loads((PROFILES_DIR / f"{profile}.toml").read_text(encoding="utf-8"))
    leaves = _leaves(raw)
    assert leaves, f"{profile}.toml sets nothing"
    for path, value in leaves.items():
        got: object = dumped
        for part in path:
            got = got[part]  # type: ignore[index]
        if isinstance(value, list):
            value = list(value)
            got = list(got)  # type: ignore[arg-type]
        assert got == value, (path, got, value)


def test_every_stage_has_a_section() -> None:
    cfg = build_config("smoke")
    for stage in STAGES:
        assert stage in PipelineConfig.model_fields
        assert getattr(cfg, stage) is not None


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError) as info:
        build_config("no-such-profile")
    msg = str(info.value)
    assert "no-such-profile" in msg
    for name in available_profiles():
        assert name in msg


def test_unknown_field_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        build_config("smoke", ["pretrain.epochz=3"])
    assert "pretrain.epochz" in str(info.value)


def test_unknown_stage_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        build_config("smoke", ["pretrian.epochs=3"])
    assert "'pretrian'" in str(info.value)
    assert "pretrain" in str(info.value)  # the list of stages


@pytest.mark.parametrize("item", ["pretrain.epochs", "epochs=3", "pretrain..epochs=3", "=3"])
def test_malformed_override_is_a_config_error(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config("smoke", [item])
    assert repr(item) in str(info.value)


def test_out_of_range_value_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        build_config("smoke", ["pretrain.epochs=0"])
    assert "pretrain.epochs" in str(info.value)


@pytest.mark.parametrize(
    "item",
    [
        "pretrain.lr=Infinity",
        "pretrain.lr=NaN",
        "pretrain.min_lr=Infinity",
        "pretrain.grad_clip=1e400",
        "judge.timeout_s=Infinity",
        "tokenize.spam_ratios=[0.7, 0.1, NaN]",
    ],
)
def test_non_finite_floats_are_rejected(item: str) -> None:
    field = item.partition("=")[0]
    with pytest.raises(ConfigError) as info:
        build_config("smoke", [item])
    assert field in str(info.value)
    assert "finite" in str(info.value)


def test_json_values_parse() -> None:
    cfg = build_config(
        "smoke",
        [
            "pretrain.epochs=7",
            "pretrain.lr=2.5e-4",
            "pretrain.cosine=true",
            "pretrain.grad_clip=null",
            "tokenize.spam_ratios=[0.6, 0.2, 0.2]",
            'pretrain.model.overrides={"n_layers": 3, "drop_rate": 0.25}',
        ],
    )
    assert cfg.pretrain.epochs == 7 and isinstance(cfg.pretrain.epochs, int)
    assert math.isclose(cfg.pretrain.lr, 2.5e-4)
    assert cfg.pretrain.cosine is True
    assert cfg.pretrain.grad_clip is None
    assert cfg.tokenize.spam_ratios == (0.6, 0.2, 0.2)
    assert cfg.pretrain.model.overrides == {"n_layers": 3, "drop_rate": 0.25}


def test_parse_override_string_fallback() -> None:
    assert parse_override("pretrain.sample_prompt=Hello world") == (
        ["pretrain", "sample_prompt"],
        "Hello world",
    )
    assert parse_override("judge.hosts = http://127.0.0.1:1 ") == (
        ["judge", "hosts"],
        "http://127.0.0.1:1",
    )
    assert parse_override('judge.models="12"') == (["judge", "models"], "12")
    assert parse_override("pretrain.epochs=3") == (["pretrain", "epochs"], 3)
    deep = "[" * 100_000  # not JSON (and too deep to try): kept as text
    assert parse_override(f"judge.models={deep}") == (["judge", "models"], deep)


def test_string_fallback_reaches_the_config() -> None:
    cfg = build_config(
        "smoke", ["pretrain.sample_prompt=Once upon a time", "judge.models=llama3.1"]
    )
    assert cfg.pretrain.sample_prompt == "Once upon a time"
    assert cfg.judge.models == ("llama3.1",)
    with pytest.raises(ConfigError) as info:  # text where a number belongs
        build_config("smoke", ["pretrain.epochs=many"])
    assert "pretrain.epochs" in str(info.value)


def test_nested_model_override_merges_into_the_profile() -> None:
    base = build_config("smoke")
    assert base.pretrain.model.name == "tiny"
    cfg = build_config("smoke", ['pretrain.model={"name":"mini"}'])
    assert cfg.pretrain.model.name == "mini"
    assert cfg.pretrain.model.overrides == {}
    # the rest of the section keeps the profile's values
    assert cfg.pretrain.epochs == base.pretrain.epochs
    assert cfg.pretrain.epochs == base.pretrain.epochs
    # dotted form, and both combined (later overrides win)
    cfg = build_config("smoke", ["pretrain.model.name=mini", "pretrain.model.overrides.n_layers=1"])
    assert (cfg.pretrain.model.name, cfg.pretrain.model.overrides) == ("mini", {"n_layers": 1})
    with pytest.raises(ConfigError) as info:
        build_config("smoke", ['pretrain.model={"nam":"mini"}'])
    assert "pretrain.model.nam" in str(info.value)


def test_base_dict_replaces_the_profile_and_config_round_trips() -> None:
    cfg = build_config("smoke", ["pretrain.epochs=3"])
    again = build_config("smoke", base=config_to_dict(cfg))
    assert again == cfg
    assert config_to_dict(again)["pretrain"]["epochs"] == 3


def test_config_is_frozen() -> None:
    from pydantic import ValidationError

    cfg = build_config("smoke")
    with pytest.raises(ValidationError):
        cfg.pretrain.epochs = 99  # type: ignore[misc]
