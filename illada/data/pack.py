"""Stage 6, pack: token streams -> fixed-length sequences in Arrow shards, per source.

Documents are concatenated, each followed by end-of-text, and cut every `seq_len` tokens;
a document may run across sequences. Each document file's tokens are packed by their own
task; the tokens left over at its end (fewer than seq_len) go to a remainder file, and a
final task per source packs the remainders in order and pads the very last sequence. So
only one sequence per source is padded, and no token is dropped.

A validation split is held out per source, by document: a document whose hash of (source,
id) falls in the lowest `validation_fraction` of the hash range is packed, whole, into the
validation shards (`validation/<source>/`, kind "validation" in the manifest) and never
into the training shards (`shards/<source>/`, kind "shard"). The choice depends on the
source and document id alone (ids are `id_field` values, or ingest's file:line), so a
re-run holds out the same documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import xxhash

from illada.config import ConfigError, PackConfig
from illada.data.documents import DocumentWriter, iter_batches, read_table
from illada.data.shards import ShardWriter
from illada.layout import TRAINING_SHARDS, VALIDATION_SHARDS
from illada.pipeline.stage import Stage, StageContext, file_entry

REMAINDER_SCHEMA = pa.schema([("id", pa.string()), ("tokens", pa.large_list(pa.int32()))])

Piece = tuple[str, np.ndarray]  # (document id, tokens), end-of-text already appended if the document ends here

# split -> (folder under pack/, manifest kind)
SPLITS = {"train": ("shards", TRAINING_SHARDS), "validation": ("validation", VALIDATION_SHARDS)}


def is_validation(source: str, doc_id: str, fraction: float) -> bool:
    """Whether a document is held out for validation: its (source, id) hash is below
    `fraction` of the 64-bit range."""
    return xxhash.xxh3_64_intdigest(f"{source}\x00{doc_id}".encode()) < fraction * 2**64


class Packer:
    """Cuts a stream of document pieces into sequences of exactly `seq_len` tokens."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._pieces: list[Piece] = []
        self._size = 0

    def feed(self, pieces: Iterable[Piece]) -> Iterator[tuple[np.ndarray, list[int], list[str]]]:
        """Yield (tokens, doc_ends, doc_ids) for each sequence completed by these pieces."""
        for doc_id, tokens in pieces:
            while len(tokens):
                take = min(len(tokens), self.seq_len - self._size)
                self._pieces.append((doc_id, tokens[:take]))
                self._size += take
                tokens = tokens[take:]
                if self._size == self.seq_len:
                    yield self._emit()

    def _emit(self) -> tuple[np.ndarray, list[int], list[str]]:
        tokens = np.concatenate([t for _, t in self._pieces])
        ends = np.cumsum([len(t) for _, t in self._pieces]).tolist()
        ids = [i for i, _ in self._pieces]
        self._pieces, self._size = [], 0
        return tokens, ends, ids

    def remainder(self) -> list[Piece]:
        return list(self._pieces)

    def flush_padded(self, pad_id: int) -> tuple[np.ndarray, list[int], list[str], int] | None:
        """The last, partial sequence padded to full length, or None if nothing is left."""
        if not self._pieces:
            return None
        pad = self.seq_len - self._size
        tokens, ends, ids = self._emit()
        return np.concatenate([tokens, np.full(pad, pad_id, dtype=tokens.dtype)]), ends, ids, pad


def _document_pieces(urls: list[str], eot_id: int) -> Iterator[Piece]:
    eot = np.array([eot_id], dtype=np.int32)
    for url in urls:
        for batch in iter_batches(url, columns=["id", "tokens"]):
            tokens = batch.column("tokens")
            offsets = tokens.offsets.to_numpy()
            values = tokens.values.to_numpy(zero_copy_only=False)
            for row, doc_id in enumerate(batch.column("id").to_pylist()):
                yield doc_id, np.concatenate([values[offsets[row] : offsets[row + 1]], eot])


def pack_task(spec: dict) -> dict:
    """Pack one document file's tokens (its parts in order) into training and validation
    shards; leave each split's unfinished sequence in its remainder file."""
    cfg = PackConfig.model_validate(spec["pack"])
    packers = {split: Packer(cfg.seq_len) for split in SPLITS}
    writers = {split: ShardWriter(spec["shard_prefix"][split], cfg.seq_len, cfg.sequences_per_shard, cfg.zstd_level) for split in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    for doc_id, tokens in _document_pieces(spec["tokens_urls"], spec["eot_id"]):
        split = "validation" if is_validation(spec["source"], doc_id, cfg.validation_fraction) else "train"
        documents[split] += 1
        for sequence, ends, ids in packers[split].feed([(doc_id, tokens)]):
            writers[split].write(sequence, ends, ids, spec["source"])
    out = {"source": spec["source"], "splits": {}}
    for split in SPLITS:
        remainder = packers[split].remainder()
        with DocumentWriter(spec["remainder_url"][split], schema=REMAINDER_SCHEMA) as rest:
            for doc_id, tokens in remainder:
                rest.write(id=doc_id, tokens=tokens)
        out["splits"][split] = {"documents": documents[split], "shards": writers[split].close(), "remainder_tokens": int(sum(len(t) for _, t in remainder))}
    return out


def tail_task(spec: dict) -> dict:
    """Pack one source's remainders of one split, in task order, and pad the last sequence."""
    cfg = PackConfig.model_validate(spec["pack"])
    packer = Packer(cfg.seq_len)
    writer = ShardWriter(spec["shard_prefix"], cfg.seq_len, cfg.sequences_per_shard, cfg.zstd_level)
    for url in spec["remainders"]:
        table = read_table(url)
        pieces = zip(table.column("id").to_pylist(), (np.asarray(t, dtype=np.int32) for t in table.column("tokens").to_pylist()))
        for tokens, ends, ids in packer.feed(pieces):
            writer.write(tokens, ends, ids, spec["source"])
    last = packer.flush_padded(spec["pad_id"])
    if last is not None:
        tokens, ends, ids, pad = last
        writer.write(tokens, ends, ids, spec["source"], pad=pad)
    return {"source": spec["source"], "splits": {spec["split"]: {"documents": 0, "shards": writer.close()}}}


def run_pack(ctx: StageContext) -> dict:
    cfg = ctx.config.data.pack
    special = ctx.inputs["tokenizer"]["stats"]["special_ids"]
    # A document file's tokens may come in parts (tokenize cuts files by the cluster's
    # size); a task packs all of one file's parts, so the shards do not depend on the cut.
    by_file: dict[int, list[dict]] = {}
    for f in ctx.input_files("tokenize", "tokens"):
        by_file.setdefault(f.get("document_file", f["path"]), []).append(f)
    specs = {}
    for i, parts in enumerate(by_file.values()):
        tid, source = f"{i:06d}", parts[0]["source"]
        specs[tid] = {
            "tokens_urls": [ctx.absolute(f["path"]) for f in parts],
            "source": source,
            "shard_prefix": {split: ctx.path(folder, source, tid) for split, (folder, _) in SPLITS.items()},
            "remainder_url": {split: ctx.path(f"_remainder_{split}", source, f"{tid}.parquet") for split in SPLITS},
            "eot_id": special["eot"],
            "pack": cfg.model_dump(mode="json"),
        }
    packed = ctx.run_tasks("pack", pack_task, specs)
    sources = sorted({s["source"] for s in specs.values()})
    tail_specs = {
        f"{source}-{split}": {
            "source": source,
            "split": split,
            "remainders": [s["remainder_url"][split] for tid, s in sorted(specs.items()) if s["source"] == source],
            "shard_prefix": ctx.path(folder, source, "tail"),
            "pad_id": special["pad"],
            "pack": cfg.model_dump(mode="json"),
        }
        for source in sources
        for split, (folder, _) in SPLITS.items()
    }
    tails = ctx.run_tasks("tail", tail_task, tail_specs)
    return _manifest_body(ctx, [packed[t] for t in sorted(packed)] + [tails[t] for t in sorted(tails)], special)


def require_data_for_every_source(mix: dict[str, float], counts: dict[str, int], what: str) -> None:
    """Refuse to finish with a source of the mix that has nothing left (all its documents
    deduplicated or dropped): training would give its weight to no data."""
    empty = [name for name, weight in mix.items() if weight > 0 and not counts.get(name)]
    if empty:
        raise ConfigError(
            f"source(s) {', '.join(repr(n) for n in empty)} have no {what} left after ingest, deduplication and tokenization "
            "(see the ingest and dedup manifests' stats); remove them from data.sources or fix their input"
        )


def _manifest_body(ctx: StageContext, results: list[dict], special: dict) -> dict:
    files, per_source = [], {}
    for r in results:
        s = per_source.setdefault(r["source"], {})
        for split, done in r["splits"].items():
            kind = SPLITS[split][1]
            prefix = "" if split == "train" else "validation_"
            for key in ("sequences", "tokens", "pad_tokens", "documents", "shards"):
                s.setdefault(prefix + key, 0)
            s[prefix + "documents"] += done["documents"]
            for shard in done["shards"]:
                files.append(file_entry(ctx, shard["url"], kind, shard["sha256"], shard["bytes"], sequences=shard["sequences"], tokens=shard["tokens"], source=r["source"]))
                s[prefix + "sequences"] += shard["sequences"]
                s[prefix + "tokens"] += shard["tokens"]
                s[prefix + "pad_tokens"] += shard["pad"]
                s[prefix + "shards"] += 1
    require_data_for_every_source(ctx.config.data.mix(), {n: s.get("sequences", 0) for n, s in per_source.items()}, "sequences")
    stats = {
        "seq_len": ctx.config.data.pack.seq_len,
        "mix": ctx.config.data.mix(),
        "special_ids": special,
        "vocab_size": ctx.inputs["tokenizer"]["stats"]["vocab_size"],
        "validation_fraction": ctx.config.data.pack.validation_fraction,
        "sources": per_source,
        "sequences": sum(s["sequences"] for s in per_source.values()),
        "tokens": sum(s["tokens"] for s in per_source.values()),
        "validation_sequences": sum(s["validation_sequences"] for s in per_source.values()),
        "validation_tokens": sum(s["validation_tokens"] for s in per_source.values()),
    }
    return {"files": files, "stats": stats}


STAGE = Stage(
    name="pack",
    inputs=("tokenize", "tokenizer"),
    run=run_pack,
    identity=lambda config: {"pack": config.data.pack.model_dump(mode="json"), "mix": config.data.mix()},
    description="Pack token streams per source into fixed-length sequences, a validation split held out by document; write zstd Arrow shards and a manifest.",
)
