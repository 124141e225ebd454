import numpy as np
import pytest

from illada.data.shards import ROWS_PER_BATCH, ShardWriter
from illada.train.data import BlendedSchedule, PackedData, Permutation

SEQ = 8


@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 1000, 4097])
def test_permutation_is_a_bijection_and_depends_on_the_seed(n):
    perm = Permutation(n, seed=7)
    values = [perm(i) for i in range(n)]
    assert sorted(values) == list(range(n))
    if n >= 64:
        assert values != list(range(n))
        assert values != [Permutation(n, seed=8)(i) for i in range(n)]


def test_blend_follows_the_weights_and_resumes_exactly():
    schedule = BlendedSchedule({"a": 3, "b": 1}, seed=0)
    draws = schedule.draw(400)
    assert sum(1 for s, _ in draws if s == "a") == 300
    # At every prefix the counts are within one sample of the target share.
    counts = {"a": 0, "b": 0}
    for i, (s, nth) in enumerate(draws):
        assert nth == counts[s]
        counts[s] += 1
        assert abs(counts["a"] - 0.75 * (i + 1)) <= 1
    resumed = BlendedSchedule({"a": 3, "b": 1}, seed=0)
    first = resumed.draw(123)
    state = resumed.state_dict()
    fresh = BlendedSchedule({"a": 3, "b": 1}, seed=0)
    fresh.load_state_dict(state)
    assert first + fresh.draw(277) == draws


def write_source(tmp_path, name: str, sequences: int, per_shard: int) -> list[dict]:
    writer = ShardWriter(str(tmp_path / name / "s"), SEQ, per_shard, zstd_level=1)
    for i in range(sequences):
        # every token of sequence i of source name encodes (source, i)
        writer.write(np.full(SEQ, (1000 if name == "a" else 2000) + i, dtype=np.int32), [SEQ], [f"{name}{i}"], name, pad=i % 2)
    return [
        {"path": f"{name}/{s['url'].rsplit('/', 1)[-1]}", "kind": "shard", "source": name, "sequences": s["sequences"]}
        for s in writer.close()
    ]


@pytest.fixture()
def manifest(tmp_path):
    files = write_source(tmp_path, "a", 45, per_shard=20) + write_source(tmp_path, "b", 7, per_shard=5)
    return {"files": files}


def test_shards_have_full_record_batches_except_the_last(tmp_path, manifest):
    import pyarrow as pa

    for f in manifest["files"]:
        reader = pa.ipc.open_file(str(tmp_path / f["path"]))
        sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        assert all(n == ROWS_PER_BATCH for n in sizes[:-1]) and sum(sizes) == f["sequences"]


def test_each_epoch_visits_every_sequence_once(tmp_path, manifest):
    data = PackedData(manifest, str(tmp_path), {"a": 1}, seed=3)
    seen = [int(x) for _ in range(9) for x in data.next_batch(5)[:, 0]]
    assert sorted(seen) == [1000 + i for i in range(45)]
    assert seen != sorted(seen)
    second_epoch = [int(x) for _ in range(9) for x in data.next_batch(5)[:, 0]]
    assert sorted(second_epoch) == sorted(seen) and second_epoch != seen
    assert data.tokens_seen["a"] == 90 * SEQ - sum(i % 2 for i in range(45)) * 2


def test_data_parallel_ranks_split_the_same_global_batch(tmp_path, manifest):
    whole = PackedData(manifest, str(tmp_path), {"a": 0.5, "b": 0.5}, seed=1)
    ranks = [PackedData(manifest, str(tmp_path), {"a": 0.5, "b": 0.5}, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(6):
        expected = whole.next_batch(4)
        assert np.array_equal(np.concatenate([r.next_batch(4) for r in ranks]), expected)


def test_resuming_from_state_continues_the_same_samples(tmp_path, manifest):
    straight = PackedData(manifest, str(tmp_path), {"a": 2, "b": 1}, seed=5)
    expected = [straight.next_batch(3) for _ in range(20)]
    first = PackedData(manifest, str(tmp_path), {"a": 2, "b": 1}, seed=5)
    got = [first.next_batch(3) for _ in range(8)]
    resumed = PackedData(manifest, str(tmp_path), {"a": 2, "b": 1}, seed=5)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_batch(3) for _ in range(12)]
    assert all(np.array_equal(x, y) for x, y in zip(got, expected))


def test_mix_naming_an_unknown_source_is_an_error(tmp_path, manifest):
    with pytest.raises(ValueError, match=r"no shards: \['c'\]"):
        PackedData(manifest, str(tmp_path), {"a": 1, "c": 1}, seed=0)


def test_micro_batches_count_the_real_tokens_trained_after_the_random_cut():
    from illada.config import TrainConfig
    from illada.train.data import Sequences
    from illada.train.trainer import micro_batches

    pad_id, mask_id, seq = 0, 5, 32
    tokens = np.arange(100, 100 + 6 * seq, dtype=np.int64).reshape(6, seq)
    pads = np.array([0, 7, 0, 31, 3, 0])
    for row, pad in enumerate(pads):
        tokens[row, seq - pad :] = pad_id
    rows = Sequences(tokens, pads, ["a", "b", "a", "b", "a", "b"])
    train = TrainConfig.model_validate({"data_root": "unused", "steps": 1, "global_batch_size": 6, "micro_batch_size": 2, "random_length_fraction": 1.0, "optim": {"warmup_steps": 0}})

    batches, counted = micro_batches(rows, train, step=0, mask_id=mask_id, device="cpu")

    assert any(b.clean.shape[1] < seq for b in batches)  # every micro-batch is cut here
    expected = {"a": 0, "b": 0}  # independently: the non-pad ids left in each cut micro-batch
    for k, batch in enumerate(batches):
        for r in range(batch.clean.shape[0]):
            expected[rows.sources[2 * k + r]] += int((batch.clean[r] != pad_id).sum())
            assert not batch.noised.masked[r][batch.clean[r] == pad_id].any()
    assert counted == expected
