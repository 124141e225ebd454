import shutil

import numpy as np
import pytest

from illada.config import load_config
from illada.data.documents import read_table
from illada.data.pack import Packer
from illada.data.shards import read_sequences
from illada.pipeline.runner import run_pipeline
from illada.data.stages import PRETRAIN as STAGES
from tests.helpers import make_config, write_jsonl


def test_packer_keeps_every_token_and_marks_document_ends():
    rng = np.random.default_rng(0)
    docs = [(f"d{i}", rng.integers(10, 100, size=n).astype(np.int32)) for i, n in enumerate([5, 17, 3, 40, 1, 9])]
    packer = Packer(seq_len=8)
    sequences = list(packer.feed(docs))
    padded = packer.flush_padded(pad_id=0)
    assert all(len(t) == 8 for t, _, _ in sequences)
    tokens, ends, ids, pad = padded
    assert len(tokens) == 8 and pad == 8 - ends[-1]
    stream = np.concatenate([t for t, _, _ in sequences] + [tokens[: 8 - pad]])
    assert np.array_equal(stream, np.concatenate([d for _, d in docs]))
    # A document that runs across sequences appears in each; ends are exclusive offsets.
    first_tokens, first_ends, first_ids = sequences[0]
    assert first_ids == ["d0", "d1"] and first_ends == [5, 8]
    assert sequences[1][2] == ["d1"] and sequences[1][1] == [8]


def test_packer_remainder_continues_in_a_second_packer():
    docs = [("a", np.arange(10, dtype=np.int32)), ("b", np.arange(7, dtype=np.int32))]
    first = Packer(seq_len=6)
    assert len(list(first.feed(docs))) == 2
    rest = first.remainder()
    assert [i for i, _ in rest] == ["b"] and sum(len(t) for _, t in rest) == 5
    second = Packer(seq_len=6)
    assert list(second.feed(rest)) == []
    tokens, ends, ids, pad = second.flush_padded(pad_id=-1)
    assert pad == 1 and ids == ["b"] and tokens[-1] == -1


@pytest.fixture(scope="module")
def packed(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]

    def doc():
        return " ".join(rng.choice(words, size=rng.integers(3, 60)))

    write_jsonl(tmp / "a" / "1.jsonl", [{"text": doc()} for _ in range(50)])
    write_jsonl(tmp / "a" / "2.jsonl", [{"text": doc()} for _ in range(31)])
    write_jsonl(tmp / "b" / "1.jsonl.zst", [{"text": doc()} for _ in range(12)], compress=True)
    config = make_config(
        tmp / "run",
        [{"name": "a", "paths": [str(tmp / "a")], "weight": 2}, {"name": "b", "paths": [str(tmp / "b" / "*.zst")], "weight": 1}],
        ["data.pack.validation_fraction=0.25"],
    )
    return config, run_pipeline(config, STAGES)


def test_the_shards_do_not_depend_on_how_tokenize_cut_the_document_files(packed, tmp_path):
    """Tokenize cuts files into parts by the cluster's size; re-tokenizing the same run with
    another cut must give the same shards, byte for byte."""
    config, manifests = packed
    other = tmp_path / "run"
    shutil.copytree(config.root, other)
    recut = load_config(None, [f"root={other}", "data.tokenize.num_workers=1"], base=config.model_dump(mode="json"))
    again = run_pipeline(recut, STAGES, start="tokenize")
    assert len(again["tokenize"]["files"]) != len(manifests["tokenize"]["files"])  # another cut
    assert [(f["path"], f["sha256"]) for f in again["pack"]["files"]] == [(f["path"], f["sha256"]) for f in manifests["pack"]["files"]]


def rows_of(root, files: list[dict]) -> list[dict]:
    return [r for f in files for r in read_sequences(f"{root}/{f['path']}").to_pylist()]


def test_shards_hold_every_token_of_every_document_per_source(packed):
    config, manifests = packed
    pack, tokenize = manifests["pack"], manifests["tokenize"]
    special = pack["stats"]["special_ids"]
    for source in ("a", "b"):
        docs = []
        for f in tokenize["files"]:
            if f["source"] == source:
                docs += read_table(f"{config.root}/{f['path']}").to_pylist()
        expected = np.concatenate([np.array(d["tokens"] + [special["eot"]], dtype=np.int32) for d in docs])
        streams, s = [], pack["stats"]["sources"][source]
        for kind, prefix in (("shard", ""), ("validation", "validation_")):
            rows = rows_of(config.root, [f for f in pack["files"] if f["source"] == source and f["kind"] == kind])
            assert all(len(r["tokens"]) == 32 and r["source"] == source for r in rows)
            assert sum(r["pad"] > 0 for r in rows) <= 1  # only the very last sequence of a split is padded
            streams += [np.array(r["tokens"][: 32 - r["pad"]], dtype=np.int32) for r in rows]
            assert s[prefix + "sequences"] == len(rows)
        stream = np.concatenate(streams)
        assert np.array_equal(np.sort(stream), np.sort(expected)) and len(stream) == len(expected)
        assert s["tokens"] + s["validation_tokens"] == len(expected) == tokenize["stats"]["sources"][source]["tokens"] + len(docs)
        assert s["documents"] + s["validation_documents"] == len(docs)


def test_validation_shards_are_disjoint_from_training_shards_by_document(packed):
    config, manifests = packed
    pack, tokenize = manifests["pack"], manifests["tokenize"]
    all_ids = {(f["source"], d) for f in tokenize["files"] for d in read_table(f"{config.root}/{f['path']}").column("id").to_pylist()}
    ids = {}
    for kind in ("shard", "validation"):
        files = [f for f in pack["files"] if f["kind"] == kind]
        assert all(f["path"].startswith(f"pack/{'shards' if kind == 'shard' else 'validation'}/{f['source']}/") for f in files)
        ids[kind] = {(r["source"], d) for r in rows_of(config.root, files) for d in r["doc_ids"]}
    assert not ids["shard"] & ids["validation"]  # no document is split between them
    assert ids["shard"] | ids["validation"] == all_ids
    assert 0.1 < len(ids["validation"]) / len(all_ids) < 0.4  # validation_fraction=0.25 of 93 documents
    assert pack["stats"]["validation_sequences"] == sum(f["sequences"] for f in pack["files"] if f["kind"] == "validation") > 0


def test_the_training_reader_reads_only_training_shards(packed):
    from illada.train.data import PackedData

    config, manifests = packed
    data = PackedData(manifests["pack"], config.root, {"a": 2, "b": 1}, seed=0)
    urls = {url for s in data.sources.values() for url in s.urls}
    assert urls == {f"{config.root}/{f['path']}" for f in manifests["pack"]["files"] if f["kind"] == "shard"}
    assert sum(s.size for s in data.sources.values()) == manifests["pack"]["stats"]["sequences"]


def test_manifest_lists_checksummed_zstd_shards(packed):
    import pyarrow as pa

    from illada import storage

    config, manifests = packed
    pack = manifests["pack"]
    assert pack["stats"]["mix"] == {"a": 2 / 3, "b": 1 / 3}
    assert pack["stats"]["special_ids"]["mask"] == 5
    for f in pack["files"]:
        url = f"{config.root}/{f['path']}"
        assert storage.sha256_file(url) == f["sha256"]
        reader = pa.ipc.open_file(url)
        assert reader.schema.field("tokens").type == pa.list_(pa.int32(), 32)
        assert reader.get_batch(0).num_rows > 0
        with open(url, "rb") as raw:
            assert b"\x28\xb5\x2f\xfd" in raw.read()  # zstd frame magic: buffers are zstd-compressed


def test_a_source_emptied_by_dedup_is_an_error_not_a_weight_without_data(tmp_path, ray_local):
    from illada.config import ConfigError

    texts = [{"text": f"a document about {w} number {i}"} for i, w in enumerate(["cats", "dogs", "owls"] * 4)]
    write_jsonl(tmp_path / "raw" / "a.jsonl", texts)
    write_jsonl(tmp_path / "raw" / "copy.jsonl", texts[:5])  # every one an exact duplicate of an earlier source's
    sources = [{"name": "a", "paths": [str(tmp_path / "raw" / "a.jsonl")], "weight": 1}, {"name": "copy", "paths": [str(tmp_path / "raw" / "copy.jsonl")], "weight": 1}]
    with pytest.raises(ConfigError, match="source.s. 'copy' have no sequences left"):
        run_pipeline(make_config(tmp_path / "run", sources), STAGES)
    assert not (tmp_path / "run" / "pack" / "manifest.json").exists()


def test_eval_perplexity_defaults_to_the_validation_shards(packed, tmp_path, capsys):
    import json

    from illada.eval.cli import default_shards

    config, manifests = packed
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    info = {"step": 1, "model": {}, "files": {}, "digest": "0", "data_root": config.root}
    (checkpoint / "illada.json").write_text(json.dumps(info))
    validation = [f"{config.root}/{f['path']}" for f in manifests["pack"]["files"] if f["kind"] == "validation"]
    assert validation and default_shards(str(checkpoint)) == validation
    assert capsys.readouterr().err == ""

    # Data packed without a validation split: the last training shards, with a warning.
    root = tmp_path / "novalidation"
    (root / "pack").mkdir(parents=True)
    files = [f for f in manifests["pack"]["files"] if f["kind"] == "shard"]
    (root / "pack" / "manifest.json").write_text(json.dumps({"files": files}))
    (checkpoint / "illada.json").write_text(json.dumps(info | {"data_root": str(root)}))
    assert default_shards(str(checkpoint)) == [f"{root}/{f['path']}" for f in reversed(files)]
    assert "no validation shards" in capsys.readouterr().err
