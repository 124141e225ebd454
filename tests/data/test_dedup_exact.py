from illada.data.documents import read_table
from illada.pipeline.runner import run_pipeline
from illada.data.stages import PRETRAIN as STAGES
from tests.helpers import make_config, write_jsonl

UPTO_DEDUP = STAGES[:3]


def docs_of(root, manifest) -> list[dict]:
    rows = []
    for f in manifest["files"]:
        rows += read_table(f"{root}/{f['path']}").to_pylist()
    return rows


def test_removes_every_planted_exact_duplicate_and_nothing_else(tmp_path, ray_local):
    unique_a = [f"alpha document {i}" for i in range(40)]
    unique_b = [f"beta document {i}" for i in range(30)]
    shared = "a text that both sources contain"
    # Planted: 3 copies inside a (across two files), one in b of a's text, one of a
    # near-copy that differs by one character (must be kept).
    write_jsonl(tmp_path / "a" / "1.jsonl", [{"text": t} for t in unique_a[:20]] + [{"text": shared}, {"text": unique_a[3]}])
    write_jsonl(tmp_path / "a" / "2.jsonl", [{"text": t} for t in unique_a[20:]] + [{"text": unique_a[3]}])
    write_jsonl(tmp_path / "b" / "1.jsonl", [{"text": t} for t in unique_b] + [{"text": shared}, {"text": shared + "!"}])
    config = make_config(
        tmp_path / "run",
        # b first: "earliest" is the config's order, not the names' order
        [{"name": "b", "paths": [str(tmp_path / "b")], "weight": 1}, {"name": "a", "paths": [str(tmp_path / "a")], "weight": 1}],
        ["data.dedup.exact.num_partitions=3"],
    )
    manifests = run_pipeline(config, UPTO_DEDUP)
    texts = [d["text"] for d in docs_of(config.root, manifests["dedup_exact"])]
    assert sorted(texts) == sorted(unique_a + unique_b + [shared, shared + "!"])
    kept_shared = [d for d in docs_of(config.root, manifests["dedup_exact"]) if d["text"] == shared]
    assert [d["source"] for d in kept_shared] == ["b"]  # the earliest copy (first source in the config) is kept

    stats = manifests["dedup_exact"]["stats"]
    assert stats["duplicates"] == 3
    assert stats["sources"]["a"]["duplicates"] == 3 and stats["sources"]["a"]["duplicate_of_source"] == {"a": 2, "b": 1}
    assert stats["sources"]["b"]["duplicates"] == 0
    assert stats["documents_in"] == 75 and stats["documents_out"] == 72
