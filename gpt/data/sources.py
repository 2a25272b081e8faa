"""The registry of every public input the pipeline downloads.

Each :class:`Source` is one or more :class:`SourceFile` entries. A file's ``path`` is
its location relative to the datasets folder *and* relative to a mirror (datasets at
the top, the GPT-2 tokenizer under ``gpt2/``, a GPT-2 size's OpenAI release files under
``gpt2/<size>/``, its Hugging Face ``model.safetensors`` + ``config.json`` under
``gpt2-hf/<size>/``), so a filled datasets folder can itself serve as a mirror.

Files without a published sha256 are trusted on first use: see
:func:`gpt.data.download.download_sources` (``trusted``) and :func:`pinned_files`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from gpt.errors import ConfigError

#: GPT-2 release sizes, smallest first.
GPT2_SIZES: tuple[str, ...] = ("124M", "355M", "774M", "1558M")

#: Where GPT-2 weights come from: OpenAI's TensorFlow release, or the Hugging Face
#: safetensors layout of the same weights.
GPT2_WEIGHT_SOURCES: tuple[str, ...] = ("openai", "hf")

#: The seven files of each GPT-2 release size.
GPT2_FILES: tuple[str, ...] = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)

_GPT2_PRIMARY = "https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}"
_GPT2_BACKUP = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/{size}/{file}"

#: sha256 and size of the tokenizer files, identical in every GPT-2 release size.
_GPT2_TOKENIZER_HASHES: dict[str, tuple[str, int]] = {
    "encoder.json": ("196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", 1_042_301),
    "vocab.bpe": ("1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", 456_318),
}

#: Published sha256 / size of OpenAI's release files beyond the tokenizer, (size, file) ->
#: (sha256 or None, bytes or None). Where a value is None no published one was found: the
#: downloader then records the first verified download and refuses a later one that
#: differs (trust on first use, see ``gpt.data.download``). Provenance:
#: - sizes of all 124M and 355M files: the reference repository's own download tests
#:   (rasbt/LLMs-from-scratch, ch05 tests, which HEAD-check every file's Content-Length);
#: - sha256 of the 124M ``model.ckpt.data-00000-of-00001``: two independent public
#:   projects pin the same value (a GPT-2 downloader in MontrealAI/AGI-Alpha-Agent-v0 and
#:   a SecureBench "gpt2-codegolf" task, which also states 497,759,232 bytes);
#: - sha256 of the 124M ``checkpoint``, ``hparams.json``, ``model.ckpt.index`` and
#:   ``model.ckpt.meta``: the same MontrealAI downloader's table; its ``checkpoint`` and
#:   ``hparams.json`` values were re-derived here from the files' known text (77 and 90
#:   bytes) and its tokenizer and data-file values match the other sources.
#: No sha256 was found for any 355M, 774M or 1558M weight file.
_GPT2_RELEASE_PINS: dict[tuple[str, str], tuple[str | None, int | None]] = {
    ("124M", "checkpoint"): (
        "dd1b025d2e155283f5e300ce95bf6d5b6bc0f7fe010db73daa6975eb896ab9cb",
        77,
    ),
    ("124M", "hparams.json"): (
        "d9d56e4121c427164e0c55c6f03c08e1daf9002b9b672825112d19097b680318",
        90,
    ),
    ("124M", "model.ckpt.data-00000-of-00001"): (
        "2060c885360cc0cf41d7a6dbc4d24b5127aae20260c8b5ae521b5a6578407118",
        497_759_232,
    ),
    ("124M", "model.ckpt.index"): (
        "71916f763f9746f9b2a06b12d91996cf1084ae008d0424543d39391c5f2dc687",
        5_215,
    ),
    ("124M", "model.ckpt.meta"): (
        "4668c448fa11531fd6700460487f73e82d3272960cea942252f8744bf225c77b",
        471_155,
    ),
    ("355M", "checkpoint"): (None, 77),
    ("355M", "hparams.json"): (None, 91),
    ("355M", "model.ckpt.data-00000-of-00001"): (None, 1_419_292_672),
    ("355M", "model.ckpt.index"): (None, 10_399),
    ("355M", "model.ckpt.meta"): (None, 926_519),
}

#: The same GPT-2 weights in the Hugging Face layout: Hub repository of each size.
GPT2_HF_REPOS: dict[str, str] = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
#: The files of each size in that layout (mirror: ``gpt2-hf/<size>/<file>``).
GPT2_HF_FILES: tuple[str, ...] = ("model.safetensors", "config.json")
#: The Hub commit each size is fetched at (URLs pin it, so the bytes cannot move under a
#: pinned hash): the revisions widely pinned by public projects that verify these files.
_GPT2_HF_REVISIONS: dict[str, str] = {
    "124M": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
    "355M": "6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
    "774M": "32b71b12589c2f8d625668d2335a01cac3249519",
    "1558M": "15ea56dee5df4983c59b2538573817e1667135e2",
}
_GPT2_HF_URL = "https://huggingface.co/{repo}/resolve/{rev}/{file}"
#: Published sha256 / size of the HF files, (size, file) -> (sha256, bytes or None).
#: model.safetensors sha256: the Hub's Git LFS object ids (shown on each repository's file
#: page, also on its safetensors pull requests) and pinned by many public projects; the
#: 124M and 355M byte counts are from published manifests of those revisions. config.json
#: sha256/size: public manifests of the same revisions (124M, 355M), a pinned fingerprint
#: table (1558M). The 774M config.json and the 774M/1558M sizes: none found (trust on
#: first use).
_GPT2_HF_PINS: dict[tuple[str, str], tuple[str | None, int | None]] = {
    ("124M", "model.safetensors"): (
        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
        548_105_171,
    ),
    ("124M", "config.json"): (
        "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4",
        665,
    ),
    ("355M", "model.safetensors"): (
        "fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd",
        1_519_984_962,
    ),
    ("355M", "config.json"): (
        "ef1a44d889ad1a0acc7731c78134f1b87d2d222f110e97dd10fd4117331caf22",
        718,
    ),
    ("774M", "model.safetensors"): (
        "5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce",
        None,
    ),
    ("1558M", "model.safetensors"): (
        "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a",
        None,
    ),
    ("1558M", "config.json"): (
        "be48115d52314bc27327e160bf10197760db02ea689d10adb24db4102edf7a8a",
        None,
    ),
}


@dataclass(frozen=True)
class ArchiveMember:
    """A file inside a downloaded archive whose content is verified after extraction."""

    name: str
    """Member name inside the archive (``/``-separated)."""
    sha256: str | None = None
    """Expected sha256 of the extracted bytes (None: not verified)."""
    size: int | None = None
    """Expected size in bytes of the extracted file (None: unknown)."""


@dataclass(frozen=True)
class SourceFile:
    """One downloadable file of a source."""

    path: str
    """Location relative to the datasets folder and to a mirror, ``/``-separated."""
    urls: tuple[str, ...]
    """Remote URLs, primary first, then backups."""
    sha256: str | None = None
    """Expected sha256 of the downloaded bytes (None: unknown, recorded on download)."""
    size: int | None = None
    """Expected size in bytes (None: unknown)."""
    extract_to: str | None = None
    """For a zip: folder (relative to the datasets folder) to extract it into."""
    members: tuple[ArchiveMember, ...] = ()
    """For a zip: members that must be present after extraction, with their hashes."""

    def __post_init__(self) -> None:
        p = PurePosixPath(self.path)
        if p.is_absolute() or ".." in p.parts or not self.path:
            raise ValueError(f"SourceFile.path must be relative without '..': {self.path!r}")
        if self.members and not self.extract_to:
            raise ValueError(f"{self.path}: archive members listed without extract_to")

    @property
    def filename(self) -> str:
        """The last path segment (the remote URLs' last segment)."""
        return PurePosixPath(self.path).name

    @property
    def subdir(self) -> str:
        """The folder part of :attr:`path` (``""`` for datasets at the top)."""
        parent = str(PurePosixPath(self.path).parent)
        return "" if parent == "." else parent

    @property
    def primary_url(self) -> str | None:
        """The first remote URL, if any."""
        return self.urls[0] if self.urls else None

    @property
    def backup_urls(self) -> tuple[str, ...]:
        """Every remote URL after the primary."""
        return self.urls[1:]

    @property
    def is_archive(self) -> bool:
        """True when the file is a zip that is extracted after download."""
        return self.extract_to is not None


@dataclass(frozen=True)
class Source:
    """A named input: one or more files fetched and verified together."""

    name: str
    """Registry name, e.g. ``"sms-spam"`` or ``"gpt2-124M"``."""
    description: str
    """One line saying what this is."""
    files: tuple[SourceFile, ...] = field(default_factory=tuple)
    """The files of this source."""

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError(f"source {self.name!r} has no files")

    @property
    def filename(self) -> str:
        """Name of the first file (single-file sources)."""
        return self.files[0].filename

    @property
    def urls(self) -> tuple[str, ...]:
        """URLs of the first file (single-file sources)."""
        return self.files[0].urls

    @property
    def sha256(self) -> str | None:
        """Expected sha256 of the first file (single-file sources)."""
        return self.files[0].sha256

    @property
    def size(self) -> int | None:
        """Expected size of the first file (single-file sources)."""
        return self.files[0].size

    @property
    def subdir(self) -> str:
        """Folder of the first file, relative to the datasets folder."""
        return self.files[0].subdir

    @property
    def inner_sha256(self) -> str | None:
        """sha256 of the first archive member (the SMS zip's ``SMSSpamCollection``)."""
        for f in self.files:
            for m in f.members:
                return m.sha256
        return None


def gpt2_source_name(size: str, source: str = "openai") -> str:
    """Registry name of a GPT-2 release size, e.g. ``"124M"`` -> ``"gpt2-124M"`` (OpenAI's
    TensorFlow release) or, with ``source="hf"``, ``"gpt2-hf-124M"`` (the Hugging Face
    safetensors layout)."""
    if size not in GPT2_SIZES:
        raise ConfigError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(GPT2_SIZES)}")
    if source not in GPT2_WEIGHT_SOURCES:
        raise ConfigError(
            f"unknown GPT-2 weight source {source!r}; choose one of {', '.join(GPT2_WEIGHT_SOURCES)}"
        )
    return f"gpt2-{size}" if source == "openai" else f"gpt2-hf-{size}"


def _gpt2_file(size: str, file: str, path: str) -> SourceFile:
    sha, nbytes = _GPT2_TOKENIZER_HASHES.get(file) or _GPT2_RELEASE_PINS.get(
        (size, file), (None, None)
    )
    return SourceFile(
        path=path,
        urls=(
            _GPT2_PRIMARY.format(size=size, file=file),
            _GPT2_BACKUP.format(size=size, file=file),
        ),
        sha256=sha,
        size=nbytes,
    )


def _build_registry() -> dict[str, Source]:
    reg: list[Source] = [
        Source(
            name="the-verdict",
            description='Edith Wharton, "The Verdict" (public domain): the pretraining text',
            files=(
                SourceFile(
                    path="the-verdict.txt",
                    urls=(
                        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                        "ch02/01_main-chapter-code/the-verdict.txt",
                    ),
                    sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
                    size=20_479,
                ),
            ),
        ),
        Source(
            name="sms-spam",
            description="UCI SMS Spam Collection (5,574 labelled messages), zipped",
            files=(
                SourceFile(
                    path="sms+spam+collection.zip",
                    urls=(
                        "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
                        "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
                    ),
                    # The zip bytes differ between hosts (and the mirror re-pack):
                    # the extracted data file is what is verified.
                    sha256=None,
                    size=None,
                    extract_to="sms_spam_collection",
                    members=(
                        ArchiveMember(
                            name="SMSSpamCollection",
                            sha256="edc1f2ca36319ca36c6f80fede2f6ae5f81335289352485f3924df077ec20266",
                            size=477_906,
                        ),
                    ),
                ),
            ),
        ),
        Source(
            name="instruction-data",
            description="Alpaca-style instruction data (1,100 records) for instruction finetuning",
            files=(
                SourceFile(
                    path="instruction-data.json",
                    urls=(
                        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                        "ch07/01_main-chapter-code/instruction-data.json",
                    ),
                    sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
                    size=203_524,
                ),
            ),
        ),
        Source(
            name="gpt2-tokenizer",
            description="GPT-2 BPE tokenizer files (encoder.json, vocab.bpe) from the 124M release",
            files=tuple(_gpt2_file("124M", f, f"gpt2/{f}") for f in ("encoder.json", "vocab.bpe")),
        ),
    ]
    for size in GPT2_SIZES:
        reg.append(
            Source(
                name=f"gpt2-{size}",
                description=f"OpenAI GPT-2 {size} release (TensorFlow checkpoint + tokenizer)",
                files=tuple(_gpt2_file(size, f, f"gpt2/{size}/{f}") for f in GPT2_FILES),
            )
        )
        repo, rev = GPT2_HF_REPOS[size], _GPT2_HF_REVISIONS[size]
        reg.append(
            Source(
                name=f"gpt2-hf-{size}",
                description=f"GPT-2 {size} in the Hugging Face layout ({repo}, safetensors)",
                files=tuple(
                    SourceFile(
                        path=f"gpt2-hf/{size}/{f}",
                        urls=(_GPT2_HF_URL.format(repo=repo, rev=rev, file=f),),
                        sha256=_GPT2_HF_PINS.get((size, f), (None, None))[0],
                        size=_GPT2_HF_PINS.get((size, f), (None, None))[1],
                    )
                    for f in GPT2_HF_FILES
                ),
            )
        )
    return {s.name: s for s in reg}


#: Every known source by name.
SOURCES: dict[str, Source] = _build_registry()

#: The sources the pipeline's data stages need (everything but GPT-2 weights).
DATASET_SOURCES: tuple[str, ...] = ("the-verdict", "sms-spam", "instruction-data", "gpt2-tokenizer")


def pinned_files() -> dict[str, bool]:
    """Every registered file (by path) -> whether a published sha256 pins it (False:
    trusted on first use)."""
    return {
        f.path: f.sha256 is not None or any(m.sha256 for m in f.members)
        for s in SOURCES.values()
        for f in s.files
    }


def list_sources() -> list[Source]:
    """Every registered source, in registry order."""
    return list(SOURCES.values())


def get_source(name: str) -> Source:
    """The source called ``name`` (ConfigError listing the known names otherwise)."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}") from None


def resolve_sources(
    names: Iterable[str | Source], sources: Mapping[str, Source] | None
) -> list[Source]:
    """The sources ``names`` (names in ``sources``, default :data:`SOURCES`, or sources)."""
    registry = SOURCES if sources is None else sources
    resolved: list[Source] = []
    for n in names:
        if isinstance(n, Source):
            resolved.append(n)
        elif n in registry:
            resolved.append(registry[n])
        else:
            raise ConfigError(f"unknown source {n!r}; known sources: {', '.join(registry)}")
    return resolved
