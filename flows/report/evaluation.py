"""The report's evaluation sections: the spam classifier against its baselines
(accuracy per split, confusion matrices), the judge's scores, the agreement between
judges and the lowest-scored responses."""

from __future__ import annotations

from typing import Any

import pandas as pd

from flows.report import fmt, plots
from flows.report.blocks import (
    Block,
    Heading,
    Image,
    Para,
    Table,
    bold,
    code,
    join,
    text,
    with_code_spans,
)
from flows.report.data import ReportData, generic_table
from gpt.eval.paired import split_key

#: The confusion-matrix cells, in the order metrics and baselines name them.
CELLS = ("tn", "fp", "fn", "tp")


def spam_accuracy(d: ReportData) -> pd.DataFrame:
    """Accuracy per split: the finetuned classifier and each baseline, each read from the
    run that computed it (columns ``split``, ``finetuned``, one per baseline model)."""
    acc = d.accuracies
    cols = (["finetuned"] if "finetuned" in acc else []) + sorted(set(acc) - {"finetuned"})
    splits = sorted({s for by_split in acc.values() for s in by_split}, key=split_key)
    rows = [{"split": s, **{c: acc[c].get(s) for c in cols}} for s in splits]
    return pd.DataFrame(rows, columns=["split", *cols])


def best_baseline(base: pd.DataFrame) -> str | None:
    """The baseline with the highest validation accuracy (chosen on validation, so the
    test comparison stays fair); ties go to the first name."""
    if base.empty:
        return None
    val = base[base["split"].isin(["val", "validation"])]
    pool = val if not val.empty else base
    ranked = pool.sort_values(["accuracy", "model"], ascending=[False, True])
    return str(ranked["model"].iloc[0])


def spam_section(d: ReportData) -> list[Block]:
    """Accuracy per split, the best baseline, and both confusion matrices on the test
    split with precision, recall and F1."""
    table = spam_accuracy(d)
    if table.empty:
        return []
    cols = [c for c in table.columns if c != "split"]
    rows = tuple((r["split"], *(fmt.percent(r[c]) for c in cols)) for r in table.to_dict("records"))
    blocks: list[Block] = [
        Heading("Spam classifier: finetuned vs baselines"),
        Table(("split", *cols), rows, "l" + "r" * len(cols)),
    ]
    splits = sorted(table["split"], key=split_key)
    test = "test" if "test" in splits else splits[-1]
    base = d.cat.query_df(
        "SELECT model, split, accuracy, precision, recall, f1, tn, fp, fn, tp "
        "FROM baselines WHERE run_id = ?",
        [d.of("baseline_spam")],
    )
    best = best_baseline(base)
    detail = _test_detail(d, test, base, best)
    if best is not None:
        blocks.append(Para(join("Best baseline (highest validation accuracy): ", code(best), ".")))
    if detail:
        matrices = {
            (name if name == "finetuned" else f"best baseline: {name}"): {
                k: int(m[k]) for k in CELLS
            }
            for name, m in detail
        }
        blocks.append(
            Image(
                lambda: plots.confusion_matrices(matrices, split=test),
                f"confusion matrices on the {test} split",
                f"Rows: true label; columns: prediction ({test} split).",
            )
        )
        blocks.append(
            Table(
                ("model", "accuracy", "precision", "recall", "F1"),
                tuple(
                    (
                        name,
                        *(fmt.percent(m.get(k)) for k in ("accuracy", "precision", "recall", "f1")),
                    )
                    for name, m in detail
                ),
                "lrrrr",
            )
        )
    return blocks


def _test_detail(
    d: ReportData, test: str, base: pd.DataFrame, best: str | None
) -> list[tuple[str, dict[str, Any]]]:
    """``(name, metrics)`` on the ``test`` split of the finetuned classifier and of the
    ``best`` of the baselines ``base``, for those that stored a whole confusion matrix."""
    detail = []
    fin = d.cat.query_df(
        "SELECT name, value FROM metrics WHERE run_id = ? AND stage = 'finetune_spam' "
        "AND split = ? AND name LIKE 'final_%'",
        [d.of("finetune_spam"), test],
    )
    f = {n.removeprefix("final_"): v for n, v in zip(fin["name"], fin["value"], strict=True)}
    if all(k in f for k in CELLS):
        detail.append(("finetuned", f))
    b = base[(base["model"] == best) & (base["split"] == test)]
    if not b.empty:
        detail.append((str(best), b.iloc[0].to_dict()))
    return detail


def judge_section(d: ReportData) -> list[Block]:
    """How many responses were generated, the judge's scores per model and prompt
    version and their histogram — or why there are none."""
    judge = d.stage("judge")
    if judge is None and d.stage("extract_responses") is None:
        return []
    blocks: list[Block] = [Heading("Judge")]
    ext = d.outputs("extract_responses")
    if ext.get("n"):
        blocks.append(
            Para(
                text(
                    f"{fmt.count(ext['n'])} responses, {fmt.count(ext.get('new_tokens'))} new "
                    f"tokens generated in {fmt.duration(ext.get('generation_s'))}."
                )
            )
        )
    summary_df = d.cat.query_df(
        "SELECT * FROM eval_summary WHERE run_id = ? ORDER BY judge_model, prompt_version",
        [d.run_id],
    )
    if summary_df.empty:
        if judge is None:
            why = text("no judge stage ran for this run.")
        elif not fmt.is_missing(judge.get("message")):
            why = join(
                f"the judge stage was {judge['status']}: ", with_code_spans(judge["message"])
            )
        else:
            why = text(f"the judge stage ended {judge['status']} without scores.")
        blocks.append(Para(join(bold("No scores:"), " ", why)))
        return blocks
    # n_examples is n / repeats: one column fewer keeps the table inside the page
    blocks.append(
        generic_table(summary_df, drop=("run_id", "responses_run_id", "judge_key", "n_examples"))
    )
    scores = d.cat.query_df(
        "SELECT judge_model, score FROM run_judgments WHERE run_id = ? AND score IS NOT NULL",
        [d.run_id],
    )
    if not scores.empty:
        by_model = {str(m): g["score"].tolist() for m, g in scores.groupby("judge_model")}
        blocks.append(Image(lambda: plots.score_histogram(by_model), "judge score histogram"))
    return blocks


def agreement_section(d: ReportData) -> list[Block]:
    """Agreement between judges (the ``judge_agreement`` view)."""
    if "judge_agreement" not in d.relations:
        return []
    df = d.cat.query_df("SELECT * FROM judge_agreement WHERE run_id = ?", [d.run_id])
    if df.empty:
        return []
    return [Heading("Judge agreement", 3), generic_table(df, drop=("run_id", "key_a", "key_b"))]


def worst_section(d: ReportData) -> list[Block]:
    """The five lowest-scored responses."""
    df = d.cat.query_df(
        "SELECT example_id, instruction, response, score, judge_model FROM eval_examples "
        "WHERE run_id = ? AND score IS NOT NULL ORDER BY score, example_id LIMIT 5",
        [d.run_id],
    )
    if df.empty:
        return []
    rows = tuple(
        (
            fmt.count(r["example_id"]),
            fmt.shorten(r["instruction"], 90),
            fmt.shorten(r["response"], 90) if not fmt.is_missing(r["response"]) else "(empty)",
            fmt.count(r["score"]),
            str(r["judge_model"]),
        )
        for r in df.to_dict("records")
    )
    return [
        Heading("Lowest-scored responses", 3),
        Table(("example", "instruction", "response", "score", "judge"), rows, "rllrl"),
    ]
