"""Scikit-learn baselines for the spam classifier, on exactly the finetune's splits.

A majority-class dummy and logistic regression over bag-of-words and TF-IDF features.
Labels follow the classifier: ham = 0, spam = 1 (spam is the positive class).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from gpt.config import Args
from gpt.errors import DataError

log = logging.getLogger(__name__)

Splits = dict[str, tuple[list[str], list[int]]]

#: Names of the labels 0 and 1, as ``spam_examples.label`` stores them.
LABEL_NAMES = ("ham", "spam")


class BaselineArgs(Args):
    """Settings of the logistic-regression baselines (a majority-class dummy always runs)."""

    features: tuple[Literal["bow", "tfidf"], ...] = ("bow", "tfidf")
    """Feature sets to fit, each "bow" (CountVectorizer) or "tfidf" (TfidfVectorizer)."""
    C: float = Field(1.0, gt=0)
    """Inverse regularisation strength of LogisticRegression."""
    max_iter: int = Field(1000, ge=1)
    """Solver iteration limit of LogisticRegression."""
    seed: int = 123
    """random_state of the estimators."""
    lowercase: bool = True
    """Lower-case the texts before tokenising (the vectorisers' default)."""
    train_split: str = "train"
    """Name of the split the models are fitted on; every split is scored."""


def binary_metrics(y_true: list[int], y_pred: list[int]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 (spam = 1 positive) and the confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
    )

    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
    }


def prediction_rows(
    split: str,
    labels: Sequence[int],
    predictions: Sequence[int],
    prob_spam: Sequence[float | None],
) -> list[dict[str, Any]]:
    """One row per message of a split: ``{split, example_id, label, prediction,
    prob_spam}`` with ``example_id`` = the message's index in the split (the ``idx`` of
    ``spam/splits.json``) and labels named ``ham``/``spam``."""
    if not len(labels) == len(predictions) == len(prob_spam):
        raise DataError(
            f"split {split!r}: {len(labels)} labels, {len(predictions)} predictions and "
            f"{len(prob_spam)} probabilities; they must be equally many"
        )
    return [
        {
            "split": split,
            "example_id": i,
            "label": LABEL_NAMES[int(y)],
            "prediction": LABEL_NAMES[int(p)],
            "prob_spam": None if q is None else float(q),
        }
        for i, (y, p, q) in enumerate(zip(labels, predictions, prob_spam, strict=True))
    ]


@dataclass
class BaselineResult:
    """What :func:`evaluate_baselines` computed."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    """One metrics row per (model, split), as :func:`run_baselines` returns them."""
    predictions: list[dict[str, Any]] = field(default_factory=list)
    """One row per (model, split, message): ``{model, split, example_id, label,
    prediction, prob_spam}`` (:func:`prediction_rows` plus the model)."""


def check_spam_splits(splits: Splits, train_split: str = "train") -> None:
    """Raise a :class:`DataError` unless ``splits`` has ``train_split``, as many labels as
    texts in every split, and labels 0 (ham) / 1 (spam) only."""
    if train_split not in splits:
        raise DataError(f"spam splits have no {train_split!r} split (have {sorted(splits)})")
    for name, (texts, labels) in splits.items():
        if len(texts) != len(labels):
            raise DataError(f"spam split {name!r}: {len(texts)} texts but {len(labels)} labels")
        bad = sorted({y for y in labels if y not in (0, 1)})
        if bad:
            raise DataError(f"spam split {name!r}: labels must be 0 (ham) / 1 (spam), got {bad}")


def load_spam_splits(path: Path) -> Splits:
    """``spam/splits.json`` (written by :func:`gpt.recipes.prepare.prepare_datasets`) as
    {split: (texts, labels)} with ham=0, spam=1."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {
        split: ([r["text"] for r in recs], [1 if r["label"] == "spam" else 0 for r in recs])
        for split, recs in data.items()
    }


def run_baselines(splits: Splits, args: BaselineArgs | None = None) -> list[dict]:
    """Fit the baselines on the train split and score every split.

    Returns one row per (model, split): ``{model, split, accuracy, precision, recall,
    f1, tn, fp, fn, tp, settings}`` with model in majority / logreg_bow / logreg_tfidf.
    """
    return evaluate_baselines(splits, args).rows


def _spam_probabilities(model: Any, texts: list[str]) -> list[float | None]:
    """P(spam) per text from ``predict_proba`` (None for a model without it)."""
    if not hasattr(model, "predict_proba"):
        return [None] * len(texts)
    classes = [int(c) for c in model.classes_]
    if 1 not in classes:
        return [0.0] * len(texts)
    col = classes.index(1)
    return [float(p[col]) for p in model.predict_proba(texts)]


def evaluate_baselines(splits: Splits, args: BaselineArgs | None = None) -> BaselineResult:
    """:func:`run_baselines`' rows plus every model's per-message predictions with the
    probability of spam (``predict_proba``)."""
    from sklearn.dummy import DummyClassifier
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    args = args or BaselineArgs()
    check_spam_splits(splits, args.train_split)
    x_train, y_train = splits[args.train_split]
    if len(set(y_train)) < 2:
        raise DataError(
            f"spam split {args.train_split!r} holds a single class: cannot fit a baseline"
        )

    models: list[tuple[str, object, dict]] = [
        (
            "majority",
            DummyClassifier(strategy="most_frequent"),
            {"strategy": "most_frequent"},
        )
    ]
    for feat in args.features:
        vec_cls = CountVectorizer if feat == "bow" else TfidfVectorizer
        settings = {
            "features": feat,
            "vectorizer": vec_cls.__name__,
            "lowercase": args.lowercase,
            "C": args.C,
            "max_iter": args.max_iter,
            "solver": "lbfgs",
            "seed": args.seed,
        }
        pipe = make_pipeline(
            vec_cls(lowercase=args.lowercase),
            LogisticRegression(C=args.C, max_iter=args.max_iter, random_state=args.seed),
        )
        models.append((f"logreg_{feat}", pipe, settings))

    result = BaselineResult()
    for name, model, settings in models:
        model.fit(list(x_train), list(y_train))  # type: ignore[attr-defined]
        settings = {**settings, "train_split": args.train_split, "n_train": len(x_train)}
        for split, (texts, labels) in splits.items():
            pred = [int(p) for p in model.predict(list(texts))]  # type: ignore[attr-defined]
            metrics = binary_metrics(list(labels), pred)
            result.rows.append(
                {"model": name, "split": split, **metrics, "settings": dict(settings)}
            )
            probs = _spam_probabilities(model, list(texts))
            result.predictions += [
                {"model": name, **r} for r in prediction_rows(split, list(labels), pred, probs)
            ]
            log.info("baseline %s %s accuracy %.4f", name, split, metrics["accuracy"])
    return result
