"""The storage layer against a local disk and a real (moto) S3 server."""

from __future__ import annotations

import gc
import sys

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from illada import storage
from illada.cli import main
from illada.config import dump_config, load_config


class Boom(RuntimeError):
    pass


def _fail_writing(url: str, data: bytes) -> None:
    with pytest.raises(Boom):
        with storage.open_atomic(url) as f:
            f.write(data)
            raise Boom("the writer failed half way")


@pytest.fixture
def unraisable(monkeypatch):
    """Exceptions raised where nobody can catch them (e.g. in a file's __del__)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info))
    return seen


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_local(tmp_path):
    url = str(tmp_path / "out" / "data.bin")
    _fail_writing(url, b"partial")
    assert not storage.exists(url)
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left behind either

    storage.write_bytes(url, b"complete")
    assert storage.read_bytes(url) == b"complete"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["data.bin"]


@pytest.mark.parametrize("size", [100, 6 << 20], ids=["one-shot-put", "multipart"])
def test_atomic_write_s3(s3_bucket, unraisable, size):
    url = f"{s3_bucket}/out/data.bin"
    _fail_writing(url, b"x" * size)
    gc.collect()  # a discarded file must not upload itself when it is collected
    fs, _ = storage.filesystem(url)
    fs.invalidate_cache()
    assert not storage.exists(url)
    assert storage.list_files(f"{s3_bucket}/out") == []
    client = boto3.client("s3")
    assert not client.list_multipart_uploads(Bucket=s3_bucket[5:]).get("Uploads")
    assert unraisable == []

    storage.write_bytes(url, b"y" * size)
    assert storage.read_bytes(url) == b"y" * size


def test_s3_json_roundtrip_and_remove(s3_bucket):
    url = f"{s3_bucket}/a/b/c.json"
    storage.write_json(url, {"k": [1, 2]})
    assert storage.read_json(url) == {"k": [1, 2]}
    assert storage.sha256_file(url) == __import__("hashlib").sha256(storage.read_bytes(url)).hexdigest()
    storage.remove(f"{s3_bucket}/a")
    assert not storage.exists(url)


# --- listing keeps the protocol -------------------------------------------------------------


def test_glob_and_list_files_keep_s3_protocol(s3_bucket):
    for name in ("d/x-1.jsonl", "d/x-2.jsonl", "d/y.txt", "d/sub/z.jsonl"):
        storage.write_bytes(f"{s3_bucket}/{name}", b"{}\n")

    assert storage.glob(f"{s3_bucket}/d/*.jsonl") == [f"{s3_bucket}/d/x-1.jsonl", f"{s3_bucket}/d/x-2.jsonl"]
    assert storage.glob(f"{s3_bucket}/d/**/*.jsonl")[-1] == f"{s3_bucket}/d/x-2.jsonl"
    listed = storage.list_files(f"{s3_bucket}/d")
    assert listed == sorted(f"{s3_bucket}/d/{n}" for n in ("x-1.jsonl", "x-2.jsonl", "y.txt", "sub/z.jsonl"))
    assert all(storage.exists(u) for u in listed)  # what is listed can be opened again as is
    assert storage.list_files(f"{s3_bucket}/missing") == []


def test_glob_and_list_files_local(tmp_path):
    for name in ("x-1.jsonl", "x-2.jsonl", "sub/z.jsonl"):
        storage.write_bytes(str(tmp_path / name), b"{}\n")
    assert storage.glob(f"{tmp_path}/*.jsonl") == [f"{tmp_path}/x-1.jsonl", f"{tmp_path}/x-2.jsonl"]
    assert storage.list_files(str(tmp_path)) == [f"{tmp_path}/sub/z.jsonl", f"{tmp_path}/x-1.jsonl", f"{tmp_path}/x-2.jsonl"]


# --- Arrow ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_arrow_filesystem(where, tmp_path, request):
    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    url = f"{base}/tables/t.parquet"
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    fs, path = storage.arrow_filesystem(url)
    fs.create_dir(path.rsplit("/", 1)[0])
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert fs.get_file_info(path).size == len(storage.read_bytes(url))
    # and a dataset read over the folder, as Ray Data and Arrow readers do
    dfs, dpath = storage.arrow_filesystem(f"{base}/tables")
    assert pq.read_table(dpath, filesystem=dfs).num_rows == 3


# --- credentials stay out of everything written -----------------------------------------------

KEY = "AKIAILLADATESTKEY0001"
SECRET = "illada-test-secret-do-not-write-0123456789"


def _storage_with_secrets(endpoint: str) -> dict:
    return {"s3": {"endpoint_url": endpoint, "region": "us-east-1", "key": KEY, "secret": SECRET}}


def test_dump_config_and_config_show_leave_out_credentials(tmp_path, s3_server, tiny_config_factory, capsys):
    raw = tiny_config_factory.raw(str(tmp_path / "run"), str(tmp_path / "raw"), extra={"storage": _storage_with_secrets(s3_server)})
    config = load_config(base=raw)
    assert config.storage.s3.secret.get_secret_value() == SECRET
    assert SECRET not in repr(config) and SECRET not in str(config.storage)

    dumped = dump_config(config)
    assert SECRET not in dumped and KEY not in dumped
    assert s3_server in dumped  # the non-secret S3 options are kept
    assert load_config(base=__import__("yaml").safe_load(dumped)) == config.model_copy(
        update={"storage": config.storage.model_copy(update={"s3": config.storage.s3.model_copy(update={"key": None, "secret": None})})}
    )

    path = tiny_config_factory.write_yaml(raw, tmp_path / "tiny.yaml")
    assert main(["config", "show", path]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and KEY not in out


def test_pipeline_run_writes_no_credentials(tmp_path, s3_bucket, s3_server, ray_local, tiny_config_factory):
    """Raw inputs on S3 read with the config's credentials; nothing under the run root holds them."""
    from illada.pipeline.runner import run_pipeline
    from illada.data.stages import PRETRAIN as STAGES

    root = tmp_path / "run"
    config = tiny_config_factory(str(root), f"{s3_bucket}/raw", extra={"storage": _storage_with_secrets(s3_server)})
    manifests = run_pipeline(config, STAGES)
    assert manifests["pack"]["stats"]["sequences"] > 0

    written = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written) and any(p.name == "config.yaml" for p in written)
    for p in written:
        data = p.read_bytes()
        assert SECRET.encode() not in data, p
        assert KEY.encode() not in data, p
