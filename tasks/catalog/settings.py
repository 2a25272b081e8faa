"""Where the catalog lives: one typed declaration, resolved from the environment in one
place (:meth:`CatalogSettings.from_env`).

``url`` unset: the DuckDB file at ``path`` (``GPTFLOW_DB``, else
``artifacts/gptflow.duckdb``), the published file beside the writers' live one.
``url = "ducklake:postgres:…"`` with a ``data_path`` (a folder or ``s3://``): a DuckLake
several machines write at once. The variables (``GPTFLOW_CATALOG_URL``,
``GPTFLOW_CATALOG_DATA_PATH``, ``GPTFLOW_DB``, ``GPTFLOW_DB_LOCK_TIMEOUT``,
``GPTFLOW_CATALOG_S3_*``) are listed in docs/catalog.md. The pipeline's ``catalog``
section (:class:`CatalogArgs`) overrides them per run; S3 credentials never come from a
config: each machine reads its own (:meth:`CatalogSettings.with_env_s3`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gpt.config import Args, operational
from gpt.errors import CatalogError
from gpt.paths import default_db_path
from tasks.store.objects import s3_env

#: Default bound, in seconds, on waiting for other writers (file lock, lake conflicts).
DEFAULT_LOCK_TIMEOUT = 60.0

_PASSWORD_RE = re.compile(r"(password\s*=\s*)(\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with any ``password=…`` value replaced (for messages and logs)."""
    return _PASSWORD_RE.sub(r"\1***", text)


def lock_timeout_from_env(environ: Mapping[str, str] | None = None) -> float:
    """``GPTFLOW_DB_LOCK_TIMEOUT`` in seconds, or :data:`DEFAULT_LOCK_TIMEOUT`."""
    env = os.environ if environ is None else environ
    value = env.get("GPTFLOW_DB_LOCK_TIMEOUT")
    if not value:
        return DEFAULT_LOCK_TIMEOUT
    try:
        return float(value)
    except ValueError as exc:
        raise CatalogError(
            f"GPTFLOW_DB_LOCK_TIMEOUT={value!r} is not a number of seconds; unset it or "
            "set e.g. GPTFLOW_DB_LOCK_TIMEOUT=60"
        ) from exc


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False
    )


class S3Settings(_Model):
    """How DuckDB's httpfs reaches an S3 ``data_path`` (an S3 secret scoped to it)."""

    endpoint: str | None = None
    """``host:port`` or ``http(s)://host:port`` of an S3-compatible server; None: AWS.
    An ``http://`` URL turns ``use_ssl`` off."""
    key_id: str | None = None
    """Access key id; None: no secret is created (public or pre-configured access)."""
    secret: SecretStr | None = None
    """Secret access key (never printed)."""
    region: str = "us-east-1"
    """Bucket region."""
    use_ssl: bool = True
    """HTTPS to the endpoint."""
    url_style: Literal["path", "vhost"] = "vhost"
    """``path`` for most S3-compatible servers (MinIO, moto), ``vhost`` for AWS."""

    def duckdb_endpoint(self) -> tuple[str | None, bool]:
        """(``host:port`` without scheme, use_ssl) as DuckDB's secret wants them."""
        if self.endpoint is None:
            return None, self.use_ssl
        if "://" in self.endpoint:
            parts = urlsplit(self.endpoint)
            return parts.netloc, parts.scheme == "https"
        return self.endpoint, self.use_ssl

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """S3 settings from ``GPTFLOW_CATALOG_S3_*``, falling back to the AWS variables."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {**s3_env("GPTFLOW_CATALOG_S3", env)}
        endpoint = values["endpoint"]
        values["region"] = values["region"] or "us-east-1"
        # a custom endpoint is nearly always path-style; AWS itself is vhost-style
        values["url_style"] = env.get("GPTFLOW_CATALOG_S3_URL_STYLE") or (
            "path" if endpoint else "vhost"
        )
        ssl = env.get("GPTFLOW_CATALOG_S3_USE_SSL")
        if ssl:
            values["use_ssl"] = ssl
        elif isinstance(endpoint, str) and endpoint.startswith("http://"):
            values["use_ssl"] = False
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise CatalogError(f"invalid GPTFLOW_CATALOG_S3_* setting: {exc}") from exc


class CatalogSettings(_Model):
    """Which catalog to use: the embedded DuckDB file (default) or a shared DuckLake."""

    url: str | None = None
    """None: the DuckDB file at ``path``. ``ducklake:postgres:dbname=… host=… port=…
    user=…``: a DuckLake with its metadata in PostgreSQL, written by several machines at
    once. Other DuckLake metadata stores (``ducklake:sqlite:FILE``, a ``.ducklake``
    DuckDB file) are accepted but not tested here."""
    path: Path | None = None
    """The DuckDB file when ``url`` is None (None: ``GPTFLOW_DB`` or
    ``artifacts/gptflow.duckdb``, resolved when the catalog is opened)."""
    data_path: str | None = None
    """Where a DuckLake keeps its Parquet files: a folder every writer sees, or
    ``s3://bucket/prefix/``. Required with ``url``; must match what the lake recorded."""
    lock_timeout: float = Field(DEFAULT_LOCK_TIMEOUT, ge=0)
    """Seconds to keep retrying while other writers hold the file lock or (DuckLake)
    keep winning write conflicts, before a CatalogError."""
    s3: S3Settings = S3Settings()
    """Credentials and endpoint for an ``s3://`` data_path."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if not v.startswith("ducklake:"):
            raise ValueError(
                f"catalog url {redact(v)!r} is not a DuckLake URL; use "
                "'ducklake:postgres:dbname=NAME host=HOST port=PORT user=USER' (or leave it "
                "unset for the DuckDB file)"
            )
        return v

    @field_validator("data_path")
    @classmethod
    def _norm_data_path(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if "://" not in v:
            v = str(Path(v).expanduser().resolve())
        return v if v.endswith("/") else v + "/"

    @model_validator(mode="after")
    def _check_combination(self) -> CatalogSettings:
        if self.url is not None and self.data_path is None:
            raise ValueError(
                f"the DuckLake catalog {redact(self.url)} needs a data_path (a shared folder "
                "or s3://bucket/prefix/); set GPTFLOW_CATALOG_DATA_PATH or catalog.data_path"
            )
        if self.url is not None and self.path is not None:
            raise ValueError("give either a catalog url (DuckLake) or a DuckDB file path, not both")
        return self

    @classmethod
    def checked(cls, **values: object) -> CatalogSettings:
        """Settings from ``values``; what is wrong with them is a one-line
        :class:`CatalogError`."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for e in exc.errors():
                msg = str(e["msg"]).removeprefix("Value error, ")
                problems.append(f"{'.'.join(map(str, e['loc']))}: {msg}" if e["loc"] else msg)
            raise CatalogError(f"invalid catalog setting: {'; '.join(problems)}") from None

    def __repr_args__(self):  # type: ignore[override]
        for name, value in super().__repr_args__():
            yield name, redact(value) if name == "url" and isinstance(value, str) else value

    # ------------------------------------------------------------------ derived
    @property
    def is_lake(self) -> bool:
        """True for a DuckLake, False for the DuckDB file."""
        return self.url is not None

    @property
    def metadata_kind(self) -> str:
        """``postgres``, ``sqlite`` or ``duckdb``: where a DuckLake keeps its metadata."""
        assert self.url is not None
        rest = self.url[len("ducklake:") :]
        for kind in ("postgres", "sqlite"):
            if rest.startswith(kind + ":"):
                return kind
        return "duckdb"

    @property
    def on_s3(self) -> bool:
        """The lake's data files are on S3 (httpfs and an S3 secret are needed)."""
        return bool(self.data_path and self.data_path.startswith(("s3://", "s3a://")))

    def file_path(self) -> Path:
        """The DuckDB file (``path`` or the default)."""
        return Path(self.path).expanduser() if self.path is not None else default_db_path()

    def live_path(self) -> Path:
        """The DuckDB file writers write (``<path>.live``): only gptflow's writers open
        it, each for one transaction; :attr:`path` gets a checkpointed copy of it."""
        published = self.file_path()
        return published.with_name(published.name + ".live")

    def location(self) -> str:
        """What to name in messages: the file, or the lake URL (password hidden)."""
        if self.url is None:
            return str(self.file_path())
        return f"{redact(self.url)} (data {self.data_path})"

    def exists(self) -> bool:
        """Whether there is a catalog to read: the file (published or live) exists (a lake
        always counts)."""
        return self.is_lake or self.file_path().exists() or self.live_path().exists()

    def with_env_s3(self, environ: Mapping[str, str] | None = None) -> CatalogSettings:
        """These settings with the S3 part read from this machine's environment (a lake;
        the DuckDB file needs none): settings that crossed machines or a JSON dump (where
        the secret is masked) never carry credentials that are used."""
        if not self.is_lake:
            return self
        return self.model_copy(update={"s3": S3Settings.from_env(environ)})

    def without_secrets(self) -> CatalogSettings:
        """These settings without S3 credentials (what a run's context carries)."""
        return self.model_copy(update={"s3": S3Settings()})

    def pinned(self) -> CatalogSettings:
        """The DuckDB file's path resolved now (``GPTFLOW_DB`` / ``GPTFLOW_ARTIFACTS``
        read once), so the run keeps writing one file whatever the environment later
        says; a lake is returned as it is."""
        if self.is_lake:
            return self
        return self.model_copy(update={"path": self.file_path().expanduser().resolve()})

    def lake_key(self) -> str:
        """Identifies one lake (process-wide connection caching and locking)."""
        return f"{self.url}|{self.data_path}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CatalogSettings:
        """The catalog the environment selects (see the module docstring)."""
        env = os.environ if environ is None else environ
        url = env.get("GPTFLOW_CATALOG_URL") or None
        values: dict[str, object] = {"url": url, "lock_timeout": lock_timeout_from_env(env)}
        if url:
            values["data_path"] = env.get("GPTFLOW_CATALOG_DATA_PATH") or None
            values["s3"] = S3Settings.from_env(env)
        elif env.get("GPTFLOW_DB"):
            values["path"] = Path(env["GPTFLOW_DB"]).expanduser().resolve()
        return cls.checked(**values)


class CatalogArgs(Args):
    """The pipeline's ``catalog`` section: which catalog a run writes. Every field left
    unset (None) comes from the environment of the machine running the flow
    (:meth:`CatalogSettings.from_env`); the resolved catalog is the one every stage of
    the run writes. All fields are operational: the catalog indexes results, it does not
    shape them. Only non-secret fields live here: put a PostgreSQL password in
    ``PGPASSWORD`` or ``~/.pgpass`` and S3 credentials in the environment
    (``GPTFLOW_CATALOG_S3_*`` / ``AWS_*``) of each machine."""

    url: str | None = operational(None)
    """``ducklake:postgres:dbname=… host=… port=… user=…``: the run writes a DuckLake
    shared by several machines (needs ``data_path``). None: ``GPTFLOW_CATALOG_URL``, else
    the DuckDB file."""
    data_path: str | None = operational(None)
    """Where the DuckLake keeps its Parquet files: a folder every writer sees, or
    ``s3://bucket/prefix/``. None: ``GPTFLOW_CATALOG_DATA_PATH``."""
    path: Path | None = operational(None)
    """The DuckDB file (when no ``url`` is set here). None: ``GPTFLOW_DB``, else
    ``artifacts/gptflow.duckdb``."""
    lock_timeout: float | None = operational(None, ge=0)
    """Seconds to keep retrying while other writers hold the file lock or win DuckLake
    write conflicts. None: ``GPTFLOW_DB_LOCK_TIMEOUT``, else 60."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        v = CatalogSettings._check_url(v)
        if v is not None and _PASSWORD_RE.search(v):
            raise ValueError(
                "keep the password out of catalog.url (the config is recorded with every "
                "run); set PGPASSWORD or use ~/.pgpass on each machine"
            )
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> CatalogArgs:
        if self.url is not None and self.path is not None:
            raise ValueError(
                "set either catalog.url (a DuckLake) or catalog.path (a DuckDB file), not both"
            )
        return self

    def resolve(self, environ: Mapping[str, str] | None = None) -> CatalogSettings:
        """The catalog these settings select, completed from ``environ`` (default: this
        process's environment), S3 settings included."""
        env = os.environ if environ is None else environ
        base = CatalogSettings.from_env(env)
        values: dict[str, object] = {
            "lock_timeout": base.lock_timeout if self.lock_timeout is None else self.lock_timeout
        }
        if self.path is not None:
            values["path"] = Path(self.path).expanduser().resolve()
        elif self.url is not None or base.is_lake:
            values["url"] = self.url or base.url
            values["data_path"] = self.data_path or env.get("GPTFLOW_CATALOG_DATA_PATH") or None
            values["s3"] = S3Settings.from_env(env)
        else:
            values["path"] = base.path
        if self.data_path is not None and "url" not in values:
            raise CatalogError(
                f"catalog.data_path={self.data_path!r} is set but the catalog is the DuckDB "
                "file; set catalog.url (or GPTFLOW_CATALOG_URL) to use a DuckLake"
            )
        return CatalogSettings.checked(**values)
