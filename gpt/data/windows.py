"""Token files and next-token sliding windows.

Token arrays are stored as ``uint16`` ``.npy`` files (GPT-2's vocabulary of 50,257 ids
fits in 16 bits), written atomically and loadable as a read-only memory map.
:class:`SlidingWindowDataset` turns one token array into (input, target) windows without
a Python loop per window: the window starts come from ``np.arange`` and the windows are
slices (or, for :meth:`SlidingWindowDataset.as_tensors`, strided views) of the token
array, so memory grows with the number of tokens, not with windows × length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gpt.errors import ConfigError, DataError
from gpt.fileio import atomic_open
from gpt.fileio import sha256_file as _sha256

__all__ = [
    "SlidingWindowDataset",
    "TokenFileInfo",
    "load_tokens",
    "make_loader",
    "save_tokens",
    "tokenize_to_npy",
]

_UINT16_LIMIT = 1 << 16


class _Encoder(Protocol):
    vocab_size: int

    def encode(self, text: str, allow_eot: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class TokenFileInfo:
    """What :func:`tokenize_to_npy` / :func:`save_tokens` wrote."""

    path: Path
    """The ``.npy`` file (1-D ``uint16``)."""
    num_tokens: int
    """Number of token ids in the file."""
    vocab_size: int
    """Vocabulary size of the tokenizer that produced the ids."""
    sha256: str
    """sha256 of the file's bytes."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (path as a string)."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def save_tokens(ids: Sequence[int] | np.ndarray, path: Path, *, vocab_size: int) -> TokenFileInfo:
    """Write ``ids`` as a 1-D ``uint16`` ``.npy`` file atomically (temp file + rename)."""
    path = Path(path)
    if vocab_size > _UINT16_LIMIT:
        raise DataError(
            f"{path}: vocabulary of {vocab_size} ids does not fit in uint16 "
            f"(limit {_UINT16_LIMIT}); use a smaller vocabulary or another storage dtype"
        )
    arr = np.asarray(ids).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: token ids must be integers, got {arr.dtype}")
    if arr.dtype.kind == "O" or not arr.size:
        arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise DataError(
            f"{path}: token id out of range [0, {vocab_size}) (min {arr.min()}, max {arr.max()})"
        )
    data = arr.astype(np.uint16)
    with atomic_open(path, "wb") as f:
        np.save(f, data, allow_pickle=False)
    return TokenFileInfo(
        path=path, num_tokens=int(data.size), vocab_size=int(vocab_size), sha256=_sha256(path)
    )


def tokenize_to_npy(text: str, tokenizer: _Encoder, path: Path) -> TokenFileInfo:
    """Encode ``text`` with ``tokenizer`` (``<|endoftext|>`` allowed) and store it as uint16."""
    vocab = int(tokenizer.vocab_size)
    if vocab >= _UINT16_LIMIT:
        raise DataError(
            f"{path}: tokenizer vocabulary ({vocab}) must be < {_UINT16_LIMIT} to store ids as uint16"
        )
    to_numpy = getattr(tokenizer, "encode_to_numpy", None)
    ids = to_numpy(text) if to_numpy is not None else tokenizer.encode(text)
    return save_tokens(ids, path, vocab_size=vocab)


def load_tokens(path: Path, mmap: bool = True) -> np.ndarray:
    """Load a 1-D ``uint16`` token file (read-only memory map when ``mmap``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: token file not found; rerun the tokenize step that writes it")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(
            f"{path}: not a readable .npy token file ({exc}); delete it and re-tokenize"
        ) from exc
    if arr.dtype != np.uint16 or arr.ndim != 1:
        raise DataError(
            f"{path}: expected a 1-D uint16 token array, found {arr.dtype} with shape {arr.shape}"
        )
    return arr


class SlidingWindowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Next-token windows over a token array.

    Window ``i`` starts at ``starts[i] = i * stride``; its input is
    ``tokens[s : s + max_length]`` and its target ``tokens[s + 1 : s + max_length + 1]``.
    The starts are exactly those of the reference loop
    ``range(0, len(tokens) - max_length, stride)`` (which leaves out the start
    ``len(tokens) - max_length`` even though its target would still fit).
    """

    def __init__(
        self, tokens: np.ndarray | Sequence[int] | torch.Tensor, max_length: int, stride: int
    ) -> None:
        if int(max_length) < 1 or int(stride) < 1:
            raise ConfigError(
                f"sliding windows need max_length >= 1 and stride >= 1 "
                f"(got max_length={max_length}, stride={stride})"
            )
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1:
            raise DataError(f"token array must be 1-D, got shape {arr.shape}")
        self.tokens: np.ndarray = arr
        self.max_length = int(max_length)
        self.stride = int(stride)
        self.starts: np.ndarray = np.arange(
            0, max(len(arr) - self.max_length, 0), self.stride, dtype=np.int64
        )

    @classmethod
    def from_npy(
        cls, path: Path, max_length: int, stride: int, *, mmap: bool = True
    ) -> SlidingWindowDataset:
        """Windows over a token file written by :func:`tokenize_to_npy`."""
        return cls(load_tokens(path, mmap=mmap), max_length, stride)

    @property
    def num_tokens(self) -> int:
        """Length of the underlying token array."""
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])  # IndexError past the end, negative indices as usual
        chunk = torch.from_numpy(np.asarray(self.tokens[s : s + self.max_length + 1], np.int64))
        return chunk[:-1], chunk[1:]

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All windows at once as ``(inputs, targets)`` LongTensors ``[N, max_length]``.

        Both are strided views (``unfold``) of one int64 copy of the token array, so they
        share memory and are not contiguous; call ``.contiguous()`` to materialise.
        """
        n, length = len(self), self.max_length
        if n == 0:
            empty = torch.empty((0, length), dtype=torch.long)
            return empty, empty.clone()
        ids = torch.from_numpy(np.asarray(self.tokens, dtype=np.int64))
        inputs = ids.unfold(0, length, self.stride)[:n]
        targets = ids[1:].unfold(0, length, self.stride)[:n]
        return inputs, targets


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    seed: int = 123,
) -> DataLoader[Any]:
    """A single-process DataLoader whose shuffling comes from its own seeded generator.

    The generator (``loader.generator``) is what :func:`gpt.train.train_lm` saves and
    restores to continue the data order exactly after a resume.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=bool(shuffle),
        drop_last=bool(drop_last),
        num_workers=0,
        generator=gen,
    )
