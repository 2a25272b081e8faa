"""Cache keys cover exactly the code a stage runs (derived from its imports).

Each stage's code fingerprint is computed over a copy of the source tree, the copy is
edited, and the fingerprint is computed again: editing any module in a stage's import
closure (its wrapper in ``tasks/`` included) changes it; editing the run report, the
command line or another stage's wrapper does not. The closure is checked against what
a stage really loads: every stage of the smoke pipeline runs in a process of its own
that starts without any project module (``_stage_probe.py``), and every project module
it loaded must be in its closure, so that editing it changes the key (an edit test over the closure alone could not see a
module the closure misses).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from _paths import REPO
from helpers_fork import ForkServer

from tasks.stages import STAGES
from tasks.store.fingerprint import code_fingerprint, module_closure, package_versions

HERE = Path(__file__).resolve().parent
CACHED = [s for s in STAGES if s != "download"]  # download is content-addressed by bytes


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages to edit."""
    for pkg in ("gpt", "tasks", "flows"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _fp(stage: str, root: Path) -> str:
    from tasks.store.fingerprint import _fingerprint

    _fingerprint.cache_clear()  # the per-process cache assumes files don't change
    return code_fingerprint(f"tasks.stages.{stage}", root)


def _edit(root: Path, rel: str) -> None:
    """Append a line to ``rel``, dated a minute ago: an edit made before the run, whose
    new size and mtime the stat cache sees. (Dated now, every edited file stays "racily
    clean" for 2 s and is parsed again by each following fingerprint: the loops below,
    one fingerprint per module of a closure, spent ~100 CPU-s re-parsing.)"""
    path = root / rel
    path.write_text(path.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    past = time.time() - 60
    os.utime(path, (past, past))


def _each_edit_changes_the_key(stage: str, root: Path, modules: list[str]) -> None:
    """Edit each of ``modules`` in turn (edits accumulate): every edit changes the key
    from the one before it."""
    before = _fp(stage, root)
    for module in modules:
        rel = module.replace(".", "/")
        rel = f"{rel}/__init__.py" if (root / rel).is_dir() else f"{rel}.py"
        _edit(root, rel)
        after = _fp(stage, root)
        assert after != before, f"editing {rel} left the key of {stage} unchanged"
        before = after


# The modules observation 1 of the issue named (in today's layout): editing them left
# the keys of load_gpt2, finetune_spam and extract_responses unchanged.
REPORTED = [
    ("load_gpt2", "gpt/eval/metrics.py"),  # was gpt/evaluate.py
    ("finetune_spam", "gpt/eval/baseline.py"),
    ("baseline_spam", "gpt/eval/baseline.py"),
    ("extract_responses", "gpt/recipes/prepare.py"),
    ("load_gpt2", "tasks/stages/load_gpt2.py"),  # the stage's own wrapper (was tasks/stages.py)
    ("finetune_spam", "tasks/stages/finetune_spam.py"),
    ("extract_responses", "tasks/stages/extract_responses.py"),
]


@pytest.mark.parametrize(("stage", "rel"), REPORTED)
def test_editing_reported_modules_changes_the_key(tree: Path, stage: str, rel: str) -> None:
    before = _fp(stage, tree)
    _edit(tree, rel)
    assert _fp(stage, tree) != before, f"editing {rel} left the key of {stage} unchanged"


@pytest.mark.parametrize("stage", CACHED)
def test_editing_any_module_of_the_closure_changes_the_key(tree: Path, stage: str) -> None:
    closure = module_closure(f"tasks.stages.{stage}", tree)
    assert f"tasks.stages.{stage}" in closure and "tasks.stages.runner" in closure
    assert not [m for m in closure if m.startswith("flows")], closure
    _each_edit_changes_the_key(stage, tree, closure)


@pytest.mark.parametrize("stage", CACHED)
def test_report_cli_and_sibling_stages_do_not_change_the_key(tree: Path, stage: str) -> None:
    before = _fp(stage, tree)
    for rel in (
        "flows/report/__init__.py",
        "flows/cli.py",
        "flows/commands/run.py",
        "flows/pipeline.py",
    ):
        _edit(tree, rel)
    sibling = next(s for s in CACHED if s != stage and s != "judge")
    if sibling != stage:
        _edit(tree, f"tasks/stages/{sibling}.py")
    _edit(tree, "tasks/catalog/present.py")  # how the CLI prints tables
    assert _fp(stage, tree) == before


def test_closure_follows_lazy_imports(tree: Path) -> None:
    """Imports inside functions count (the stages import the library lazily)."""
    closure = module_closure("tasks.stages.load_gpt2", tree)
    # prepare_bases imports these inside its body
    for mod in ("gpt.weights.openai", "gpt.eval.metrics", "gpt.checkpoint", "gpt.fileio"):
        assert mod in closure


def test_no_hand_kept_module_lists() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "tasks").rglob("*.py"))
    assert "STAGE_MODULES" not in source


def test_keys_computed_in_parallel_threads(tree: Path) -> None:
    """The flow computes the keys of finetune_spam and baseline_spam in two threads at
    once. CPython 3.11's ast.parse is not thread-safe (gh-106905): a thread switch inside
    it — here forced by a gc callback — raised "SystemError: AST constructor recursion
    depth mismatch" and failed a run's stage at random."""
    import gc
    import threading
    import time

    from tasks.store.fingerprint import stat_cache

    errors: list[BaseException] = []

    def switch(phase: str, info: dict) -> None:
        time.sleep(0.0001)  # let the other thread run in the middle of a parse

    def work(stage: str) -> None:
        try:
            for _ in range(2):
                stat_cache(tree.resolve()).files.clear()
                _fp(stage, tree)
        except BaseException as exc:
            errors.append(exc)

    threshold = gc.get_threshold()
    gc.callbacks.append(switch)
    gc.set_threshold(200)
    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in ("finetune_spam", "judge")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        gc.callbacks.remove(switch)
        gc.set_threshold(*threshold)
    assert not errors, errors[0]


# --------------------------------------------------------------------------- loaded modules


@pytest.fixture(scope="module")
def loaded_by_stage(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """The project modules each stage of the smoke pipeline loads, each stage run in a
    process of its own that starts without any project module (``_stage_probe.py``,
    forked by one ``helpers_fork.ForkServer``), on its upstream stages' results
    (download runs here)."""
    from benchmarks.ollama_stub import OllamaStub
    from flows.config import build_config
    from tasks.catalog import CatalogSettings
    from tasks.stages.contract import RunContext
    from tasks.stages.runner import load_spec, run_stage

    root = tmp_path_factory.mktemp("probe")
    context = {
        "run_id": "probe",
        "db": str(root / "catalog.duckdb"),
        "artifacts": str(root / "artifacts"),
        "datasets": str(root / "datasets"),
        "mirror": str(mirror),
        "progress": False,
        "device": "cpu",
    }
    fields = {k: v for k, v in context.items() if k != "db"}
    ctx = RunContext(catalog_settings=CatalogSettings(path=context["db"]), **fields)
    ctx.recorder.start_run("probe", flow_run_id=None, profile="smoke", config={}, git_rev=None)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    loaded: dict[str, list] = {}
    with (
        OllamaStub(reply=lambda req: {"score": 50, "reason": "fine"}) as stub,
        ForkServer(env, root / "probe-logs") as children,
    ):
        cfg = build_config("smoke", [f"judge.hosts={stub.host}"])
        dl = run_stage(ctx, "download", cfg.download)
        results: dict[str, Any] = {
            "download": {"stage": "download", "key": dl.key, "root": dl.root,
                         "run_id": dl.run_id, "digest": dl.digest, "out": dl.data}
        }  # fmt: skip
        for stage in CACHED:  # in the order of the DAG
            inputs = {i: results.get(i) for i in load_spec(stage).inputs}
            if stage == "load_gpt2" and cfg.load_gpt2.base_model != "scratch":
                inputs["pretrain"] = None
            request = root / f"{stage}.json"
            request.write_text(json.dumps({"stage": stage, "settings": getattr(cfg, stage).to_dict(),
                                           "context": context, "inputs": inputs}))  # fmt: skip
            children.start(stage, [str(HERE / "_stage_probe.py"), str(request)])
            code, out, err = children.finish(stage, timeout=600)
            line = next((x for x in out.splitlines() if x.startswith("PROBE ")), None)
            assert code == 0 and line, f"{stage}: {err[-3000:]}"
            probe = json.loads(line.removeprefix("PROBE "))
            results[stage], loaded[stage] = probe["result"], probe["loaded"]
    return loaded


@pytest.mark.slow
@pytest.mark.parametrize("stage", CACHED)
def test_every_module_a_stage_loads_is_in_its_closure_and_keyed(
    loaded_by_stage: dict[str, list], tree: Path, stage: str
) -> None:
    loaded = loaded_by_stage[stage]
    assert f"tasks.stages.{stage}" in loaded  # the stage ran in the probe
    assert not [m for m in loaded if m.startswith("flows")], loaded
    closure = set(module_closure(f"tasks.stages.{stage}", tree))
    missing = sorted(set(loaded) - closure)
    assert not missing, f"{stage} loads {missing}, which its key's closure leaves out"
    _each_edit_changes_the_key(stage, tree, loaded)


def _new_process_caches() -> None:
    """Forget what this process computed, as a new process would (the on-disk stat cache
    stays)."""
    from tasks.store import fingerprint

    fingerprint._fingerprint.cache_clear()
    fingerprint._distributions.cache_clear()
    fingerprint._STAT_CACHES.clear()


def _age(root: Path, seconds: float = 60.0) -> None:
    """Set every source file's mtime ``seconds`` into the past (an unchanged tree)."""
    past = time.time() - seconds
    for path in root.rglob("*.py"):
        os.utime(path, (past, past))


def test_unchanged_tree_is_not_reread_by_a_new_process(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new process reuses each file's digest and imports while its size, mtime and inode
    match: no source file is read or parsed again, and the key is the same."""
    _age(tree)
    _new_process_caches()
    before = code_fingerprint("tasks.stages.finetune_spam", tree)
    versions = package_versions("tasks.stages.finetune_spam", tree)
    _new_process_caches()
    reads: list[Path] = []
    real = Path.read_bytes

    def counted(self: Path) -> bytes:
        if self.suffix == ".py" and tree in self.parents:
            reads.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counted)
    monkeypatch.setattr(
        "importlib.metadata.packages_distributions",
        lambda: pytest.fail("rescanned the installed distributions"),
    )
    assert code_fingerprint("tasks.stages.finetune_spam", tree) == before
    assert package_versions("tasks.stages.finetune_spam", tree) == versions
    assert reads == []


@pytest.mark.parametrize("same_size", [True, False])
def test_edited_file_changes_the_key_in_a_new_process(tree: Path, same_size: bool) -> None:
    """Touch and edit a file of the closure after its digest was cached: the key changes
    (an edit that keeps the file's size included), and goes back with the content."""
    _age(tree)
    _new_process_caches()
    rel = "gpt/recipes/classifier.py"
    before = code_fingerprint("tasks.stages.finetune_spam", tree)
    path = tree / rel
    text = path.read_text(encoding="utf-8")
    edited = text.replace("ham", "HAM", 1) if same_size else text + "\n# edited\n"
    assert edited != text and (len(edited) == len(text)) == same_size
    path.write_text(edited, encoding="utf-8")
    _new_process_caches()
    assert code_fingerprint("tasks.stages.finetune_spam", tree) != before
    path.write_text(text, encoding="utf-8")
    _new_process_caches()
    assert code_fingerprint("tasks.stages.finetune_spam", tree) == before
