"""The project's own error types. Every user-facing failure is one of these, with a
message that names the file / record / field / URL involved and what to do."""

from __future__ import annotations


class GPTFlowError(Exception):
    """Base class of every error gptflow raises on purpose."""


class ConfigError(GPTFlowError):
    """A config value, profile or ``--set`` override is invalid."""


class DataError(GPTFlowError):
    """An input file or record is malformed (names the file, line/record and field)."""


class DownloadError(GPTFlowError):
    """A source could not be fetched from any of its URLs."""


class ChecksumError(DownloadError):
    """Downloaded bytes do not match the expected sha256."""


class UnsafeArchiveError(DataError):
    """An archive member would escape the extraction folder."""


class CheckpointError(GPTFlowError):
    """A checkpoint folder/file is missing, corrupt, unsafe or does not fit the model."""


class ExportError(GPTFlowError):
    """A checkpoint cannot be written in another library's format as asked (names what
    cannot be expressed there and the way out)."""


class CatalogError(GPTFlowError):
    """The DuckDB catalog refused an operation (read-only, lock timeout, bad schema)."""


class CatalogLockedError(CatalogError):
    """Another process kept the catalog file locked for longer than the lock timeout."""


class WorkerDiedError(GPTFlowError):
    """The process that started this flow run and reads its output (a Prefect worker,
    or the shell of ``gptflow run``) died while the run went on."""


class JudgeError(GPTFlowError):
    """The Ollama judge could not be used."""


class OllamaUnreachableError(JudgeError):
    """No Ollama server answers at the configured host."""


class ModelNotPulledError(JudgeError):
    """The judge model is not present on the Ollama server."""


class DistributedError(GPTFlowError):
    """A multi-process (torchrun) run failed or could not start; names the command and
    carries the tail of the child's stderr."""


def one_line(message: str) -> str:
    """``message`` as one line: DuckDB's excerpt of the query (``LINE 1: …`` and the
    caret under it) left out, the remaining lines and runs of spaces joined by one space.
    What ``gptflow`` prints for a user error and a deployment run logs at ERROR."""
    kept = []
    for line in message.splitlines():
        text = line.strip()
        if (text.startswith("LINE ") and ":" in text[:12]) or set(text) <= {"^", " "}:
            continue
        kept.append(text)
    return " ".join(" ".join(kept).split())
