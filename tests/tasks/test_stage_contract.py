"""The stage contract without Prefect: stages run through ``run_stage`` on the smoke
profile, on the mirror inputs.

- a cached result is verified completely: a checkpoint's own manifest, meta or tokenizer
  missing → recomputed, and the stage says why (observation 3 of issue 11);
- a cache hit in another catalog brings its rows along (observation 2);
- every setting reaches the library call or changes the key; the device reaches every
  stage that runs a model (observation 4);
- stages read typed outputs, not repeated path literals; pretrain reads the token files
  tokenize wrote (observation 5);
- ``--force`` works for download and judge; an unknown stage name is refused (6).
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from _paths import REPO

from flows.config import PipelineConfig, build_config
from gpt.config import Args
from gpt.errors import ConfigError
from tasks.catalog import Catalog
from tasks.catalog.settings import CatalogSettings
from tasks.stages.contract import RunContext, StageRun
from tasks.stages.runner import load_spec, run_stage


def _ctx(root: Path, run_id: str, *, db: str = "catalog.duckdb", **kw: Any) -> RunContext:
    import dataclasses

    names = {f.name for f in dataclasses.fields(RunContext)}
    where = (
        {"catalog_settings": CatalogSettings(path=root / db)}
        if "catalog_settings" in names
        else {"db_path": str(root / db)}
    )
    return RunContext(
        run_id=run_id,
        **where,
        artifacts=str(root / "artifacts"),
        datasets=str(root / "datasets"),
        progress=False,
        device="cpu",
        **kw,
    )


#: The module's tests check what the runner does with a pretrain result (verify,
#: recompute, ingest), not training: one epoch without evaluations is a third of the
#: smoke profile's pretraining, which the damage tests run four times.
SHORT_PRETRAIN = ["pretrain.epochs=1", "pretrain.eval_every=100"]


@pytest.fixture(scope="module")
def smoke(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """download → tokenize → pretrain of the smoke profile (pretraining shortened to
    :data:`SHORT_PRETRAIN`), run once for the module."""
    root = tmp_path_factory.mktemp("contract")
    cfg = build_config("smoke", SHORT_PRETRAIN)
    ctx = _ctx(root, "run-1", mirror=str(mirror))
    ctx.recorder.start_run("run-1", flow_run_id=None, profile="smoke", config={}, git_rev=None)
    dl = run_stage(ctx, "download", cfg.download)
    tok = run_stage(ctx, "tokenize", cfg.tokenize, download=dl)
    pre = run_stage(ctx, "pretrain", cfg.pretrain, tokenize=tok)
    return {"root": root, "cfg": cfg, "mirror": mirror, "dl": dl, "tok": tok, "pre": pre}


def _stage_row(ctx: RunContext, stage: str) -> dict[str, Any]:
    df = ctx.catalog.query_df(
        "SELECT * FROM stages WHERE run_id = ? AND stage = ?", [ctx.run_id, stage]
    )
    return df.to_dict("records")[0]


# --------------------------------------------------------------------------- obs 3


@pytest.mark.parametrize("damage", ["manifest.json", "meta.json", "tokenizer"])
def test_incomplete_checkpoint_is_recomputed_with_the_reason(smoke, damage: str) -> None:
    """Deleting a checkpoint's own manifest.json, meta.json or tokenizer/ is no hit."""
    pre = smoke["pre"]
    target = pre.path(pre.out.checkpoint) / damage
    assert target.exists()
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    ctx = _ctx(smoke["root"], f"run-damage-{damage}", mirror=str(smoke["mirror"]))
    again = run_stage(ctx, "pretrain", smoke["cfg"].pretrain, tokenize=smoke["tok"])
    assert not again.cache_hit
    row = _stage_row(ctx, "pretrain")
    assert row["status"] == "completed" and not row["cache_hit"]
    assert "not usable" in row["message"] and f"final/{damage}" in row["message"]
    assert (again.path(again.out.checkpoint) / damage).exists()  # whole again
    # the recomputed folder is complete: the next run is a hit
    ctx3 = _ctx(smoke["root"], f"run-after-{damage}", mirror=str(smoke["mirror"]))
    assert run_stage(ctx3, "pretrain", smoke["cfg"].pretrain, tokenize=smoke["tok"]).cache_hit
    smoke["pre"] = again


def test_large_files_rehash_on_mtime_change_or_full_verify(smoke, monkeypatch) -> None:
    """Files over the small-file threshold are re-hashed when their mtime changed or with
    verify="full"; a same-size, same-mtime edit is only caught by "full"."""
    import os

    import tasks.store.manifest as cache

    monkeypatch.setattr(cache, "SMALL_FILE_BYTES", 0)  # every file counts as large
    tok = smoke["tok"]
    npy = tok.path(tok.out.train_tokens)
    st = npy.stat()
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the edit from mtime
    store = _ctx(smoke["root"], "x").store
    assert store.lookup("tokenize", tok.key, "auto")[0] is not None
    manifest, reason = store.lookup("tokenize", tok.key, "full")
    assert manifest is None and "tokens/train.npy was changed" in reason
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a visible edit
    manifest, reason = store.lookup("tokenize", tok.key, "auto")
    assert manifest is None and "tokens/train.npy" in reason
    data[-1] ^= 0xFF  # put it back
    npy.write_bytes(bytes(data))
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.lookup("tokenize", tok.key, "full")[0] is not None


# --------------------------------------------------------------------------- obs 2


def test_a_hit_in_another_catalog_brings_its_rows(smoke) -> None:
    """Same artifacts, a new catalog: the hit ingests the producing run's rows (and its
    run record) into it; a second hit ingests nothing."""
    ctx_b = _ctx(smoke["root"], "run-b", db="b.duckdb", mirror=str(smoke["mirror"]))
    dl = run_stage(ctx_b, "download", smoke["cfg"].download)
    tok = run_stage(ctx_b, "tokenize", smoke["cfg"].tokenize, download=dl)
    assert tok.cache_hit and tok.run_id == "run-1"
    b = ctx_b.catalog
    for table in ("spam_examples", "instructions", "corpus"):
        n = b.query_df(f"SELECT count(*) AS n FROM {table} WHERE run_id = 'run-1'").n[0]
        assert n > 0, table
    assert b.query_df("SELECT count(*) AS n FROM sms_messages").n[0] == 5574
    assert "ingested from the stage folder" in _stage_row(ctx_b, "tokenize")["message"]
    assert b.query_df("SELECT profile FROM runs WHERE run_id = 'run-1'").empty is False
    again = _ctx(smoke["root"], "run-b2", db="b.duckdb", mirror=str(smoke["mirror"]))
    run_stage(again, "tokenize", smoke["cfg"].tokenize, download=dl)
    assert _stage_row(again, "tokenize")["message"] is None  # nothing was missing


# --------------------------------------------------------------------------- obs 4


def _variants(field: Any, default: Any) -> list[Any]:
    """Candidate non-default values for a settings field."""
    import typing

    ann = field.annotation
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Literal:
        return [a for a in args if a != default]
    if default is None:
        return [1, 0.5, "x", True, {"a": 1}, ("bow",), ["http://h:1"], "ducklake:postgres:dbname=x"]
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [default + 1, default + 2, max(default - 1, 0)]
    if isinstance(default, float):
        return [default * 2, default / 2, 1e-6, 0.05, 0.5]
    if isinstance(default, str):
        return [default + "x", "llama3:8b", "tiny"]
    if isinstance(default, tuple | list):
        return [list(default[:1]), [*default, "x"], ["http://other:1"], [0.6, 0.2, 0.2]]
    if isinstance(default, dict):
        return [{"n_layers": 1}]
    if isinstance(default, Args):  # an operational block: any valid change of one field
        fields = type(default).model_fields.items()
        return [
            {**default.model_dump(), n: v}
            for n, f in fields
            for v in _variants(f, getattr(default, n))
        ]
    return []


def _walk(cls: type[Args], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field path, field info, default) of every leaf of a settings class."""
    out = []
    inst = cls()
    for name, field in cls.model_fields.items():
        value = getattr(inst, name)
        if isinstance(value, Args) and name not in cls.operational_fields():
            out += _walk(type(value), f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", field, value))
    return out


def _set(obj: Args, path: str, value: Any) -> Args:
    head, _, rest = path.partition(".")
    if not rest:
        return type(obj).model_validate({**obj.model_dump(), head: value})
    return type(obj).model_validate(
        {**obj.model_dump(), head: _set(getattr(obj, head), rest, value).model_dump()}
    )


SECTIONS = [
    name
    for name, f in PipelineConfig.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, Args)
]


@pytest.mark.parametrize("section", SECTIONS)
def test_every_setting_shapes_the_key_or_is_operational(section: str) -> None:
    """Each field of each section, set to another valid value, changes the settings'
    cache-key part — unless it is declared operational (it only changes where/how fast
    a result is computed; those reach the library call, see the next test)."""
    cls = PipelineConfig.model_fields[section].annotation
    base = cls()
    checked = 0
    for path, field, default in _walk(cls):
        changed = None
        for value in _variants(field, default):
            try:
                other = _set(base, path, value)
            except ConfigError:
                continue
            if other.to_dict() == base.to_dict():
                continue
            changed = other
            break
        assert changed is not None, f"{section}.{path}: no other valid value found"
        top = path.split(".")[0]
        if top in cls.operational_fields():
            assert changed.key_dict() == base.key_dict(), f"{section}.{path} is operational"
        else:
            assert changed.key_dict() != base.key_dict(), f"{section}.{path} leaves the key"
        checked += 1
    assert checked == len(_walk(cls))


class _Called(Exception):
    """Raised by a stand-in library function once it has seen its arguments."""


#: The library call each stage makes, where the stage finds it when it runs (the model
#: stages import their recipe inside the stage body).
LIBRARY_CALLS = {
    "tokenize": "gpt.recipes.prepare.prepare_datasets",
    "pretrain": "gpt.recipes.pretrain.pretrain",
    "load_gpt2": "gpt.recipes.base.prepare_bases",
    "finetune_spam": "gpt.recipes.classifier.finetune_classifier",
    "baseline_spam": "tasks.stages.baseline_spam.evaluate_baselines",
    "finetune_instruct": "gpt.recipes.instruct.finetune_instruct",
    "extract_responses": "gpt.recipes.extract.extract_responses",
    "judge": "tasks.stages.judge.judge_run",
}
MODEL_STAGES = {"pretrain", "load_gpt2", "finetune_spam", "finetune_instruct", "extract_responses"}


@pytest.mark.parametrize("stage", sorted(LIBRARY_CALLS))
def test_the_section_object_itself_reaches_the_library_call(
    stage: str, smoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage hands its settings object to the library unchanged (so every field of
    it arrives), and the run's device reaches every stage that runs a model."""
    import importlib

    from tasks.records.rows import RowSink

    importlib.import_module(f"tasks.stages.{stage}")  # the stage registers itself
    seen: dict[str, Any] = {}

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Called

    where, _, name = LIBRARY_CALLS[stage].rpartition(".")
    library_call = getattr(importlib.import_module(where), name)
    monkeypatch.setattr(LIBRARY_CALLS[stage], stand_in)
    cfg = smoke["cfg"]
    section = getattr(cfg, stage)
    ctx = RunContext(**{**_ctx(smoke["root"], "probe").__dict__, "device": "cuda:7"})
    # the runner resolves the run's device once where the stage runs (here: as named)
    run = StageRun(ctx, stage, "k", tmp_path, tmp_path, "probe", RowSink(tmp_path))
    tok, pre = smoke["tok"], smoke["pre"]
    inputs = {"download": smoke["dl"], "tokenize": tok, "pretrain": pre, "load_gpt2": pre,
              "finetune_instruct": pre, "extract_responses": pre}  # fmt: skip
    if stage in ("finetune_spam", "finetune_instruct"):  # they read these from load_gpt2
        from tasks.stages.load_gpt2 import LoadGPT2Out

        inputs["load_gpt2"] = type(pre)(**{**pre.__dict__, "out": LoadGPT2Out(
            base_model="scratch", spam_base=pre.out.checkpoint,
            instruct_base=pre.out.checkpoint, evaluations={})})  # fmt: skip
    if stage == "extract_responses":
        from tasks.stages.finetune_instruct import InstructOut

        inputs["finetune_instruct"] = type(pre)(**{**pre.__dict__, "out": InstructOut(
            checkpoint=pre.out.checkpoint, steps=1, tokens_seen=1, tokens_per_s=1.0,
            final_train_loss=None, final_val_loss=None, resumed_from_step=None,
            max_length=8, n_train=1, n_val=1, samples=[], timings={})})  # fmt: skip
    spec = load_spec(stage)
    with pytest.raises(_Called):
        spec.fn(run, section, **{i: inputs[i] for i in spec.inputs})
    passed = [*seen["args"], *seen["kwargs"].values()]
    assert any(a is section for a in passed), f"{stage}: its settings object was not passed"
    if stage in MODEL_STAGES:
        assert seen["kwargs"].get("device") == "cuda:7", stage
    if stage == "pretrain":  # the token files tokenize wrote, not a re-tokenized text
        import inspect

        got = inspect.signature(library_call).bind(*seen["args"], **seen["kwargs"]).arguments
        assert (got["train_tokens"], got["val_tokens"]) == (
            tok.path(tok.out.train_tokens),
            tok.path(tok.out.val_tokens),
        )
        assert got["max_length"] == tok.out.max_length


def test_download_settings_reach_the_downloader(smoke, monkeypatch) -> None:
    from gpt.data.download import DownloadArgs

    seen = {}

    def fetch(self, *a: Any, **kw: Any) -> Any:
        seen["self"] = self
        raise _Called

    monkeypatch.setattr(DownloadArgs, "fetch", fetch)
    args = DownloadArgs(retries=5, backoff_s=0.25, timeout_s=7.0)
    with pytest.raises(_Called):
        run_stage(_ctx(smoke["root"], "dl-probe"), "download", args)
    assert seen["self"] is args


def test_device_is_recorded_in_the_stage_outputs(smoke) -> None:
    from tasks.store.manifest import read_manifest

    store = _ctx(smoke["root"], "x").store
    manifest = read_manifest(store.final_dir("pretrain", smoke["pre"].key))
    assert manifest["device"] == "cpu"
    assert build_config("smoke", ["device=cpu"]).model_dump()["device"] == "cpu"


def test_instruct_honours_max_steps(tmp_path: Path, tokenizer_dir: Path) -> None:
    """finetune_instruct.max_steps was documented, validated and keyed, but ignored."""
    from gpt.architecture import get_config
    from gpt.args import InstructArgs
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT
    from gpt.recipes.instruct import finetune_instruct

    base = save_checkpoint(tmp_path / "b", GPT(get_config("tiny")), tokenizer_dir=tokenizer_dir)
    recs = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(16)]
    args = InstructArgs(epochs=2, batch_size=4, max_steps=3, eval_every=1, eval_batches=1)
    res = finetune_instruct(base, recs, recs[:2], args, out_dir=tmp_path / "o", progress=False)
    assert res["steps"] == 3  # not 2 epochs x 4 batches


# --------------------------------------------------------------------------- obs 5

#: Paths the old stage wrappers repeated between stages.
REPEATED_LITERALS = {
    "final",
    "loss.png",
    "tokenizer",
    "text/corpus.txt",
    "tokens/train.npy",
    "tokens/val.npy",
    "spam/splits.json",
    "spam/messages.json",
    "instruct/splits.json",
}


def _path_literals(tree: ast.AST) -> set[str]:
    """String constants used as paths: operands of ``/`` and arguments of ``.path(...)``."""
    out = set()
    for node in ast.walk(tree):
        operands: list[ast.AST] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = [node.left, node.right]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "path":
            operands = list(node.args)
        out |= {o.value for o in operands if isinstance(o, ast.Constant)}
    return out


def test_stages_read_typed_outputs_not_path_literals() -> None:
    found = {}
    for path in sorted((REPO / "tasks" / "stages").glob("*.py")):
        literals = _path_literals(ast.parse(path.read_text(encoding="utf-8")))
        bad = sorted(c for c in literals if isinstance(c, str) and c in REPEATED_LITERALS)
        if bad:
            found[path.name] = bad
    assert not found, found
    # the check sees what it is meant to see
    assert _path_literals(ast.parse('tok.path("spam/splits.json"); w / "final"')) == {
        "spam/splits.json",
        "final",
    }


def test_stage_inputs_and_settings_types_match_the_config() -> None:
    """Each stage takes its own section's type and only upstream stage outputs (tokenize
    no longer takes the pretrain section, nor pretrain the tokenize one)."""
    import inspect

    expected = {
        "tokenize": ("download",),
        "pretrain": ("tokenize",),
        "load_gpt2": ("tokenize", "pretrain"),
        "finetune_spam": ("tokenize", "load_gpt2"),
        "baseline_spam": ("tokenize",),
        "finetune_instruct": ("tokenize", "load_gpt2"),
        "extract_responses": ("tokenize", "finetune_instruct"),
        "judge": ("extract_responses",),
    }
    for stage, inputs in expected.items():
        spec = load_spec(stage)
        assert spec.inputs == inputs, stage
        hint = inspect.signature(spec.fn, eval_str=True).parameters
        args_type = list(hint.values())[1].annotation
        assert args_type is PipelineConfig.model_fields[stage].annotation, stage


# --------------------------------------------------------------------------- obs 6


def test_force_download_fetches_again(smoke) -> None:
    ctx = _ctx(smoke["root"], "dl-plain", mirror=str(smoke["mirror"]))
    out = run_stage(ctx, "download", smoke["cfg"].download)
    assert out.cache_hit  # everything present and verified: nothing fetched
    forced = _ctx(smoke["root"], "dl-forced", mirror=str(smoke["mirror"]), force=("download",))
    out2 = run_stage(forced, "download", smoke["cfg"].download)
    assert not out2.cache_hit and out2.digest == out.digest  # fetched again, same bytes
    assert _stage_row(forced, "download")["status"] == "completed"


def test_force_judge_scores_again_and_unknown_names_are_refused(smoke) -> None:
    from benchmarks.ollama_stub import OllamaStub
    from flows.run_start import make_context
    from tasks.stages.judge import responses_input

    cat = Catalog(smoke["root"] / "catalog.duckdb")
    rows = [
        {"run_id": "resp", "example_id": i, "instruction": f"Say {i}", "input": "",
         "output": str(i), "response": str(i), "new_tokens": 1, "seconds": 0.1}
        for i in range(3)
    ]  # fmt: skip
    cat.replace_rows("responses", rows, where={"run_id": "resp"})
    with OllamaStub(models=["llama3"], reply=lambda req: {"score": 70}) as stub:
        judge = build_config("smoke", [f"judge.hosts={stub.host}"]).judge
        first = run_stage(_ctx(smoke["root"], "j1"), "judge", judge,
                          extract_responses=responses_input(cat, "resp"))  # fmt: skip
        assert not first.cache_hit and stub.chat_count == 3
        again = run_stage(_ctx(smoke["root"], "j2"), "judge", judge,
                          extract_responses=responses_input(cat, "resp"))  # fmt: skip
        assert again.cache_hit and stub.chat_count == 3
        forced = _ctx(smoke["root"], "j3", force=("judge",))
        res = run_stage(forced, "judge", judge, extract_responses=responses_input(cat, "resp"))
        assert not res.cache_hit and stub.chat_count == 6 and res.out.n_sent == 3
    with pytest.raises(ConfigError, match="no such stage"):
        make_context(smoke["cfg"], "r", force=["judges"])


def test_one_judge_stage() -> None:
    """The pipeline and the gptflow-judge flow (and `gptflow judge`) run the same stage."""
    calls = {}
    for path in [*(REPO / "flows").rglob("*.py"), *(REPO / "tasks").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        if "judge_run(" in text:
            calls[path.relative_to(REPO).as_posix()] = text.count("judge_run(")
    assert set(calls) == {"tasks/stages/judge.py"}, calls
    for module in ("flows/pipeline.py", "flows/judge_flow.py"):
        assert 'stage_task("judge")' in (REPO / module).read_text(encoding="utf-8") or (
            'step("judge")' in (REPO / module).read_text(encoding="utf-8")
        ), module
    judge_cli = (REPO / "flows" / "commands" / "judge_responses.py").read_text(encoding="utf-8")
    assert 'run_stage(ctx, "judge"' in judge_cli


def test_manifest_lists_every_file_of_the_folder(smoke) -> None:
    """Every file is listed: the result's files in manifest.json, the rows (records of
    the run) in produced.json beside it."""
    from tasks.store.manifest import read_manifest

    pre = smoke["pre"]
    folder = Path(pre.root)
    manifest = read_manifest(folder)
    on_disk = sorted(
        rel
        for p in folder.rglob("*")
        if p.is_file()
        and (rel := p.relative_to(folder).as_posix()) not in ("manifest.json", "produced.json")
        and not rel.startswith(".")  # the runner's own files: owner marker, row buffers
    )
    assert sorted(manifest["files"]) == on_disk
    assert {"final/manifest.json", "final/meta.json", "rows/metrics.parquet"} <= set(on_disk)
    content = json.loads((folder / "manifest.json").read_text())
    assert sorted(content["files"]) == [rel for rel in on_disk if not rel.startswith("rows/")]


def test_progress_outside_a_prefect_run_asks_no_server(monkeypatch) -> None:
    """Stages run outside a flow (tests, library use) must not make Prefect start a
    temporary server for a progress artifact (15-30 s and a logging error at exit)."""
    import prefect.artifacts

    from tasks.stages.contract import ProgressArtifact

    calls: list[str] = []
    monkeypatch.setattr(
        prefect.artifacts, "create_progress_artifact", lambda **kw: calls.append("create") or 1
    )
    monkeypatch.setattr(
        prefect.artifacts, "update_progress_artifact", lambda *a, **kw: calls.append("update")
    )
    bar = ProgressArtifact("pretrain-steps")
    bar.update(5, 10)
    assert calls == [] and bar.id is None
