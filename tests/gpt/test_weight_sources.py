"""GPT-2 weight sources: published pins, trust on first use for the files without one,
and the Hugging Face safetensors layout through the same downloader and mirror."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _ci import require_module

from gpt.data.download import download_sources
from gpt.data.sources import (
    GPT2_HF_FILES,
    GPT2_SIZES,
    Source,
    SourceFile,
    get_source,
    gpt2_source_name,
    pinned_files,
)
from gpt.errors import ChecksumError, ConfigError

FAST = {"retries": 1, "backoff": 0.01, "timeout": 2.0, "progress": False}


def test_published_pins_of_the_124m_release() -> None:
    files = {f.filename: f for f in get_source("gpt2-124M").files}
    assert all(f.sha256 is not None and f.size is not None for f in files.values())
    assert files["model.ckpt.data-00000-of-00001"].size == 497_759_232
    # the small text files' pins are the digests of their known contents
    hp = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    text = json.dumps(hp, indent=2) + "\n"
    assert files["hparams.json"].sha256 == hashlib.sha256(text.encode()).hexdigest()
    ckpt = 'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    assert files["checkpoint"].sha256 == hashlib.sha256(ckpt.encode()).hexdigest()
    assert files["checkpoint"].size == len(ckpt)


def test_pinned_and_trust_on_first_use_files_are_listed() -> None:
    pins = pinned_files()
    assert pins["gpt2/124M/model.ckpt.index"] and pins["gpt2-hf/124M/model.safetensors"]
    assert not pins["gpt2/774M/model.ckpt.data-00000-of-00001"]  # no published sha256
    assert not pins["gpt2/355M/model.ckpt.meta"]
    assert get_source("gpt2-355M").files[3].size == 1_419_292_672  # size pinned, hash not
    for size in GPT2_SIZES:
        assert pins[f"gpt2/{size}/encoder.json"] and pins[f"gpt2-hf/{size}/model.safetensors"]


def test_hf_sources_share_the_mirror_layout_and_pin_revisions() -> None:
    for size in GPT2_SIZES:
        src = get_source(gpt2_source_name(size, "hf"))
        assert [f.path for f in src.files] == [f"gpt2-hf/{size}/{f}" for f in GPT2_HF_FILES]
        for f in src.files:
            assert f.urls[0].startswith("https://huggingface.co/openai-community/gpt2")
            assert "/resolve/main/" not in f.urls[0]  # a fixed commit, not a moving branch
    with pytest.raises(ConfigError, match="weight source"):
        gpt2_source_name("124M", "tf")


# --------------------------------------------------------------------------- TOFU


def _tofu_source(root: Path) -> Source:
    """A GPT-2-like weight file with no published hash, served from a local mirror."""
    (root / "gpt2" / "355M").mkdir(parents=True, exist_ok=True)
    (root / "gpt2" / "355M" / "model.ckpt.index").write_bytes(b"index v1" * 50)
    return Source(
        "gpt2-test",
        "t",
        (SourceFile("gpt2/355M/model.ckpt.index", ("https://invalid.example/x",)),),
    )


def test_later_download_differing_from_the_first_is_refused(tmp_path: Path) -> None:
    mirror, dest = tmp_path / "mirror", tmp_path / "datasets"
    src = _tofu_source(mirror)
    first = download_sources([src], dest, mirror=mirror, **FAST)[0].files[0]
    trusted = {first.relpath: (first.sha256, first.bytes)}  # what the catalog records

    # upstream changes, the local copy is gone: before, the new bytes were accepted
    (mirror / first.relpath).write_bytes(b"index v2" * 50)  # same size, other bytes
    (dest / first.relpath).unlink()
    with pytest.raises(ChecksumError, match="trust on first use") as err:
        download_sources([src], dest, mirror=mirror, trusted=trusted, **FAST)
    assert first.sha256 in str(err.value) and "gpt2-test:gpt2/355M/model.ckpt.index" in str(
        err.value
    )
    assert not (dest / first.relpath).exists()  # nothing unverified was kept

    # same bytes as recorded: accepted (and a present verified copy is skipped)
    (mirror / first.relpath).write_bytes(b"index v1" * 50)
    again = download_sources([src], dest, mirror=mirror, trusted=trusted, **FAST)[0]
    assert again.files[0].sha256 == first.sha256 and not again.skipped
    assert download_sources([src], dest, mirror=mirror, trusted=trusted, **FAST)[0].skipped


def test_trusted_digest_never_overrides_a_published_one(tmp_path: Path, mirror: Path) -> None:
    src = get_source("the-verdict")
    wrong = {"the-verdict.txt": ("0" * 64, 20_479)}
    res = download_sources([src], tmp_path / "d", mirror=mirror, trusted=wrong, **FAST)[0]
    assert res.sha256 == src.sha256


def test_catalog_keeps_first_download_digests(tmp_path: Path) -> None:
    from tasks.catalog import Catalog

    cat = Catalog(tmp_path / "c.duckdb")
    assert cat.source_digests() == {}
    cat.record_source("gpt2-355M:gpt2/355M/model.ckpt.index", "u", "ab" * 32, 10_399)
    cat.record_source("the-verdict", "u", "cd" * 32, 20_479)  # single-file source: no path
    assert cat.source_digests() == {"gpt2/355M/model.ckpt.index": ("ab" * 32, 10_399)}


# --------------------------------------------------------------------------- HF layout


def test_hf_layout_through_the_downloader_imports_to_transformers_logits(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """A tiny GPT-2 written by transformers itself, laid out as the gpt2-hf/<size>/ mirror
    entry, fetched by the verified downloader and imported without TensorFlow."""
    transformers = require_module("transformers", "a dev dependency: pip install -e '.[dev]'")
    from gpt.checkpoint import load_checkpoint
    from gpt.weights.hf import convert_hf_checkpoint

    torch.manual_seed(0)
    conf = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=2,
                                   n_head=2)  # fmt: skip
    hf = transformers.GPT2LMHeadModel(conf).eval()
    mirror = tmp_path / "mirror"
    hf.save_pretrained(mirror / "gpt2-hf" / "124M")
    real = get_source(gpt2_source_name("124M", "hf"))
    # the real entry's paths and URLs; its published hashes are those of the real 548 MB file
    src = replace(real, files=tuple(replace(f, sha256=None, size=None) for f in real.files))
    res = download_sources([src], tmp_path / "datasets", mirror=mirror, **FAST)[0]
    assert [f.relpath for f in res.files] == ["gpt2-hf/124M/model.safetensors",
                                               "gpt2-hf/124M/config.json"]  # fmt: skip
    out = convert_hf_checkpoint(res.folder, tmp_path / "ckpt", tokenizer_dir)
    loaded = load_checkpoint(out)
    assert loaded.meta["source"] == "hf-gpt2" and loaded.tokenizer_dir is not None
    x = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (loaded.model(x) - hf(x).logits).abs().max().item() < 1e-4
