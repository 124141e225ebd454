import json

import pytest

from illada.config import ConfigError
from illada.data.documents import read_table
from illada.data.stages import PRETRAIN
from illada.lineage.pipeline import stage_metrics
from illada.pipeline.runner import run_pipeline
from illada.tracking import open_store
from tests.helpers import make_config, write_jsonl

UPTO_FILTER = PRETRAIN[:2]
assert [s.name for s in UPTO_FILTER] == ["ingest", "filter"]

ENGLISH = [
    "The river that runs through the old town has shaped its history for centuries. Merchants built their houses along the "
    "banks, and the bridges that connect the two halves of the town were rebuilt many times after floods. Today the water is "
    "calm for most of the year, and visitors walk with their families along the paths that follow it. In spring, however, "
    "melting snow from the mountains can raise the level quickly, and the council keeps a careful watch on the gauges.",
    "Learning to cook well takes patience and a willingness to make mistakes. Most beginners start with simple dishes such "
    "as soups, rice and roasted vegetables, and they learn how heat changes the texture of food. It helps to taste often, to "
    "keep knives sharp and to read a recipe fully before starting. Over time a cook develops a feeling for balance between "
    "salt, acid and sweetness, and that judgement matters more than any single technique found in a book.",
]
GERMAN = (
    "Der Fluss, der durch die alte Stadt fließt, hat ihre Geschichte über Jahrhunderte geprägt. Kaufleute bauten ihre Häuser "
    "entlang der Ufer, und die Brücken, die beide Hälften der Stadt verbinden, wurden nach Hochwassern oft neu errichtet. "
    "Heute ist das Wasser die meiste Zeit des Jahres ruhig, und Besucher gehen mit ihren Familien auf den Wegen spazieren."
)
SHORT = "The meeting moved to Tuesday and the room is on the second floor, next to the kitchen."  # < 50 words
SPAM = "\n".join(["Buy cheap watches today with free shipping to your home and office."] * 12)  # one line, repeated


def filtered_rows(root, manifest) -> list[dict]:
    return [row for f in manifest["files"] if f["kind"] == "filtered" for row in read_table(f"{root}/{f['path']}").to_pylist()]


def test_failing_documents_are_set_aside_with_the_filter_and_reason(tmp_path, ray_local):
    web = [{"id": "en0", "text": ENGLISH[0]}, {"id": "de", "text": GERMAN}, {"id": "short", "text": SHORT}, {"id": "en1", "text": ENGLISH[1]}, {"id": "spam", "text": SPAM}]
    write_jsonl(tmp_path / "web" / "1.jsonl", web)
    write_jsonl(tmp_path / "code" / "1.jsonl", [{"id": "c", "text": "x = 1"}, {"id": "d", "text": SHORT}])
    config = make_config(
        tmp_path / "run",
        [
            {"name": "web", "paths": [str(tmp_path / "web")], "weight": 1, "id_field": "id"},
            {"name": "code", "paths": [str(tmp_path / "code")], "weight": 1, "id_field": "id", "filters": []},
        ],
        ["data.filter.filters=[language, gopher_quality, gopher_repetition]"],
    )
    manifests = run_pipeline(config, UPTO_FILTER)
    manifest = manifests["filter"]

    kept = {row["id"]: row for f in manifest["files"] if f["kind"] == "documents" for row in read_table(f"{config.root}/{f['path']}").to_pylist()}
    assert sorted(kept) == ["c", "d", "en0", "en1"]  # the code source is not filtered
    assert kept["en0"]["text"] == ENGLISH[0]
    assert '"language": "en"' in kept["en0"]["metadata"]

    removed = {row["id"]: (row["filter"], row["reason"]) for row in filtered_rows(config.root, manifest)}
    assert removed == {
        "de": ("language", "language_de"),
        "short": ("gopher_quality", "gopher_short_doc"),
        "spam": ("gopher_repetition", "dup_line_frac"),
    }
    assert {row["id"]: row["text"] for row in filtered_rows(config.root, manifest)}["de"] == GERMAN  # nothing lost

    stats = manifest["stats"]
    web_stats = stats["sources"]["web"]
    assert web_stats["by_filter"] == {"language": 1, "gopher_quality": 1, "gopher_repetition": 1}
    assert web_stats["by_reason"]["language/language_de"] == 1
    assert (web_stats["documents_in"], web_stats["documents_out"], web_stats["filtered"]) == (5, 2, 3)
    assert stats["sources"]["code"] == {"filters": [], "documents_in": 2, "documents_out": 2, "filtered": 0, "by_filter": {}, "by_reason": {}}
    assert (stats["documents_in"], stats["filtered"], stats["documents_out"]) == (7, 3, 4)

    metrics = stage_metrics(manifest)
    assert metrics["filtered_by_filter.language"] == 1 and metrics["filtered_by_filter.gopher_repetition"] == 1
    assert metrics["sources.web.by_filter.gopher_quality"] == 1
    # ... and the pipeline run's nested MLflow run of the filter stage has them
    client, experiment_id = open_store(config)
    (pipeline,) = client.search_runs([experiment_id], f"tags.`illada.kind` = 'pipeline' and tags.`illada.root` = '{config.root}'")
    (stage,) = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}' and tags.`illada.stage` = 'filter'")
    assert stage.data.metrics["filtered_by_filter.language"] == 1 and stage.data.metrics["sources.web.by_filter.gopher_repetition"] == 1

    # dedup_exact reads the filter stage's documents, not ingest's
    manifests = run_pipeline(config, PRETRAIN[:3])
    assert manifests["dedup_exact"]["stats"]["documents_in"] == 4


def test_a_non_english_document_is_dropped_by_the_language_filter(tmp_path, ray_local):
    write_jsonl(tmp_path / "web.jsonl", [{"id": "en", "text": ENGLISH[1]}, {"id": "de", "text": GERMAN}])
    source = {"name": "web", "paths": [str(tmp_path / "web.jsonl")], "weight": 1, "id_field": "id", "filters": ["language"]}
    manifest = run_pipeline(make_config(tmp_path / "run", [source]), UPTO_FILTER)["filter"]
    assert [(r["id"], r["filter"]) for r in filtered_rows(tmp_path / "run", manifest)] == [("de", "language")]
    assert manifest["stats"]["sources"]["web"]["by_filter"] == {"language": 1}

    # a source that accepts German keeps it
    source["languages"] = ["de", "en"]
    manifest = run_pipeline(make_config(tmp_path / "run2", [source]), UPTO_FILTER)["filter"]
    assert manifest["stats"]["filtered"] == 0


def test_a_wrong_filter_argument_is_a_config_error_that_keeps_the_previous_output(tmp_path, ray_local):
    write_jsonl(tmp_path / "web.jsonl", [{"text": ENGLISH[0]}])
    sources = [{"name": "web", "paths": [str(tmp_path / "web.jsonl")], "weight": 1}]
    before = run_pipeline(make_config(tmp_path / "run", sources, ["data.filter.filters=[gopher_quality]"]), UPTO_FILTER)["filter"]
    config = make_config(tmp_path / "run", sources, ["data.filter.filters=[gopher_quality]", "data.filter.params.gopher_quality.min_words=3"])
    with pytest.raises(ConfigError, match="data.filter.params.gopher_quality: .*min_words"):
        run_pipeline(config, UPTO_FILTER)
    assert json.loads((tmp_path / "run" / "filter" / "manifest.json").read_text())["digest"] == before["digest"]


def test_conversations_are_not_filtered(tmp_path):
    source = {"name": "chat", "paths": [str(tmp_path)], "weight": 1, "format": "chat"}
    with pytest.raises(ConfigError, match="does not filter conversations"):
        make_config(tmp_path, [source], ["data.kind=sft", "data.tokenizer.path=t.json", "data.filter.filters=[language]"])
