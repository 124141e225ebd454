"""The whole pipeline with its raw inputs and its run root on S3 (moto's real HTTP server)."""

from __future__ import annotations

import boto3

from illada import storage
from illada.cli import main
from illada.data.shards import read_sequences

STAGE_NAMES = ["ingest", "dedup_exact", "dedup_fuzzy", "decontaminate", "tokenizer", "tokenize", "pack"]


def _manifests(root: str) -> dict[str, dict]:
    return {name: storage.read_json(f"{root}/{name}/manifest.json") for name in STAGE_NAMES}


def test_pipeline_on_s3_runs_and_reruns_as_a_no_op(tmp_path, s3_bucket, ray_local, tiny_config_factory, capsys):
    root = f"{s3_bucket}/run"
    raw = tiny_config_factory.raw(str(tmp_path / "unused-root"), f"{s3_bucket}/raw")
    config_path = tiny_config_factory.write_yaml(raw, tmp_path / "tiny.yaml")

    assert main(["pipeline", "run", config_path, "--root", root]) == 0
    assert "packed" in capsys.readouterr().out
    assert not (tmp_path / "unused-root").exists()  # nothing went to local disk

    # Every stage's manifest is on S3, the object store itself says so (not just fsspec).
    bucket = s3_bucket.removeprefix("s3://")
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]}
    assert {f"run/{name}/manifest.json" for name in STAGE_NAMES} <= keys

    first = _manifests(root)
    pack = first["pack"]
    shards = [f for f in pack["files"] if f["kind"] == "shard"]
    assert shards and {f["source"] for f in shards} == {"alpha", "beta"}
    assert pack["stats"]["seq_len"] == 64
    assert sum(f["sequences"] for f in shards) == pack["stats"]["sequences"] > 0
    assert first["ingest"]["stats"]["documents"] == 14  # 2 sources x (6 + 1 duplicate)
    assert first["dedup_exact"]["stats"]["duplicates"] == 2
    for f in shards:
        url = storage.join(root, f["path"])
        assert url.startswith(f"{root}/pack/shards/")
        assert f"run/{f['path']}" in keys
        assert storage.sha256_file(url) == f["sha256"]

    table = read_sequences(storage.join(root, shards[0]["path"]))
    assert table.schema.metadata[b"seq_len"] == b"64"
    assert table.num_rows == shards[0]["sequences"]
    assert all(len(tokens) == 64 for tokens in table.column("tokens").to_pylist())

    # Run again: every stage is up to date and skipped, so no manifest is rewritten.
    assert main(["pipeline", "run", config_path, "--root", root]) == 0
    second = _manifests(root)
    for name in STAGE_NAMES:
        assert second[name]["digest"] == first[name]["digest"], name
        assert second[name]["created_unix"] == first[name]["created_unix"], f"{name} was run again"

    capsys.readouterr()
    assert main(["pipeline", "status", config_path, "--root", root]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [[name, "complete"] for name in STAGE_NAMES]
