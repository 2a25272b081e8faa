"""One run's evaluation rows, read through the runs that produced them.

:class:`RunData` reads each table once (lazily) for a run: the stage producers first,
then metrics, baselines, predictions, spam examples, responses and judgments from the
run each stage's rows belong to (see :mod:`tasks.catalog.lookup`).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import pandas as pd

from tasks.catalog.lookup import producers, run_info

if TYPE_CHECKING:
    from tasks.catalog import Catalog

_SPLIT_ORDER = {"train": 0, "val": 1, "validation": 1, "test": 2}
#: What a finetune trained and stored (gpt.adapter.ModelSize): headline label of each.
SIZE_METRICS = {"trainable_params": "trainable parameters", "checkpoint_bytes": "checkpoint MB"}
_SIZE_NAMES = ", ".join(f"'{n}'" for n in SIZE_METRICS)


def split_key(split: str) -> tuple[int, str]:
    """Sort key: train, val, test, then others by name."""
    return (_SPLIT_ORDER.get(split, 9), split)


class RunData:
    """Lazily read, cached evaluation rows of one run (read-only snapshot)."""

    def __init__(self, cat: Catalog, run_id: str) -> None:
        self.cat = cat
        self.run_id = run_id

    @cached_property
    def producers(self) -> dict[str, str]:
        """``{stage: producing run}`` for the run's stages."""
        return producers(self.cat, self.run_id)

    def of(self, stage: str) -> str:
        """The run whose rows hold ``stage``'s results (the run itself by default)."""
        return self.producers.get(stage, self.run_id)

    @property
    def responses_run(self) -> str:
        """The run whose responses and judgments belong to this run: the one its judge
        scored, else the producer of its responses, else itself."""
        judged = self.producers.get("judge")
        if judged and judged != self.run_id:  # a skipped judge records no responses run
            return judged
        return self.producers.get("extract_responses", self.run_id)

    @cached_property
    def info(self) -> dict[str, Any]:
        """The ``runs`` row (config parsed), or ``{run_id, config: None}``."""
        return run_info(self.cat, self.run_id)

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """stage, split, name, last (value at the highest step), latest (value written
        last) of the headline metric names, from each stage's producer."""
        stages = ("pretrain", "load_gpt2", "finetune_spam", "finetune_instruct")
        cond = " OR ".join("(stage = ? AND run_id = ?)" for _ in stages)
        params: list[Any] = [x for s in stages for x in (s, self.of(s))]
        return self.cat.query_df(
            "SELECT stage, split, name, arg_max(value, step) AS last, "
            "arg_max(value, time) AS latest FROM metrics "
            f"WHERE ({cond}) AND (name IN ('loss', 'final_accuracy', {_SIZE_NAMES}) "
            "OR starts_with(name, 'perplexity')) GROUP BY stage, split, name",
            params,
        )

    @cached_property
    def accuracies(self) -> dict[str, dict[str, float]]:
        """``{model: {split: accuracy}}``: the finetuned classifier (``finetuned``) and
        each baseline."""
        out: dict[str, dict[str, float]] = {}
        m = self.metrics
        ft = m[(m["stage"] == "finetune_spam") & (m["name"] == "final_accuracy")]
        for s, v in zip(ft["split"], ft["latest"], strict=True):
            out.setdefault("finetuned", {})[str(s)] = float(v)
        bl = self.cat.query_df(
            "SELECT model, split, accuracy FROM baselines WHERE run_id = ?",
            [self.of("baseline_spam")],
        )
        for model, s, v in zip(bl["model"], bl["split"], bl["accuracy"], strict=True):
            out.setdefault(str(model), {})[str(s)] = float(v)
        return out

    @cached_property
    def _predictions(self) -> pd.DataFrame:
        preds = self.cat.query_df(
            "SELECT model, split, example_id, label, prediction, prob_spam FROM predictions "
            "WHERE (stage = 'finetune_spam' AND run_id = ?) "
            "OR (stage = 'baseline_spam' AND run_id = ?) ORDER BY model, split, example_id",
            [self.of("finetune_spam"), self.of("baseline_spam")],
        )
        texts = self.cat.query_df(
            "SELECT split, idx AS example_id, text FROM spam_examples WHERE run_id = ?",
            [self.of("tokenize")],
        )
        if texts.empty:
            preds["text"] = None
            return preds
        return preds.merge(texts, on=["split", "example_id"], how="left")

    def predictions(self, model: str = "finetuned") -> pd.DataFrame:
        """split, example_id, label, prediction, prob_spam, text of one model."""
        p = self._predictions
        return p[p["model"] == model].drop(columns="model").reset_index(drop=True)

    @cached_property
    def judge_scores(self) -> pd.DataFrame:
        """Per judge model, prompt version and example: the mean of its scored judgments
        (repeats averaged) and how many there were — the judgments of the judge keys this
        run's judge stage used (``run_judgments``)."""
        return self.cat.query_df(
            "SELECT judge_model, prompt_version, example_id, avg(score) AS score, "
            "count(score) AS n_scores FROM run_judgments WHERE run_id = ? "
            "GROUP BY judge_model, prompt_version, example_id HAVING count(score) > 0 "
            "ORDER BY judge_model, prompt_version, example_id",
            [self.run_id],
        )

    @cached_property
    def responses(self) -> pd.DataFrame:
        """example_id, instruction, input, output, response."""
        return self.cat.query_df(
            "SELECT example_id, instruction, input, output, response FROM responses "
            "WHERE run_id = ?",
            [self.responses_run],
        )

    def headline(self) -> pd.DataFrame:
        """section, metric, value: every stage's headline numbers."""
        rows: list[tuple[str, str, float]] = []
        m = self.metrics

        def losses(stage: str) -> None:
            d = m[(m["stage"] == stage) & (m["name"] == "loss")]
            for s in sorted(d["split"], key=split_key):
                v = d.loc[d["split"] == s, "last"].iloc[0]
                rows.append((stage, f"final {s} loss", float(v)))

        losses("pretrain")
        ppl = m[(m["stage"] == "load_gpt2") & m["name"].str.startswith("perplexity")]
        for name, v in sorted(zip(ppl["name"], ppl["latest"], strict=True)):
            rows.append(("load_gpt2", f"val {name}", float(v)))

        def sizes(stage: str) -> None:  # LoRA vs full finetune: what trains, what is stored
            d = m[(m["stage"] == stage) & m["name"].isin(list(SIZE_METRICS))]
            for name, label in SIZE_METRICS.items():
                v = d.loc[d["name"] == name, "latest"]
                if len(v):
                    scale = 1e-6 if name == "checkpoint_bytes" else 1.0
                    rows.append((stage, label, float(v.iloc[0]) * scale))

        sizes("finetune_spam")
        for model, by_split in sorted(self.accuracies.items(), key=lambda kv: kv[0] != "finetuned"):
            section = "finetune_spam" if model == "finetuned" else "baseline_spam"
            for s in sorted(by_split, key=split_key):
                rows.append((section, f"{model} {s} accuracy", by_split[s]))
        losses("finetune_instruct")
        sizes("finetune_instruct")
        for (jm, pv), g in self.judge_scores.groupby(["judge_model", "prompt_version"], sort=True):
            rows += [
                ("judge", f"{jm} {pv} mean", float(g["score"].mean())),
                ("judge", f"{jm} {pv} median", float(g["score"].median())),
                ("judge", f"{jm} {pv} n", float(len(g))),
            ]
        return pd.DataFrame(rows, columns=["section", "metric", "value"])


__all__ = ["RunData", "split_key"]
