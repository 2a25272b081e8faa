"""Property-based fuzzing of the input parsers and the config/``--set`` parser: any input
gives either a result or one of the project's own errors (a GPTFlowError subclass),
never another exception; what is accepted round-trips exactly."""

from __future__ import annotations

import json
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt.errors import ConfigError, DataError

FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _write(data: bytes, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="relfuzz-"))
    p = folder / name
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------- SMS


def _sms_outcome(path: Path) -> list | DataError:
    from gpt.data.parsing import parse_sms

    try:
        return parse_sms(path)
    except DataError as exc:
        assert str(path) in str(exc), f"DataError does not name the file: {exc}"
        return exc


@FUZZ
@given(st.binary(max_size=2000))
def test_parse_sms_arbitrary_bytes(data: bytes) -> None:
    path = _write(data, "SMSSpamCollection")
    out = _sms_outcome(path)  # anything but DataError propagates and fails the test
    if isinstance(out, list):
        lines = data.decode("utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        assert len(out) == len(lines)
        for rec, line in zip(out, lines, strict=True):
            assert f"{rec.label}\t{rec.text}" == line.removesuffix("\r")


_label = st.sampled_from(["ham", "spam", "Ham", "", "spam ", "junk"])
_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)
_line = st.tuples(_label, st.sampled_from(["\t", "", " ", "\t\t"]), _text).map("".join)


@FUZZ
@given(st.lists(_line, max_size=30), st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_parse_sms_structured_lines(lines: list[str], eol: str, final_eol: bool) -> None:
    data = eol.join(lines) + (eol if final_eol and lines else "")
    path = _write(data.encode("utf-8"), "sms.tsv")
    out = _sms_outcome(path)
    good = all(
        "\n" not in ln and "\r" not in ln and "\t" in ln and ln.split("\t", 1)[0] in ("ham", "spam")
        for ln in lines
    )
    if good and lines:
        assert isinstance(out, list), f"valid input refused: {out}"
        assert [(r.label, r.text) for r in out] == [tuple(ln.split("\t", 1)) for ln in lines]
        assert [r.line_no for r in out] == list(range(1, len(lines) + 1))


@FUZZ
@given(st.binary(max_size=600))
def test_parse_sms_arbitrary_zip_bytes(data: bytes) -> None:
    _sms_outcome(_write(data, "sms+spam+collection.zip"))


def _zip_with_member(tmp: Path, payload: bytes, method: int = zipfile.ZIP_DEFLATED) -> bytearray:
    p = tmp / "src.zip"
    with zipfile.ZipFile(p, "w", method) as zf:
        zf.writestr("SMSSpamCollection", payload)
    return bytearray(p.read_bytes())


def _corrupt_zip(tmp: Path, how: str) -> bytes:
    """A zip whose SMSSpamCollection member is damaged in one specific way."""
    payload = b"ham\thello there\n" * 200
    if how == "deflate-stream":
        b = _zip_with_member(tmp, payload)
        start = b.find(b"SMSSpamCollection") + len("SMSSpamCollection")
        for k in range(start + 5, start + 25):
            b[k] ^= 0xFF
        return bytes(b)
    b = _zip_with_member(tmp, payload, zipfile.ZIP_STORED)
    cd = b.find(b"PK\x01\x02")
    if how == "unknown-method":  # compression method 99 in the local and central headers
        b[8:10] = struct.pack("<H", 99)
        b[cd + 10 : cd + 12] = struct.pack("<H", 99)
    elif how == "encrypted":  # the "encrypted" flag bit set
        b[6] |= 1
        b[cd + 8] |= 1
    elif how == "bad-crc":
        i = b.find(b"ham\thello")
        b[i] = ord("x")
    elif how == "truncated":
        b = b[: len(b) // 2]
    return bytes(b)


@pytest.mark.parametrize(
    "how", ["deflate-stream", "unknown-method", "encrypted", "bad-crc", "truncated"]
)
def test_parse_sms_damaged_zip_gives_data_error(tmp_path: Path, how: str) -> None:
    """Every kind of damaged archive is a DataError naming the file (not zlib.error,
    NotImplementedError or RuntimeError from the zipfile module)."""
    from gpt.data.parsing import parse_sms

    path = tmp_path / "sms+spam+collection.zip"
    path.write_bytes(_corrupt_zip(tmp_path, how))
    with pytest.raises(DataError) as info:
        parse_sms(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- instructions

_json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text
_json_value = st.recursive(
    _json_scalar,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_text, kids, max_size=4),
    max_leaves=15,
)
_field = st.sampled_from(["instruction", "input", "output", "extra"])
_record = st.dictionaries(_field, _text | _json_scalar, max_size=4)


def _instr_outcome(path: Path) -> list | DataError:
    from gpt.data.parsing import parse_instructions

    try:
        return parse_instructions(path)
    except DataError as exc:
        assert str(path) in str(exc), f"DataError does not name the file: {exc}"
        return exc


@FUZZ
@given(_json_value | st.lists(_record, max_size=6))
def test_parse_instructions_any_json(value: object) -> None:
    path = _write(json.dumps(value).encode("utf-8"), "instruction-data.json")
    out = _instr_outcome(path)
    valid = isinstance(value, list) and all(
        isinstance(r, dict)
        and all(isinstance(r.get(k), str) for k in ("instruction", "input", "output"))
        for r in value
    )
    if valid:
        assert out == value
    else:
        assert isinstance(out, DataError)


@FUZZ
@given(st.binary(max_size=400) | _text.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_parse_instructions_any_bytes(data: bytes) -> None:
    _instr_outcome(_write(data, "instruction-data.json"))


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_parse_instructions_deeply_nested(tmp_path: Path, opener: str) -> None:
    """A hostile file nesting 100,000 levels deep is a DataError, not a RecursionError."""
    from gpt.data.parsing import parse_instructions

    path = tmp_path / "instruction-data.json"
    path.write_text(opener * 100_000, encoding="utf-8")
    with pytest.raises(DataError) as info:
        parse_instructions(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- config


def _config_outcome(profile: str, overrides: list[str]) -> object:
    from flows.config import PipelineConfig, build_config

    try:
        cfg = build_config(profile, overrides)
    except ConfigError as exc:
        assert str(exc), "empty ConfigError message"
        return exc
    assert isinstance(cfg, PipelineConfig)
    return cfg


@FUZZ
@given(st.lists(st.text(max_size=60), max_size=4))
def test_set_overrides_arbitrary_text(overrides: list[str]) -> None:
    _config_outcome("smoke", overrides)


_SECTIONS = ["pretrain", "tokenize", "judge", "download", "finetune_spam", "profile", "nope"]
_FIELDS = [
    "epochs",
    "lr",
    "model",
    "model.name",
    "model.overrides.n_layers",
    "required",
    "spam_ratios",
    "host",
    "mirror",
    "timeout_s",
    "x",
    "seed",
]
_values = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats().map(repr),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "NaN",
            "Infinity",
            "-1e400",
            "[]",
            "{}",
            "[0.7,0.1,0.2]",
            "[1,2]",
            '{"name":"tiny"}',
            '"x"',
            "",
            "[[[[",
            "1e999",
        ]
    ),
    _text,
)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(_SECTIONS), st.sampled_from(_FIELDS), _values).map(
            lambda t: f"{t[0]}.{t[1]}={t[2]}"
        ),
        min_size=1,
        max_size=4,
    )
)
def test_set_overrides_structured(overrides: list[str]) -> None:
    out = _config_outcome("smoke", overrides)
    if not isinstance(out, ConfigError):
        # an accepted override really took effect (the last one for a given key wins)
        from flows.config import parse_override

        path, value = parse_override(overrides[-1])
        node: object = out
        for part in path:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            assert node == value or float(node) == float(value)


@FUZZ
@given(st.text(max_size=30))
def test_profile_name_arbitrary(name: str) -> None:
    out = _config_outcome(name, [])
    if name not in ("smoke", "cpu", "book"):
        assert isinstance(out, ConfigError)
