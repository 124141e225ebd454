"""Where everything lies on storage: the one module that knows the on-disk layout.

Light on purpose (no torch, megatron or Ray): the CLI, the Ray job driver, lineage,
inference and training all find stage outputs and checkpoints through it.

Stage outputs, under a run root:

    <root>/_lock.json                the running pipeline's lock; <root>/_root.json which pipeline
    <root>/<stage>/manifest.json     written last: the stage's files, stats and digest
    <root>/<stage>/_fingerprint.json what the outputs were made from
    <root>/<stage>/...               the stage's own files (illada.pipeline.stage)

Checkpoints, under train.checkpoint.dir (default <root>/checkpoints):

    step_00001000/                   one checkpoint (megatron dist_checkpointing files)
        illada.json                  written last: the checkpoint is complete only with it
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from illada import storage
from illada.errors import UserError

MANIFEST = "manifest.json"
FINGERPRINT = "_fingerprint.json"
LOCK = "_lock.json"  # held by the one `pipeline run` writing the root (illada.pipeline.lock)
ROOT_IDENTITY = "_root.json"  # which pipeline the root holds

CHECKPOINT_MARKER = "illada.json"
CHECKPOINTS = "checkpoints"  # the default checkpoint folder under a run root
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointNotFound(UserError, FileNotFoundError):
    """A path that is neither a checkpoint, a folder of them nor a run root with one."""


# --- stage outputs -------------------------------------------------------------------------


def stage_dir(root: str, stage: str) -> str:
    return storage.join(root, stage)


def manifest_url(root: str, stage: str) -> str:
    return storage.join(root, stage, MANIFEST)


def read_manifest(root: str, stage: str) -> dict | None:
    """A stage's manifest, or None where the stage has not completed."""
    url = manifest_url(root, stage)
    return storage.read_json(url) if storage.exists(url) else None


# --- checkpoints ---------------------------------------------------------------------------


def checkpoint_root(root: str, checkpoint_dir: str | None = None) -> str:
    """The checkpoint folder of a run: train.checkpoint.dir, or <root>/checkpoints. Megatron's
    torch_dist format writes through the filesystem, so it must be a filesystem path."""
    folder = checkpoint_dir or storage.join(root, CHECKPOINTS)
    if not storage.is_local(folder):
        raise UserError(
            f"train.checkpoint.dir {folder!r} is not a filesystem path: megatron's torch_dist checkpoints are written "
            "through the filesystem; use local disk or a shared filesystem mounted on every node"
        )
    return folder


def step_dir(folder: str, step: int) -> str:
    return os.path.join(folder, f"step_{step:08d}")


def complete_checkpoints(folder: str) -> list[str]:
    """Complete checkpoint directories in a folder, oldest first."""
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if STEP_DIR.match(n) and is_complete_checkpoint(os.path.join(folder, n)))
    return [os.path.join(folder, n) for n in names]


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from itself, a folder of them or a run root (the latest)."""
    path = os.path.abspath(path)
    if is_complete_checkpoint(path):
        return path
    for folder in (path, os.path.join(path, CHECKPOINTS)):
        found = complete_checkpoints(folder)
        if found:
            return found[-1]
    raise CheckpointNotFound(
        f"{path} is not a complete checkpoint (no {CHECKPOINT_MARKER}), a folder of them or a run root with {CHECKPOINTS}/; "
        f"give a checkpoint directory such as <root>/{CHECKPOINTS}/step_00001000"
    )


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's illada.json: what it is, what it came from and its files' hashes."""

    step: int
    model: dict  # the ModelConfig it was trained with
    files: dict[str, dict]  # name -> {"size", "sha256"}
    digest: str
    tokens_per_source: dict[str, int] = field(default_factory=dict)
    parent: str | None = None  # the checkpoint its run resumed from or started from
    init_from: str | None = None
    data_root: str | None = None
    parallel: dict[str, int] = field(default_factory=dict)
    saved_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what a newer writer added

    @classmethod
    def from_dict(cls, raw: dict) -> CheckpointInfo:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in raw.items() if k in known}, extra={k: v for k, v in raw.items() if k not in known})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**out, **self.extra}


def is_complete_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CHECKPOINT_MARKER))


def checkpoint_info(path: str) -> CheckpointInfo:
    """The illada.json of a checkpoint (or of the latest under a folder or run root)."""
    return CheckpointInfo.from_dict(json.loads(Path(resolve_checkpoint(path), CHECKPOINT_MARKER).read_text()))
