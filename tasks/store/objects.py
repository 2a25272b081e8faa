"""The artifacts root on object storage: an ``s3://`` prefix with conditional writes.

:class:`ObjectRoot` offers the few operations the stage store, leases and run records
need, among them :meth:`~ObjectRoot.create` (``If-None-Match: *``) and
:meth:`~ObjectRoot.replace_if` / :meth:`~ObjectRoot.delete_if` (``If-Match``), which make
them safe across machines without a lock server. Only S3 (s3fs, the ``lake`` extra) is
implemented; credentials come from the environment (:func:`storage_options`).
"""

from __future__ import annotations

import email.utils
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.errors import GPTFlowError
from gpt.paths import url_protocol

#: Protocols with an implementation of the conditional writes.
SUPPORTED_PROTOCOLS = ("s3", "s3a")


class StorageError(GPTFlowError):
    """The artifacts store cannot be used (bad URL, missing bucket, failed publish)."""


def s3_env(prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """``endpoint``, ``key_id``, ``secret`` and ``region`` from
    ``<prefix>_{ENDPOINT,KEY_ID,SECRET,REGION}``, each falling back to the AWS variables
    of the same meaning (None: none is set)."""
    env = os.environ if environ is None else environ
    names = {
        "endpoint": ("ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        "key_id": ("KEY_ID", "AWS_ACCESS_KEY_ID"),
        "secret": ("SECRET", "AWS_SECRET_ACCESS_KEY"),
        "region": ("REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    }
    return {
        field: next((env[n] for n in (f"{prefix}_{own}", *aws) if env.get(n)), None)
        for field, (own, *aws) in names.items()
    }


def storage_options() -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem`` from ``GPTFLOW_ARTIFACTS_S3_*``, else
    the AWS variables (:func:`s3_env`); what is unset is left to botocore (its endpoint
    handling, credential chain and default region)."""
    env = s3_env("GPTFLOW_ARTIFACTS_S3")
    opts = {k: v for k, v in (("key", env["key_id"]), ("secret", env["secret"])) if v}
    client = {"endpoint_url": env["endpoint"], "region_name": env["region"]}
    client = {k: v for k, v in client.items() if v}
    return {**opts, "client_kwargs": client} if client else opts


@dataclass(frozen=True)
class Entry:
    """One object of a listing."""

    size: int
    etag: str


@dataclass(frozen=True)
class Fetched:
    """An object's bytes with its version and age."""

    data: bytes
    etag: str
    age_s: float | None
    """Seconds since it was last written, by the server's clock (None: unknown)."""


_FS_LOCK = threading.Lock()
_FS: dict[tuple[str, str], Any] = {}


def _filesystem(protocol: str) -> Any:
    """One s3fs filesystem per protocol and settings (listing cache off: other machines
    write the same prefixes)."""
    try:
        import s3fs
    except ImportError as exc:
        raise StorageError(
            f"an {protocol}:// artifacts root needs s3fs: pip install 'gptflow[lake]'"
        ) from exc
    options = storage_options()
    ident = (protocol, json.dumps(options, sort_keys=True))
    with _FS_LOCK:
        fs = _FS.get(ident)
        if fs is None:
            fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True, **options)
            _FS[ident] = fs
        return fs


def _is_precondition(exc: BaseException) -> bool:
    """True for a failed ``If-Match``/``If-None-Match`` (412) or a concurrent conditional
    write of the same key (409), as raised through s3fs."""
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__ or exc
    response = getattr(cause, "response", None) or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    code = (response.get("Error") or {}).get("Code")
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def _error_code(exc: BaseException) -> str | None:
    cause = exc.__cause__ or exc
    return ((getattr(cause, "response", None) or {}).get("Error") or {}).get("Code")


class ObjectRoot:
    """A prefix of an object store: ``s3://bucket/prefix`` (see the module docstring).
    Names (``rel``) are ``/``-separated and relative to the prefix."""

    def __init__(self, url: str, *, fs: Any = None) -> None:
        protocol = url_protocol(url)
        if protocol not in SUPPORTED_PROTOCOLS:
            raise StorageError(
                f"artifacts root {url!r}: object storage is implemented for s3:// (AWS S3 or "
                "an S3-compatible server, endpoint in GPTFLOW_ARTIFACTS_S3_ENDPOINT); use "
                "s3://bucket/prefix, a shared folder, or a file:// URL"
            )
        self.url = url.rstrip("/")
        rest = self.url.split("://", 1)[1]
        self.bucket, _, self.prefix = rest.partition("/")
        if not self.bucket:
            raise StorageError(f"artifacts root {url!r} names no bucket: use s3://bucket/prefix")
        self.fs = fs if fs is not None else _filesystem(protocol)

    # ------------------------------------------------------------------ names
    def key(self, rel: str) -> str:
        """The object key of ``rel``."""
        rel = rel.strip("/")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel.strip('/')}"

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)

    def _missing_bucket(self, exc: BaseException) -> StorageError:
        return StorageError(
            f"cannot write {self.url}: {exc} (does the bucket {self.bucket!r} exist, and do "
            "GPTFLOW_ARTIFACTS_S3_* / AWS_* reach it?)"
        )

    # ------------------------------------------------------------------ reads
    def get(self, rel: str) -> Fetched | None:
        """The object ``rel`` with its ETag and age, or None when there is none."""
        from fsspec.asyn import sync

        async def fetch() -> Fetched | None:
            try:
                resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key(rel))
            except FileNotFoundError:
                return None
            async with resp["Body"] as body:
                data = await body.read()
            age = None
            date = (resp.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
            if date and resp.get("LastModified") is not None:
                age = (
                    email.utils.parsedate_to_datetime(date) - resp["LastModified"]
                ).total_seconds()
            return Fetched(data, resp["ETag"], age)

        return sync(self.fs.loop, fetch)

    def list(self, prefix: str = "") -> dict[str, Entry]:
        """Every object under ``prefix/`` (recursively): ``{name relative to prefix:
        Entry}``."""
        base = (
            self.key(prefix) + "/"
            if prefix.strip("/")
            else (self.prefix + "/" if self.prefix else "")
        )
        out: dict[str, Entry] = {}
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Prefix": base}
            if token:
                kw["ContinuationToken"] = token
            try:
                page = self._call("list_objects_v2", **kw)
            except FileNotFoundError:
                return out
            for obj in page.get("Contents", []):
                out[obj["Key"][len(base) :]] = Entry(int(obj["Size"]), obj.get("ETag", ""))
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def download(self, pairs: Sequence[tuple[str, Path]]) -> None:
        """Copy objects to local files (parents created)."""
        if not pairs:
            return
        for _, local in pairs:
            Path(local).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(
            [f"{self.bucket}/{self.key(rel)}" for rel, _ in pairs], [str(p) for _, p in pairs]
        )

    # ------------------------------------------------------------------ writes
    def put(self, rel: str, data: bytes) -> str:
        """Write ``rel`` unconditionally; returns its ETag."""
        try:
            return self._call("put_object", Key=self.key(rel), Body=data)["ETag"]
        except FileNotFoundError as exc:
            raise self._missing_bucket(exc) from exc

    def create(self, rel: str, data: bytes) -> str | None:
        """Write ``rel`` only if it does not exist; its ETag, or None when it existed."""
        try:
            return self._call("put_object", Key=self.key(rel), Body=data, IfNoneMatch="*")["ETag"]
        except FileNotFoundError as exc:
            raise self._missing_bucket(exc) from exc
        except OSError as exc:
            if _is_precondition(exc):
                return None
            raise

    def replace_if(self, rel: str, data: bytes, etag: str) -> str | None:
        """Overwrite ``rel`` only if its ETag is still ``etag``; the new ETag, or None
        when it changed (or is gone)."""
        try:
            return self._call("put_object", Key=self.key(rel), Body=data, IfMatch=etag)["ETag"]
        except FileNotFoundError:
            return None  # gone: S3 answers 404 to If-Match on a missing key
        except OSError as exc:
            if _is_precondition(exc):
                return None
            raise

    def delete_if(self, rel: str, etag: str) -> bool:
        """Delete ``rel`` only if its ETag is still ``etag``; False when it changed.
        Where the server does not implement conditional deletes, it reads the object
        and deletes it if unchanged."""
        try:
            self._call("delete_object", Key=self.key(rel), IfMatch=etag)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _is_precondition(exc):
                return False
            if _error_code(exc) not in ("NotImplemented", "InvalidArgument"):
                raise
        got = self.get(rel)
        if got is None or got.etag != etag:
            return False
        self.delete([rel])
        return True

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy of ``src`` to ``dst`` (both under this root)."""
        self._call(
            "copy_object",
            Key=self.key(dst),
            CopySource={"Bucket": self.bucket, "Key": self.key(src)},
        )

    def delete(self, rels: Sequence[str]) -> None:
        """Delete the objects ``rels`` (missing ones are fine), in the given order."""
        keys = [self.key(r) for r in rels]
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            self._call(
                "delete_objects", Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
            )

    def upload(self, pairs: Sequence[tuple[Path, str]]) -> None:
        """Copy local files to objects (concurrently)."""
        if not pairs:
            return
        try:
            self.fs.put(
                [str(p) for p, _ in pairs], [f"{self.bucket}/{self.key(rel)}" for _, rel in pairs]
            )
        except FileNotFoundError as exc:
            raise self._missing_bucket(exc) from exc
