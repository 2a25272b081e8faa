"""baseline_spam: majority-class and logistic-regression baselines on exactly the spam
finetune's splits (:func:`gpt.eval.baseline.run_baselines`)."""

from __future__ import annotations

import json
from typing import Any

from gpt.eval.baseline import BaselineArgs, evaluate_baselines, load_spam_splits
from tasks.stages.contract import StageOut, StageOutput, StageRun
from tasks.stages.runner import stage


class BaselineOut(StageOut):
    """One row per (baseline, split): accuracy, precision, recall, F1, confusion matrix."""

    baselines_json: str
    """The same rows as a JSON file."""
    rows: list[dict[str, Any]]


@stage("baseline_spam")
def baseline_spam(run: StageRun, args: BaselineArgs, tokenize: StageOutput) -> BaselineOut:
    splits = load_spam_splits(tokenize.path(tokenize.out.spam_splits))
    result = evaluate_baselines(splits, args)  # metrics rows + per-example predictions
    rows = result.rows
    run.add_rows("baselines", rows)
    run.add_rows("predictions", result.predictions)
    rel = "baselines.json"
    text = json.dumps(rows, indent=1, default=str, sort_keys=True)
    (run.work / rel).write_text(text, encoding="utf-8")
    return BaselineOut(baselines_json=rel, rows=json.loads(json.dumps(rows, default=str)))
