"""scikit-learn spam baselines on the real balanced SMS split."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd
import pytest

from gpt.data.parsing import balance_and_split_spam, parse_sms
from gpt.errors import ConfigError, DataError
from gpt.eval.baseline import (
    BaselineArgs,
    binary_metrics,
    evaluate_baselines,
    prediction_rows,
    run_baselines,
)

Splits = dict[str, tuple[list[str], list[int]]]

#: Test accuracies measured here on the real split (1,045 / 149 / 300 messages):
#: logreg_bow 0.9667 (290/300), logreg_tfidf 0.9700 (291/300), majority 0.4967.
TEST_FLOORS = {"logreg_bow": 0.96, "logreg_tfidf": 0.965}


def _independent_split(zip_path: Path) -> Splits:
    """The reference's procedure written out directly (no gpt.data.parsing)."""
    with zipfile.ZipFile(zip_path) as zf:
        raw = zf.read("SMSSpamCollection").decode("utf-8")
    rows = [line.split("\t", 1) for line in raw.splitlines() if line.strip()]
    df = pd.DataFrame(rows, columns=["Label", "Text"])
    spam = df[df["Label"] == "spam"]
    ham = df[df["Label"] == "ham"].sample(len(spam), random_state=123)
    bal = pd.concat([ham, spam]).sample(frac=1, random_state=123).reset_index(drop=True)
    a = int(len(bal) * 0.7)
    b = a + int(len(bal) * 0.1)
    parts = {"train": bal[:a], "val": bal[a:b], "test": bal[b:]}
    return {k: (list(d["Text"]), [int(x == "spam") for x in d["Label"]]) for k, d in parts.items()}


@pytest.fixture(scope="module")
def splits(mirror: Path) -> Splits:
    parts = balance_and_split_spam(parse_sms(mirror / "sms+spam+collection.zip"), seed=123)
    return {
        k: ([r.text for r in recs], [int(r.label == "spam") for r in recs])
        for k, recs in parts.items()
    }


def test_split_is_the_reference_one(splits: Splits, mirror: Path) -> None:
    assert {k: len(v[0]) for k, v in splits.items()} == {"train": 1045, "val": 149, "test": 300}
    assert splits == _independent_split(mirror / "sms+spam+collection.zip")


def test_logreg_baselines_on_real_split(splits: Splits) -> None:
    rows = run_baselines(splits, BaselineArgs(features=["bow", "tfidf"], C=1.0, seed=123))
    assert len(rows) == 3 * 3
    by = {(r["model"], r["split"]): r for r in rows}
    assert set(by) == {
        (m, s) for m in ("majority", "logreg_bow", "logreg_tfidf") for s in ("train", "val", "test")
    }
    for (model, split), r in by.items():
        texts, labels = splits[split]
        assert r["tn"] + r["fp"] + r["fn"] + r["tp"] == len(texts)
        assert r["tp"] + r["fn"] == sum(labels)
        assert r["accuracy"] == pytest.approx((r["tn"] + r["tp"]) / len(texts))
        assert r["settings"]["n_train"] == 1045
        if model != "majority":
            assert r["settings"]["features"] == model.removeprefix("logreg_")
            assert r["settings"]["C"] == 1.0 and r["settings"]["max_iter"] == 1000
    for model, floor in TEST_FLOORS.items():
        acc = by[(model, "test")]["accuracy"]
        print(f"{model}: " + ", ".join(f"{s} {by[(model, s)]['accuracy']:.4f}" for s in splits))
        assert acc >= floor, (model, acc)
        assert by[(model, "train")]["accuracy"] > 0.97
    # the majority class of the training split (ham, 528 of 1,045) predicted everywhere
    for split, (_, labels) in splits.items():
        r = by[("majority", split)]
        assert r["tp"] == r["fp"] == 0 and r["precision"] == 0.0 and r["f1"] == 0.0
        assert r["accuracy"] == pytest.approx(labels.count(0) / len(labels))


def test_baseline_predictions_per_example(splits: Splits) -> None:
    """Every model scores every message: ids follow the split order, labels are the
    split's, predictions reproduce the metrics rows, and the spam probability is the
    fitted model's own predict_proba."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    small = {k: (texts[:60], labels[:60]) for k, (texts, labels) in splits.items()}
    res = evaluate_baselines(small, BaselineArgs(seed=7))
    assert res.rows == run_baselines(small, BaselineArgs(seed=7))
    preds = pd.DataFrame(res.predictions)
    assert set(preds.columns) == {
        "model",
        "split",
        "example_id",
        "label",
        "prediction",
        "prob_spam",
    }
    assert len(preds) == 3 * 3 * 60
    by_row = {(r["model"], r["split"]): r for r in res.rows}
    for (model, split), g in preds.groupby(["model", "split"]):
        assert g["example_id"].tolist() == list(range(60))
        assert g["label"].tolist() == ["spam" if y else "ham" for y in small[split][1]]
        y = (g["label"] == "spam").astype(int).tolist()
        p = (g["prediction"] == "spam").astype(int).tolist()
        assert binary_metrics(y, p) == {
            k: v
            for k, v in by_row[(model, split)].items()
            if k not in ("model", "split", "settings")
        }
        assert ((g["prob_spam"] >= 0) & (g["prob_spam"] <= 1)).all()
        if model != "majority":  # a logistic regression predicts spam iff P(spam) > 0.5
            assert ((g["prob_spam"] > 0.5) == (g["prediction"] == "spam")).all()
    # the majority model: P(spam) is 1 for the majority class, else 0
    maj = preds[preds["model"] == "majority"]
    train_labels = small["train"][1]
    majority_is_spam = sum(train_labels) * 2 > len(train_labels)
    assert set(maj["prob_spam"]) == {1.0 if majority_is_spam else 0.0}
    # independent refit of the bag-of-words model: the same probabilities
    ref = LogisticRegression(C=1.0, max_iter=1000, random_state=7)
    vec = CountVectorizer(lowercase=True)
    ref.fit(vec.fit_transform(small["train"][0]), train_labels)
    want = ref.predict_proba(vec.transform(small["test"][0]))[:, 1]
    got = preds[(preds["model"] == "logreg_bow") & (preds["split"] == "test")]["prob_spam"]
    assert got.to_numpy() == pytest.approx(want, abs=1e-9)


def test_prediction_rows_checks_lengths() -> None:
    rows = prediction_rows("val", [0, 1], [1, 1], [0.7, None])
    assert rows == [
        {"split": "val", "example_id": 0, "label": "ham", "prediction": "spam", "prob_spam": 0.7},
        {"split": "val", "example_id": 1, "label": "spam", "prediction": "spam", "prob_spam": None},
    ]
    with pytest.raises(DataError, match="equally many"):
        prediction_rows("val", [0, 1], [1], [0.5, 0.5])


def test_binary_metrics_against_hand_counts() -> None:
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 0, 1, 0, 1, 0, 0, 0]
    m = binary_metrics(y, p)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    zero = binary_metrics([0, 1], [0, 0])  # no positive predictions: 0, not a warning
    assert zero["precision"] == 0.0 and zero["f1"] == 0.0


def test_baseline_input_errors() -> None:
    with pytest.raises(ConfigError, match="features"):
        BaselineArgs(features=["word2vec"])
    with pytest.raises(DataError, match="train"):
        run_baselines({"test": (["a"], [0])})
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        run_baselines({"train": (["a", "b"], [0])})
    with pytest.raises(DataError, match="single class"):
        run_baselines({"train": (["a", "b"], [0, 0])})
