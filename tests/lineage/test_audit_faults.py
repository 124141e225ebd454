"""`lineage verify` on what happens to real runs: keep_last prunes a parent, a data root is
copied with its mlflow.db and training continues on the copy, a store is mistyped or damaged.

One pipeline run (its own mlflow.db) copied to a second root; a training run on the
original (keep_last=1) and its resume on the copy, both recorded in the training root's
own mlflow.db."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from illada.cli import main
from illada.config import load_config
from illada.pipeline.runner import run_pipeline
from illada.data.stages import PRETRAIN as STAGES
from tests.conftest import TinyConfigFactory
from tests.lineage.conftest import train


@pytest.fixture(scope="module")
def copied(tmp_path_factory, ray_local):
    patch = pytest.MonkeyPatch()
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: <root>/mlflow.db
    tmp = tmp_path_factory.mktemp("audit")
    original, copy = tmp / "data", tmp / "data-copy"
    manifests = run_pipeline(load_config(base=TinyConfigFactory().raw(str(original), str(tmp / "raw"))), STAGES)
    shutil.copytree(original, copy)  # the shards with their mlflow.db
    env = {"MLFLOW_TRACKING_URI": None}
    train(tmp / "T", str(original), "train.checkpoint.keep_last=1", env=env)  # steps 1, 2: keeps step 2
    train(tmp / "T", str(copy), "train.checkpoint.keep_last=1", "train.steps=3", env=env)  # resumes from 2 on the copy, prunes 2
    yield SimpleNamespace(tmp=tmp, original=original, copy=copy, pack=manifests["pack"], checkpoints=tmp / "T" / "checkpoints")
    patch.undo()


def a_shard(pack: dict) -> str:
    return min(f["path"] for f in pack["files"] if f["kind"] == "shard")


def flip_a_byte(path: Path) -> bytes:
    original = path.read_bytes()
    path.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    return original


def test_a_parent_pruned_by_keep_last_is_reported_not_a_failure(copied, capsys):
    assert [p.name for p in copied.checkpoints.iterdir() if p.name.startswith("step_")] == ["step_00000003"]
    capsys.readouterr()
    assert main(["lineage", "verify", str(copied.checkpoints)]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"verifying: 100%.* (\d+)/\1 \[", err), err  # its progress bar, to the last file
    assert f"PRUNED   checkpoint      {copied.checkpoints / 'step_00000002'}" in out
    assert "everything matches what was recorded" in out
    assert main(["lineage", "show", str(copied.checkpoints)]) == 0
    assert "removed by keep_last" in capsys.readouterr().out


def test_verify_hashes_every_copy_of_the_data_that_a_run_read(copied, capsys):
    """Steps 1-2 read the original data root, step 3 its copy: a shard changed in either is
    named (one shard set per place read, though both have the same digest)."""
    for root in (copied.copy, copied.original):
        shard = root / a_shard(copied.pack)
        original = flip_a_byte(shard)
        try:
            capsys.readouterr()
            assert main(["lineage", "verify", str(copied.checkpoints)]) == 1
            out = capsys.readouterr().out
            prefix = f"  {'CHANGED':<9}{'shard':<16}"  # verify.text's columns: state, kind, path
            changed = [line.removeprefix(prefix).split()[0] for line in out.splitlines() if line.startswith(prefix)]
            assert changed == [str(shard)], out
        finally:
            shard.write_bytes(original)
    assert main(["lineage", "verify", str(copied.checkpoints)]) == 0


def test_a_mistyped_tracking_uri_is_one_line_and_creates_nothing(copied, capsys):
    typo = copied.tmp / "T" / "mlfow.db"
    capsys.readouterr()
    assert main(["lineage", "verify", str(copied.checkpoints), "--tracking-uri", f"sqlite:///{typo}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("illada: error: no MLflow database at") and err.count("\n") == 1, err
    assert not typo.exists()


def test_a_truncated_database_is_one_line(copied, capsys):
    database = copied.tmp / "T" / "mlflow.db"
    saved = database.read_bytes()
    try:
        database.write_bytes(saved[: len(saved) // 3])
        capsys.readouterr()
        assert main(["lineage", "verify", str(copied.checkpoints)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("illada: error:") and captured.err.count("\n") == 1, captured.err
        assert "Traceback" not in captured.out + captured.err
    finally:
        database.write_bytes(saved)
