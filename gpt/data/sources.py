"""The registry of every public input the pipeline downloads.

Each :class:`Source` is one or more :class:`SourceFile` entries. A file's ``path`` is
its location relative to the datasets folder *and* relative to a mirror (datasets at
the top, the GPT-2 tokenizer under ``gpt2/``, a GPT-2 size's release files under
``gpt2/<size>/``), so a filled datasets folder can itself serve as a mirror.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from gpt.errors import ConfigError

#: GPT-2 release sizes, smallest first.
GPT2_SIZES: tuple[str, ...] = ("124M", "355M", "774M", "1558M")

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


def gpt2_source_name(size: str) -> str:
    """Registry name of a GPT-2 release size, e.g. ``"124M"`` -> ``"gpt2-124M"``."""
    if size not in GPT2_SIZES:
        raise ConfigError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(GPT2_SIZES)}")
    return f"gpt2-{size}"


def _gpt2_file(size: str, file: str, path: str) -> SourceFile:
    sha, nbytes = _GPT2_TOKENIZER_HASHES.get(file, (None, None))
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
    return {s.name: s for s in reg}


#: Every known source by name.
SOURCES: dict[str, Source] = _build_registry()

#: The sources the pipeline's data stages need (everything but GPT-2 weights).
DATASET_SOURCES: tuple[str, ...] = ("the-verdict", "sms-spam", "instruction-data", "gpt2-tokenizer")


def list_sources() -> list[Source]:
    """Every registered source, in registry order."""
    return list(SOURCES.values())


def get_source(name: str) -> Source:
    """The source called ``name`` (ConfigError listing the known names otherwise)."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}") from None
