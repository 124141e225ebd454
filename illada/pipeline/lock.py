"""One writer per run root, and one pipeline per run root.

`pipeline run` holds ROOT/_lock.json for as long as it runs. A second run on the same root
is refused at once with a message naming the holder; it does not wait, because a data run
can take hours and a refused command is easier to reason about than one that hangs.

- Local roots: an exclusive `fcntl.flock` on the file. The kernel releases it when the
  process ends, however it ends, so a killed run never leaves a stale lock behind.
- s3:// roots: S3 has no locks but has conditional writes. The lock object is created
  with `If-None-Match: *` (of two runs, exactly one creates it), names its owner, and is
  rewritten every `heartbeat_s` seconds with `If-Match` on its ETag. A lock whose
  heartbeat is older than `stale_s` (its owner died) is taken over with `If-Match` on the
  ETag that was read, so two runs cannot both take it over. It is deleted on release,
  again only if it is still ours. Staleness compares the holder's clock with ours:
  `stale_s` is minutes, far above the skew of NTP-synchronised machines.

ROOT/_root.json records which pipeline the root holds (config name, data kind and
sources, without weights). A run whose config differs there is refused unless forced:
it would replace every stage's output. Changing a stage's settings (pack.seq_len, the
tokenizer, a weight) is the normal re-run workflow and is not refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from illada import storage
from illada.config import Config
from illada.errors import UserError
from illada.layout import LOCK, ROOT_IDENTITY
from illada.pipeline.stage import PipelineError

log = logging.getLogger(__name__)



class RootInUse(PipelineError, UserError):
    """Another run holds the root; the message names it."""


class RootHoldsAnotherPipeline(PipelineError, UserError):
    """The root was made by a different pipeline config; the message says how to proceed."""


def _holder(command: str) -> dict:
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "command": command, "started_unix": time.time(), "heartbeat_unix": time.time()}


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started_unix", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command', '?')}, since {started})"


class RootLock:
    """Use as `with RootLock(root, "pipeline run"):`; raises RootInUse if another run holds it."""

    def __init__(self, root: str, command: str, heartbeat_s: float = 30.0, stale_s: float = 300.0):
        self.url = storage.join(root, LOCK)
        self.root = root
        self.holder = _holder(command)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.lost: str | None = None  # set if another run took an S3 lock over (we looked dead)
        self._file = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RootLock:
        if storage.is_local(self.url):
            self._lock_local()
        else:
            self._lock_object()
            self._thread = threading.Thread(target=self._heartbeat, name="root-lock-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._etag is not None and self.lost is None:
            fs, path = storage.filesystem(self.url)
            bucket, key, _ = fs.split_path(path)
            try:
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
            except Exception:  # taken over, or a store without conditional deletes: delete only if still ours
                fs.invalidate_cache(path)
                with contextlib.suppress(FileNotFoundError):
                    if json.loads(fs.cat_file(path)).get("owner") == self.holder["owner"]:
                        fs.rm(path)
            fs.invalidate_cache(path)

    def check(self) -> None:
        """Raise RootInUse if the lock was lost (call between steps that write)."""
        if self.lost:
            raise RootInUse(f"lost the lock on {self.root}: {self.lost}; stop and check who else writes there")

    # --- local: flock ------------------------------------------------------------------

    def _lock_local(self) -> None:
        import fcntl

        path = self.url.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            f.close()
            raise RootInUse(self._refusal(holder)) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self.holder))
        f.flush()
        self._file = f

    # --- s3: conditional writes ---------------------------------------------------------

    def _lock_object(self) -> None:
        fs, path = storage.filesystem(self.url)
        try:
            self._etag = fs.pipe_file(path, self._body(), mode="create")["ETag"]
            return
        except FileExistsError:
            pass
        fs.invalidate_cache(path)
        info = fs.info(path)
        holder = json.loads(fs.cat_file(path))
        age = time.time() - holder.get("heartbeat_unix", 0)
        if age <= self.stale_s:
            raise RootInUse(self._refusal(holder))
        log.warning("taking over the lock of %s: its holder, %s, has not been seen for %.0f s", self.root, _describe(holder), age)
        try:
            self._etag = fs.pipe_file(path, self._body(), IfMatch=info["ETag"])["ETag"]
        except OSError:  # another run took it over first
            raise RootInUse(self._refusal(json.loads(fs.cat_file(path)))) from None

    def _body(self) -> bytes:
        self.holder["heartbeat_unix"] = time.time()
        return json.dumps(self.holder).encode()

    def _heartbeat(self) -> None:
        fs, path = storage.filesystem(self.url)
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._etag = fs.pipe_file(path, self._body(), IfMatch=self._etag)["ETag"]
            except OSError as e:
                self.lost = f"the lock object changed under us ({e})"
                log.error("lost the lock on %s: %s", self.root, self.lost)
                return

    def _refusal(self, holder: dict) -> str:
        return (
            f"run root {self.root} is in use by {_describe(holder)}; wait for that run to finish or use another --root "
            f"(a killed run's lock expires by itself{'' if storage.is_local(self.url) else f' after {self.stale_s:.0f} s'})"
        )


def root_identity(config: Config) -> dict:
    """What makes a root hold one pipeline rather than another."""
    sources = [s.model_dump(mode="json", exclude={"weight"}) for s in config.data.sources]
    return {"name": config.name, "kind": config.data.kind, "sources": sources}


def check_root_identity(config: Config, force: bool) -> None:
    """Record the root's pipeline on first use; refuse a different one unless `force`."""
    url = storage.join(config.root, ROOT_IDENTITY)
    identity = root_identity(config)
    if storage.exists(url):
        recorded = storage.read_json(url)
        if recorded != identity and not force:
            what = [k for k in identity if identity[k] != recorded.get(k)]
            raise RootHoldsAnotherPipeline(
                f"run root {config.root} holds the outputs of another pipeline config (its {', '.join(what)} differ: "
                f"{_differences(recorded, identity)}); use another --root, or pass --force to rebuild every stage there"
            )
        if recorded == identity:
            return
    storage.write_json(url, identity)


def _differences(recorded: dict, identity: dict) -> str:
    parts = []
    for key in identity:
        if identity[key] != recorded.get(key):
            if key == "sources":
                before, after = [s["name"] for s in recorded.get(key, [])], [s["name"] for s in identity[key]]
                parts.append(f"sources {before} -> {after}" if before != after else "the sources' paths or fields")
            else:
                parts.append(f"{key} {recorded.get(key)!r} -> {identity[key]!r}")
    return "; ".join(parts)
