"""Is a checkpoint what its illada.json says it is? Checked before anything in it is loaded.

Megatron's dist_checkpointing reads pickles: torch.distributed.checkpoint's `.metadata`
(plain pickle) and `common.pt` (torch.load, weights_only by default since torch 2.6). A
crafted pickle runs code when it is read, and a damaged file loads silently or fails deep
inside megatron. So before loading, every file is compared with what illada.json recorded
when the checkpoint was saved: its size always, its sha256 when asked (the default), and
no file may be there that illada.json does not list.

This detects damage and tampering with the files alone. A checkpoint from someone else
comes with its own illada.json: load it only if you trust where it came from, or compare
its digest with a record you trust (`illada lineage verify`, its MLflow LoggedModel).

Light on purpose (no megatron): the lineage audit and the CLI import it too.
"""

from __future__ import annotations

import json
import os

from illada import storage
from illada.config import ConfigError

MARKER = "illada.json"  # as illada.train.checkpoint writes it, last


class DamagedCheckpoint(ConfigError):
    """A checkpoint's files do not match its illada.json; names the checkpoint and the file."""

    def __init__(self, path: str, file: str, reason: str):
        self.path, self.file, self.reason = path, file, reason
        super().__init__(f"checkpoint {path} is damaged: {file} {reason}")


def read_marker(path: str) -> dict:
    """A checkpoint's illada.json (DamagedCheckpoint if it is unreadable)."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(path, MARKER, f"cannot be read ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
        raise DamagedCheckpoint(path, MARKER, "lists no files")
    return info


def check_files(path: str, *, sha256: bool = True) -> dict:
    """Compare every file of the checkpoint at `path` with its illada.json; returns the
    parsed illada.json. Raises DamagedCheckpoint naming the first file that differs."""
    info = read_marker(path)
    listed = info["files"]
    for name in sorted(os.listdir(path)):
        if name != MARKER and name not in listed:
            raise DamagedCheckpoint(path, name, "is not listed in illada.json")
    for name, meta in sorted(listed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise DamagedCheckpoint(path, name, "is missing")
        size = os.path.getsize(file)
        if size != meta["size"]:
            raise DamagedCheckpoint(path, name, f"has {size} bytes, illada.json recorded {meta['size']}")
    if sha256:
        for name, meta in sorted(listed.items()):
            digest = storage.sha256_file(os.path.join(path, name))
            if digest != meta["sha256"]:
                raise DamagedCheckpoint(path, name, f"has sha256 {digest[:16]}, illada.json recorded {meta['sha256'][:16]}")
    return info
