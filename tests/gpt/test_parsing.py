"""Parsers and splits on the real mirror files and on crafted bad inputs."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpt.data.parsing import (
    SmsRecord,
    balance_and_split_spam,
    parse_instructions,
    parse_sms,
    read_text,
    split_instructions,
    split_text,
)
from gpt.errors import DataError


def _sms_bytes(mirror: Path) -> bytes:
    with zipfile.ZipFile(mirror / "sms+spam+collection.zip") as zf:
        return zf.read("SMSSpamCollection")


# ------------------------------------------------------------------ real files


def test_sms_real_counts(mirror: Path, tmp_path: Path) -> None:
    recs = parse_sms(mirror / "sms+spam+collection.zip")
    assert len(recs) == 5_574
    assert sum(r.label == "ham" for r in recs) == 4_827
    assert sum(r.label == "spam" for r in recs) == 747
    # independent reference: pandas with quoting disabled reads the same rows
    df = pd.read_csv(
        io.BytesIO(_sms_bytes(mirror)),
        sep="\t",
        header=None,
        names=["Label", "Text"],
        quoting=csv.QUOTE_NONE,
        keep_default_na=False,
    )
    assert [r.label for r in recs] == df["Label"].tolist()
    assert [r.text for r in recs] == df["Text"].tolist()
    assert recs[0].line_no == 1 and recs[-1].line_no == 5_574
    # the extracted data file parses identically to the zip
    (tmp_path / "SMSSpamCollection").write_bytes(_sms_bytes(mirror))
    assert parse_sms(tmp_path / "SMSSpamCollection") == recs


def test_spam_split_matches_reference_procedure(mirror: Path) -> None:
    recs = parse_sms(mirror / "sms+spam+collection.zip")
    res = balance_and_split_spam(recs)
    assert {k: len(v) for k, v in res.items()} == {"train": 1_045, "val": 149, "test": 300}
    m = res.manifest
    assert (
        m.seed == 123 and m.total == 1_494 and m.counts == {"train": 1_045, "val": 149, "test": 300}
    )
    assert m.extra["input_ham"] == 4_827 and m.extra["input_spam"] == 747
    all_rows = [r for part in res.values() for r in part]
    assert (
        sum(r.label == "spam" for r in all_rows) == 747 == sum(r.label == "ham" for r in all_rows)
    )
    assert len({r.line_no for r in all_rows}) == 1_494  # no row twice
    # independent derivation of pandas' sampling (RandomState.choice without replacement)
    ham = [r for r in recs if r.label == "ham"]
    spam = [r for r in recs if r.label == "spam"]
    picked = np.random.RandomState(123).choice(len(ham), size=747, replace=False)
    balanced = [ham[i] for i in picked] + spam
    perm = np.random.RandomState(123).choice(1_494, size=1_494, replace=False)
    expected = [balanced[i] for i in perm]
    assert res["train"] + res["val"] + res["test"] == expected
    assert res["train"] == expected[:1_045] and res["test"] == expected[1_194:]


def test_spam_split_reproduces_reference_rows_on_its_input(mirror: Path) -> None:
    """On the rows the reference reads (default quoting: 5,572), our split picks exactly
    the reference's rows, in the reference's order."""
    df = pd.read_csv(io.BytesIO(_sms_bytes(mirror)), sep="\t", header=None, names=["Label", "Text"])
    assert len(df) == 5_572
    # the reference code, verbatim in behaviour
    n_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(n_spam, random_state=123)
    bal = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    bal = bal.sample(frac=1, random_state=123).reset_index(drop=True)
    ref = {"train": bal[:1_045], "val": bal[1_045:1_194], "test": bal[1_194:]}
    recs = [
        SmsRecord(i + 1, lab, txt)
        for i, (lab, txt) in enumerate(zip(df.Label, df.Text, strict=True))
    ]
    ours = balance_and_split_spam(recs)
    for split, part in ref.items():
        assert [r.text for r in ours[split]] == part["Text"].tolist()
        assert [r.label for r in ours[split]] == part["Label"].tolist()


def test_spam_split_other_seed_and_ratios(mirror: Path) -> None:
    recs = parse_sms(mirror / "sms+spam+collection.zip")
    a = balance_and_split_spam(recs, seed=1, ratios=(0.5, 0.25, 0.25))
    assert {k: len(v) for k, v in a.items()} == {"train": 747, "val": 373, "test": 374}
    assert a["test"] != balance_and_split_spam(recs)["test"][:374]
    with pytest.raises(DataError, match="must sum to 1"):
        balance_and_split_spam(recs, ratios=(0.5, 0.2, 0.2))


def test_instructions_real(mirror: Path) -> None:
    recs = parse_instructions(mirror / "instruction-data.json")
    assert len(recs) == 1_100
    assert sum(r["input"] != "" for r in recs) == 325
    raw = json.loads((mirror / "instruction-data.json").read_text(encoding="utf-8"))
    res = split_instructions(recs)
    assert {k: len(v) for k, v in res.items()} == {"train": 935, "val": 55, "test": 110}
    assert res["train"] == raw[:935] and res["test"] == raw[935:1_045] and res["val"] == raw[1_045:]
    assert res.manifest.seed is None and res.manifest.counts["test"] == 110
    shuffled = split_instructions(recs, train=0.8, test=0.1, shuffle_seed=7)
    assert {k: len(v) for k, v in shuffled.items()} == {"train": 880, "val": 110, "test": 110}
    assert shuffled["train"] != raw[:880]
    assert sorted(json.dumps(r) for part in shuffled.values() for r in part) == sorted(
        json.dumps(r) for r in raw
    )
    assert (
        split_instructions(recs, shuffle_seed=7)["train"]
        == split_instructions(recs, shuffle_seed=7)["train"]
    )


def test_text_real(mirror: Path) -> None:
    text = read_text(mirror / "the-verdict.txt")
    assert len(text) == 20_479
    train, val = split_text(text)
    assert len(train) == int(0.9 * 20_479) == 18_431 and train + val == text
    res = split_text(text, 0.5)
    assert (
        res.manifest.counts == {"train": 10_239, "val": 10_240}
        and res.manifest.unit == "characters"
    )


# ------------------------------------------------------------------ crafted bad inputs


def test_sms_missing_tab_names_line(tmp_path: Path) -> None:
    p = tmp_path / "sms.tsv"
    p.write_text('ham\tok "quoted\nspam\tfine\nham no tab here\nham\tlater\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"sms\.tsv: line 3 has no tab"):
        parse_sms(p)


def test_sms_unknown_label_names_line(tmp_path: Path) -> None:
    p = tmp_path / "sms.tsv"
    p.write_text("ham\ta\nspam\tb\nSPAM\tc\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3 has unknown label 'SPAM'"):
        parse_sms(p)


def test_sms_quotes_kept_and_crlf(tmp_path: Path) -> None:
    p = tmp_path / "sms.tsv"
    p.write_bytes(b'ham\t"unterminated quote\r\nspam\tsecond\tpart\r\n')
    recs = parse_sms(p)
    assert recs == [
        SmsRecord(1, "ham", '"unterminated quote'),
        SmsRecord(2, "spam", "second\tpart"),
    ]


def test_sms_bad_utf8_offset(tmp_path: Path) -> None:
    p = tmp_path / "sms.tsv"
    p.write_bytes(b"ham\tok\nspam\tbad \xff byte\n")
    with pytest.raises(DataError, match=r"sms\.tsv: not valid UTF-8 at byte offset 16 \(line 2"):
        parse_sms(p)


def test_sms_zip_without_member(tmp_path: Path) -> None:
    p = tmp_path / "x.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("readme", "hi")
    with pytest.raises(DataError, match="no 'SMSSpamCollection' member"):
        parse_sms(p)


def test_read_text_bad_utf8(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_bytes("héllo\n".encode() + b"wor\xc3ld")
    with pytest.raises(DataError, match=r"t\.txt: not valid UTF-8 at byte offset 10 \(line 2"):
        read_text(p)


def _write_json(tmp_path: Path, obj: object) -> Path:
    p = tmp_path / "inst.json"
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


def test_instructions_non_object_record(tmp_path: Path) -> None:
    good = {"instruction": "a", "input": "", "output": "b"}
    p = _write_json(tmp_path, [good, good, ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"record 2 is a list, not an object"):
        parse_instructions(p)


def test_instructions_non_string_field(tmp_path: Path) -> None:
    good = {"instruction": "a", "input": "", "output": "b"}
    p = _write_json(tmp_path, [good, {"instruction": "a", "input": None, "output": "b"}])
    with pytest.raises(DataError, match=r"record 1 field 'input' is a NoneType, not a string"):
        parse_instructions(p)
    p = _write_json(tmp_path, [{"instruction": "a", "input": ""}])
    with pytest.raises(DataError, match=r"record 0 has no field 'output'"):
        parse_instructions(p)


def test_instructions_invalid_json(tmp_path: Path) -> None:
    p = tmp_path / "inst.json"
    p.write_text('[\n  {"instruction": "a",\n   "input": "" "output": "b"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"invalid JSON at line 3, column 16"):
        parse_instructions(p)
    p.write_text('{"instruction": "a"}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list"):
        parse_instructions(p)


def _damaged_zip(tmp_path: Path) -> Path:
    """A deflated SMS zip whose compressed stream is overwritten in the middle."""
    p = tmp_path / "sms.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("SMSSpamCollection", b"ham\thello there\n" * 200)
    b = bytearray(p.read_bytes())
    start = b.find(b"SMSSpamCollection") + len("SMSSpamCollection")
    for k in range(start + 5, start + 25):
        b[k] ^= 0xFF
    p.write_bytes(bytes(b))
    return p


def test_sms_damaged_zip_member(tmp_path: Path) -> None:
    p = _damaged_zip(tmp_path)
    with pytest.raises(DataError) as info:
        parse_sms(p)
    msg = str(info.value)
    assert str(p) in msg and "'SMSSpamCollection'" in msg and "damaged" in msg


def test_sms_not_a_zip(tmp_path: Path) -> None:
    p = tmp_path / "sms.zip"
    p.write_bytes(b"ham\thello\n")
    with pytest.raises(DataError, match="not a readable zip archive"):
        parse_sms(p)


def test_instructions_too_deeply_nested(tmp_path: Path) -> None:
    p = tmp_path / "inst.json"
    p.write_text('{"a":' * 50_000, encoding="utf-8")
    with pytest.raises(DataError, match=r"inst\.json: JSON nested too deeply"):
        parse_instructions(p)
