"""The downloader against a loopback HTTP server and a local-folder mirror."""

from __future__ import annotations

import hashlib
import shutil
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers_http import Fault, LoopbackServer, serve

from gpt.data.archives import safe_extract_zip
from gpt.data.download import (
    download_source,
    download_sources,
    sha256_file,
)
from gpt.data.sources import (
    DATASET_SOURCES,
    GPT2_FILES,
    GPT2_SIZES,
    SOURCES,
    ArchiveMember,
    Source,
    SourceFile,
    get_source,
)
from gpt.errors import ChecksumError, DataError, DownloadError, UnsafeArchiveError

VERDICT_SHA = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
SMS_INNER_SHA = "edc1f2ca36319ca36c6f80fede2f6ae5f81335289352485f3924df077ec20266"
FAST = {"retries": 2, "backoff": 0.01, "timeout": 2.0, "progress": False}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def www(tmp_path: Path, mirror: Path) -> Path:
    """A server root holding copies of the real mirror files."""
    root = tmp_path / "www"
    shutil.copytree(mirror, root, ignore=shutil.ignore_patterns("README.md"))
    for p in root.rglob("*"):
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return root


@pytest.fixture
def server(www: Path) -> Iterator[LoopbackServer]:
    with serve(www) as srv:
        yield srv


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "datasets"


def _verdict(server: LoopbackServer, *aliases: str) -> Source:
    """The real the-verdict entry, pointed at the loopback server under ``aliases``."""
    real = get_source("the-verdict").files[0]
    urls = tuple(server.url(f"/{a}/the-verdict.txt") for a in aliases)
    return Source("verdict-test", "test", (SourceFile(real.path, urls, real.sha256, real.size),))


def _no_trace(dest: Path, relpath: str) -> None:
    final = dest / relpath
    assert not final.exists()
    assert not final.with_name(final.name + ".part").exists()
    assert not final.with_name(f".{final.name}.download.json").exists()


# ------------------------------------------------------------------ registry


def test_registry_entries() -> None:
    assert set(DATASET_SOURCES) <= set(SOURCES)
    for size in GPT2_SIZES:
        src = get_source(f"gpt2-{size}")
        assert [f.filename for f in src.files] == list(GPT2_FILES)
        assert all(f.subdir == f"gpt2/{size}" for f in src.files)
        assert src.files[0].urls[0].startswith("https://openaipublic.blob.core.windows.net/")
        assert "backblazeb2" in src.files[0].urls[1]
        shas = {f.filename: f.sha256 for f in src.files}
        # tokenizer files are identical across sizes; of the weights only the 124M ones
        # have a published hash (the others are trusted on first use)
        assert shas["encoder.json"] == get_source("gpt2-tokenizer").files[0].sha256
        assert (shas["model.ckpt.index"] is None) == (size != "124M")
    sms = get_source("sms-spam")
    assert sms.inner_sha256 == SMS_INNER_SHA and sms.sha256 is None
    assert len(sms.urls) == 2


# ------------------------------------------------------------------ HTTP


def test_http_mirror_success_then_skip(server: LoopbackServer, dest: Path, mirror: Path) -> None:
    base = server.url("/m")
    res = download_sources(list(DATASET_SOURCES), dest, mirror=base, **FAST)
    by = {r.name: r for r in res}
    assert by["the-verdict"].sha256 == VERDICT_SHA and by["the-verdict"].bytes == 20_479
    sms_file = by["sms-spam"].path
    assert sms_file.name == "SMSSpamCollection" and sha256_file(sms_file) == SMS_INNER_SHA
    for r in res:
        for f in r.files:
            assert not f.skipped
            assert f.path.read_bytes() == (mirror / f.relpath).read_bytes()
            assert f.url == server.url("/m/" + f.relpath.replace("+", "%2B"))
    n_requests = len(server.log)
    assert n_requests == 5
    again = download_sources(list(DATASET_SOURCES), dest, mirror=base, **FAST)
    assert all(r.skipped for r in again)
    assert len(server.log) == n_requests  # nothing fetched
    assert again[0].files[0].url == res[0].files[0].url  # the recorded URL


def test_checksum_mismatch_primary_then_backup(server: LoopbackServer, dest: Path) -> None:
    server.set_fault("/p/the-verdict.txt", Fault(body=b"x" * 20_479))
    res = download_source(_verdict(server, "p", "b"), dest, **FAST)
    assert res.url == server.url("/b/the-verdict.txt")
    assert sha256_file(res.path) == VERDICT_SHA
    assert len(server.requests_for("/p/the-verdict.txt")) == 1  # checksum: no retry, next URL


def test_checksum_mismatch_everywhere_leaves_nothing(server: LoopbackServer, dest: Path) -> None:
    bad1, bad2 = b"y" * 20_479, b"z" * 20_479
    server.set_fault("/p/the-verdict.txt", Fault(body=bad1))
    server.set_fault("/b/the-verdict.txt", Fault(body=bad2))
    src = _verdict(server, "p", "b")
    with pytest.raises(ChecksumError) as ei:
        download_source(src, dest, **FAST)
    msg = str(ei.value)
    assert "verdict-test" in msg
    assert server.url("/p/the-verdict.txt") in msg and server.url("/b/the-verdict.txt") in msg
    assert f"expected {VERDICT_SHA}" in msg
    assert f"got {_sha(bad1)}" in msg and f"got {_sha(bad2)}" in msg
    assert "GPTFLOW_MIRROR" in msg and "No file was kept" in msg
    _no_trace(dest, "the-verdict.txt")
    # a later run with healthy servers fetches it (nothing bad was accepted)
    server.set_fault("/p/the-verdict.txt", None)
    assert not download_source(src, dest, **FAST).skipped


def test_size_mismatch_is_a_checksum_failure(server: LoopbackServer, dest: Path) -> None:
    server.set_fault("/p/the-verdict.txt", Fault(body=b"short"))
    with pytest.raises(ChecksumError, match="expected 20,479 bytes, got 5"):
        download_source(_verdict(server, "p"), dest, **FAST)
    _no_trace(dest, "the-verdict.txt")


def test_404_on_primary_uses_backup(server: LoopbackServer, dest: Path) -> None:
    server.set_fault("/p/the-verdict.txt", Fault(status=404))
    res = download_source(_verdict(server, "p", "b"), dest, **FAST)
    assert res.url == server.url("/b/the-verdict.txt") and res.sha256 == VERDICT_SHA
    assert len(server.requests_for("/p/the-verdict.txt")) == 1  # 404 is not retried


def test_500_is_retried_then_backup(server: LoopbackServer, dest: Path) -> None:
    server.set_fault("/p/the-verdict.txt", Fault(status=500))
    res = download_source(_verdict(server, "p", "b"), dest, **{**FAST, "retries": 3})
    assert res.url == server.url("/b/the-verdict.txt")
    assert len(server.requests_for("/p/the-verdict.txt")) == 3


def test_transient_500_recovers_on_same_url(server: LoopbackServer, dest: Path) -> None:
    server.set_fault("/p/the-verdict.txt", Fault(status=503, times=1))
    res = download_source(_verdict(server, "p", "b"), dest, **FAST)
    assert res.url == server.url("/p/the-verdict.txt")
    assert [r.status for r in server.requests_for("/p/the-verdict.txt")] == [503, 200]


def test_timeout_on_primary_uses_backup(server: LoopbackServer, dest: Path) -> None:
    server.set_fault("/p/the-verdict.txt", Fault(delay=1.5))
    res = download_source(
        _verdict(server, "p", "b"), dest, **{**FAST, "timeout": 0.3, "retries": 1}
    )
    assert res.url == server.url("/b/the-verdict.txt") and res.sha256 == VERDICT_SHA


def test_all_failures_are_named(server: LoopbackServer, dest: Path) -> None:
    server.set_fault("/p/the-verdict.txt", Fault(status=404))
    server.set_fault("/b/the-verdict.txt", Fault(delay=1.5))
    with pytest.raises(DownloadError) as ei:
        download_source(_verdict(server, "p", "b"), dest, **{**FAST, "timeout": 0.3})
    msg = str(ei.value)
    assert not isinstance(ei.value, ChecksumError)
    assert f"{server.url('/p/the-verdict.txt')}: HTTP 404" in msg
    assert f"{server.url('/b/the-verdict.txt')}: timeout after 0.3 s" in msg
    assert "after 2 attempts" in msg
    _no_trace(dest, "the-verdict.txt")


def test_connection_refused_is_named(dest: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = Source(
        "refused",
        "test",
        (SourceFile("x.bin", (f"http://127.0.0.1:{port}/x.bin",), None, None),),
    )
    with pytest.raises(DownloadError, match=r"x\.bin: connection failed") as ei:
        download_source(src, dest, **FAST)
    assert "after 2 attempts" in str(ei.value)


@pytest.mark.parametrize("range_support", [True, False])
def test_cut_transfer_resumes_within_one_call(www: Path, dest: Path, range_support: bool) -> None:
    with serve(www, range_support=range_support) as srv:
        srv.set_fault("/p/the-verdict.txt", Fault(cut_after=5_000, times=1))
        res = download_source(_verdict(srv, "p"), dest, **FAST)
        assert sha256_file(res.path) == VERDICT_SHA
        reqs = srv.requests_for("/p/the-verdict.txt")
        assert [r.sent for r in reqs] == [5_000, 20_479 - 5_000 if range_support else 20_479]
        assert reqs[1].range == "bytes=5000-"
        assert reqs[1].status == (206 if range_support else 200)


@pytest.mark.parametrize("range_support", [True, False])
def test_cut_transfer_verified_on_a_later_run(www: Path, dest: Path, range_support: bool) -> None:
    with serve(www, range_support=range_support) as srv:
        srv.set_fault("/p/the-verdict.txt", Fault(cut_after=7_000, times=1))
        src = _verdict(srv, "p")
        with pytest.raises(DownloadError, match=r"connection cut after 7,000 of 20,479 bytes"):
            download_source(src, dest, **{**FAST, "retries": 1})
        part = dest / "the-verdict.txt.part"
        assert part.stat().st_size == 7_000  # kept for resume, never accepted as final
        assert not (dest / "the-verdict.txt").exists()
        res = download_source(src, dest, **FAST)
        assert sha256_file(res.path) == VERDICT_SHA and not part.exists()
        assert srv.requests_for("/p/the-verdict.txt")[1].status == (206 if range_support else 200)


def test_stale_partial_with_wrong_bytes_is_redone(server: LoopbackServer, dest: Path) -> None:
    dest.mkdir(parents=True)
    (dest / "the-verdict.txt.part").write_bytes(b"\0" * 1000)  # garbage from elsewhere
    res = download_source(_verdict(server, "p"), dest, **FAST)
    assert sha256_file(res.path) == VERDICT_SHA
    reqs = server.requests_for("/p/the-verdict.txt")
    assert [(r.range, r.status) for r in reqs] == [("bytes=1000-", 206), (None, 200)]


def test_corrupted_present_file_is_fetched_again(server: LoopbackServer, dest: Path) -> None:
    src = _verdict(server, "p")
    download_source(src, dest, **FAST)
    assert download_source(src, dest, **FAST).skipped
    (dest / "the-verdict.txt").write_text("tampered")
    res = download_source(src, dest, **FAST)
    assert not res.skipped and sha256_file(res.path) == VERDICT_SHA


def test_unknown_hash_is_recorded_and_checked(
    server: LoopbackServer, www: Path, dest: Path
) -> None:
    (www / "blob.bin").write_bytes(bytes(range(256)) * 100)
    src = Source("blob", "t", (SourceFile("sub/blob.bin", (server.url("/p/blob.bin"),)),))
    first = download_source(src, dest, **FAST)
    assert first.sha256 == _sha(bytes(range(256)) * 100) and first.bytes == 25_600
    assert download_source(src, dest, **FAST).skipped  # recorded hash, same size & mtime
    (dest / "sub" / "blob.bin").write_bytes(b"changed")
    # no published hash: a file changed since its download is refused, never fetched over
    with pytest.raises(ChecksumError, match="changed since its verified download"):
        download_source(src, dest, **FAST)
    assert (dest / "sub" / "blob.bin").read_bytes() == b"changed"
    (dest / "sub" / "blob.bin").unlink()
    again = download_source(src, dest, **FAST)
    assert not again.skipped and again.sha256 == first.sha256


# ------------------------------------------------------------------ zip


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


@pytest.mark.parametrize(
    ("members", "links", "needle"),
    [
        ({"ok.txt": b"1", "../evil.txt": b"2"}, None, "'..'"),
        ({"ok.txt": b"1", "a/../../evil.txt": b"2"}, None, "'..'"),
        ({"/tmp/evil.txt": b"2"}, None, "absolute path"),
        ({"ok.txt": b"1"}, {"link": "../../etc"}, "symlink"),
        ({"ok.txt": b"1"}, {"link": "/etc/passwd"}, "symlink"),
    ],
)
def test_unsafe_zip_refused(
    tmp_path: Path, members: dict[str, bytes], links: dict[str, str] | None, needle: str
) -> None:
    z = _zip(tmp_path / "bad.zip", members, links)
    target = tmp_path / "out" / "x"
    target.parent.mkdir()
    with pytest.raises(UnsafeArchiveError, match=needle):
        safe_extract_zip(z, target)
    assert not target.exists() and not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temp folder left


def test_safe_zip_extracts_and_replaces(tmp_path: Path) -> None:
    z = _zip(tmp_path / "good.zip", {"a.txt": b"A", "d/b.txt": b"B"}, {"d/l": "../a.txt"})
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    files = safe_extract_zip(z, target)
    assert sorted(p.relative_to(target).as_posix() for p in files) == ["a.txt", "d/b.txt", "d/l"]
    assert (target / "d" / "b.txt").read_bytes() == b"B"
    assert (target / "d" / "l").read_bytes() == b"A"  # an inner symlink is fine
    assert not (target / "stale.txt").exists()


def test_unsafe_zip_via_download_leaves_nothing(
    server: LoopbackServer, www: Path, dest: Path
) -> None:
    _zip(www / "evil.zip", {"SMSSpamCollection": b"ham\thi\n", "../escape.txt": b"x"})
    src = Source(
        "evil",
        "t",
        (
            SourceFile(
                "evil.zip",
                (server.url("/p/evil.zip"),),
                extract_to="evil",
                members=(ArchiveMember("SMSSpamCollection"),),
            ),
        ),
    )
    with pytest.raises(UnsafeArchiveError, match=r"escape the extraction folder"):
        download_source(src, dest, **FAST)
    _no_trace(dest, "evil.zip")
    assert not (dest / "evil").exists() and not (dest.parent / "escape.txt").exists()


def test_zip_inner_checksum_verified(server: LoopbackServer, www: Path, dest: Path) -> None:
    # the primary serves a zip whose inner file is altered; the backup the real one
    _zip(www / "altered.zip", {"SMSSpamCollection": b"ham\taltered\n"})
    sms = get_source("sms-spam").files[0]
    src = Source(
        "sms-test",
        "t",
        (
            SourceFile(
                sms.path,
                (server.url("/p/altered.zip"), server.url("/b/sms+spam+collection.zip")),
                extract_to=sms.extract_to,
                members=sms.members,
            ),
        ),
    )
    res = download_source(src, dest, **FAST)
    assert res.url == server.url("/b/sms+spam+collection.zip")
    assert sha256_file(res.path) == SMS_INNER_SHA
    # both bad -> ChecksumError naming the member hash, nothing extracted or kept
    shutil.rmtree(dest)
    only_bad = Source("sms-test", "t", (replace(src.files[0], urls=src.files[0].urls[:1]),))
    with pytest.raises(
        ChecksumError, match=f"archive member SMSSpamCollection: expected {SMS_INNER_SHA}"
    ):
        download_source(only_bad, dest, **FAST)
    _no_trace(dest, sms.path)
    assert not (dest / "sms_spam_collection").exists()


# ------------------------------------------------------------------ local mirror


def test_local_folder_mirror(mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTFLOW_MIRROR", str(mirror))
    res = download_sources(list(DATASET_SOURCES), progress=False)  # env mirror, default dest
    from gpt.paths import datasets_dir

    assert all(r.path.is_relative_to(datasets_dir()) for r in res)
    assert [r.name for r in res] == list(DATASET_SOURCES)
    assert res[0].sha256 == VERDICT_SHA and res[0].url == str(mirror.resolve() / "the-verdict.txt")
    assert sha256_file(res[1].path) == SMS_INNER_SHA
    assert all(r.skipped for r in download_sources(list(DATASET_SOURCES), progress=False))


def test_mirror_only_error(mirror: Path, dest: Path) -> None:
    with pytest.raises(DownloadError) as ei:
        download_source("gpt2-124M", dest, mirror=mirror, progress=False)
    msg = str(ei.value)
    assert "gpt2-124M" in msg and "Mirror-only mode" in msg
    assert str(mirror.resolve() / "gpt2" / "124M" / "checkpoint") in msg
    assert "openaipublic" in msg  # says where it would come from without the mirror
    _no_trace(dest, "gpt2/124M/checkpoint")


def test_mirror_must_exist(tmp_path: Path) -> None:
    from gpt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mirror folder .* does not exist"):
        download_source("the-verdict", tmp_path / "d", mirror=tmp_path / "nope")


def test_cli_download_table(mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert (
        main(["download", "--mirror", str(mirror), "--no-progress", "--only", "the-verdict"]) == 0
    )
    out = capsys.readouterr().out
    assert "the-verdict.txt" in out and "fetched" in out and "b41e41a68f03" in out
    assert (
        main(["download", "--mirror", str(mirror), "--no-progress", "--only", "the-verdict"]) == 0
    )
    assert "skipped (verified)" in capsys.readouterr().out
    assert main(["download", "--only", "nope", "--no-progress"]) == 1
    assert "unknown source 'nope'" in capsys.readouterr().err


def test_damaged_zip_member_is_a_data_error_leaving_nothing(tmp_path: Path) -> None:
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr("data.txt", b"ham\thello there\n" * 200)
    b = bytearray(z.read_bytes())
    start = b.find(b"data.txt") + len("data.txt")
    for k in range(start + 5, start + 25):
        b[k] ^= 0xFF
    z.write_bytes(bytes(b))
    target = tmp_path / "out" / "x"
    target.parent.mkdir()
    with pytest.raises(DataError) as info:
        safe_extract_zip(z, target)
    assert str(z) in str(info.value) and "'data.txt'" in str(info.value)
    assert not isinstance(info.value, UnsafeArchiveError)
    assert list((tmp_path / "out").iterdir()) == []  # no temp folder left
