"""Strict settings, checked when the config is built (issue 17, point 4).

- every shipped profile and every deployment of ``prefect.yaml`` builds;
- a table of invalid values across the sections: each fails in ``build_config`` (before
  any stage runs) with the field named — no coercion (bool→int, str→int, float→int,
  str→bool, …), and every rule between fields or sections that a stage used to trip
  over minutes later;
- the faithful JSON/TOML spellings still work: a list for a tuple, a string for a path
  or a choice, an integer for a float, one name for a list of names;
- the same rules hold for every source: a profile file, ``--set``, a past run's stored
  config (``gptflow rerun``), the flow's parameters (deployment runs);
- one name per setting: an old name fails with "renamed to …"; no field has a second
  name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import flows.config as config_module
from flows.config import PipelineConfig, build_config, config_to_dict
from flows.profiles import available_profiles
from gpt.config import Args
from gpt.errors import ConfigError

# --------------------------------------------------------------------------- valid


@pytest.mark.parametrize("profile", available_profiles())
def test_every_shipped_profile_builds_and_round_trips_as_json(profile: str) -> None:
    cfg = build_config(profile)
    stored = json.loads(json.dumps(config_to_dict(cfg)))  # as runs.config holds it
    assert build_config(profile, base=stored) == cfg


def test_every_deployment_of_prefect_yaml_builds() -> None:
    from flows.deployment import check_parameters, read_prefect_yaml

    assert check_parameters(read_prefect_yaml()) >= 3  # nightly, smoke, judge-rescore


def test_a_bad_deployment_parameter_is_refused_before_deploying() -> None:
    from flows.deployment import DeploymentError, check_parameters

    spec = {
        "deployments": [
            {
                "name": "nightly",
                "parameters": {"profile": "cpu", "overrides": ["pretrain.epochs=true"]},
            },
        ]
    }
    with pytest.raises(DeploymentError, match=r"'nightly'.*pretrain\.epochs"):
        check_parameters(spec)


#: Faithful spellings of a value in JSON or TOML, and what they mean.
VALID = [
    ("device=cuda:1", "device", "cuda:1"),
    ("device=cuda:0", "device", "cuda:0"),
    ("device=cuda", "device", "cuda"),
    ("device=mps", "device", "mps"),
    ("device=cpu", "device", "cpu"),
    ("device=auto", "device", "auto"),
    ("tokenize.spam_ratios=[0.6, 0.2, 0.2]", "tokenize.spam_ratios", (0.6, 0.2, 0.2)),
    ('baseline_spam.features=["tfidf"]', "baseline_spam.features", ("tfidf",)),
    ("judge.models=phi3", "judge.models", ("phi3",)),
    ('judge.models=["a", "b"]', "judge.models", ("a", "b")),
    ("pretrain.lr=1", "pretrain.lr", 1.0),
    ("catalog.path=/tmp/x.duckdb", "catalog.path", Path("/tmp/x.duckdb")),
    ('load_gpt2.source="hf"', "load_gpt2.source", "hf"),
    ('pretrain.model.overrides={"n_layers": 1, "drop_rate": 0}', "pretrain.model.overrides",
     {"n_layers": 1, "drop_rate": 0}),
    ("finetune_spam.trainable_blocks=2", "finetune_spam.trainable_blocks", 2),
    ("judge.hosts=localhost:11434", "judge.hosts", ("localhost:11434",)),
    ('judge.hosts=["http://a:1", "https://b.example/ollama"]', "judge.hosts",
     ("http://a:1", "https://b.example/ollama")),
    ("judge.hosts=http://[::1]:11434", "judge.hosts", ("http://[::1]:11434",)),
]  # fmt: skip


@pytest.mark.parametrize(("item", "path", "want"), VALID, ids=[v[0] for v in VALID])
def test_faithful_spellings_are_accepted(item: str, path: str, want: Any) -> None:
    got: Any = build_config("smoke", [item])
    for part in path.split("."):
        got = getattr(got, part)
    assert got == want and type(got) is type(want)


# --------------------------------------------------------------------------- invalid

#: (override, the field the error must name). Each one used to be coerced, or accepted
#: and then failed (or silently did something else) inside a stage.
INVALID = [
    # the examples
    ("pretrain.epochs=true", "pretrain.epochs"),
    ('pretrain.epochs="3"', "pretrain.epochs"),
    ('pretrain.model.overrides={"bogus": 1}', "pretrain.model.overrides.bogus"),
    ("tokenize.spam_ratios=[0.5, 0.5, 0.5]", "tokenize.spam_ratios"),
    ("judge.host=http://h:1", "judge.host"),
    ("judge.model=llama3", "judge.model"),
    ("device=cuda:x", "device"),
    # no coercion
    ("pretrain.epochs=3.0", "pretrain.epochs"),
    ("pretrain.epochs=2.5", "pretrain.epochs"),
    ("pretrain.lr=true", "pretrain.lr"),
    ('pretrain.lr="4e-4"', "pretrain.lr"),
    ("pretrain.cosine=1", "pretrain.cosine"),
    ("pretrain.cosine=yes", "pretrain.cosine"),
    ("finetune_spam.batch_size=false", "finetune_spam.batch_size"),
    ("finetune_spam.prefix_cache=0", "finetune_spam.prefix_cache"),
    ("finetune_instruct.max_length=1024.0", "finetune_instruct.max_length"),
    ('extract_responses.max_new_tokens="12"', "extract_responses.max_new_tokens"),
    ("judge.temperature=false", "judge.temperature"),
    ("judge.repeats=1.0", "judge.repeats"),
    ("judge.models=[1]", "judge.models.0"),
    ("judge.structured=1", "judge.structured"),
    ("gates.fail_run=1", "gates.fail_run"),
    ("gates.bootstrap_resamples=1e4", "gates.bootstrap_resamples"),
    ("tokenize.spam_ratios=[0.7, 0.1, true]", "tokenize.spam_ratios.2"),
    ('tokenize.spam_ratios=["0.7", 0.1, 0.2]', "tokenize.spam_ratios.0"),
    ("tokenize.spam_seed=1.5", "tokenize.spam_seed"),
    ("baseline_spam.C=true", "baseline_spam.C"),
    ('baseline_spam.features="bow"', "baseline_spam.features"),
    ("download.retries=2.0", "download.retries"),
    ('pretrain.distributed={"nproc": "2"}', "pretrain.distributed.nproc"),
    ("catalog.path=3", "catalog.path"),
    ("placement.pretrain=1", "placement.pretrain"),
    ('pretrain.model.overrides={"n_layers": true}', "pretrain.model.overrides.n_layers"),
    ('pretrain.model.overrides={"drop_rate": "0.1"}', "pretrain.model.overrides.drop_rate"),
    ('pretrain.model.overrides={"qkv_bias": 1}', "pretrain.model.overrides.qkv_bias"),
    # rules a stage used to trip over minutes later
    ('pretrain.model.overrides={"emb_dim": 33}', "pretrain.model.overrides"),
    ('pretrain.model.overrides={"vocab_size": 1000}', "pretrain.model.overrides.vocab_size"),
    ("pretrain.model.name=gpt9", "pretrain.model.name"),
    ("tokenize.max_length=65", "tokenize.max_length"),  # smoke: tiny's context is 64
    ("tokenize.spam_ratios=[0.8, 0.2, 0.0]", "tokenize.spam_ratios"),
    ("tokenize.spam_ratios=[0.7, 0.3]", "tokenize.spam_ratios.2"),
    ("tokenize.instruct_test=0.2", "tokenize.instruct_test"),  # 0.85 + 0.2 > 1
    ("finetune_spam.trainable_blocks=3", "finetune_spam.trainable_blocks"),  # tiny: 2
    ("baseline_spam.train_split=validation", "baseline_spam.train_split"),
    ("pretrain.min_lr=1", "pretrain.min_lr"),
    ('finetune_spam.distributed={"nproc": 3}', "finetune_spam.distributed"),
    ('pretrain.distributed={"nnodes": 2}', "pretrain.distributed.rdzv_endpoint"),
    ("device=cuda:01", "device"),
    ("device=gpu", "device"),
    ("device=CUDA", "device"),
    ("device=cuda:-1", "device"),
    # judge URLs: a typo shows here, not at the judge stage hours later
    ("judge.hosts=htp://localhost:11434", "judge.hosts"),
    ("judge.hosts=http//localhost:11434", "judge.hosts"),
    ("judge.hosts=http://localhost:11434x", "judge.hosts"),
    ("judge.hosts=http://localhost:99999", "judge.hosts"),
    ("judge.hosts=http://a:1,http://b:2", "judge.hosts"),
    ("judge.hosts=http://", "judge.hosts"),
    ("judge.hosts=http://local host:1", "judge.hosts"),
    ('judge.hosts=["http://a:1", "http://b_c:2"]', "judge.hosts"),
]


@pytest.mark.parametrize(("item", "field"), INVALID, ids=[v[0] for v in INVALID])
def test_invalid_value_fails_when_the_config_is_built(item: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config("smoke", [item])
    msg = str(info.value)
    assert f"{field}:" in msg, msg
    assert "\n" not in msg


def test_the_table_covers_every_section() -> None:
    assert len(INVALID) >= 30
    named = {field.split(".")[0] for _, field in INVALID}
    sections = {
        n for n, f in PipelineConfig.model_fields.items() if isinstance(f.annotation, type)
    } - {"profile"}
    sections -= {"load_gpt2"}  # every field a choice or a bounded int: covered below
    assert sections <= named, sections - named


def test_rules_across_sections_follow_the_base_model() -> None:
    # a GPT-2 base has 12 blocks: 3 trainable is fine there, 13 is not
    gpt2 = ["load_gpt2.base_model=gpt2"]
    assert build_config("smoke", [*gpt2, "finetune_spam.trainable_blocks=3"])
    with pytest.raises(ConfigError, match=r"finetune_spam\.trainable_blocks: 13 but GPT-2 124M"):
        build_config("smoke", [*gpt2, "finetune_spam.trainable_blocks=13"])
    with pytest.raises(ConfigError, match=r"load_gpt2\.spam_size: .*'124m'"):
        build_config("smoke", ["load_gpt2.spam_size=124m"])
    with pytest.raises(ConfigError, match=r"load_gpt2\.sample_tokens"):
        build_config("smoke", ["load_gpt2.sample_tokens=true"])
    # one GPU named, but two processes of a training stage
    with pytest.raises(ConfigError, match=r"device: 'cuda:1' pins one GPU.*pretrain"):
        build_config("smoke", ["device=cuda:1", 'pretrain.distributed={"nproc": 2}'])
    assert build_config("smoke", ["device=cuda", 'pretrain.distributed={"nproc": 2}'])


# --------------------------------------------------------------------------- sources


def test_a_profile_file_is_as_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.toml").write_text(
        "[pretrain]\nepochs = 2.0\n[tokenize]\nspam_ratios = [0.7, 0.1, 0.2]\n", encoding="utf-8"
    )
    monkeypatch.setattr(config_module, "PROFILES_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"profile 'mine'.*pretrain\.epochs: .*got 2\.0"):
        build_config("mine")
    (tmp_path / "mine.toml").write_text(
        "[pretrain]\nepochs = 2\n[tokenize]\nspam_ratios = [0.7, 0.1, 0.2]\n", encoding="utf-8"
    )
    assert build_config("mine").tokenize.spam_ratios == (0.7, 0.1, 0.2)


def test_a_stored_config_is_as_strict_and_old_names_are_upgraded() -> None:
    stored = json.loads(json.dumps(config_to_dict(build_config("smoke"))))
    coerced = json.loads(json.dumps(stored))
    coerced["pretrain"]["epochs"] = True
    with pytest.raises(ConfigError, match=r"pretrain\.epochs: .*got True"):
        build_config("smoke", base=coerced)
    bogus = json.loads(json.dumps(stored))
    bogus["pretrain"]["model"]["overrides"] = {"bogus": 1}
    with pytest.raises(ConfigError, match=r"pretrain\.model\.overrides\.bogus"):
        build_config("smoke", base=bogus)
    # a run recorded before judge.host/model became hosts/models reruns
    old = json.loads(json.dumps(stored))
    old["judge"]["host"] = old["judge"].pop("hosts")[0]
    old["judge"]["model"] = old["judge"].pop("models")[0]
    assert build_config("smoke", base=old) == build_config("smoke")


def test_flow_parameters_are_as_strict() -> None:
    """A deployment run's parameters: the config and the flow's own parameters."""
    from prefect.exceptions import ParameterTypeError

    from flows.judge_flow import gptflow_judge
    from flows.pipeline import gptflow_pipeline

    stored = json.loads(json.dumps(config_to_dict(build_config("smoke"))))
    got = gptflow_pipeline.validate_parameters({"config": stored})
    assert got["config"] == build_config("smoke")
    for section, name, value in [
        ("pretrain", "epochs", "3"),
        ("tokenize", "spam_ratios", [0.5, 0.5, 0.5]),
        (None, "device", "cuda:x"),
    ]:
        bad = json.loads(json.dumps(stored))
        (bad[section] if section else bad)[name] = value
        with pytest.raises(ParameterTypeError, match=name):
            gptflow_pipeline.validate_parameters({"config": bad})
    for params in ({"progress": "yes"}, {"verify": "ful"}, {"overrides": [1]}):
        with pytest.raises(ParameterTypeError):
            gptflow_pipeline.validate_parameters(params)
    with pytest.raises(ParameterTypeError):
        gptflow_judge.validate_parameters({"required": "false"})


# --------------------------------------------------------------------------- names


def _settings_classes() -> list[type[Args]]:
    out: list[type[Args]] = []
    todo = [Args]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def test_one_name_per_setting() -> None:
    classes = _settings_classes()
    assert PipelineConfig in classes and len(classes) >= 10
    for cls in classes:
        for name, f in cls.model_fields.items():
            assert f.alias is None and f.validation_alias is None, f"{cls.__name__}.{name}"
        for old, new in cls.renamed.items():
            assert old not in cls.model_fields and new in cls.model_fields, (cls, old)


@pytest.mark.parametrize(("old", "new"), [("host", "hosts"), ("model", "models")])
def test_an_old_name_says_what_it_was_renamed_to(old: str, new: str) -> None:
    with pytest.raises(ConfigError, match=rf"judge\.{old}: renamed to {new}"):
        build_config("smoke", [f"judge.{old}=x"])


def test_cuda_n_resolves_to_that_gpu_and_a_missing_one_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the device is used: ``cuda:N`` is that GPU; an index this machine lacks is
    a one-line error (no GPU here: CUDA's answers are stood in for)."""
    import torch

    from gpt.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'cuda:2' requested but this machine has 2 CUDA"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match=r"device 'cuda:x' is not a device; use auto, cpu"):
        resolve_device("cuda:x")
