"""Reading SFT samples for training: every sample once per epoch, a new order every epoch,
the position resumable; epochs to steps; objective and data must match."""

from __future__ import annotations

import numpy as np
import pytest

from illada.config import load_config
from illada.data.shards import SampleShardWriter
from illada.train.sft import SFTData, check_objective, with_steps

EOT = 1


def write_shards(root, source: str, n: int, per_shard: int) -> list[dict]:
    """n samples of lengths 8 or 12: sample i has prompt_len 2 + i % 3 and token i at position 1."""
    writer = SampleShardWriter(str(root / "pack" / "shards" / source / "000000"), per_shard, 3)
    for i in range(n):
        length, prompt_len = (8, 2 + i % 3) if i % 2 else (12, 2 + i % 3)
        tokens = np.full(length, EOT, dtype=np.int32)
        tokens[:5] = [3, 100 + i, 6, 4, 50]
        writer.write(tokens, prompt_len, 5 - prompt_len, length - 5, f"{source}-{i}", source)
    return [
        {"kind": "shard", "source": source, "path": shard["url"][len(str(root)) + 1 :], "sequences": shard["sequences"], "sha256": shard["sha256"]}
        for shard in writer.close()
    ]


@pytest.fixture
def manifest(tmp_path) -> dict:
    files = write_shards(tmp_path, "a", 37, per_shard=16) + write_shards(tmp_path, "b", 11, per_shard=16)
    stats = {"format": "sft", "mix": {"a": 0.5, "b": 0.5}, "sources": {"a": {"samples": 37}, "b": {"samples": 11}}}
    return {"files": files, "stats": stats}


def test_every_sample_once_per_epoch_in_a_new_order_each_epoch(tmp_path, manifest):
    data = SFTData(manifest, str(tmp_path), {"a": 1.0}, seed=7)
    epochs = [[int(s.tokens[1]) - 100 for s in data.next_batch(37)] for _ in range(3)]
    assert all(sorted(e) == list(range(37)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    one = data.next_batch(1)[0]
    i = int(one.tokens[1]) - 100
    assert one.prompt_len == 2 + i % 3 and len(one.tokens) == (8 if i % 2 else 12) and one.tokens[-1] == EOT
    assert data.tokens_seen["a"] == sum(5 for _ in range(3 * 37 + 1))  # padding is not counted


def test_the_position_resumes_and_ranks_read_their_slices(tmp_path, manifest):
    weights = {"a": 0.5, "b": 0.5}
    whole = SFTData(manifest, str(tmp_path), weights, seed=3)
    first = [s.tokens.tolist() for s in whole.next_batch(8)]
    state = whole.state_dict()  # what a checkpoint keeps
    expected = [s.tokens.tolist() for s in whole.next_batch(8)]
    resumed = SFTData(manifest, str(tmp_path), weights, seed=3)
    resumed.load_state_dict(state)
    assert [s.tokens.tolist() for s in resumed.next_batch(8)] == expected
    halves = [SFTData(manifest, str(tmp_path), weights, seed=3, dp_rank=r, dp_size=2).next_batch(8) for r in (0, 1)]
    assert [s.tokens.tolist() for s in halves[0] + halves[1]] == first


def test_epochs_give_the_steps_and_the_objective_must_match_the_data(tmp_path, manifest):
    def config(**train):
        return load_config(base={"name": "t", "root": str(tmp_path), "train": {"global_batch_size": 8, "optim": {"warmup_steps": 0}, **train}})

    sft = config(objective="sft", sft={"epochs": 3})
    assert with_steps(sft, manifest, {"a": 1.0, "b": 1.0}).train.steps == 18  # ceil(3 * 48 / 8)
    assert with_steps(sft, manifest, {"a": 1.0, "b": 0.0}).train.steps == 14  # ceil(3 * 37 / 8)
    assert with_steps(config(objective="sft", steps=5), manifest, {"a": 1.0}).train.steps == 5
    check_objective(manifest, sft.train)
    with pytest.raises(ValueError, match="holds SFT samples; set train.objective: sft"):
        check_objective(manifest, config(steps=5).train)
    with pytest.raises(ValueError, match="holds pre-training shards; point train.data_root at the root of an SFT data run"):
        check_objective({"stats": {"seq_len": 64}}, sft.train)
