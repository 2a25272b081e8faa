"""The pipeline's scale-out settings, without running anything heavy:

- ``distributed`` on the three training sections (``--set``, cache keys, the batch split
  and the spam finetune's DDP-only rule checked with the settings);
- the ``catalog`` section: what it resolves to against the environment, that the run's
  context carries the resolved catalog and never S3 credentials, and that the commands
  that read the catalog share one ``--db`` resolution.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from flows.config import build_config, config_to_dict
from flows.run_start import make_context
from gpt.distributed import DistributedArgs
from gpt.errors import CatalogError, ConfigError
from tasks.catalog import Catalog, CatalogArgs, CatalogSettings
from tasks.stages.contract import RunContext

TRAINING = ("pretrain", "finetune_spam", "finetune_instruct")
LAKE_URL = "ducklake:postgres:dbname=lake host=127.0.0.1 port=5999 user=gptflow"


# --------------------------------------------------------------------------- distributed


def test_distributed_set_from_the_command_line_stays_out_of_the_keys() -> None:
    one = build_config("smoke")
    two = build_config(
        "smoke",
        [
            'pretrain.distributed={"nproc": 2}',
            "finetune_spam.distributed.nproc=2",
            'finetune_instruct.distributed={"nproc": 2, "backend": "gloo"}',
        ],
    )
    for stage in TRAINING:
        section = getattr(two, stage)
        assert section.distributed.nproc == 2 and section.distributed.world_size == 2
        assert getattr(one, stage).distributed == DistributedArgs()
        # the layout is operational: the same cache key as one process
        assert section.key_dict() == getattr(one, stage).key_dict()
        assert "distributed" not in section.key_dict()
    assert two.finetune_instruct.distributed.backend == "gloo"
    assert config_to_dict(two)["pretrain"]["distributed"]["nproc"] == 2  # recorded in runs


def test_a_batch_that_does_not_split_is_refused_with_the_settings() -> None:
    # smoke: pretrain batch 4, spam batch 8, instruct batch 4
    for stage in TRAINING:
        with pytest.raises(
            ConfigError, match=rf"{stage}.distributed: .*batch_size=\d+ cannot be split evenly"
        ):
            build_config("smoke", [f'{stage}.distributed={{"nproc": 3}}'])
    with pytest.raises(ConfigError, match="supports 'ddp' only"):
        build_config("smoke", ['finetune_spam.distributed={"nproc": 2, "strategy": "fsdp"}'])
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        build_config("smoke", ['pretrain.distributed={"nnodes": 2}'])
    lm = build_config("smoke", ['pretrain.distributed={"nproc": 2, "strategy": "fsdp"}'])
    assert lm.pretrain.distributed.strategy == "fsdp"


# --------------------------------------------------------------------------- catalog section


def test_catalog_section_defaults_to_the_environment(tmp_path: Path) -> None:
    env = {"GPTFLOW_DB": str(tmp_path / "env.duckdb"), "GPTFLOW_DB_LOCK_TIMEOUT": "9"}
    s = CatalogArgs().resolve(env)
    assert not s.is_lake and s.file_path() == tmp_path / "env.duckdb" and s.lock_timeout == 9
    s = CatalogArgs(path=tmp_path / "cfg.duckdb", lock_timeout=3).resolve(env)
    assert s.file_path() == tmp_path / "cfg.duckdb" and s.lock_timeout == 3
    # a lake from the config; data path and S3 credentials from the environment
    lake_env = {
        **env,
        "GPTFLOW_CATALOG_DATA_PATH": "s3://bucket/lake",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }
    s = CatalogArgs(url=LAKE_URL).resolve(lake_env)
    assert s.is_lake and s.data_path == "s3://bucket/lake/" and s.on_s3
    assert s.s3.key_id == "key" and s.s3.secret is not None
    assert s.s3.secret.get_secret_value() == "s3cr3t"
    # a lake from the environment, its data path from the config
    env_lake = {"GPTFLOW_CATALOG_URL": LAKE_URL, "GPTFLOW_CATALOG_DATA_PATH": str(tmp_path)}
    s = CatalogArgs(data_path=str(tmp_path / "other")).resolve(env_lake)
    assert s.url == LAKE_URL and s.data_path == f"{tmp_path / 'other'}/"
    assert CatalogArgs(path=tmp_path / "f.duckdb").resolve(env_lake).is_lake is False


def test_catalog_section_refuses_secrets_and_contradictions(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"catalog\.url: .*keep the password out"):
        build_config("smoke", [f"catalog.url={LAKE_URL} password=hush"])
    with pytest.raises(ConfigError, match=r"catalog\.url: .*not a DuckLake URL"):
        build_config("smoke", ["catalog.url=postgres://h/db"])
    with pytest.raises(ConfigError, match="not both"):
        build_config("smoke", [f"catalog.url={LAKE_URL}", f"catalog.path={tmp_path}/x.duckdb"])
    with pytest.raises(ConfigError, match=r"catalog\.s3: Extra inputs"):
        build_config("smoke", ['catalog.s3={"secret": "x"}'])  # credentials: environment only
    with pytest.raises(CatalogError, match="needs a data_path"):
        CatalogArgs(url=LAKE_URL).resolve({})
    with pytest.raises(CatalogError, match=r"data_path=.* the catalog is the DuckDB file"):
        CatalogArgs(data_path=str(tmp_path)).resolve({})


def test_run_context_carries_the_configured_catalog_without_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the default: the environment's DuckDB file, pinned when the run starts
    ctx = make_context(build_config("smoke"), "r1")
    assert ctx.catalog_settings == CatalogSettings(path=tmp_path / "catalog.duckdb")
    monkeypatch.setenv("GPTFLOW_DB", str(tmp_path / "moved.duckdb"))
    assert ctx.catalog.path == tmp_path / "catalog.duckdb"  # the run keeps its file
    # a lake set in the config: every stage's catalog is that lake
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    cfg = build_config(
        "smoke", [f"catalog.url={LAKE_URL}", "catalog.data_path=s3://b/p", "catalog.lock_timeout=5"]
    )
    ctx = make_context(cfg, "r2")
    assert isinstance(ctx, RunContext)
    assert ctx.catalog_settings.url == LAKE_URL and ctx.catalog_settings.lock_timeout == 5
    assert ctx.catalog_settings.s3.secret is None and ctx.catalog_settings.s3.key_id is None
    assert "s3cr3t" not in json.dumps(config_to_dict(cfg))
    cat = ctx.catalog  # this machine's credentials, read when the catalog is opened
    assert cat.is_lake and cat.location == f"{LAKE_URL} (data s3://b/p/)"
    assert cat.settings.s3.secret is not None
    assert cat.settings.s3.secret.get_secret_value() == "s3cr3t"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated")
    assert ctx.catalog.settings.s3.secret.get_secret_value() == "rotated"


def test_commands_read_the_catalog_named_by_db(tmp_path: Path, capsys) -> None:
    """`--db FILE` means the same for runs, sql, evals, compare and report; `runs` had
    no --db and always read the environment's catalog."""
    other = tmp_path / "other.duckdb"
    Catalog(other).migrate()
    assert not (tmp_path / "catalog.duckdb").exists()  # the environment's catalog
    assert cli_main(["runs", "--db", str(other), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert (
        cli_main(["sql", "SELECT count(*) AS n FROM runs", "--db", str(other), "--format", "json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [{"n": 0}]
    assert cli_main(["evals", "--db", str(other), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"summary": [], "examples": []}
    for argv in (["compare"], ["report"]):
        assert cli_main([*argv, "--db", str(other)]) != 0
        assert f"the catalog {other} holds " in capsys.readouterr().err
    missing = tmp_path / "missing.duckdb"
    assert cli_main(["report", "--db", str(missing)]) != 0
    assert f"the catalog {missing} does not exist yet" in capsys.readouterr().err
