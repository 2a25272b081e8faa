"""GPT-2 tokenizer built offline from the mirror's encoder.json + vocab.bpe."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt.errors import DataError
from gpt.tokenizer import GPT2_PAT_STR, Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def test_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>") == [50256]
    assert 50256 not in tok.encode("<|endoftext|>", allow_eot=False)
    assert tok.decode([15496, 11, 995]) == "Hello, world"


def test_the_verdict_count(tok: Tokenizer, mirror: Path) -> None:
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    assert len(text) == 20_479
    ids = tok.encode(text)
    assert len(ids) == 5_145
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "Hello, world"]) == [ids, [15496, 11, 995]]


def test_same_as_tiktoken_gpt2_definition(
    tok: Tokenizer, tokenizer_dir: Path, mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Build tiktoken's own ``gpt2`` spec (its URLs swapped for the local files, its
    sha256 pins kept, so the files are proven to be the official ones) and compare."""
    import tiktoken
    import tiktoken_ext.openai_public as public
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    def local(vocab_bpe_file: str, encoder_json_file: str, **kw):
        return data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(tokenizer_dir / Path(vocab_bpe_file).name),
            encoder_json_file=str(tokenizer_dir / Path(encoder_json_file).name),
            **kw,
        )

    monkeypatch.setattr(public, "data_gym_to_mergeable_bpe_ranks", local)
    spec = public.gpt2()
    assert spec["pat_str"] == GPT2_PAT_STR
    ref = tiktoken.Encoding(**spec)
    ours = tok.encoding
    assert ours._special_tokens == ref._special_tokens == {"<|endoftext|>": 50256}
    assert ours._mergeable_ranks == ref._mergeable_ranks
    assert ours.n_vocab == ref.n_vocab
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    samples = [
        text,
        "  weird\tspacing\n\n and 123,456 numbers ümlauts 日本語 🤖 's 'll",
        "a<|endoftext|>b",
    ]
    for s in samples:
        assert tok.encode(s) == ref.encode(s, allowed_special={"<|endoftext|>"})


def test_missing_files_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"encoder\.json"):
        Tokenizer.from_dir(tmp_path)


def test_encode_to_numpy_equals_encode(tokenizer_dir: Path, mirror: Path) -> None:
    """The array path used for large corpora gives exactly the list path's ids."""
    import numpy as np

    tok = Tokenizer.from_dir(tokenizer_dir)
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8") + "<|endoftext|>x"
    arr = tok.encode_to_numpy(text)
    assert arr.dtype == np.uint32
    assert arr.tolist() == tok.encode(text)
    assert arr[-2] == 50256


def test_an_encoding_is_built_once_per_file_contents(tokenizer_dir: Path, tmp_path: Path) -> None:
    """The same two files give the same (immutable) encoding without building it again;
    files whose contents changed give a new one, never the stale encoding."""
    import json
    import shutil

    folder = tmp_path / "gpt2"
    shutil.copytree(tokenizer_dir, folder)
    first = Tokenizer.from_dir(folder)
    assert Tokenizer.from_dir(folder).encoding is first.encoding
    assert first.files == (folder / "encoder.json", folder / "vocab.bpe")
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    # swap the ids of two single-byte tokens: "!" (0) and '"' (1)
    encoder["!"], encoder['"'] = encoder['"'], encoder["!"]
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    with pytest.raises(DataError, match="not a consistent GPT-2 BPE pair"):
        Tokenizer.from_dir(folder)  # tiktoken checks the pair: a changed file is re-read
    shutil.copy(tokenizer_dir / "encoder.json", folder / "encoder.json")
    assert Tokenizer.from_dir(folder).encode("Hello, world") == [15496, 11, 995]
