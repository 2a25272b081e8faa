"""GPT-2 byte-pair encoding via tiktoken, built offline from ``encoder.json`` + ``vocab.bpe``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpt.errors import DataError
from gpt.fileio import sha256_file as _sha256

__all__ = ["EOT_TOKEN", "GPT2_PAT_STR", "GPT2_VOCAB_SIZE", "Tokenizer"]

EOT_TOKEN = "<|endoftext|>"
#: Token ids of the GPT-2 BPE (the one tokenizer of this project); a model must have at
#: least this many embeddings.
GPT2_VOCAB_SIZE = 50257
#: GPT-2's pre-tokenization regex (identical to tiktoken's ``r50k_pat_str``).
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
ENCODER_FILE = "encoder.json"
MERGES_FILE = "vocab.bpe"
#: Encodings built by :meth:`Tokenizer.from_dir`, by (name, sha256 of vocab.bpe, sha256
#: of encoder.json).
_ENCODINGS: dict[tuple[str, str, str], Any] = {}
_ENCODINGS_LOCK = threading.Lock()


class Tokenizer:
    """GPT-2 tokenizer (50,257 ids, ``<|endoftext|>`` = 50256)."""

    def __init__(self, encoding: object, files: tuple[Path, Path] | None = None) -> None:
        self._enc = encoding
        self.files = files
        """``(encoder.json, vocab.bpe)`` this tokenizer was built from (None for tiktoken's)."""
        self.eot_id: int = encoding.eot_token  # type: ignore[attr-defined]
        self.vocab_size: int = encoding.n_vocab  # type: ignore[attr-defined]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Build the GPT-2 encoding from ``path/encoder.json`` and ``path/vocab.bpe``
        (no network)."""
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        folder = Path(path)
        enc_file, bpe_file = folder / ENCODER_FILE, folder / MERGES_FILE
        for f in (enc_file, bpe_file):
            if not f.is_file():
                raise DataError(
                    f"tokenizer file {f} not found: a GPT-2 tokenizer folder needs "
                    f"{ENCODER_FILE} and {MERGES_FILE} (run `gptflow download`)"
                )
        # Passing each file's own sha256 makes tiktoken's path-keyed cache re-read the
        # file whenever its contents changed; the built encoding (immutable) is reused
        # for the same contents: building it costs ~0.15 CPU-s, recipes build one each.
        bpe_hash, enc_hash = _sha256(bpe_file), _sha256(enc_file)
        name = f"gpt2-local-{folder.name}"
        encoding = _ENCODINGS.get((name, bpe_hash, enc_hash))
        if encoding is not None:
            return cls(encoding, (enc_file, bpe_file))
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=str(bpe_file),
                encoder_json_file=str(enc_file),
                vocab_bpe_hash=bpe_hash,
                encoder_json_hash=enc_hash,
            )
        except (AssertionError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise DataError(
                f"{enc_file} and {bpe_file} are not a consistent GPT-2 BPE pair ({exc!r}); "
                "re-download them"
            ) from exc
        n_vocab = len(ranks) + 1
        encoding = tiktoken.Encoding(
            name=name,
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={EOT_TOKEN: len(ranks)},
            explicit_n_vocab=n_vocab,
        )
        with _ENCODINGS_LOCK:
            if len(_ENCODINGS) >= 4:  # a few distinct tokenizers per process at most
                _ENCODINGS.pop(next(iter(_ENCODINGS)))
            _ENCODINGS[(name, bpe_hash, enc_hash)] = encoding
        return cls(encoding, (enc_file, bpe_file))

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """tiktoken's registered ``gpt2`` encoding (downloads the files on first use)."""
        import tiktoken

        return cls(tiktoken.get_encoding("gpt2"))

    def encode(self, text: str, allow_eot: bool = True) -> list[int]:
        """Token ids of ``text``; with ``allow_eot`` the literal ``<|endoftext|>`` maps to
        50256, else it is encoded as plain text."""
        if allow_eot:
            return self._enc.encode(text, allowed_special={EOT_TOKEN})  # type: ignore[attr-defined]
        return self._enc.encode(text, disallowed_special=())  # type: ignore[attr-defined]

    def encode_to_numpy(self, text: str, allow_eot: bool = True) -> Any:
        """:meth:`encode` straight into a uint32 NumPy array (no Python int list: about
        4 bytes per token instead of ~40 for large corpora)."""
        if allow_eot:
            return self._enc.encode_to_numpy(text, allowed_special={EOT_TOKEN})  # type: ignore[attr-defined]
        return self._enc.encode_to_numpy(text, disallowed_special=())  # type: ignore[attr-defined]

    def encode_batch(self, texts: Iterable[str], allow_eot: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts (tiktoken threads)."""
        if allow_eot:
            return self._enc.encode_batch(list(texts), allowed_special={EOT_TOKEN})  # type: ignore[attr-defined]
        return self._enc.encode_ordinary_batch(list(texts))  # type: ignore[attr-defined]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 byte sequences become U+FFFD)."""
        return self._enc.decode(list(ids))  # type: ignore[attr-defined]

    @property
    def encoding(self) -> object:
        """The underlying ``tiktoken.Encoding``."""
        return self._enc
