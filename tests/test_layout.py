"""illada.layout: one resolver for checkpoints (a checkpoint, a folder of them, a run root),
typed checkpoint records, and no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from illada.errors import UserError
from illada.layout import CheckpointInfo, checkpoint_info, complete_checkpoints, resolve_checkpoint
from tests.conftest import REPO

INFO = {"step": 2, "model": {"num_layers": 2}, "files": {"common.pt": {"size": 3, "sha256": "ab"}}, "digest": "d", "data_root": "/data", "written_by": "a newer illada"}


@pytest.fixture
def run_root(tmp_path):
    """<root>/checkpoints with step 1 and 2 complete and step 3 a crashed save (no marker)."""
    for step in (1, 2, 3):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        if step < 3:
            (folder / "illada.json").write_text(json.dumps({**INFO, "step": step}))
    return tmp_path


def test_a_checkpoint_a_folder_and_a_run_root_resolve_alike(run_root):
    latest = str(run_root / "checkpoints" / "step_00000002")
    assert resolve_checkpoint(str(run_root)) == latest
    assert resolve_checkpoint(str(run_root / "checkpoints")) == latest
    assert resolve_checkpoint(str(run_root / "checkpoints" / "step_00000001")) == str(run_root / "checkpoints" / "step_00000001")
    assert [p.rsplit("_", 1)[-1] for p in complete_checkpoints(str(run_root / "checkpoints"))] == ["00000001", "00000002"]


def test_an_unfinished_checkpoint_or_an_empty_folder_is_a_user_error(run_root, tmp_path):
    with pytest.raises(UserError, match="is not a complete checkpoint"):
        resolve_checkpoint(str(run_root / "checkpoints" / "step_00000003"))
    with pytest.raises(FileNotFoundError):  # what older callers catch
        resolve_checkpoint(str(tmp_path / "nothing-here"))


def test_checkpoint_info_is_typed_and_keeps_what_it_does_not_know(run_root):
    info = checkpoint_info(str(run_root))
    assert isinstance(info, CheckpointInfo) and info.step == 2 and info.data_root == "/data" and info.parent is None
    assert info.extra == {"written_by": "a newer illada"}
    defaults = {"tokens_per_source": {}, "parent": None, "init_from": None, "parallel": {}, "saved_at": None, "tokenizer": None, "source": None, "hf_config": None}
    assert info.to_dict() == {**INFO, "step": 2, **defaults}  # written back as read


def test_the_layout_module_imports_nothing_heavy():
    probe = "import sys, illada.layout; print([m for m in ('torch', 'ray', 'megatron', 'mlflow') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
