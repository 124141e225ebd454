import base64
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from illada.config import ConfigError, IngestConfig, SourceConfig
from illada.data.documents import read_table
from illada.data.ingest import QuarantineError, ingest_task, plan_tasks, expand_paths
from illada.pipeline.runner import run_pipeline
from illada.data.stages import PRETRAIN as STAGES
from tests.conftest import WORDS
from tests.helpers import make_config, write_jsonl


def run_ingest_task(tmp_path, source: dict, ingest: dict | None = None) -> tuple[dict, list[dict], list[dict]]:
    source_cfg = SourceConfig.model_validate(source)
    [task] = plan_tasks(source_cfg, expand_paths(source_cfg))
    spec = {
        **task,
        "source": source_cfg.model_dump(mode="json"),
        "ingest": IngestConfig.model_validate(ingest or {}).model_dump(mode="json"),
        "docs_url": str(tmp_path / "out" / "docs.parquet"),
        "quarantine_url": str(tmp_path / "out" / "quarantine.jsonl"),
    }
    result = ingest_task(spec)
    docs = read_table(spec["docs_url"]).to_pylist()
    qpath = tmp_path / "out" / "quarantine.jsonl"
    quarantine = [json.loads(line) for line in qpath.read_text().splitlines()] if qpath.exists() else []
    return result, docs, quarantine


def test_every_kind_of_bad_jsonl_record_is_quarantined_with_its_reason(tmp_path):
    records = [
        {"text": "good one", "id": "g1", "lang": "en"},
        b"\xff\xfe not utf-8",
        '{"text": "truncated',
        "[1, 2, 3]",
        {"body": "no text field"},
        {"text": 42},
        {"text": "   "},
        {"text": "x" * 101},
        {"text": "bad id", "id": {"nested": 1}},
        {"text": "good two", "id": 7},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    result, docs, quarantine = run_ingest_task(
        tmp_path, {"name": "s", "paths": [str(path)], "weight": 1, "id_field": "id"}, {"max_chars": 100}
    )
    assert [d["text"] for d in docs] == ["good one", "good two"]
    assert [d["id"] for d in docs] == ["g1", "7"]
    assert json.loads(docs[0]["metadata"]) == {"lang": "en"}
    reasons = [q["reason"] for q in quarantine]
    assert reasons == ["invalid_utf8", "bad_json", "not_an_object", "missing_text", "missing_text", "empty", "too_long", "bad_id"]
    assert result["quarantined"] == {"invalid_utf8": 1, "bad_json": 1, "not_an_object": 1, "missing_text": 2, "empty": 1, "too_long": 1, "bad_id": 1}
    assert result["records"] == 10 and result["documents"] == 2
    # Nothing is lost: the raw record is kept, bytes included, with its location.
    assert base64.b64decode(quarantine[0]["raw_base64"]) == b"\xff\xfe not utf-8"
    assert quarantine[1]["raw"] == '{"text": "truncated' and quarantine[1]["location"] == "in.jsonl:3"


def test_compressed_jsonl_parquet_and_text_files_are_read(tmp_path):
    write_jsonl(tmp_path / "z" / "a.jsonl.zst", [{"text": "zstd doc"}], compress=True)
    pq.write_table(pa.table({"content": ["pq doc", None], "k": [1, 2]}), tmp_path / "z" / "b.parquet")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "one.txt").write_text("text file one")
    (tmp_path / "t" / "two.txt").write_bytes(b"\xc3\x28 broken")

    _, docs, _ = run_ingest_task(tmp_path, {"name": "z", "paths": [str(tmp_path / "z" / "*.zst")], "weight": 1})
    assert [d["text"] for d in docs] == ["zstd doc"]

    _, docs, quarantine = run_ingest_task(tmp_path, {"name": "p", "paths": [str(tmp_path / "z" / "b.parquet")], "weight": 1, "text_field": "content"})
    assert [d["text"] for d in docs] == ["pq doc"] and json.loads(docs[0]["metadata"]) == {"k": 1}
    assert [q["reason"] for q in quarantine] == ["missing_text"] and quarantine[0]["raw"] == {"content": None, "k": 2}

    _, docs, quarantine = run_ingest_task(tmp_path, {"name": "t", "paths": [str(tmp_path / "t")], "weight": 1})
    assert [(d["id"], d["text"]) for d in docs] == [("one.txt", "text file one")]
    assert [q["reason"] for q in quarantine] == ["invalid_utf8"]


def test_parquet_without_the_text_column_is_quarantined_whole_with_its_rows(tmp_path):
    pq.write_table(pa.table({"body": [f"row {i}" for i in range(10_000)]}), tmp_path / "b.parquet")
    result, docs, quarantine = run_ingest_task(tmp_path, {"name": "p", "paths": [str(tmp_path / "b.parquet")], "weight": 1})
    assert docs == []
    [unit] = quarantine
    assert (unit["reason"], unit["unit"], unit["rows"], unit["location"]) == ("missing_text", "file", 10_000, "b.parquet")
    assert unit["bytes"] == (tmp_path / "b.parquet").stat().st_size
    assert result["records"] == 10_000 and result["quarantined"] == {"missing_text": 10_000}


def test_an_unreadable_parquet_file_is_quarantined_whole_with_its_bytes(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not a parquet file")
    result, docs, quarantine = run_ingest_task(tmp_path, {"name": "x", "paths": [str(tmp_path / "x.parquet")], "weight": 1})
    [unit] = quarantine
    assert docs == [] and (unit["reason"], unit["rows"], unit["bytes"]) == ("unreadable_parquet", 0, 31)
    assert result["damaged"] == [{"file": "x.parquet", "reason": "unreadable_parquet", "detail": unit["detail"], "rows": 0, "bytes": 31}]


def test_the_bound_also_weighs_damaged_files_by_bytes_when_their_rows_are_unknown(tmp_path):
    from illada.data.ingest import _check_quarantine_rate
    from illada.pipeline.stage import StageContext

    ctx = StageContext(config=make_config(tmp_path / "run", [{"name": "s", "paths": ["unused"], "weight": 1}]), stage="ingest")
    unit = {"file": "big.parquet", "reason": "unreadable_parquet", "detail": "not parquet", "rows": 0, "bytes": 9_000}
    stats = {"s": {"records": 100, "documents": 100, "bytes": 10_000, "quarantined": {}, "damaged_files": [unit], "empty_files": []}}
    with pytest.raises(QuarantineError, match=r"9000 of 10000 bytes \(90.0%\) are in damaged files.*File big.parquet is quarantined whole"):
        _check_quarantine_rate(ctx, stats, [])
    stats["s"]["bytes"] = 1_000_000  # a small damaged file among much good data passes (with its quarantine line)
    _check_quarantine_rate(ctx, stats, [])


def test_a_cut_zstd_file_is_quarantined_whole_none_of_its_documents_kept(tmp_path):
    rng = random.Random(0)
    # ~4 KB each, so the ~320 KB stream spans several zstd blocks and its first half decodes
    docs_in = [{"text": " ".join(rng.choice(WORDS) for _ in range(700))} for i in range(79)]
    path = write_jsonl(tmp_path / "in" / "cut.jsonl.zst", docs_in, compress=True)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])

    result, docs, quarantine = run_ingest_task(tmp_path, {"name": "z", "paths": [str(path)], "weight": 1})

    assert docs == []
    [unit] = quarantine
    assert unit["reason"] == "truncated" and unit["location"] == "cut.jsonl.zst" and unit["bytes"] == len(whole) // 2
    assert 0 < unit["rows"] < 79 and result["records"] == unit["rows"] == result["quarantined"]["truncated"]


def test_a_cut_gzip_file_is_quarantined_whole(tmp_path):
    import gzip

    path = tmp_path / "in" / "cut.jsonl.gz"
    path.parent.mkdir()
    whole = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 20}).encode() + b"\n" for i in range(200)))
    path.write_bytes(whole[: len(whole) // 2])
    result, docs, quarantine = run_ingest_task(tmp_path, {"name": "g", "paths": [str(path)], "weight": 1})
    assert docs == [] and [q["reason"] for q in quarantine] == ["truncated"]


def test_a_whole_zstd_file_of_several_frames_is_read(tmp_path):
    import zstandard

    frames = [zstandard.ZstdCompressor().compress(json.dumps({"text": f"frame {i}"}).encode() + b"\n") for i in range(3)]
    (tmp_path / "f.jsonl.zst").write_bytes(b"".join(frames))
    _, docs, quarantine = run_ingest_task(tmp_path, {"name": "f", "paths": [str(tmp_path / "f.jsonl.zst")], "weight": 1})
    assert [d["text"] for d in docs] == ["frame 0", "frame 1", "frame 2"] and quarantine == []


def test_a_damaged_file_beside_a_good_one_fails_the_source_in_rows(tmp_path, ray_local):
    good = write_jsonl(tmp_path / "raw" / "good.jsonl", [{"text": f"good document {i}"} for i in range(100)])
    pq.write_table(pa.table({"body": [f"row {i}" for i in range(10_000)]}), tmp_path / "raw" / "wrong.parquet")
    source = {"name": "mixed", "paths": [str(good), str(tmp_path / "raw" / "wrong.parquet")], "weight": 1}
    with pytest.raises(QuarantineError) as err:
        run_pipeline(make_config(tmp_path / "run", [source]), STAGES)
    message = str(err.value)
    assert "source 'mixed': 10000 of 10100 rows (99.0%)" in message
    assert "File wrong.parquet is quarantined whole (missing_text" in message


def test_an_empty_file_and_an_emptied_source_are_errors_naming_them(tmp_path, ray_local):
    good = write_jsonl(tmp_path / "raw" / "good.jsonl", [{"text": f"good document {i}"} for i in range(20)])
    (tmp_path / "raw" / "empty.jsonl").write_bytes(b"")
    config = make_config(tmp_path / "run", [{"name": "e", "paths": [str(good), str(tmp_path / "raw" / "empty.jsonl")], "weight": 1}])
    with pytest.raises(ConfigError, match="source 'e': 1 input file.s. hold no record: empty.jsonl"):
        run_pipeline(config, STAGES)

    blank = write_jsonl(tmp_path / "raw" / "blank.jsonl", [{"text": " "}, {"text": ""}])
    sources = [{"name": "ok", "paths": [str(good)], "weight": 1}, {"name": "blank", "paths": [str(blank)], "weight": 1}]
    config = make_config(tmp_path / "run2", sources, ["data.ingest.max_quarantine_fraction=1"])
    with pytest.raises(ConfigError, match="source 'blank' has no valid document"):
        run_pipeline(config, STAGES)


def test_a_cut_gzip_source_is_one_line_naming_the_file(tmp_path, ray_local, capsys):
    import gzip

    from illada.cli import main
    from tests.conftest import TinyConfigFactory

    raw = TinyConfigFactory().raw(str(tmp_path / "run"), str(tmp_path / "raw"))
    whole = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 20}).encode() + b"\n" for i in range(200)))
    (tmp_path / "raw" / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    raw["data"]["sources"][1]["paths"] = [str(tmp_path / "raw" / "cut.jsonl.gz")]
    config = TinyConfigFactory.write_yaml(raw, tmp_path / "c.yaml")

    assert main(["pipeline", "run", config]) == 2
    stderr = capsys.readouterr().err
    [line] = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert line.startswith("illada: error: source 'beta'") and "cut.jsonl.gz" in line
    assert "Traceback" not in stderr and "beta-00000" not in line


def test_stage_fails_with_a_clear_message_past_the_quarantine_bound(tmp_path, ray_local):
    path = write_jsonl(tmp_path / "raw" / "bad.jsonl", [{"text": "ok"}, "not json", "also not json"])
    config = make_config(tmp_path / "run", [{"name": "bad", "paths": [str(path)], "weight": 1}], ["data.ingest.max_quarantine_fraction=0.5"])
    with pytest.raises(QuarantineError) as err:
        run_pipeline(config, STAGES)
    message = str(err.value)
    assert "source 'bad': 2 of 3 rows (66.7%)" in message
    assert "bad_json: 2" in message and "quarantine/bad/00000.jsonl" in message
    assert not (tmp_path / "run" / "ingest" / "manifest.json").exists()


def test_missing_input_path_names_the_source(tmp_path):
    source = SourceConfig(name="gone", paths=[str(tmp_path / "nope.jsonl")], weight=1)
    with pytest.raises(FileNotFoundError, match="source 'gone': nothing at"):
        expand_paths(source)


def test_an_empty_directory_names_the_source(tmp_path):
    (tmp_path / "raw").mkdir()
    source = SourceConfig(name="web", paths=[str(tmp_path / "raw")], weight=1)
    with pytest.raises(FileNotFoundError, match="source 'web': the directory .*raw' holds no files"):
        expand_paths(source)
    write_jsonl(tmp_path / "raw" / "a" / "one.jsonl", [{"text": "one"}])
    assert expand_paths(source) == [str(tmp_path / "raw" / "a" / "one.jsonl")]
