"""Token files and sliding windows, checked against the reference's Python loop."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.data.windows import (
    SlidingWindowDataset,
    load_tokens,
    make_loader,
    save_tokens,
    tokenize_to_npy,
)
from gpt.errors import ConfigError, DataError


def reference_windows(ids: list[int], max_length: int, stride: int):
    """The reference GPTDatasetV1 loop, written out independently."""
    inputs, targets = [], []
    for i in range(0, len(ids) - max_length, stride):
        inputs.append(ids[i : i + max_length])
        targets.append(ids[i + 1 : i + max_length + 1])
    return inputs, targets


@pytest.fixture(scope="module")
def verdict_ids(mirror: Path, tokenizer_dir: Path) -> list[int]:
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    return tok.encode(text)


def test_verdict_has_5145_tokens(verdict_ids: list[int]) -> None:
    assert len(verdict_ids) == 5145


@pytest.mark.parametrize(("max_length", "stride"), [(256, 256), (4, 1)])
def test_verdict_window_counts_and_contents(
    verdict_ids: list[int], max_length: int, stride: int
) -> None:
    ref_in, ref_tg = reference_windows(verdict_ids, max_length, stride)
    ds = SlidingWindowDataset(np.asarray(verdict_ids, dtype=np.uint16), max_length, stride)
    assert len(ds) == len(ref_in)
    # first and last windows through __getitem__
    for i in (0, len(ref_in) - 1):
        x, y = ds[i]
        assert x.dtype == torch.long and y.dtype == torch.long
        assert x.tolist() == ref_in[i]
        assert y.tolist() == ref_tg[i]
    # every window through the vectorised path
    xs, ys = ds.as_tensors()
    assert xs.shape == (len(ref_in), max_length)
    assert torch.equal(xs, torch.tensor(ref_in))
    assert torch.equal(ys, torch.tensor(ref_tg))
    with pytest.raises(IndexError):
        ds[len(ref_in)]


def test_verdict_counts_match_hand_values(verdict_ids: list[int]) -> None:
    # 5145 tokens: starts 0,256,...,<4889 -> 20 windows; stride 1 -> 5141 windows
    n = len(verdict_ids)
    assert len(SlidingWindowDataset(np.asarray(verdict_ids), 256, 256)) == -(-(n - 256) // 256)
    assert len(SlidingWindowDataset(np.asarray(verdict_ids), 4, 1)) == n - 4


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=60),
    max_length=st.integers(min_value=1, max_value=12),
    stride=st.integers(min_value=1, max_value=12),
)
def test_windows_match_reference_loop(n: int, max_length: int, stride: int) -> None:
    ids = list(np.random.default_rng(n * 1000 + max_length * 13 + stride).integers(0, 50257, n))
    ref_in, ref_tg = reference_windows(ids, max_length, stride)
    ds = SlidingWindowDataset(np.asarray(ids, dtype=np.int64), max_length, stride)
    assert len(ds) == len(ref_in)
    xs, ys = ds.as_tensors()
    assert xs.shape == (len(ref_in), max_length) == ys.shape
    assert xs.tolist() == ref_in
    assert ys.tolist() == ref_tg
    assert [ds[i][0].tolist() for i in range(len(ds))] == ref_in


def test_as_tensors_are_views_of_one_token_copy() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    ds = SlidingWindowDataset(tokens, 512, 1)
    xs, ys = ds.as_tensors()
    assert xs.shape == (10_000 - 512, 512)
    # both share one int64 storage holding the tokens, not windows x length
    assert xs.untyped_storage().data_ptr() == ys.untyped_storage().data_ptr()
    assert xs.untyped_storage().nbytes() == 8 * 10_000
    assert ds.starts.nbytes == 8 * len(ds)


def test_bad_window_args() -> None:
    with pytest.raises(ConfigError):
        SlidingWindowDataset(np.arange(10), 0, 1)
    with pytest.raises(ConfigError):
        SlidingWindowDataset(np.arange(10), 4, 0)


def test_uint16_round_trip(
    tmp_path: Path, verdict_ids: list[int], mirror: Path, tokenizer_dir: Path
) -> None:
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    verdict = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    text = "Hello, world<|endoftext|>" + verdict
    info = tokenize_to_npy(text, tok, tmp_path / "tok" / "train.npy")
    assert info.path == tmp_path / "tok" / "train.npy"
    assert info.num_tokens == 3 + 1 + 5145
    assert info.vocab_size == 50257
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    assert [p.name for p in info.path.parent.iterdir()] == ["train.npy"]  # no temp left
    arr = load_tokens(info.path)
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
    assert arr[:4].tolist() == [15496, 11, 995, 50256]  # ids above 32767 survive
    assert arr[4:].tolist() == verdict_ids
    eager = load_tokens(info.path, mmap=False)
    assert not isinstance(eager, np.memmap) and eager.tolist() == arr.tolist()
    assert info.to_dict()["path"] == str(info.path)


def test_save_tokens_refuses_wide_vocab_and_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="uint16"):
        save_tokens([1, 2, 3], tmp_path / "a.npy", vocab_size=70_000)
    with pytest.raises(DataError, match="out of range"):
        save_tokens([1, 50257], tmp_path / "b.npy", vocab_size=50257)

    class WideTokenizer:
        vocab_size = 65536

        def encode(self, text: str, allow_eot: bool = True) -> list[int]:
            return [1]

    with pytest.raises(DataError, match="65536"):
        tokenize_to_npy("x", WideTokenizer(), tmp_path / "c.npy")
    assert list(tmp_path.iterdir()) == []


def test_load_tokens_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_tokens(tmp_path / "missing.npy")
    np.save(tmp_path / "f.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(DataError, match="uint16"):
        load_tokens(tmp_path / "f.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    with pytest.raises(DataError, match=r"junk\.npy"):
        load_tokens(tmp_path / "junk.npy")


def test_make_loader_seeded_order() -> None:
    ds = SlidingWindowDataset(np.arange(103, dtype=np.uint16), 4, 4)  # 25 windows
    assert len(ds) == 25

    def order(loader) -> list[int]:
        return [int(x[0]) // 4 for xb, _ in loader for x in xb]

    a = make_loader(ds, 4, shuffle=True, drop_last=True, seed=7)
    b = make_loader(ds, 4, shuffle=True, drop_last=True, seed=7)
    c = make_loader(ds, 4, shuffle=True, drop_last=True, seed=8)
    first_a, first_b = order(a), order(b)
    assert first_a == first_b and len(first_a) == 24  # drop_last drops one window
    assert len(set(first_a)) == 24 and set(first_a) <= set(range(25))
    assert first_a != order(c)
    # the same generator drives the next epoch: a fresh loader replays both epochs
    assert order(a) == order(b) != first_a
    # the permutation equals torch.randperm on a generator seeded like the loader's
    g = torch.Generator().manual_seed(7)
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the iterator's base seed draw
    assert first_a == torch.randperm(25, generator=g).tolist()[:24]
    seq = make_loader(ds, 10, shuffle=False, drop_last=False)
    assert order(seq) == list(range(25))
    assert [len(xb) for xb, _ in seq] == [10, 10, 5]
    with pytest.raises(ConfigError):
        make_loader(ds, 0, shuffle=False, drop_last=False)
