"""Distributed training and the shared catalog in the pipeline, through a real local
Prefect server on the smoke profile (the Ollama stand-in judges):

1. run A trains in one process and writes the DuckDB file catalog; run B recomputes the
   three training stages with ``distributed.nproc = 2`` (torchrun, gloo) and is
   configured (``--set catalog.url=… catalog.data_path=…``) to write a DuckLake on a
   throwaway PostgreSQL: every row of run B is in the lake, none in the file, and its
   metrics equal run A's within 1e-5;
2. ``gptflow catalog rebuild --url … --data-path …`` fills a new lake from the artifacts
   as run A left them (copied aside before run B, whose forced training stages replace
   the folders of the same keys): the spam accuracy, eval summary, metrics, responses,
   judgments and stages of run A read the same as in the file catalog; ``gptflow sql``,
   ``evals``, ``runs`` and ``report`` give the same answers on the lake as on the file;
   a non-empty lake is refused without ``--replace``, and rebuilt in place with it from
   the final artifacts, where run B's rows read as in the lake run B wrote.

Dropout is off in pretraining (its masks depend on the process layout; the finetunes
have none by default). Both runs share one artifacts folder, as a user's runs would.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.cli import main as cli_main
from tasks.catalog import Catalog, CatalogSettings

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

TOL = 1e-5
TRAINING = ("pretrain", "finetune_spam", "finetune_instruct")
# the same settings for both runs; per-step losses of the language models as rows too
COMMON = [
    'pretrain.model.overrides={"drop_rate": 0.0}',
    "pretrain.log_every=1",
    "finetune_instruct.log_every=1",
]
TWO_PROCESSES = [f'{stage}.distributed={{"nproc": 2}}' for stage in TRAINING]
#: Compared per run between a catalog and its rebuild (a view or table, with run_id).
PER_RUN = ("spam_accuracy", "eval_summary", "metrics", "responses", "judgments", "stages")


def _env(mp: pytest.MonkeyPatch, root: Path, mirror: Path) -> None:
    mp.setenv("GPTFLOW_DB", str(root / "catalog.duckdb"))
    mp.setenv("GPTFLOW_ARTIFACTS", str(root / "artifacts"))
    mp.setenv("GPTFLOW_DATASETS", str(root / "datasets"))
    mp.setenv("GPTFLOW_MIRROR", str(mirror))


def _new_lake(server, root: Path, name: str) -> CatalogSettings:
    db = server.create_database()
    return CatalogSettings(url=server.ducklake_url(db), data_path=str(root / f"{name}-data"))


@pytest.fixture(scope="module")
def runs(prefect_server, postgres_server, tmp_path_factory, mirror: Path):
    """Run A (1 process, the file catalog) and run B (2 processes for the three training
    stages, recomputed; the lake ``lake_b``), with the torchrun command lines launched."""
    from benchmarks.ollama_stub import OllamaStub
    from flows.pipeline import run_pipeline
    from gpt.distributed import launch

    root = tmp_path_factory.mktemp("scaleout")
    lake_b = _new_lake(postgres_server, root, "lake-b")
    stub = OllamaStub(models=["llama3"], reply=lambda req: "Score: 42")
    stub.start()
    launched: list[list[str]] = []
    real_command = launch.launch_command

    def spy(args, workdir):
        cmd = real_command(args, workdir)
        launched.append(cmd)
        return cmd

    try:
        with pytest.MonkeyPatch.context() as mp:
            _env(mp, root, mirror)
            judge = [*COMMON, f"judge.hosts={stub.host}"]
            t0 = time.perf_counter()
            a = run_pipeline("smoke", judge, progress=False)
            t1 = time.perf_counter()
            shutil.copytree(root / "artifacts", root / "artifacts-a")
            mp.setattr(launch, "launch_command", spy)
            b = run_pipeline(
                "smoke",
                [
                    *judge,
                    *TWO_PROCESSES,
                    f"catalog.url={lake_b.url}",
                    f"catalog.data_path={lake_b.data_path}",
                ],
                force=list(TRAINING),
                progress=False,
            )
            t2 = time.perf_counter()
    finally:
        stub.stop()
    print(f"run A (1 process): {t1 - t0:.1f} s; run B (2 processes, forced): {t2 - t1:.1f} s")
    return {"root": root, "a": a, "b": b, "lake_b": lake_b, "launched": launched}


def _rows(cat: Catalog, table: str, run_id: str, exclude: tuple[str, ...] = ()) -> pd.DataFrame:
    cols = f"* EXCLUDE ({', '.join(exclude)})" if exclude else "*"
    df = cat.query_df(f"SELECT {cols} FROM {table} WHERE run_id = ? ORDER BY ALL", [run_id])
    return df.reset_index(drop=True)


def _metrics(cat: Catalog, run_id: str, stage: str) -> dict[tuple, float]:
    df = cat.query_df(
        "SELECT step, split, name, value FROM metrics WHERE run_id = ? AND stage = ? "
        "AND name <> 'tokens_per_s'",  # wall-clock throughput, not a result
        [run_id, stage],
    )
    return {(r.step, r.split, r.name): float(r.value) for r in df.itertuples()}


def test_two_processes_write_the_configured_lake_with_one_process_metrics(runs) -> None:
    a, b = runs["a"], runs["b"]
    assert a["status"] == "completed", a
    assert b["status"] == "completed", b
    for stage in TRAINING:
        assert b["stages"][stage] == {"status": "completed", "cache_hit": False, "message": None}
    # torchrun ran each training stage in 2 processes; its scratch folders are gone
    assert len(runs["launched"]) == 3
    for cmd in runs["launched"]:
        assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and "gpt.distributed.worker" in cmd
    stages_dir = runs["root"] / "artifacts" / "stages"
    assert not list(stages_dir.glob("*/*.torchrun")) and not list(stages_dir.glob("*/*.partial"))

    file_cat = Catalog(runs["root"] / "catalog.duckdb")
    lake = Catalog(settings=runs["lake_b"])
    # every stage of run B wrote the lake it was configured with, none the file (the lake
    # also holds run A's rows of the results run B took from the cache, and A's run row)
    count = "SELECT count(*) AS n FROM {} WHERE run_id = ?"
    for cat, run in ((file_cat, a), (lake, b)):
        assert cat.query_df(count.format("runs"), [run["run_id"]]).n[0] == 1
        assert cat.query_df(count.format("stages"), [run["run_id"]]).n[0] == 9
    for table in ("runs", "stages", "metrics", "samples", "checkpoints", "responses"):
        assert file_cat.query_df(count.format(table), [b["run_id"]]).n[0] == 0, table
    assert lake.query_df(count.format("stages"), [a["run_id"]]).n[0] == 0
    trained_by_a = count.format("metrics") + " AND stage IN ('pretrain', 'load_gpt2', "
    trained_by_a += "'finetune_spam', 'finetune_instruct')"
    assert lake.query_df(trained_by_a, [a["run_id"]]).n[0] == 0
    assert lake.query_df(count.format("checkpoints"), [b["run_id"]]).n[0] == 4
    status = lake.query_df("SELECT status FROM runs WHERE run_id = ?", [b["run_id"]])
    assert status.status[0] == "completed"

    # the same training, within float rounding
    for stage in TRAINING:
        one, two = _metrics(file_cat, a["run_id"], stage), _metrics(lake, b["run_id"], stage)
        assert one and one.keys() == two.keys(), stage
        diff = max(abs(one[k] - two[k]) for k in one)
        assert diff <= TOL, f"{stage}: max metric difference {diff}"
    steps = [k for k in _metrics(lake, b["run_id"], "pretrain") if k[2] == "step_loss"]
    assert len(steps) == 20  # every optimizer step's loss came through the event channel
    acc = [
        _rows(c, "spam_accuracy", r["run_id"], ("run_id",)) for c, r in ((file_cat, a), (lake, b))
    ]
    pd.testing.assert_frame_equal(acc[1], acc[0], atol=TOL)
    samples = "SELECT stage, epoch, text FROM samples WHERE run_id = ? ORDER BY ALL"
    assert len(lake.query_df(samples, [b["run_id"]])) == 4  # pretrain 2, load_gpt2, instruct
    pd.testing.assert_frame_equal(
        lake.query_df(samples, [b["run_id"]]), file_cat.query_df(samples, [a["run_id"]])
    )


def _compare_run(got: Catalog, want: Catalog, run_id: str, empty: tuple[str, ...] = ()) -> None:
    """Each of PER_RUN reads the same for ``run_id``; only those in ``empty`` may be empty
    (run B judged nothing itself: its responses equal run A's, so the judge was a hit)."""
    for table in PER_RUN:
        expected = _rows(want, table, run_id)
        assert len(expected) or table in empty, f"{table} of run {run_id} is empty"
        pd.testing.assert_frame_equal(_rows(got, table, run_id), expected, obj=table)


def _cli_json(argv: list[str], capsys) -> object:
    assert cli_main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_rebuild_fills_a_lake_that_answers_like_the_catalogs_the_runs_wrote(
    runs, postgres_server, monkeypatch: pytest.MonkeyPatch, mirror: Path, capsys
) -> None:
    root, a, b = runs["root"], runs["a"]["run_id"], runs["b"]["run_id"]
    _env(monkeypatch, root, mirror)
    file_cat = Catalog(root / "catalog.duckdb")
    target = _new_lake(postgres_server, root, "rebuilt")
    rebuild = ["catalog", "rebuild", "--url", str(target.url), "--data-path", str(target.data_path)]
    first = [*rebuild, "--artifacts", str(root / "artifacts-a")]
    assert cli_main(first) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"rebuilt {target.location()} from {root / 'artifacts-a'}: 1 runs"), out
    lake = Catalog(settings=target)
    _compare_run(lake, file_cat, a)

    # the command line and the eval views, unchanged, on the lake (the environment's
    # catalog) and on the file (--db)
    monkeypatch.setenv("GPTFLOW_CATALOG_URL", str(target.url))
    monkeypatch.setenv("GPTFLOW_CATALOG_DATA_PATH", str(target.data_path))
    db = ["--db", str(root / "catalog.duckdb")]
    for view in ("eval_summary", "spam_accuracy"):
        query = f"SELECT * FROM {view} WHERE run_id = '{a}' ORDER BY ALL"
        on_lake = _cli_json(["sql", query, "--format", "json"], capsys)
        assert on_lake and on_lake == _cli_json(["sql", query, "--format", "json", *db], capsys)
    evals = ["evals", "--run", a, "--format", "json"]
    assert _cli_json(evals, capsys) == _cli_json([*evals, *db], capsys)
    for argv in (["runs", a, "--format", "json"], ["runs", "--format", "json"]):
        assert _cli_json(argv, capsys) == _cli_json([*argv, *db], capsys)
    report = root / "report.md"
    assert cli_main(["report", a, "--markdown", str(report)]) == 0, capsys.readouterr().err
    assert "## Spam classifier: finetuned vs baselines" in report.read_text(encoding="utf-8")
    assert cli_main(["compare"]) != 0  # one run: it names the lake it read
    assert f"the catalog {target.location()} holds 1 completed run(s)" in capsys.readouterr().err

    # a lake with rows is refused; --replace empties the rebuilt tables in place, keeps a
    # download digest the artifacts do not hold and restores those the run records hold
    assert cli_main(rebuild) != 0
    err = capsys.readouterr().err
    assert "already holds rows in" in err and "--replace" in err, err
    lake.insert_rows("sources", [{"name": "the-verdict:x.txt", "sha256": "ab", "bytes": 1}])
    assert cli_main([*rebuild, "--replace"]) == 0, capsys.readouterr().err
    assert ": 2 runs" in capsys.readouterr().out
    recorded = set(file_cat.query_df("SELECT name FROM sources").name)
    assert recorded and "the-verdict:x.txt" not in recorded
    restored = set(lake.query_df("SELECT name FROM sources").name)
    assert restored == recorded | {"the-verdict:x.txt"}
    _compare_run(lake, Catalog(settings=runs["lake_b"]), b, empty=("eval_summary", "judgments"))
    assert lake.query_df("SELECT count(*) AS n FROM responses WHERE run_id = ?", [b]).n[0] == 12
