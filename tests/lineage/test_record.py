"""The pieces of recording and reading lineage that need no pipeline: redaction, params,
digests, where a record is looked up, and drawing a graph."""

from __future__ import annotations

import hashlib
import json

import pytest

from illada.config import load_config
from illada.lineage import mix, render
from illada.lineage.graph import Edge, Lineage, Node
from illada.lineage.record import (
    Redactor,
    config_params,
    numeric_metrics,
    shard_set_digest,
    short,
)
from illada.tracking import artifact_location, tracking_uri_near


def test_secrets_never_reach_params_and_are_masked_wherever_they_slip_in(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-123")
    config = load_config(
        base={
            "name": "t",
            "root": "/tmp/x",
            "storage": {"s3": {"endpoint_url": "http://s3.local", "key": "config-key-abcdef", "secret": "config-secret-987654"}},
            "data": {"sources": [{"name": "a", "paths": ["s3://b/config-secret-987654/x.jsonl"], "weight": 1}]},
        }
    )
    params = config_params(config)
    assert params["storage.s3.endpoint_url"] == "http://s3.local"
    assert not any(k.startswith(("storage.s3.key", "storage.s3.secret")) for k in params)
    redact = Redactor(config)
    masked = redact.all(params)
    assert masked["data.sources.0.paths.0"] == "s3://b/***/x.jsonl"
    assert redact("token env-secret-value-123 and config-key-abcdef") == "token *** and ***"
    assert redact("short values like ab stay") == "short values like ab stay"


def test_stats_become_metrics_with_dotted_names():
    stats = {"documents": 3, "disabled": True, "sources": {"a": {"quarantined": {"bad json": 2}}}, "mix": {"a": 0.5}}
    assert numeric_metrics(stats) == {"documents": 3.0, "sources.a.quarantined.bad json": 2.0, "mix.a": 0.5}


def test_stage_metrics_sum_quarantined_records_by_reason():
    from illada.lineage.pipeline import stage_metrics

    manifest = {
        "files": [{"path": "a", "bytes": 10}, {"path": "b", "bytes": 5}],
        "stats": {"documents": 7, "sources": {"a": {"quarantined": {"bad_json": 2, "too_long": 1}}, "b": {"quarantined": {"bad_json": 3}}}},
    }
    metrics = stage_metrics(manifest)
    assert metrics["quarantined_by_reason.bad_json"] == 5 and metrics["quarantined_by_reason.too_long"] == 1
    assert metrics["sources.b.quarantined.bad_json"] == 3 and (metrics["files"], metrics["bytes"]) == (2, 15)


def test_digests():
    assert len(short("ab" * 32)) <= 36  # MLflow's limit for a dataset digest
    files = [{"path": "p/b", "sha256": "2"}, {"path": "p/a", "sha256": "1"}]
    assert shard_set_digest(files) == shard_set_digest(files[::-1]) == hashlib.sha256(b"p/a\x001\np/b\x002\n").hexdigest()


def test_a_record_is_looked_up_in_the_store_of_the_run_root_that_holds_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    assert tracking_uri_near(str(tmp_path / "run" / "checkpoints" / "step_00000001")) is None
    (tmp_path / "run" / "mlflow.db").write_bytes(b"")
    assert tracking_uri_near(str(tmp_path / "run" / "checkpoints" / "step_00000001")) == f"sqlite:///{tmp_path}/run/mlflow.db"
    assert tracking_uri_near("s3://bucket/run/pack/manifest.json") is None
    assert tracking_uri_near("/anywhere", explicit="http://server:5000") == "http://server:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://other:5000")
    assert tracking_uri_near(str(tmp_path / "run")) == "http://other:5000"
    assert artifact_location(f"sqlite:///{tmp_path}/run/mlflow.db") == f"file://{tmp_path}/run/mlartifacts"
    assert artifact_location("http://other:5000") is None


def small_lineage() -> Lineage:
    g = Lineage(root="checkpoint:/r/B/step_2")
    g.add(Node("checkpoint:/r/B/step_2", "checkpoint", "checkpoint step_2", {"path": "/r/B/step_2", "step": 2, "tokens per source": {"a": 30, "b": 10}}))
    g.add(Node("checkpoint:/r/A/step_5", "checkpoint", "checkpoint step_5", {"path": "/r/A/step_5", "step": 5, "tokens per source": {"a": 7, "b": 3}}))
    g.add(Node("checkpoint:/r/A/step_3", "checkpoint", "checkpoint step_3", {"path": "/r/A/step_3", "step": 3, "tokens per source": {"a": 4, "b": 2}}))
    g.add(Node("run:1", "training_run", "training run B", {"mix": {"a": 0.75, "b": 0.25}}))
    g.add(Node("stage:pack:1", "stage", "pack", {"digest": "f" * 64}, problems=["changed: pack now has digest 00"]))
    g.edges = [
        Edge("checkpoint:/r/B/step_2", "checkpoint:/r/A/step_5", "initialised from"),
        Edge("checkpoint:/r/A/step_5", "checkpoint:/r/A/step_3", "resumed from"),
        Edge("checkpoint:/r/B/step_2", "run:1", "trained by"),
        Edge("run:1", "stage:pack:1", "read"),
        Edge("checkpoint:/r/A/step_5", "stage:pack:1", "trained on"),
        Edge("checkpoint:/r/A/step_3", "stage:pack:1", "trained on"),
    ]
    return g


def test_text_mermaid_and_picture(tmp_path):
    g = small_lineage()
    text = render.text(g)
    assert text.splitlines()[0] == "checkpoint step_2  [storage]"
    assert "├── initialised from: checkpoint step_5" in text and "└── trained by: training run B" in text
    assert "read: pack  (shown above)" in text  # reached twice, written once
    assert "digest: ffffffffffffffff ·" not in text and "digest: ffffffffffffffff" in text
    assert text.rstrip().endswith("pack: changed: pack now has digest 00")
    mermaid = render.mermaid(g)
    assert mermaid.count("-->") == 6 and "|initialised from|" in mermaid
    assert [len(layer) for layer in render.layers(g)] == [1, 2, 1, 1]  # longest path: pack at the bottom
    assert render.picture(g, str(tmp_path / "g.png")) and (tmp_path / "g.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=".png or .svg"):
        render.picture(g, str(tmp_path / "g.pdf"))


def test_mix_counts_only_initialised_from_ancestors_as_inherited():
    report = mix.mix_report(small_lineage())
    rows = {r.source: r for r in report.rows}
    assert (rows["a"].tokens, rows["a"].inherited, rows["a"].seen) == (30, 7, 37)  # step_3's 4 are in step_5's 7
    assert rows["a"].share == pytest.approx(0.75) and rows["a"].target == 0.75
    assert report.inherited_from == ["/r/A/step_5"]
    assert "total" in mix.table(report)


def test_mix_reports_documents_dropped_by_the_filter_stage_of_its_own_data():
    g = small_lineage()
    filter_stats = {"sources": {"a": {"by_filter": {"language": 4, "gopher_quality": 1}}, "b": {"by_filter": {}}}}
    g.add(Node("stage:tokenize:1", "stage", "tokenize", {}))
    g.add(Node("stage:filter:1", "stage", "filter", {}, detail={"stats": filter_stats}))
    g.edges += [Edge("stage:pack:1", "stage:tokenize:1", "input"), Edge("stage:tokenize:1", "stage:filter:1", "input")]
    report = mix.mix_report(g)
    assert {r.source: r.filtered for r in report.rows} == {"a": {"language": 4, "gopher_quality": 1}, "b": {}}
    assert "a                        5  gopher_quality 1, language 4" in mix.table(report)
    assert json.loads(mix.as_json(report))["rows"][0]["filtered"] == {"language": 4, "gopher_quality": 1}
