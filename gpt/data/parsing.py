"""Parsers and seeded splits for the pipeline's three datasets.

* :func:`read_text` — the pretraining text, strict UTF-8.
* :func:`parse_sms` — the SMS Spam Collection (``label<TAB>text`` per line, quoting
  disabled: a stray ``"`` is part of the message, so all 5,574 records survive).
* :func:`parse_instructions` — the Alpaca-style instruction list.

Splits return the reference's partitions plus a :class:`SplitManifest` (seed, ratios,
counts) in their ``.manifest`` attribute, for the catalog.
"""

from __future__ import annotations

import json
import random
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpt.errors import DataError

#: Labels the SMS collection may use.
SMS_LABELS: tuple[str, ...] = ("ham", "spam")
#: Member of the UCI zip holding the data.
SMS_MEMBER = "SMSSpamCollection"
#: The splits of the spam and instruction data, in order (the names the tokenize stage
#: writes and later stages read).
SPLITS: tuple[str, str, str] = ("train", "val", "test")
#: String fields every instruction record must have.
INSTRUCTION_FIELDS: tuple[str, ...] = ("instruction", "input", "output")


@dataclass(frozen=True)
class SmsRecord:
    """One line of the SMS Spam Collection."""

    line_no: int
    """1-based line number in the data file."""
    label: str
    """``"ham"`` or ``"spam"``."""
    text: str
    """The message, exactly as in the file (quotes and inner tabs kept)."""


@dataclass(frozen=True)
class SplitManifest:
    """How a split was made, so it can be recorded and reproduced."""

    dataset: str
    """Which dataset: ``"text"``, ``"spam"`` or ``"instructions"``."""
    method: str
    """One line describing the procedure."""
    seed: int | None
    """Seed of every random step (None: nothing random)."""
    ratios: dict[str, float]
    """Requested fraction per split."""
    counts: dict[str, int]
    """Resulting size per split (characters for text, records otherwise)."""
    total: int
    """Size of the input (characters or records)."""
    unit: str = "records"
    """What ``counts`` count."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth recording (e.g. class counts before balancing)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


class SplitResult(dict):  # type: ignore[type-arg]
    """``{split name: items}`` in split order, with the :class:`SplitManifest` attached."""

    manifest: SplitManifest

    def __init__(self, parts: dict[str, Any], manifest: SplitManifest) -> None:
        super().__init__(parts)
        self.manifest = manifest


class TextSplit(tuple):  # type: ignore[type-arg]
    """``(train, val)`` strings; also ``.train``, ``.val`` and ``.manifest``."""

    manifest: SplitManifest

    def __new__(cls, train: str, val: str, manifest: SplitManifest) -> TextSplit:
        self = super().__new__(cls, (train, val))
        self.manifest = manifest
        return self

    @property
    def train(self) -> str:
        """Training text."""
        return self[0]

    @property
    def val(self) -> str:
        """Validation text."""
        return self[1]


# --------------------------------------------------------------------------- decoding


def _decode(data: bytes, source: str) -> str:
    """Strict UTF-8 decode; DataError naming the file, byte offset and line on failure."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.end].hex(" ")
        raise DataError(
            f"{source}: not valid UTF-8 at byte offset {exc.start} (line {line}, bytes {bad}: "
            f"{exc.reason}); re-download the file or convert it to UTF-8"
        ) from None


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content (DataError naming the file and offset of bad bytes)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{p}: cannot read the text file ({exc.strerror or exc})") from exc
    return _decode(data, str(p))


# --------------------------------------------------------------------------- SMS


def _read_sms_bytes(p: Path) -> tuple[bytes, str]:
    if p.suffix.lower() == ".zip":
        try:
            zf = zipfile.ZipFile(p)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise DataError(f"{p}: not a readable zip archive ({exc})") from exc
        with zf:
            try:
                return zf.read(SMS_MEMBER), f"{p}!{SMS_MEMBER}"
            except KeyError:
                raise DataError(f"{p}: the zip holds no {SMS_MEMBER!r} member") from None
            except (
                zipfile.BadZipFile,
                zlib.error,
                NotImplementedError,  # unknown compression method
                RuntimeError,  # encrypted member
                EOFError,
                OSError,
                ValueError,
            ) as exc:
                raise DataError(
                    f"{p}: member {SMS_MEMBER!r} of the zip is damaged or unreadable "
                    f"({type(exc).__name__}: {exc}); download the archive again"
                ) from exc
    try:
        return p.read_bytes(), str(p)
    except OSError as exc:
        raise DataError(f"{p}: cannot read the SMS collection ({exc.strerror or exc})") from exc


def parse_sms(path: str | Path) -> list[SmsRecord]:
    """Every record of the SMS Spam Collection (the data file, or the UCI zip holding it).

    Lines are ``label<TAB>text``; nothing is unquoted. A line without a tab, an empty
    line, or a label other than ham/spam raises DataError naming the file and line.
    """
    data, name = _read_sms_bytes(Path(path))
    text = _decode(data, name)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    records: list[SmsRecord] = []
    for i, raw in enumerate(lines, start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if "\t" not in line:
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise DataError(
                f"{name}: line {i} has no tab between label and text ({shown!r}); "
                "each line must be 'ham<TAB>message' or 'spam<TAB>message'"
            )
        label, msg = line.split("\t", 1)
        if label not in SMS_LABELS:
            raise DataError(
                f"{name}: line {i} has unknown label {label!r}; expected one of "
                f"{', '.join(SMS_LABELS)}"
            )
        records.append(SmsRecord(line_no=i, label=label, text=msg))
    if not records:
        raise DataError(f"{name}: no records")
    return records


# --------------------------------------------------------------------------- instructions


def parse_instructions(path: str | Path) -> list[dict[str, str]]:
    """The instruction records: a JSON list of objects with string instruction/input/output.

    Invalid JSON raises DataError with line and column; a bad record raises DataError
    naming its index (0-based) and field. Extra keys are kept.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{p}: cannot read the instruction file ({exc.strerror or exc})") from exc
    text = _decode(data, str(p))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise DataError(
            f"{p}: JSON nested too deeply to parse; expected a flat list of records"
        ) from None
    if not isinstance(obj, list):
        raise DataError(f"{p}: expected a JSON list of records, got {type(obj).__name__}")
    out: list[dict[str, str]] = []
    for idx, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise DataError(
                f"{p}: record {idx} is a {type(rec).__name__}, not an object with "
                f"{', '.join(INSTRUCTION_FIELDS)}"
            )
        for key in INSTRUCTION_FIELDS:
            if key not in rec:
                raise DataError(f"{p}: record {idx} has no field {key!r}")
            if not isinstance(rec[key], str):
                raise DataError(
                    f"{p}: record {idx} field {key!r} is a {type(rec[key]).__name__}, not a string"
                )
        out.append(dict(rec))
    return out


# --------------------------------------------------------------------------- splits


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise DataError(f"split ratio {name}={value} must be between 0 and 1")


def split_text(text: str, train_ratio: float = 0.9) -> TextSplit:
    """``(train, val)``: the first ``int(train_ratio * len(text))`` characters, and the rest."""
    _check_ratio("train", train_ratio)
    cut = int(train_ratio * len(text))
    train, val = text[:cut], text[cut:]
    manifest = SplitManifest(
        dataset="text",
        method="first train_ratio of the characters for training, the rest for validation",
        seed=None,
        ratios={"train": train_ratio, "val": 1.0 - train_ratio},
        counts={"train": len(train), "val": len(val)},
        total=len(text),
        unit="characters",
    )
    return TextSplit(train, val, manifest)


def balance_and_split_spam(
    records: Sequence[SmsRecord],
    seed: int = 123,
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> SplitResult:
    """Balance the classes and split ``{"train", "val", "test"}`` exactly like the reference.

    Ham is undersampled to the spam count with ``DataFrame.sample(n, random_state=seed)``,
    spam appended, the whole frame shuffled with ``sample(frac=1, random_state=seed)``,
    then cut at ``int(n*train)`` and ``+int(n*val)`` (the rest is test). On the full
    collection: 1,494 rows -> 1,045 / 149 / 300.
    """
    import pandas as pd

    if len(ratios) != 3:
        raise DataError(f"ratios must be (train, val, test), got {ratios!r}")
    for nm, r in zip(SPLITS, ratios, strict=True):
        _check_ratio(nm, r)
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise DataError(f"split ratios {ratios!r} must sum to 1")
    df = pd.DataFrame(
        {
            "Label": [r.label for r in records],
            "Text": [r.text for r in records],
            "pos": range(len(records)),
        }
    )
    spam = df[df["Label"] == "spam"]
    ham = df[df["Label"] == "ham"]
    n_spam = len(spam)
    if n_spam == 0 or len(ham) < n_spam:
        raise DataError(
            f"cannot balance the spam data: {len(ham)} ham and {n_spam} spam records "
            "(need at least one spam and as many ham as spam)"
        )
    ham_subset = ham.sample(n_spam, random_state=seed)
    balanced = pd.concat([ham_subset, spam])
    shuffled = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    n = len(shuffled)
    train_end = int(n * ratios[0])
    val_end = train_end + int(n * ratios[1])
    order = shuffled["pos"].tolist()
    parts = {
        "train": [records[i] for i in order[:train_end]],
        "val": [records[i] for i in order[train_end:val_end]],
        "test": [records[i] for i in order[val_end:]],
    }
    manifest = SplitManifest(
        dataset="spam",
        method=(
            "ham undersampled to the spam count (pandas sample, random_state=seed), "
            "spam appended, shuffled (sample frac=1, random_state=seed), cut "
            "int(n*train) / int(n*val) / rest"
        ),
        seed=seed,
        ratios=dict(zip(SPLITS, ratios, strict=True)),
        counts={k: len(v) for k, v in parts.items()},
        total=n,
        extra={
            "input_records": len(records),
            "input_ham": len(ham),
            "input_spam": n_spam,
            "spam_per_split": {k: sum(r.label == "spam" for r in v) for k, v in parts.items()},
        },
    )
    return SplitResult(parts, manifest)


def split_instructions(
    records: Sequence[dict[str, str]],
    train: float = 0.85,
    test: float = 0.10,
    shuffle_seed: int | None = None,
) -> SplitResult:
    """``{"train", "val", "test"}`` like the reference: in file order (or after a seeded
    shuffle), ``int(n*train)`` for training, the next ``int(n*test)`` for testing, the
    rest for validation. 1,100 records -> 935 / 55 / 110 (train / val / test)."""
    _check_ratio("train", train)
    _check_ratio("test", test)
    if train + test > 1.0 + 1e-9:
        raise DataError(f"train ({train}) + test ({test}) must not exceed 1")
    items = list(records)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    n = len(items)
    train_end = int(n * train)
    test_end = train_end + int(n * test)
    parts = {
        "train": items[:train_end],
        "val": items[test_end:],
        "test": items[train_end:test_end],
    }
    manifest = SplitManifest(
        dataset="instructions",
        method=(
            (
                "seeded shuffle (random.Random(seed).shuffle), then "
                if shuffle_seed is not None
                else ""
            )
            + "file order: first int(n*train) train, next int(n*test) test, rest val"
        ),
        seed=shuffle_seed,
        ratios={"train": train, "val": max(0.0, 1.0 - train - test), "test": test},
        counts={k: len(v) for k, v in parts.items()},
        total=n,
    )
    return SplitResult(parts, manifest)
