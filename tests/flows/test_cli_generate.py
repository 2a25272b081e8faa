"""``gptflow generate`` on a tiny saved checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from flows.cli import main
from gpt.architecture import GPTConfig
from gpt.checkpoint import save_checkpoint
from gpt.generate import generate
from gpt.model import GPT
from gpt.prompts import format_alpaca
from gpt.tokenizer import Tokenizer

CFG = GPTConfig(
    context_length=48, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, tie_weights=False
)


@pytest.fixture()
def ckpt(tmp_path: Path, tokenizer_dir: Path) -> tuple[Path, GPT]:
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    return save_checkpoint(tmp_path / "lm", m, tokenizer_dir=tokenizer_dir), m


def _expected(m: GPT, tok: Tokenizer, ids: list[int], n: int) -> str:
    new = generate(m, [ids], n, eos_id=tok.eot_id, use_cache=False)[0]
    return tok.decode(new)


def test_generate_prompt(ckpt, tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path, m = ckpt
    tok = Tokenizer.from_dir(tokenizer_dir)
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(path),
            "--prompt",
            "Every effort moves you",
            "--max-new-tokens",
            "8",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    expected = _expected(m, tok, tok.encode("Every effort moves you"), 8)
    assert expected.strip() and printed == expected + "\n"

    # seeded sampling is reproducible
    args = [
        "generate",
        "--checkpoint",
        str(path),
        "--prompt",
        "Hi",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--seed",
        "5",
        "--max-new-tokens",
        "6",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_generate_instruction(ckpt, tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path, m = ckpt
    tok = Tokenizer.from_dir(tokenizer_dir)
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(path),
            "--instruction",
            "Name a color.",
            "--input",
            "",
            "--max-new-tokens",
            "4",
        ]
    )
    assert rc == 0
    prompt_ids = tok.encode(format_alpaca("Name a color.", ""))
    assert len(prompt_ids) == 28
    expected = _expected(m, tok, prompt_ids, 4).replace("### Response:", "").strip()
    assert capsys.readouterr().out == expected + "\n"


def test_too_long_prompt_warns(ckpt, capsys, caplog: pytest.LogCaptureFixture) -> None:
    path, _ = ckpt
    with caplog.at_level(logging.WARNING):
        rc = main(
            [
                "generate",
                "--checkpoint",
                str(path),
                "--prompt",
                "word " * 100,
                "--max-new-tokens",
                "3",
            ]
        )
    assert rc == 0
    assert any("keeping the last 45" in r.getMessage() for r in caplog.records)


def test_classifier_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    m = GPT(CFG)
    m.replace_head(2)
    path = save_checkpoint(tmp_path / "clf", m, labels=["ham", "spam"])
    rc = main(["generate", "--checkpoint", str(path), "--prompt", "hello"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "classifier" in err and "gptflow classify" in err


def test_bad_args(ckpt, tmp_path: Path, capsys) -> None:
    path, m = ckpt
    assert main(["generate", "--checkpoint", str(path)]) == 1
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err
    bare = save_checkpoint(tmp_path / "bare", m)  # no tokenizer inside
    assert main(["generate", "--checkpoint", str(bare), "--prompt", "x"]) == 1
    assert "--tokenizer-dir" in capsys.readouterr().err


def test_undecodable_argv_prompt(
    ckpt, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes that are not UTF-8 in argv (surrogate escapes) are tokenized as U+FFFD, and
    the output is written even to a strict ASCII stdout (as backslash escapes)."""
    import io
    import os
    import sys

    path, m = ckpt
    tok = Tokenizer.from_dir(tokenizer_dir)
    raw = os.fsdecode(b"caf\xe9 \xff ok")
    assert "\udce9" in raw
    expected = _expected(m, tok, tok.encode("caf\ufffd \ufffd ok"), 5)
    buf = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buf, encoding="ascii", write_through=True))
    rc = main(["generate", "--checkpoint", str(path), "--prompt", raw, "--max-new-tokens", "5"])
    assert rc == 0
    want = expected.encode("ascii", "backslashreplace") + b"\n"
    assert buf.getvalue() == want


def test_from_argv_and_write_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import os
    import sys

    from flows.commands import from_argv, write_line

    assert from_argv(os.fsdecode(b"a\xffb\xc3\xa9")) == "a\ufffdb\u00e9"
    assert from_argv("x\ud800y") == "x?y"  # a lone surrogate that is no escaped byte
    assert from_argv("plain é") == "plain é"
    buf = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buf, encoding="ascii", write_through=True))
    write_line("é\ufffd")
    assert buf.getvalue() == b"\\xe9\\ufffd\n"


def test_draft_and_int8_weights(ckpt, tokenizer_dir: Path, capsys) -> None:
    """Drafting changes nothing printed; --weights int8 decodes with the int8 copy."""
    from gpt.quantize import quantize_int8

    path, m = ckpt
    tok = Tokenizer.from_dir(tokenizer_dir)
    base = ["generate", "--checkpoint", str(path), "--prompt", "one two one two one",
            "--max-new-tokens", "12"]  # fmt: skip
    outs = []
    for extra in ([], ["--draft", "none"], ["--draft-tokens", "3"]):
        assert main([*base, *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2] == _expected(m, tok, tok.encode(base[4]), 12) + "\n"
    assert main([*base, "--weights", "int8"]) == 0
    ids = tok.encode(base[4])
    q = generate(quantize_int8(m), [ids], 12, eos_id=tok.eot_id, draft="none")[0]
    assert capsys.readouterr().out == tok.decode(q) + "\n"
    assert main([*base, "--draft-tokens", "0"]) == 1
    assert "--draft-tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses the choice
        main([*base, "--weights", "int4"])
    assert "int8" in capsys.readouterr().err
