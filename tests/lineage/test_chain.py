"""A lineage chain on the default store (a sqlite database under each run root): two
pipeline runs, a pre-training run, its resume, and a second run initialised from the
first's checkpoint, each in its own run root. `show` lists every link, `mix` adds up to the
tokens consumed, `verify` catches one changed byte."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from tokenizers import Tokenizer

from illada.cli import main
from illada.config import load_config
from illada.lineage import render
from illada.lineage.graph import build
from illada.lineage.mix import mix_report
from illada.lineage.record import shard_set_digest, shard_sets
from illada.lineage.verify import verify
from illada.pipeline.runner import run_pipeline
from illada.train.data import PackedData
from illada.data.stages import PRETRAIN as STAGES
from tests.conftest import TinyConfigFactory, tiny_docs
from tests.lineage.conftest import TRAIN, train

UPSTREAM = ("ingest", "filter", "dedup_exact", "dedup_fuzzy", "decontaminate", "tokenizer", "tokenize")
PLANTED = " ".join(tiny_docs("alpha", 6)[2]["text"].split()[3:16])


def planted_docs() -> list[str]:
    """The raw documents holding the planted evaluation text."""
    return [d["text"] for source in ("alpha", "beta") for d in tiny_docs(source, 6) if PLANTED in d["text"]]


def planted_tokens(data: Path) -> int:
    """The planted documents' tokens, encoded with the data run's tokenizer by `tokenizers` itself."""
    tokenizer = Tokenizer.from_file(str(data / "tokenizer" / "tokenizer.json"))
    return sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in planted_docs())


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_local):
    patch = pytest.MonkeyPatch()
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: <root>/mlflow.db
    tmp = tmp_path_factory.mktemp("chain")
    data = tmp / "data"
    raw = TinyConfigFactory().raw(str(data), str(tmp / "raw"))
    # An evaluation set holding 13 words of one alpha document (beta's of the same number
    # has the same words): decontamination takes both out.
    (tmp / "planted.jsonl").write_text(json.dumps({"text": PLANTED}) + "\n")
    raw["data"]["decontaminate"] = {"eval_sets": [{"name": "planted", "path": str(tmp / "planted.jsonl")}]}
    first = run_pipeline(load_config(base=copy.deepcopy(raw)), STAGES)
    # The second run re-packs into smaller shards; every stage before pack is up to date.
    second = run_pipeline(load_config(base=copy.deepcopy(raw), overrides=["data.pack.sequences_per_shard=4"]), STAGES)
    env = {"MLFLOW_TRACKING_URI": None}
    train(tmp / "A", str(data), env=env)
    train(tmp / "A", str(data), "train.steps=3", env=env)  # resumes from step 2
    train(tmp / "B", str(data), f"train.init_from={tmp / 'A' / 'checkpoints'}", env=env)
    yield SimpleNamespace(tmp=tmp, data=data, first=first, second=second, A=tmp / "A" / "checkpoints", B=tmp / "B" / "checkpoints")
    patch.undo()


def step(folder: Path, n: int) -> str:
    return str(folder / f"step_{n:08d}")


def pipeline_runs(data: Path) -> list:
    client = MlflowClient(f"sqlite:///{data}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(experiments, "tags.`illada.kind` = 'pipeline'", order_by=["attributes.start_time ASC"]))


def node(lineage, kind: str, label: str):
    found = [n for n in lineage.nodes.values() if n.kind == kind and n.label == label]
    assert len(found) == 1, (kind, label, [n.label for n in lineage.nodes.values()])
    return found[0]


def linked(lineage, child, relation: str):
    return [lineage.nodes[e.parent] for e in lineage.parents(child.id) if e.relation == relation]


def test_show_lists_every_link_back_to_the_raw_data(chain, capsys):
    lineage = build(str(chain.B))  # the folder: its latest checkpoint
    b2 = lineage.nodes[lineage.root]
    assert b2.facts["path"] == step(chain.B, 2)
    assert all(n.recorded == "mlflow" for n in lineage.nodes.values()), [n.label for n in lineage.nodes.values() if n.recorded != "mlflow"]
    assert not [p for n in lineage.nodes.values() for p in n.problems]

    # checkpoint <- parent checkpoints, each with the run that trained it
    (a3,) = linked(lineage, b2, "initialised from")
    assert a3.facts["path"] == step(chain.A, 3)
    (a2,) = linked(lineage, a3, "resumed from")
    assert a2.facts["path"] == step(chain.A, 2)
    assert not linked(lineage, a2, "resumed from") and not linked(lineage, a2, "initialised from")
    runs = [linked(lineage, c, "trained by")[0] for c in (b2, a3, a2)]
    assert len({r.id for r in runs}) == 3  # B, the resume of A, A's first run
    for c in (b2, a3, a2):
        info = json.loads(Path(c.facts["path"], "illada.json").read_text())
        assert c.facts["digest"] == info["digest"] and c.facts["step"] == info["step"]
        assert c.facts["tokens per source"] == info["tokens_per_source"]

    # training run <- shards <- pack (second pipeline run) <- ... <- ingest (first) <- raw
    pack_manifest = chain.second["pack"]
    for run in runs:
        assert run.facts["mix"] == {"alpha": 0.5, "beta": 0.5}
        shards = linked(lineage, run, "read")
        assert {s.label for s in shards} == {"shards alpha", "shards beta"}
        for s in shards:
            files = shard_sets(pack_manifest)[s.label.split()[1]]
            assert s.facts["digest"] == shard_set_digest(files) and s.facts["shards"] == len(files)
            (pack,) = linked(lineage, s, "packed by")
            assert pack.label == "pack" and pack.facts["digest"] == pack_manifest["digest"]
    assert chain.first["pack"]["digest"] != pack_manifest["digest"]
    first_run, second_run = (r.info.run_id for r in pipeline_runs(chain.data))
    assert pack.facts["pipeline run"] == second_run
    for name in UPSTREAM:  # skipped by the second run: found by digest in the first
        stage = node(lineage, "stage", name)
        assert stage.facts["digest"] == chain.first[name]["digest"] == chain.second[name]["digest"]
        assert stage.facts["pipeline run"] == first_run
    assert {n.label for n in linked(lineage, pack, "input")} == {"tokenize", "tokenizer"}
    assert {n.label for n in linked(lineage, node(lineage, "stage", "dedup_exact"), "input")} == {"filter"}
    assert {n.label for n in linked(lineage, node(lineage, "stage", "filter"), "input")} == {"ingest"}
    assert node(lineage, "stage", "ingest").facts["documents"] == 14
    assert node(lineage, "stage", "dedup_exact").facts["duplicates"] == 2
    planted = planted_docs()
    assert len(planted) == 2
    assert node(lineage, "stage", "decontaminate").facts["removed per benchmark"]["planted"] == f"2 docs / {sum(len(t.split()) for t in planted)} words"
    assert node(lineage, "stage", "tokenize").facts["tokens of decontaminated documents per benchmark"] == {"planted": planted_tokens(chain.data)}
    raws = linked(lineage, node(lineage, "stage", "ingest"), "read")
    assert sorted(r.label for r in raws) == ["raw alpha", "raw beta"]
    assert node(lineage, "raw", "raw beta").facts["paths"] == [str(chain.tmp / "raw" / "beta.jsonl.zst")]

    # the command, in every format, and a picture
    capsys.readouterr()
    assert main(["lineage", "show", str(chain.B), "--picture", str(chain.tmp / "lineage.svg")]) == 0
    out = capsys.readouterr().out
    for label in (
        "initialised from: checkpoint step_00000003",
        "resumed from: checkpoint step_00000002",
        "trained by: training run tiny-train",
        "packed by: pack",
        "input: ingest",
        "read: raw alpha",
        "removed per benchmark: planted 2 docs",
    ):
        assert label in out, out
    assert (chain.tmp / "lineage.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert main(["lineage", "show", step(chain.B, 2), "--format", "json", "--picture", str(chain.tmp / "lineage.png")]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert len(as_json["nodes"]) == len(lineage.nodes) and len(as_json["edges"]) == len(lineage.edges)
    assert (chain.tmp / "lineage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["lineage", "show", step(chain.B, 2), "--format", "mermaid"]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart TD") and mermaid.count("-->") == len(lineage.edges)


def test_show_starts_from_a_run_id_too(chain, capsys):
    pipeline = pipeline_runs(chain.data)[-1]
    assert main(["lineage", "show", pipeline.info.run_id, "--tracking-uri", f"sqlite:///{chain.data}/mlflow.db", "--format", "json"]) == 0
    lineage = json.loads(capsys.readouterr().out)
    relations = {(e["relation"], e["parent"].split(":")[1]) for e in lineage["edges"] if e["child"] == lineage["root"]}
    assert relations == {("ran", "pack"), *(("reused", name) for name in UPSTREAM)}
    assert main(["lineage", "show", pipeline.info.run_id]) == 2  # which store? it says to pass one
    assert "--tracking-uri" in capsys.readouterr().err

    b_store = f"sqlite:///{chain.tmp / 'B'}/mlflow.db"
    client = MlflowClient(b_store)
    (model,) = [m for m in client.search_logged_models([e.experiment_id for e in client.search_experiments()]) if m.name.endswith("step_00000002")]
    lineage = build(model.model_id, b_store)
    assert lineage.root == f"checkpoint:{step(chain.B, 2)}"
    training = build(model.source_run_id, b_store)
    (started_from,) = [e for e in training.parents(training.root) if e.relation.startswith("started from")]
    assert started_from.parent == f"checkpoint:{step(chain.A, 3)}" and "initialised" in started_from.relation


def replay(data: Path, steps: int) -> dict[str, int]:
    """The tokens `steps` training steps read: the data order again, from the start."""
    manifest = json.loads((data / "pack" / "manifest.json").read_text())
    packed = PackedData(manifest, str(data), manifest["stats"]["mix"], seed=1234)
    for _ in range(steps):
        packed.next_batch(TRAIN["global_batch_size"])
    return packed.tokens_seen


def test_mix_adds_up_to_the_tokens_consumed(chain, capsys):
    report = mix_report(build(str(chain.B)))
    by_source = {r.source: r for r in report.rows}
    assert {n: r.tokens for n, r in by_source.items()} == replay(chain.data, 2)  # B's own 2 steps
    assert {n: r.inherited for n, r in by_source.items()} == replay(chain.data, 3)  # A's 3, resume included
    assert report.inherited_from == [step(chain.A, 3)]
    planted = planted_docs()
    expected = {"documents": 2, "words": sum(len(t.split()) for t in planted), "tokens": planted_tokens(chain.data), "texts": 0, "too_short": 0}
    assert report.decontamination["benchmarks"]["planted"] | {"texts": 0} == expected
    assert sum(r.share for r in report.rows) == pytest.approx(1.0)
    assert {n: r.target for n, r in by_source.items()} == {"alpha": 0.5, "beta": 0.5}

    # what the training runs logged step by step agrees
    client = MlflowClient(f"sqlite:///{chain.tmp / 'B'}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {n: int(run.data.metrics[f"tokens/{n}"]) for n in by_source} == {n: r.tokens for n, r in by_source.items()}

    capsys.readouterr()
    assert main(["lineage", "mix", str(chain.B), "--format", "json", "--plot", str(chain.tmp / "mix.png")]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["tokens"] == sum(replay(chain.data, 2).values())
    assert sum(r["seen"] for r in as_json["rows"]) == sum(replay(chain.data, 2).values()) + sum(replay(chain.data, 3).values())
    assert (chain.tmp / "mix.png").read_bytes()[:4] == b"\x89PNG"
    assert as_json["decontamination"]["benchmarks"]["planted"]["documents"] == 2
    assert main(["lineage", "mix", str(chain.A)]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "removed by decontamination" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("planted")] == [["planted", "2"]]


def test_verify_catches_one_changed_byte_and_a_vanished_file(chain, capsys):
    assert not verify(build(str(chain.B))).problems
    shard = chain.data / min(f["path"] for f in chain.second["pack"]["files"] if f["kind"] == "shard")
    original = shard.read_bytes()
    checkpoint_file = Path(step(chain.A, 2), "common.pt")
    saved = chain.tmp / "common.pt.saved"
    try:
        shard.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
        report = verify(build(str(chain.B)))
        assert [(f.kind, f.path) for f in report.problems if f.kind == "shard"] == [("shard", str(shard))]
        assert [f.state for f in report.problems] == ["changed", "changed"]  # the shard and its set
        capsys.readouterr()
        assert main(["lineage", "verify", str(chain.B)]) == 1
        assert f"CHANGED  shard           {shard}" in capsys.readouterr().out

        shutil.move(checkpoint_file, saved)
        problems = {(f.kind, f.state, f.path) for f in verify(build(str(chain.B))).problems}
        assert ("checkpoint file", "vanished", str(checkpoint_file)) in problems
        assert ("checkpoint", "changed", step(chain.A, 2)) in problems
    finally:
        shard.write_bytes(original)
        if saved.exists():
            shutil.move(saved, checkpoint_file)
    assert main(["lineage", "verify", str(chain.B)]) == 0


def test_without_mlflow_records_the_chain_is_followed_on_storage(chain):
    """With the data root's database gone, the stages are found through the manifests."""
    database = chain.data / "mlflow.db"
    hidden = chain.tmp / "data-mlflow.db"
    shutil.move(database, hidden)
    try:
        lineage = build(step(chain.B, 2))
    finally:
        shutil.move(hidden, database)
    for name in (*UPSTREAM, "pack"):
        stage = node(lineage, "stage", name)
        assert stage.recorded == "storage" and stage.facts["digest"] == chain.second[name]["digest"]
    assert node(lineage, "stage", "tokenize").facts["tokens"] == chain.second["tokenize"]["stats"]["tokens"]
    assert "raw alpha" in render.text(lineage)
    assert lineage.nodes[lineage.root].recorded == "mlflow"  # B's own store is still there


def test_each_pipeline_stage_is_a_nested_run_with_config_counts_datasets_and_code_version(chain):
    from illada.lineage.graph import datasets_of
    from illada.lineage.record import short

    client = MlflowClient(f"sqlite:///{chain.data}/mlflow.db")
    first, second = pipeline_runs(chain.data)
    children = {
        run.info.run_id: client.search_runs([first.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'") for run in (first, second)
    }
    assert sorted(r.info.run_name for r in children[first.info.run_id]) == sorted(chain.first)
    (pack,) = children[second.info.run_id]  # the second run ran only pack; the rest it reused
    assert second.data.tags["illada.stage.ingest"].startswith("reused ") and second.data.tags["illada.stage.pack"].startswith("ran ")
    assert {d["name"] for d in datasets_of(second) if d["context"] == "reused"} == set(UPSTREAM)

    assert pack.data.params["data.pack.sequences_per_shard"] == "4" and pack.data.params["data.sources.1.name"] == "beta"
    stats = chain.second["pack"]["stats"]
    for source in ("alpha", "beta"):
        assert pack.data.metrics[f"sources.{source}.tokens"] == stats["sources"][source]["tokens"]
        assert pack.data.metrics[f"sources.{source}.sequences"] == stats["sources"][source]["sequences"]
    assert pack.data.tags["illada.git.commit"] not in ("", "unknown") and pack.data.tags["illada.git.dirty"] in ("true", "false")
    assert pack.data.tags["illada.ray.job_id"] and pack.data.tags["illada.stage"] == "pack"
    datasets = {(d["name"], d["context"]): d for d in datasets_of(pack)}
    assert set(datasets) == {("tokenize", "input"), ("tokenizer", "input"), ("pack", "output")}
    out = datasets["pack", "output"]
    assert out["full_digest"] == chain.second["pack"]["digest"] and out["digest"] == short(out["full_digest"])
    assert out["source"] == str(chain.data / "pack" / "manifest.json")

    (dedup,) = [r for r in children[first.info.run_id] if r.info.run_name == "dedup_exact"]
    assert (dedup.data.metrics["documents_in"], dedup.data.metrics["duplicates"], dedup.data.metrics["documents_out"]) == (14, 2, 12)


def test_training_runs_record_mix_shards_parent_and_a_model_per_checkpoint(chain):
    client = MlflowClient(f"sqlite:///{chain.tmp / 'B'}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, "tags.`illada.kind` = 'train'")
    assert run.data.params["mix.alpha"] == run.data.params["mix.beta"] == "0.5"
    assert run.data.params["parent"] == step(chain.A, 3) and run.data.params["parent_relation"] == "initialised"
    assert run.data.params["model.vocab_size"] == "512"

    models = client.search_logged_models(experiments)
    assert sorted(m.name for m in models) == ["tiny-step_00000001", "tiny-step_00000002"]
    for m in models:
        info = json.loads(Path(m.params["uri"], "illada.json").read_text())
        assert m.source_run_id == run.info.run_id and m.model_type == "illada-checkpoint"
        assert (m.params["step"], m.params["digest"], m.params["parent"]) == (str(info["step"]), info["digest"], step(chain.A, 3))
        assert {k: int(v) for k, v in m.params.items() if k.startswith("tokens.")} == {f"tokens.{n}": t for n, t in info["tokens_per_source"].items()}
    # Which checkpoints were trained on this pack? MLflow answers from the model metrics' dataset.
    pack = chain.second["pack"]["digest"]
    found = client.search_logged_models(experiments, datasets=[{"dataset_name": "pack", "dataset_digest": pack[:32]}])
    assert len(found) == 2
