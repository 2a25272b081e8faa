"""One computed ``cpu``-profile run's catalog rows, for :mod:`benchmarks.catalog_year`.

Rows per computed ``cpu`` run (:data:`CPU_RUN`): counted from the ``cpu`` profile's
settings and the split sizes of the real inputs (1,494 balanced SMS messages split
1,045 / 149 / 300; 400 / 55 / 110 instruction records; 18 pretraining windows of 256
tokens) with the per-step metric rows of a real smoke run: pretraining 90 steps (9 per
epoch × 10) evaluated at step 1 and every 5 (train loss, lr, tokens/s, val loss);
the spam finetune 5 epochs × 3 splits × accuracy and loss, 8 final figures per split and
2 sizes; the instruction finetune 50 steps (400 / 8) evaluated like pretraining plus 2
sizes; one perplexity. Predictions cover every split for the finetuned classifier and
the 3 baselines. Text lengths are those of the real inputs (SMS texts of the balanced set
~104 characters; instruction, input, output ~46 / 8 / 48), stage outputs and run configs
the sizes a real smoke run recorded (0.8-3.5 kB and 3.2 kB of JSON).
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from tasks.stages import STAGES

__all__ = ["CPU_RUN", "STAGES", "Templates", "key", "metric_template", "templates"]

SPAM_SPLITS = {"train": 1045, "val": 149, "test": 300}
INSTRUCT_SPLITS = {"train": 400, "val": 55, "test": 110}
BASELINE_MODELS = ("majority", "logreg_bow", "logreg_tfidf")
#: JSON bytes of each stage's ``outputs`` (a real smoke run's rows).
OUTPUT_BYTES = {
    "download": 790,
    "tokenize": 2390,
    "pretrain": 1320,
    "load_gpt2": 1010,
    "finetune_spam": 1710,
    "baseline_spam": 3470,
    "finetune_instruct": 1920,
    "extract_responses": 850,
    "judge": 1360,
}
CONFIG_BYTES = 3190
#: The judge settings of the nightly run and of a re-scoring: (models, repeats).
NIGHTLY_JUDGE = (("llama3",), 1)
RESCORE_JUDGE = (("llama3", "mistral"), 3)


def _steps(total: int, every: int) -> list[int]:
    """Evaluation steps of a training loop: step 1 and every ``every``-th."""
    return sorted({1, *range(every, total + 1, every)})


def metric_template() -> list[dict[str, Any]]:
    """The metric rows (without run id, value scaled per run) of one computed cpu run."""
    rows: list[dict[str, Any]] = []
    for stage, steps, every, tokens in (
        ("pretrain", 90, 5, 512),
        ("finetune_instruct", 50, 5, 2048),
    ):
        for step in _steps(steps, every):
            seen = step * tokens
            for split, name, value in (
                ("train", "loss", 6.0 - 4.0 * step / steps),
                ("train", "lr", 4e-4),
                ("train", "tokens_per_s", 900.0),
                ("val", "loss", 6.4 - 3.0 * step / steps),
            ):
                rows.append(_metric(stage, step, None, seen, split, name, value))
    rows.append(_metric("load_gpt2", 0, None, 0, "val", "perplexity", 33.0))
    per_epoch = SPAM_SPLITS["train"] // 8
    for epoch in range(1, 6):
        for split in SPAM_SPLITS:
            rows.append(
                _metric("finetune_spam", epoch * per_epoch, epoch, None, split, "accuracy", 0.9)
            )
            rows.append(
                _metric("finetune_spam", epoch * per_epoch, epoch, None, split, "loss", 0.3)
            )
    last = 5 * per_epoch
    finals = ("accuracy", "f1", "precision", "recall", "tn", "fp", "fn", "tp")
    for split in SPAM_SPLITS:
        for name in finals:
            rows.append(_metric("finetune_spam", last, 5, None, split, f"final_{name}", 0.95))
    for stage, step in (("finetune_spam", last), ("finetune_instruct", 50)):
        rows.append(_metric(stage, step, None, None, "train", "checkpoint_bytes", 5.0e8))
        rows.append(_metric(stage, step, None, None, "train", "trainable_params", 7.1e6))
    return rows


def _metric(
    stage: str, step: int, epoch: int | None, seen: int | None, split: str, name: str, value: float
) -> dict[str, Any]:
    return {
        "stage": stage,
        "step": step,
        "epoch": epoch,
        "seen": seen,
        "split": split,
        "name": name,
        "value": value,
    }


#: Rows one computed cpu-profile run writes, by table (``sms_messages`` and ``sources``
#: are shared by every run of the same inputs: written once).
CPU_RUN: dict[str, int] = {
    "runs": 1,
    "stages": len(STAGES),
    "metrics": len(metric_template()),
    "samples": 10 + 1 + 1,
    "checkpoints": 4,
    "corpus": 2,
    "spam_examples": sum(SPAM_SPLITS.values()),
    "instructions": sum(INSTRUCT_SPLITS.values()),
    "baselines": len(BASELINE_MODELS) * len(SPAM_SPLITS),
    "predictions": (1 + len(BASELINE_MODELS)) * sum(SPAM_SPLITS.values()),
    "responses": INSTRUCT_SPLITS["test"],
    "judgments": INSTRUCT_SPLITS["test"] * len(NIGHTLY_JUDGE[0]) * NIGHTLY_JUDGE[1],
    "gates": 3,
}


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvk"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n)]


class _Texts:
    """Deterministic text of given mean lengths, from a fixed vocabulary (compresses
    like prose of a small vocabulary)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = _words(self.rng, 3000)

    def text(self, mean: int) -> str:
        target = max(0, int(self.rng.gauss(mean, mean / 3)))
        words: list[str] = []
        n = 0
        while n < target:
            w = self.rng.choice(self.vocab)
            words.append(w)
            n += len(w) + 1
        return " ".join(words)

    def pad(self, n: int) -> str:
        return "".join(self.rng.choice("0123456789abcdef") for _ in range(n))


@dataclass
class Templates:
    """Per-run template rows (registered once per transaction)."""

    frames: dict[str, pd.DataFrame]
    outputs: dict[str, str]
    config: str
    responses_pool: list[str]


def templates(seed: int) -> Templates:
    import pandas as pd

    t = _Texts(seed)
    spam = [
        {
            "split": s,
            "idx": i,
            "label": "spam" if (i * 7 + len(s)) % 2 else "ham",
            "text": t.text(104),
        }
        for s, n in SPAM_SPLITS.items()
        for i in range(n)
    ]
    inst = [
        {
            "split": s,
            "idx": i,
            "instruction": t.text(46),
            "input": t.text(8) if i % 3 == 0 else "",
            "output": t.text(48),
        }
        for s, n in INSTRUCT_SPLITS.items()
        for i in range(n)
    ]
    preds = [
        {
            "stage": "finetune_spam" if m == "finetuned" else "baseline_spam",
            "model": m,
            "split": r["split"],
            "example_id": r["idx"],
            "label": r["label"],
        }
        for m in ("finetuned", *BASELINE_MODELS)
        for r in spam
    ]
    samples = [
        {
            "stage": "pretrain",
            "epoch": e,
            "step": 9 * e,
            "prompt": "Every effort moves you",
            "text": t.text(200),
        }
        for e in range(1, 11)
    ] + [
        {
            "stage": "load_gpt2",
            "epoch": None,
            "step": 0,
            "prompt": "Every effort moves you",
            "text": t.text(120),
        },
        {
            "stage": "finetune_instruct",
            "epoch": 1,
            "step": 50,
            "prompt": t.text(200),
            "text": t.text(230),
        },
    ]
    ckpt_cfg = json.dumps(
        {
            "context_length": 1024,
            "emb_dim": 768,
            "n_heads": 12,
            "n_layers": 12,
            "vocab_size": 50257,
            "kind": "lm",
        }
    )
    checkpoints = [
        {"stage": s, "name": n, "bytes": b, "config": ckpt_cfg}
        for s, n, b in (
            ("pretrain", "final", 650_000_000),
            ("load_gpt2", "spam_base", 498_000_000),
            ("finetune_spam", "classifier", 498_000_000),
            ("finetune_instruct", "model", 498_000_000),
        )
    ]
    baselines = [
        {
            "model": m,
            "split": s,
            "accuracy": 0.5 + 0.15 * k,
            "precision": 0.9,
            "recall": 0.9,
            "f1": 0.9,
            "tn": n // 2,
            "fp": 3,
            "fn": 4,
            "tp": n // 2 - 7,
            "settings": json.dumps({"C": 1.0, "max_iter": 1000, "features": ["bow", "tfidf"]}),
        }
        for k, m in enumerate(BASELINE_MODELS)
        for s, n in SPAM_SPLITS.items()
    ]
    test = [r for r in inst if r["split"] == "test"]
    responses = [
        {
            "example_id": i,
            "instruction": r["instruction"],
            "input": r["input"],
            "output": r["output"],
        }
        for i, r in enumerate(test)
    ]
    frames = {
        "metrics": pd.DataFrame(metric_template()),
        "spam": pd.DataFrame(spam),
        "inst": pd.DataFrame(inst),
        "preds": pd.DataFrame(preds),
        "samples": pd.DataFrame(samples),
        "ckpt": pd.DataFrame(checkpoints),
        "base": pd.DataFrame(baselines),
        "resp": pd.DataFrame(responses),
        "sms": pd.DataFrame(
            [
                {"line_no": i, "label": "ham" if i % 7 else "spam", "text": t.text(81)}
                for i in range(5574)
            ]
        ),
    }
    outputs = {s: t.pad(max(0, n - 420)) for s, n in OUTPUT_BYTES.items()}
    return Templates(frames, outputs, t.pad(CONFIG_BYTES - 300), [t.text(200) for _ in range(2000)])


def key(*parts: object) -> str:
    return uuid.uuid5(uuid.NAMESPACE_OID, "/".join(map(str, parts))).hex[:24]
