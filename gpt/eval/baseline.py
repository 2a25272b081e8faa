"""Scikit-learn baselines for the spam classifier, on exactly the finetune's splits.

A majority-class dummy and logistic regression over bag-of-words and TF-IDF features.
Labels follow the classifier: ham = 0, spam = 1 (spam is the positive class).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from gpt.config import Args
from gpt.errors import DataError

log = logging.getLogger(__name__)

Splits = dict[str, tuple[list[str], list[int]]]


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


def _check_splits(splits: Splits, train_split: str) -> None:
    if train_split not in splits:
        raise DataError(f"spam splits have no {train_split!r} split (have {sorted(splits)})")
    for name, (texts, labels) in splits.items():
        if len(texts) != len(labels):
            raise DataError(f"spam split {name!r}: {len(texts)} texts but {len(labels)} labels")
        bad = sorted({y for y in labels if y not in (0, 1)})
        if bad:
            raise DataError(f"spam split {name!r}: labels must be 0 (ham) / 1 (spam), got {bad}")
    if len(set(splits[train_split][1])) < 2:
        raise DataError(f"spam split {train_split!r} holds a single class: cannot fit a baseline")


def run_baselines(splits: Splits, args: BaselineArgs | None = None) -> list[dict]:
    """Fit the baselines on the train split and score every split.

    Returns one row per (model, split): ``{model, split, accuracy, precision, recall,
    f1, tn, fp, fn, tp, settings}`` with model in majority / logreg_bow / logreg_tfidf.
    """
    from sklearn.dummy import DummyClassifier
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    args = args or BaselineArgs()
    _check_splits(splits, args.train_split)
    x_train, y_train = splits[args.train_split]

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

    rows: list[dict] = []
    for name, model, settings in models:
        model.fit(list(x_train), list(y_train))  # type: ignore[attr-defined]
        settings = {**settings, "train_split": args.train_split, "n_train": len(x_train)}
        for split, (texts, labels) in splits.items():
            pred = [int(p) for p in model.predict(list(texts))]  # type: ignore[attr-defined]
            metrics = binary_metrics(list(labels), pred)
            rows.append({"model": name, "split": split, **metrics, "settings": dict(settings)})
            log.info("baseline %s %s accuracy %.4f", name, split, metrics["accuracy"])
    return rows
