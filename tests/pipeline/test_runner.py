import pytest

from illada import storage
from illada.pipeline.runner import PipelineError, pipeline_status, run_pipeline
from illada.pipeline.stage import Stage, StageContext
from illada.data.stages import PRETRAIN as STAGES
from tests.helpers import make_config, write_jsonl


@pytest.fixture()
def corpus(tmp_path):
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": f"document number {i} about {w}"} for i, w in enumerate(["cats", "dogs", "owls"] * 10)])
    write_jsonl(tmp_path / "raw" / "b.jsonl", [{"text": f"another source, line {i}"} for i in range(20)])
    return [
        {"name": "a", "paths": [str(tmp_path / "raw" / "a.jsonl")], "weight": 1},
        {"name": "b", "paths": [str(tmp_path / "raw" / "b.jsonl")], "weight": 1},
    ]


def created(manifests: dict) -> dict:
    return {name: m["created_unix"] for name, m in manifests.items()}


def rerun_stages(before: dict, after: dict) -> set:
    return {name for name in before if before[name]["created_unix"] != after[name]["created_unix"]}


def test_skip_stage_from_and_config_changes(tmp_path, corpus, ray_local):
    config = make_config(tmp_path / "run", corpus)
    first = run_pipeline(config, STAGES)
    names = [s.name for s in STAGES]
    assert [s.state for s in pipeline_status(config, STAGES)] == ["complete"] * len(names)

    second = run_pipeline(config, STAGES)
    assert rerun_stages(first, second) == set()

    only = run_pipeline(config, STAGES, only="tokenize")
    assert rerun_stages(second, only) == {"tokenize"}
    assert only["tokenize"]["digest"] == second["tokenize"]["digest"]

    start = run_pipeline(config, STAGES, start="tokenizer")
    assert rerun_stages(only, start) == {"tokenizer", "tokenize", "pack"}

    changed = make_config(tmp_path / "run", corpus, ["data.pack.seq_len=16"])
    assert [s.state for s in pipeline_status(changed, STAGES)][-1] == "stale"
    after_change = run_pipeline(changed, STAGES)
    assert rerun_stages(start, after_change) == {"pack"}
    assert after_change["pack"]["digest"] != start["pack"]["digest"]


def test_forced_rerun_reproduces_every_digest(tmp_path, corpus, ray_local):
    config = make_config(tmp_path / "run", corpus)
    first = run_pipeline(config, STAGES)
    again = run_pipeline(config, STAGES, force=True)
    assert rerun_stages(first, again) == set(first)
    assert {n: m["digest"] for n, m in first.items()} == {n: m["digest"] for n, m in again.items()}


def test_stage_needs_complete_inputs(tmp_path, corpus, ray_local):
    config = make_config(tmp_path / "run", corpus)
    with pytest.raises(PipelineError, match="needs decontaminate, tokenizer to be complete first"):
        run_pipeline(config, STAGES, only="tokenize")
    with pytest.raises(PipelineError, match="unknown stage 'tokenise'"):
        run_pipeline(config, STAGES, only="tokenise")


# A stage whose tasks log each execution, and one of which crashes the first time.


def flaky_task(spec: dict) -> dict:
    with open(spec["log"], "a") as log:
        log.write(spec["id"] + "\n")
    if spec["id"] == spec["crash"] and not storage.exists(spec["crashed_flag"]):
        storage.write_bytes(spec["crashed_flag"], b"")
        raise RuntimeError("simulated crash")
    storage.write_bytes(spec["out"], spec["id"].encode())
    return {"id": spec["id"]}


def run_flaky(ctx: StageContext) -> dict:
    log, flag = storage.join(ctx.root, "executions.log"), storage.join(ctx.root, "crashed")
    specs = {f"t{i}": {"id": f"t{i}", "crash": "t3", "log": log, "crashed_flag": flag, "out": ctx.path(f"t{i}.txt")} for i in range(6)}
    results = ctx.run_tasks("work", flaky_task, specs)
    return {"files": [], "stats": {"done": sorted(results)}}


FLAKY = Stage(name="flaky", inputs=(), run=run_flaky, identity=lambda config: None)


def test_interrupted_stage_resumes_without_redoing_finished_tasks(tmp_path, corpus, ray_local):
    config = make_config(tmp_path / "run", corpus)
    with pytest.raises(Exception, match="simulated crash"):
        run_pipeline(config, [FLAKY])
    assert pipeline_status(config, [FLAKY])[0].state == "partial"
    assert not (tmp_path / "run" / "flaky" / "manifest.json").exists()
    first_run = (tmp_path / "run" / "executions.log").read_text().split()
    finished_first = {t.stem for t in (tmp_path / "run" / "flaky" / "_tasks" / "work").glob("*.json")}
    assert "t3" not in finished_first

    manifests = run_pipeline(config, [FLAKY])
    assert manifests["flaky"]["stats"]["done"] == [f"t{i}" for i in range(6)]
    second_run = (tmp_path / "run" / "executions.log").read_text().split()[len(first_run) :]
    assert set(second_run) == {f"t{i}" for i in range(6)} - finished_first
    assert pipeline_status(config, [FLAKY])[0].state == "complete"


# --- outputs that look complete but are not -----------------------------------------------


def test_a_changed_or_deleted_shard_is_reported_and_rebuilt(tmp_path, corpus, ray_local, capsys):
    from illada.cli import main

    config = make_config(tmp_path / "run", corpus)
    first = run_pipeline(config, STAGES)
    shards = sorted((tmp_path / "run" / "pack" / "shards").rglob("*.arrow"))
    original = shards[0].read_bytes()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    shards[0].write_bytes(bytes(flipped))
    assert pipeline_status(config, STAGES)[-1].state == "complete"  # same size: only a checksum sees it
    [pack] = [s for s in pipeline_status(config, STAGES, verify=True) if s.name == "pack"]
    assert pack.state == "damaged" and "sha256" in pack.problems[0] and shards[0].name in pack.problems[0]
    rebuilt = run_pipeline(config, STAGES, verify=True)
    assert rerun_stages(first, rebuilt) == {"pack"} and rebuilt["pack"]["digest"] == first["pack"]["digest"]
    assert shards[0].read_bytes() == original

    shards[1].unlink()
    assert [s.state for s in pipeline_status(config, STAGES)][-1] == "damaged"
    raw = {"name": "test", "root": str(tmp_path / "run"), "data": config.data.model_dump(mode="json")}
    from tests.conftest import TinyConfigFactory

    path = TinyConfigFactory.write_yaml(raw, tmp_path / "c.yaml")
    assert main(["pipeline", "status", path]) == 0
    assert "pack          damaged" in capsys.readouterr().out
    again = run_pipeline(config, STAGES)
    assert rerun_stages(rebuilt, again) == {"pack"} and shards[1].exists()

    # Staleness flows downstream: a new tokenizer makes what was made from it stale too.
    changed = make_config(tmp_path / "run", corpus, ["data.tokenizer.vocab_size=280"])
    states = {s.name: s.state for s in pipeline_status(changed, STAGES)}
    assert (states["dedup_fuzzy"], states["tokenizer"], states["tokenize"], states["pack"]) == ("complete", "stale", "stale", "stale")


def test_resuming_removes_orphaned_temporary_files(tmp_path, corpus, ray_local):
    config = make_config(tmp_path / "run", corpus)
    with pytest.raises(Exception, match="simulated crash"):
        run_pipeline(config, [FLAKY])
    orphan = tmp_path / "run" / "flaky" / ".tmp-0123abcd-t9.txt"  # what a killed atomic write leaves
    orphan.write_bytes(b"half")
    run_pipeline(config, [FLAKY])
    assert not orphan.exists()
    assert not list((tmp_path / "run").rglob(".tmp-*"))
