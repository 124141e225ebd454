"""One run per root at a time (local flock, S3 conditional writes), one pipeline per root."""

import json

import pytest

from illada import storage
from illada.config import StorageConfig
from illada.pipeline.lock import LOCK, RootHoldsAnotherPipeline, RootInUse, RootLock
from illada.pipeline.runner import run_pipeline
from illada.pipeline.stage import Stage, StageContext
from tests.conftest import TinyConfigFactory
from tests.helpers import make_config, write_jsonl


def run_nothing(ctx: StageContext) -> dict:
    return {"files": [], "stats": {}}


NOTHING = Stage(name="nothing", inputs=(), run=run_nothing, identity=lambda config: None)


@pytest.fixture()
def sources(tmp_path):
    path = write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": "one document"}])
    return [{"name": "a", "paths": [str(path)], "weight": 1}]


def test_a_second_run_on_a_held_local_root_is_refused_with_one_line(tmp_path, sources, capsys):
    from illada.cli import main

    root = tmp_path / "run"
    config = make_config(root, sources)
    with RootLock(str(root), "the first run"):
        with pytest.raises(RootInUse, match=r"run root .* is in use by pid \d+ on .*\(the first run, since"):
            run_pipeline(config, [NOTHING])
        raw = {"name": "test", "root": str(root), "data": config.data.model_dump(mode="json")}
        assert main(["pipeline", "run", TinyConfigFactory.write_yaml(raw, tmp_path / "c.yaml")]) == 2
        [line] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert line.startswith("illada: error: run root") and "the first run" in line
    with RootLock(str(root), "the next run"):  # released on exit
        pass


def test_an_s3_root_is_locked_by_a_conditional_write_and_a_dead_holder_is_taken_over(s3_bucket):
    storage.configure(StorageConfig())
    root = f"{s3_bucket}/run"
    first = RootLock(root, "first", heartbeat_s=3600)
    with first:
        with pytest.raises(RootInUse, match="in use by .*first"):
            RootLock(root, "second").__enter__()
    assert not storage.exists(storage.join(root, LOCK))  # deleted on release

    # A holder that died without releasing: its heartbeat is old.
    dead = {"owner": "x", "host": "gone", "pid": 1, "command": "killed run", "started_unix": 0, "heartbeat_unix": 0}
    storage.write_bytes(storage.join(root, LOCK), json.dumps(dead).encode())
    with RootLock(root, "survivor", heartbeat_s=3600, stale_s=60) as survivor:
        assert json.loads(storage.read_bytes(storage.join(root, LOCK)))["owner"] == survivor.holder["owner"]
        # The dead holder coming back cannot delete the survivor's lock: deletes are conditional.
        ghost = RootLock(root, "ghost")
        ghost._etag = '"an-old-etag"'
        ghost.__exit__(None, None, None)
        assert json.loads(storage.read_bytes(storage.join(root, LOCK)))["owner"] == survivor.holder["owner"]


def test_a_root_holding_another_pipeline_is_refused_unless_forced(tmp_path, sources, ray_local):
    root = tmp_path / "run"
    run_pipeline(make_config(root, sources), [NOTHING])
    run_pipeline(make_config(root, sources, ["data.pack.seq_len=16"]), [NOTHING])  # a stage setting: the re-run workflow
    other = make_config(root, sources, ["name=another-experiment"])
    with pytest.raises(RootHoldsAnotherPipeline, match="its name differ: name 'test' -> 'another-experiment'.*--force"):
        run_pipeline(other, [NOTHING])
    run_pipeline(other, [NOTHING], force=True)
    run_pipeline(other, [NOTHING])  # the root now holds the other pipeline
