"""Is a checkpoint what its illada.json says it is? Checked before anything in it is loaded.

Megatron's dist_checkpointing reads pickles: torch.distributed.checkpoint's `.metadata`
(plain pickle) and `common.pt` (torch.load, weights_only by default since torch 2.6). A
crafted pickle runs code when it is read, and a damaged file loads silently or fails deep
inside megatron. So before loading, every file is compared with what illada.json recorded
when the checkpoint was saved: its size always, its sha256 when asked (the default), and
no file may be there that illada.json does not list. Then `.metadata` is read with an
unpickler that resolves only the classes torch.distributed.checkpoint writes there (Python's
"restricting globals"), so a crafted one is refused even beside a matching illada.json;
`common.pt` is checked with torch's own weights_only list (get_unsafe_globals_in_checkpoint).

This detects damage and tampering with the files alone. A checkpoint from someone else
comes with its own illada.json: load it only if you trust where it came from, or compare
its digest with a record you trust (`illada lineage verify`, its MLflow LoggedModel).

Light on purpose (no megatron): the lineage audit and the CLI import it too.
"""

from __future__ import annotations

import json
import os
import pickle

from illada import storage
from illada.config import ConfigError
from illada.layout import CHECKPOINT_MARKER as MARKER
from illada.progress import hashing

DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's, a plain pickle
COMMON = "common.pt"  # megatron's non-sharded state, torch.save'd
DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint.planner")
SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


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
        with hashing(sum(meta["size"] for meta in listed.values()), f"checking {os.path.basename(path)}") as bar:
            for name, meta in sorted(listed.items()):
                digest = storage.sha256_file(os.path.join(path, name), on_read=bar.update)
                if digest != meta["sha256"]:
                    raise DamagedCheckpoint(path, name, f"has sha256 {digest[:16]}, illada.json recorded {meta['sha256'][:16]}")
    check_pickles(path)
    return info


def check_pickles(path: str) -> None:
    """Refuse pickles that would run more than torch's checkpoint classes when loaded."""
    metadata = os.path.join(path, DCP_METADATA)
    if os.path.isfile(metadata):
        try:
            with open(metadata, "rb") as f:
                _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
            raise DamagedCheckpoint(path, DCP_METADATA, f"is not plain checkpoint metadata ({e}); refusing to load it") from None
    common = os.path.join(path, COMMON)
    if os.path.isfile(common):
        import torch

        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(common)
        except Exception as e:  # noqa: BLE001  (not a torch.save file at all)
            raise DamagedCheckpoint(path, COMMON, f"cannot be read as a torch checkpoint ({e})") from None
        if unsafe:
            raise DamagedCheckpoint(path, COMMON, f"refers to {', '.join(unsafe)}, which weights_only loading refuses")


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals torch.distributed.checkpoint's metadata is made of; the
    check happens before any module is imported or anything called."""

    def find_class(self, module: str, name: str):
        import torch

        allowed = (module, name) in SAFE_GLOBALS or module in DCP_MODULES
        allowed |= module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        found = super().find_class(module, name)
        if module in DCP_MODULES and not isinstance(found, type):
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not a class")
        return found
