"""The one storage layer: fsspec for local paths and s3:// URLs, with atomic writes.

A file is visible under its final name only once complete: on a local disk it is written
beside its target and renamed; on an object store the upload is committed on close and
discarded on error. Credentials come from config or the AWS environment and are never
part of a path, manifest or log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec
import pyarrow.fs

from illada import redaction
from illada.config import StorageConfig
from illada.errors import UserError

_storage = StorageConfig()


class StorageError(UserError):
    """An object store that cannot be reached or read as configured; says what to set."""


@contextlib.contextmanager
def _explained(url: str) -> Iterator[None]:
    """Turn an object store's connection and credential errors into one line that says
    what to set (botocore's own are dozens of lines deep inside fsspec)."""
    try:
        yield
    except Exception as e:
        problem = None if is_local(url) else _object_store_problem(e)
        if problem is None:
            raise
        raise StorageError(f"{url}: {problem}") from e


def _object_store_problem(e: Exception) -> str | None:
    name = type(e).__name__  # by name: botocore need not be imported for local paths
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return "no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or storage.s3.key and storage.s3.secret)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return f"cannot reach the S3 endpoint ({e}); set AWS_ENDPOINT_URL or storage.s3.endpoint_url to your object store's address"
    if name == "ProfileNotFound":
        return f"{e}; set AWS_PROFILE to a profile of your AWS config, or unset it"
    if isinstance(e, PermissionError):
        return f"access denied ({e}); check that the credentials may read and write this bucket"
    return None


def configure(storage: StorageConfig) -> None:
    """Set the storage options used by every later call in this process (and its Ray tasks,
    which receive the config and call this first)."""
    global _storage
    _storage = storage
    redaction.remember(storage.s3.key, storage.s3.secret)  # masked in every log line from now on


CREDENTIAL_ENV = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY"}


def without_credentials(storage: StorageConfig) -> StorageConfig:
    """The storage config as a Ray task's arguments may carry it: task arguments are
    serialized into the task's spec, so the S3 key and secret travel in `worker_env`
    instead."""
    return storage.model_copy(update={"s3": storage.s3.model_copy(update={"key": None, "secret": None})})


def worker_env(storage: StorageConfig) -> dict[str, Any]:
    """Ray options giving a task or actor the config's S3 credentials as the standard AWS
    environment variables (which the S3 client reads when the config has none); {} when
    the config has none either."""
    s3 = storage.s3
    if not (s3.key and s3.secret):
        return {}
    env = {CREDENTIAL_ENV["key"]: s3.key.get_secret_value(), CREDENTIAL_ENV["secret"]: s3.secret.get_secret_value()}
    return {"runtime_env": {"env_vars": env}}


def _s3_options() -> dict[str, Any]:
    s3 = _storage.s3
    options: dict[str, Any] = {}
    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    if s3.region:
        options["client_kwargs"] = {"region_name": s3.region}
    if s3.key and s3.secret:
        options["key"] = s3.key.get_secret_value()
        options["secret"] = s3.secret.get_secret_value()
    return options


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the in-filesystem path for a URL."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = _s3_options() if protocol in ("s3", "s3a") else {}
    return fsspec.core.url_to_fs(url, **options)


def arrow_filesystem(url: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem over the same fsspec filesystem, for Arrow and Ray Data readers."""
    fs, path = filesystem(url)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with _explained(url):
        return fs.exists(path)


def glob(pattern: str) -> list[str]:
    """Sorted URLs matching a glob, with the protocol kept."""
    fs, path = filesystem(pattern)
    with _explained(pattern):
        return sorted(_unstrip(pattern, p) for p in fs.glob(path) if fs.isfile(p))


def list_files(url: str) -> list[str]:
    """Every file under a directory, recursively, sorted."""
    fs, path = filesystem(url)
    with _explained(url):
        if not fs.exists(path):
            return []
        return sorted(_unstrip(url, p) for p in fs.find(path))


def file_sizes(url: str) -> dict[str, int]:
    """The size of every file under a directory, recursively, by URL (one listing)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return {}
    return {_unstrip(url, p): int(info["size"]) for p, info in fs.find(path, detail=True).items()}


def _unstrip(reference: str, path: str) -> str:
    if "://" in reference and not reference.startswith("file://"):
        return f"{reference.split('://', 1)[0]}://{path}"
    return path


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def open_read(url: str, mode: str = "rb", compression: str | None = None) -> IO:
    fs, path = filesystem(url)
    with _explained(url):
        return fs.open(path, mode, compression=compression)


@contextlib.contextmanager
def open_atomic(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open for writing so that `url` appears only when the block finishes without error."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if is_local(url):
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
        try:
            with fs.open(tmp, mode) as f:
                yield f
            os.replace(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
    else:
        f = fs.open(path, mode)
        try:
            yield f
        except BaseException:
            # s3fs: abort the multipart upload so nothing appears under `path`.
            getattr(f, "discard", lambda: None)()
            # Mark it closed: otherwise its __del__ calls close(), which would flush the
            # discarded buffer (s3fs raises from __del__; a file type whose discard keeps
            # the buffer would upload the partial object under `path`).
            with contextlib.suppress(AttributeError):  # io-based files have a read-only `closed`
                f.closed = True
            raise
        f.close()


def write_bytes(url: str, data: bytes) -> None:
    with open_atomic(url, "wb") as f:
        f.write(data)


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def sha256_file(url: str, chunk: int = 8 << 20, on_read: Callable[[int], Any] | None = None) -> str:
    """The file's sha256; `on_read(nbytes)` after each chunk (a progress bar's update)."""
    digest = hashlib.sha256()
    with open_read(url) as f:
        while block := f.read(chunk):
            digest.update(block)
            if on_read:
                on_read(len(block))
    return digest.hexdigest()


class HashingWriter:
    """Wraps a binary file and hashes (sha256) and counts what passes through, so a shard's
    checksum costs no second read."""

    def __init__(self, f: IO):
        self._f = f
        self._digest = hashlib.sha256()
        self.bytes_written = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self.bytes_written += view.nbytes
        return self._f.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def flush(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:  # the owner closes the underlying file
        pass
