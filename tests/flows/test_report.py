"""The run report (observation 5): plots inline as PNG data URIs (what the Prefect UI's
markdown renderer shows), numbers for people (no nan / <NA> / None, durations like
``1 min 3 s``, accuracies as %), stage messages whole, checkpoints as paths (no
``file://``), spam finetune losses with their starting values, the gates section when a
``gates`` table exists; ``gptflow report RUN --html`` writes the same report as one
self-contained HTML file.

The catalog is filled by hand, shaped like a smoke run whose ``baseline_spam`` stage was
a cache hit of an earlier run (so rows must be read under their producing run)."""

from __future__ import annotations

import base64
import datetime as dt
import math
import re
from pathlib import Path

import pytest
from helpers_catalog import record_checkpoint, record_metrics, record_stage, start_run

from flows.report import fmt
from flows.report.blocks import (
    Para,
    Report,
    Table,
    join,
    text,
    to_html,
    to_markdown,
    with_code_spans,
)
from flows.report.build import build_report

PNG = b"\x89PNG\r\n\x1a\n"
JUDGE_MSG = (
    "Ollama is not reachable at http://127.0.0.1:9 — start it with `ollama serve` "
    "(connection refused) — fix: start Ollama with `ollama serve`, pull the judge with "
    "`ollama pull llama3`, then run `gptflow rerun judge`; this message is long enough "
    "that a 120-character cut would have fallen in the middle of some word"
)


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.6, "0.6 s"), (12.4, "12 s"), (63, "1 min 3 s"), (120, "2 min"), (7500, "2 h 5 min")],
)
def test_duration(seconds, shown):
    assert fmt.duration(seconds) == shown


def test_missing_values_are_a_dash():
    import numpy as np
    import pandas as pd

    for v in (None, math.nan, pd.NA, pd.NaT, np.float64("nan"), float("inf"), ""):
        for f in (fmt.number, fmt.percent, fmt.count, fmt.duration, fmt.timestamp):
            assert f(v) in (fmt.MISSING,), (f.__name__, v)
    assert fmt.percent(0.95667) == "95.7 %"
    assert fmt.number(0.63312) == "0.633" and fmt.number(6.3681) == "6.37"
    assert fmt.count(46080) == "46,080" and fmt.number(46080.0) == "46,080"


def test_shorten_never_cuts_a_word():
    s = fmt.shorten(JUDGE_MSG, 60)
    assert s.endswith(" …") and len(s) <= 62
    kept = s.removesuffix(" …")
    assert JUDGE_MSG.startswith(kept) and JUDGE_MSG[len(kept)] == " "
    assert fmt.shorten("x" * 200, 50) == "x" * 200  # one long word stays whole


def test_markdown_escapes_catalog_text():
    rep = Report("t", [Para(join("a ", text("<NA> | *x* `y`")))])
    md = to_markdown(rep)
    assert "<NA>" not in md and r"\<NA\>" in md and r"\|" in md
    assert with_code_spans("run `ollama serve` now") == (
        ("text", "run "),
        ("code", "ollama serve"),
        ("text", " now"),
    )
    html = to_html(Report("t", [Table(("a",), ((text("<b>"),),))]))
    assert "&lt;b&gt;" in html and "<b>" not in html


# --------------------------------------------------------------------------- a run


def _ckpt(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


@pytest.fixture
def catalog(tmp_path: Path):
    """Two runs: ``old`` computed the baselines; ``new`` reused them from the cache,
    trained the rest, and had its judge skipped."""
    from tasks.catalog import Catalog

    cat = Catalog()
    cat.migrate()
    t0 = dt.datetime(2026, 11, 29, 3, 0, 0)
    config = {"profile": "smoke", "load_gpt2": {"base_model": "scratch"}, "download": {}}
    start_run(cat, "old", profile="smoke", config=config)
    start_run(cat, "new", profile="smoke", config=config)
    cat.end_run("new", "completed")
    spam_rows = []
    for model, accs in {"logreg_bow": (0.99, 0.95, 0.9), "majority": (0.5, 0.5, 0.5)}.items():
        for split, acc in zip(("train", "val", "test"), accs, strict=True):
            spam_rows.append(
                {"run_id": "old", "model": model, "split": split, "accuracy": acc,
                 "precision": 0.9, "recall": 0.8, "f1": 0.85, "tn": 18, "fp": 2, "fn": 2,
                 "tp": 18, "settings": None}
            )  # fmt: skip
    cat.replace_rows("baselines", spam_rows, where={"run_id": "old"})

    def stage(name, seconds, **kw):
        record_stage(
            cat, "new", name, started_at=t0, ended_at=t0 + dt.timedelta(seconds=seconds), **kw
        )

    stage("tokenize", 0.6, status="completed", cache_hit=False, outputs={
        "producer_run_id": "new",
        "corpus": [{"split": "train", "chars": 18000, "tokens": 4600, "windows": 17},
                   {"split": "val", "chars": 2000, "tokens": 500, "windows": 1}],
        "spam_counts": {"train": 40, "val": 40, "test": 40},
        "instruct_counts": {"train": 12, "val": 12, "test": 12},
    })  # fmt: skip
    stage("pretrain", 63, status="completed", cache_hit=False,
          outputs={"producer_run_id": "new", "parameters": 1234567, "tokens_seen": 46080,
                   "tokens_per_s": 147.3, "train_seconds": 61.2})  # fmt: skip
    stage(
        "finetune_spam", 30, status="completed", cache_hit=False, outputs={"producer_run_id": "new"}
    )
    stage("baseline_spam", 0.1, status="cached", cache_hit=True, outputs={"producer_run_id": "old"})
    stage(
        "finetune_instruct",
        20,
        status="completed",
        cache_hit=False,
        outputs={"producer_run_id": "new"},
    )
    stage(
        "extract_responses",
        5,
        status="completed",
        cache_hit=False,
        outputs={"producer_run_id": "new", "n": 12, "new_tokens": 340, "generation_s": 4.2},
    )
    stage("judge", 0.2, status="skipped", message=JUDGE_MSG)
    metrics = []
    for step in (1, 6, 11):
        metrics += [
            {"step": step, "epoch": 1, "seen": step * 512, "split": "train", "name": "loss",
             "value": 10.0 / step},
            {"step": step, "epoch": 1, "seen": step * 512, "split": "val", "name": "loss",
             "value": math.nan if step == 6 else 11.0 / step},
        ]  # fmt: skip
    record_metrics(cat, "new", "pretrain", metrics)
    record_metrics(cat, "new", "finetune_instruct", metrics)
    spam = []
    for epoch, step in ((1, 5), (2, 10)):
        for split in ("train", "val", "test"):
            spam += [
                {"step": step, "epoch": epoch, "seen": step * 8, "split": split, "name": "loss",
                 "value": 0.7 / epoch},
                {"step": step, "epoch": epoch, "seen": step * 8, "split": split,
                 "name": "accuracy", "value": 0.5 + 0.2 * epoch},
            ]  # fmt: skip
    spam += [
        {"step": s, "epoch": 1 + (s > 5), "seen": s * 8, "split": "train", "name": "step_loss",
         "value": 0.8 - 0.05 * s}
        for s in range(1, 11)
    ]  # fmt: skip
    for split in ("train", "val", "test"):
        final = {"accuracy": 0.875, "precision": 0.9, "recall": 0.85, "f1": 0.87,
                 "tn": 17, "fp": 3, "fn": 2, "tp": 18}  # fmt: skip
        spam += [
            {"step": 10, "epoch": 2, "seen": 80, "split": split, "name": f"final_{k}", "value": v}
            for k, v in final.items()
        ]
    record_metrics(cat, "new", "finetune_spam", spam)
    ck = _ckpt(tmp_path / "artifacts" / "stages" / "pretrain" / "k1" / "final")
    record_checkpoint(cat, "new", "pretrain", ck)
    return cat


def _images(md: str) -> list[bytes]:
    found = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    return [base64.b64decode(b) for b in found]


def _without_images(md: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", md)


def test_report_content(catalog):
    md = to_markdown(build_report(catalog, "new"), wrap=False)  # wrapping: a test below
    pngs = _images(md)
    # pretrain + spam training + instruct curves + confusion matrices
    assert len(pngs) == 4, md[:3000]
    assert all(p.startswith(PNG) and 2_000 < len(p) < 120_000 for p in pngs)
    body = _without_images(md)
    for bad in ("nan", "NaN", "<NA>", "None", "file://", "0.6000", "seconds"):
        assert not re.search(rf"(?<![\w-]){re.escape(bad)}(?![\w-])", body), bad
    # durations and percentages for people
    assert "| pretrain | completed | 1 min 3 s |" in body
    assert "| tokenize | completed | 0.6 s |" in body
    assert "| test | 87.5 % | 90.0 % | 50.0 % |" in body  # finetuned, logreg_bow, majority
    # the cached baselines are read under the run that computed them
    assert "reused from run `old`" in body
    # spam finetune: per-epoch losses and the starting/final loss table
    assert "| finetune\\_spam | val | 0.700 | 0.350 |" in body
    assert "| 2 | 10 | 0.350 | 0.350 | 0.350 | 90.0 % | 90.0 % | 90.0 % |" in body
    # the judge message whole (with its commands as code), and why there are no scores
    msg_md = to_markdown(Report("x", [Para(with_code_spans(JUDGE_MSG))])).split("\n\n", 1)[1]
    assert body.count(msg_md.strip()) == 2, msg_md  # under Stages and under Judge
    assert "**No scores:** the judge stage was skipped" in body
    # checkpoints named by path, in words
    assert "/stages/pretrain/k1/final`" in body and "on the machine that ran" in body
    assert "## Gates" in body and "No gates were evaluated for this run." in body


def test_gates_section_when_the_run_has_gates(catalog):
    catalog.replace_rows(
        "gates",
        [
            {
                "run_id": "new",
                "gate": "spam_test_accuracy",
                "scope": "test",
                "passed": False,
                "value": 0.875,
                "threshold": 0.89,
                "compared_to_run": "old",
                "message": "spam test accuracy fell 2.5 points below run old (limit 1)",
            },
            {
                "run_id": "new",
                "gate": "beats_baseline",
                "passed": True,
                "value": 0.875,
                "threshold": 0.9,
            },
        ],
        where={"run_id": "new"},
    )
    body = _without_images(to_markdown(build_report(catalog, "new"), wrap=False))
    assert "## Gates" in body and "1 of 2 gates passed." in body
    assert "| spam\\_test\\_accuracy (test) | **FAILED** | 0.875 | 0.89 | `old` |" in body
    assert "| beats\\_baseline | passed | 0.875 | 0.9 | — |   |" in body


def _visible_width(row: str) -> int:
    """How many characters a Markdown table row takes on screen: per cell its longest
    ``<br>``-separated line without the markup, plus the padding of each cell."""
    cells = re.split(r"(?<!\\)\|", row.strip())[1:-1]
    width = 0
    for cell in cells:
        lines = [re.sub(r"\\(.)|`|\*\*", r"\1", x).strip() for x in cell.split("<br>")]
        width += max(len(x) for x in lines) + TABLE_PAD
    return width


TABLE_PAD = 4


def test_long_table_text_wraps_inside_the_page(catalog):
    """The Prefect UI's classic artifact page (where a flow run log's links lead) never
    wraps a table cell: the Gates message and the lowest-scored responses ran past the
    right edge and were cut off. The artifact's Markdown breaks the long cells of a wide
    table into lines (``<br>``) so each row fits TABLE_WIDTH characters; every word is
    kept; the terminal's text (``wrap=False``) stays on one line per row."""
    from flows.report.blocks import TABLE_WIDTH, code

    long_msg = (
        "finetuned spam test accuracy 42.5% vs best baseline logreg_bow 77.5%: -35.0 "
        "points (must be higher); see `gptflow compare` for the examples that changed"
    )
    catalog.replace_rows(
        "gates",
        [
            {
                "run_id": "new",
                "gate": "finetuned_beats_best_baseline",
                "scope": "test",
                "passed": False,
                "value": -35.0,
                "threshold": 0.0,
                "compared_to_run": "old",
                "message": long_msg,
            }
        ],
        where={"run_id": "new"},
    )
    response = "the model's answer, " * 12
    question = "What type of cloud is typically associated with thunderstorms?"
    worst = Table(
        ("example", "instruction", "response", "score", "judge"),
        (("0", question, response, "12", "llama3"),),
        "rllrl",
    )
    paths = Table(("stage", "folder"), (("pretrain", code("/tmp/x/" + "f" * 120)),))
    report = build_report(catalog, "new")
    report.blocks += [worst, paths]
    md = to_markdown(report)
    rows = [x for x in md.splitlines() if x.startswith("| ") and "<br>" in x]
    assert any("finetuned" in r for r in rows) and any("model's answer" in r for r in rows)
    for row in rows:
        assert _visible_width(row) <= TABLE_WIDTH, row
    gate_row = next(r for r in rows if "finetuned" in r)
    words = re.sub(r"<br>|\\|`", " ", gate_row).split()
    assert " ".join(words).count("see gptflow compare for the examples that changed") == 1
    assert "f" * 20 in re.sub(r"<br>|`", "", next(r for r in rows if "/tmp/x/" in r))
    flat = to_markdown(report, wrap=False)
    assert "<br>" not in flat and "points (must be higher); see `gptflow compare`" in flat


def test_cli_report_html_is_self_contained(catalog, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "report.html"
    assert main(["report", "new", "--html", str(out), "--markdown", str(tmp_path / "r.md")]) == 0
    assert "4 plots" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(https?:|file:|/)', page)  # nothing outside the file
    assert "1 min 3 s" in page and "87.5 %" in page and "<code>ollama serve</code>" in page
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert _images(md) == [base64.b64decode(s.split(",", 1)[1]) for s in srcs]
    # the latest run by default, text on the terminal with the plots left out
    assert main(["report"]) == 0
    shown = capsys.readouterr().out
    assert "# gptflow run new" in shown and "base64" not in shown
    assert main(["report", "nope"]) == 1
    assert "no run 'nope'" in capsys.readouterr().err


def test_cli_report_as_text_draws_no_plot(catalog, capsys, monkeypatch, tmp_path):
    """The terminal report names its plots and draws none (drawing them was most of a
    report's time on a year-sized catalog); the HTML report draws them."""
    from flows.cli import main
    from flows.report import plots

    drawn: list[str] = []
    for name in ("confusion_matrices", "score_histogram", "line_chart", "spam_training"):
        real = getattr(plots, name)

        def spy(*a, _real=real, _name=name, **kw):
            drawn.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(plots, name, spy)
    assert main(["report", "new"]) == 0
    shown = capsys.readouterr().out
    assert drawn == [] and shown.count("[plot: ") == 4, shown
    assert main(["report", "new", "--markdown", str(tmp_path / "r.md")]) == 0
    assert len(drawn) == 4


# --------------------------------------------------------------------------- reuse


def test_report_reused_when_nothing_changed_rebuilt_when_a_stage_recomputes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run whose stages were all served from the cache with the results an earlier run
    reported publishes that run's stored report (saying so) without rebuilding it; a run
    in which one stage recomputed gets its report rebuilt."""
    import prefect.artifacts

    from flows.report import build, publish
    from tasks.catalog import Catalog

    published: list[str] = []
    monkeypatch.setattr(
        prefect.artifacts,
        "create_markdown_artifact",
        lambda markdown, **kw: published.append(markdown),
    )
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", lambda **kw: None)
    built: list[str] = []
    real_build = build._build
    monkeypatch.setattr(build, "_build", lambda data: built.append(data.run_id) or real_build(data))

    cat = Catalog()
    cat.migrate()
    config = {"profile": "smoke", "pretrain": {"epochs": 1}}

    def run(run_id: str, producers: dict[str, str]) -> str:
        start_run(cat, run_id, profile="smoke", config=config)
        for name, producer in producers.items():
            computed = producer == run_id
            record_stage(
                cat,
                run_id,
                name,
                status="completed" if computed else "cached",
                cache_hit=not computed,
                outputs={"producer_run_id": producer, "key": f"k-{name}-{producer}",
                         "digest": f"d-{name}-{producer}"},
            )  # fmt: skip
        record_stage(cat, run_id, "judge", status="skipped", message="Ollama is not reachable")
        cat.end_run(run_id, "completed")
        return publish.publish_report(cat, run_id)

    first = run("r1", {"tokenize": "r1", "pretrain": "r1"})
    assert built == ["r1"] and "Nothing changed" not in first
    again = run("r2", {"tokenize": "r1", "pretrain": "r1"})  # all cached: same results
    assert built == ["r1"], "the report was rebuilt although nothing changed"
    assert again.startswith("> Nothing changed since run `r1`")
    assert again.endswith(first) and published[-1] == again
    recomputed = run("r3", {"tokenize": "r1", "pretrain": "r3"})  # pretrain recomputed
    assert built == ["r1", "r3"] and "Nothing changed" not in recomputed
