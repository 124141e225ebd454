"""SFT stage, pack: samples -> Arrow shards, each sample padded to its length bucket.

A sample (prompt + response, from the chat stage) is padded with end-of-text up to the
smallest of `data.sft.buckets` that holds it; the model trains on that padding, which is
how it learns to stop. A sample longer than the largest bucket is dropped, or with
`data.sft.overlong: truncate` cut to that length (its response loses its tail; one whose
prompt alone fills the length is dropped, nothing of its response being left). Either way
it is counted per source in the manifest and reported in the log — never silently.

The stage is named `pack` like the pre-training one, so everything that reads a data run's
`pack/manifest.json` (training, lineage, inference's special ids) reads an SFT run the same
way; its manifest's `stats.format` is "sft". Each tokens file is one task writing
`shards/<source>/<n>-<k>.arrow` (illada.data.shards' sample format).
"""

from __future__ import annotations

import bisect
import logging

import numpy as np

from illada.config import SFTDataConfig
from illada.data import shards
from illada.data.documents import iter_batches
from illada.data.pack import require_data_for_every_source
from illada.pipeline.stage import Stage, StageContext, file_entry

log = logging.getLogger(__name__)

FORMAT = "sft"


def fit(tokens: np.ndarray, prompt_len: int, cfg: SFTDataConfig, eot_id: int) -> tuple[np.ndarray, int, str] | None:
    """(tokens padded to their bucket, response length, "kept" | "truncated"), or None
    when the sample must be dropped."""
    status = "kept"
    if len(tokens) > cfg.max_len:
        if cfg.overlong == "drop" or prompt_len >= cfg.max_len:
            return None
        tokens, status = tokens[: cfg.max_len], "truncated"
    bucket = cfg.buckets[bisect.bisect_left(cfg.buckets, len(tokens))]
    padded = np.concatenate([tokens, np.full(bucket - len(tokens), eot_id, dtype=np.int32)])
    return padded, len(tokens) - prompt_len, status


def pack_task(spec: dict) -> dict:
    cfg = SFTDataConfig.model_validate(spec["sft"])
    writer = shards.SampleShardWriter(spec["shard_prefix"], cfg.samples_per_shard, cfg.zstd_level)
    counts = {"samples": 0, "truncated": 0, "dropped": 0, "prompt_tokens": 0, "response_tokens": 0, "pad_tokens": 0}
    buckets = dict.fromkeys(map(str, cfg.buckets), 0)
    for batch in iter_batches(spec["tokens_url"], columns=["id", "tokens", "prompt_len"]):
        tokens = batch.column("tokens")
        offsets = tokens.offsets.to_numpy()
        values = tokens.values.to_numpy(zero_copy_only=False)
        for row, (sample_id, prompt_len) in enumerate(zip(batch.column("id").to_pylist(), batch.column("prompt_len").to_pylist())):
            fitted = fit(values[offsets[row] : offsets[row + 1]], prompt_len, cfg, spec["eot_id"])
            if fitted is None:
                counts["dropped"] += 1
                continue
            padded, response_len, status = fitted
            pad = len(padded) - prompt_len - response_len
            writer.write(padded, prompt_len, response_len, pad, sample_id, spec["source"])
            counts["samples"] += 1
            counts["truncated"] += status == "truncated"
            counts["prompt_tokens"] += prompt_len
            counts["response_tokens"] += response_len
            counts["pad_tokens"] += pad
            buckets[str(len(padded))] += 1
    return {"source": spec["source"], **counts, "buckets": buckets, "shards": writer.close()}


def run_pack(ctx: StageContext) -> dict:
    cfg = ctx.config.data.sft
    special = ctx.inputs["tokenizer"]["stats"]["special_ids"]
    specs = {}
    for i, f in enumerate(ctx.input_files("chat", "tokens")):
        tid = f"{i:06d}"
        specs[tid] = {
            "tokens_url": ctx.absolute(f["path"]),
            "source": f["source"],
            "shard_prefix": ctx.path("shards", f["source"], tid),
            "eot_id": special["eot"],
            "sft": cfg.model_dump(mode="json"),
        }
    results = ctx.run_tasks("pack", pack_task, specs)
    body = _manifest_body(ctx, [results[t] for t in sorted(results)], special)
    _report_overlong(body["stats"], cfg)
    return body


def _manifest_body(ctx: StageContext, results: list[dict], special: dict) -> dict:
    files, per_source = [], {}
    for r in results:
        s = per_source.setdefault(r["source"], {"samples": 0, "truncated": 0, "dropped": 0, "prompt_tokens": 0, "response_tokens": 0, "pad_tokens": 0, "shards": 0, "buckets": {}})
        for key in ("samples", "truncated", "dropped", "prompt_tokens", "response_tokens", "pad_tokens"):
            s[key] += r[key]
        for bucket, n in r["buckets"].items():
            s["buckets"][bucket] = s["buckets"].get(bucket, 0) + n
        for shard in r["shards"]:
            files.append(file_entry(ctx, shard["url"], "shard", shard["sha256"], shard["bytes"], sequences=shard["sequences"], tokens=shard["tokens"], source=r["source"]))
            s["shards"] += 1
    require_data_for_every_source(ctx.config.data.mix(), {n: s["samples"] for n, s in per_source.items()}, "samples")
    cfg = ctx.config.data.sft
    stats = {
        "format": FORMAT,
        "seq_len": cfg.max_len,  # the longest sample: what the model's max_seq_len must hold
        "buckets": cfg.buckets,
        "overlong": cfg.overlong,
        "mix": ctx.config.data.mix(),
        "special_ids": special,
        "vocab_size": ctx.inputs["tokenizer"]["stats"]["vocab_size"],
        "sources": per_source,
        **{key: sum(s[key] for s in per_source.values()) for key in ("samples", "truncated", "dropped", "prompt_tokens", "response_tokens", "pad_tokens")},
    }
    return {"files": files, "stats": stats}


def _report_overlong(stats: dict, cfg: SFTDataConfig) -> None:
    for name, s in stats["sources"].items():
        if s["dropped"] or s["truncated"]:
            log.warning(
                "source %s: %d samples over %d tokens (data.sft.buckets' last) were dropped and %d truncated (data.sft.overlong=%s)",
                name, s["dropped"], cfg.max_len, s["truncated"], cfg.overlong,
            )


STAGE = Stage(
    name="pack",
    inputs=("chat", "tokenizer"),
    run=run_pack,
    identity=lambda config: {"sft": config.data.sft.model_dump(mode="json"), "mix": config.data.mix()},
    code=(shards,),
    description="Pad SFT samples with end-of-text to length buckets (truncate or drop overlong ones, counted); write zstd Arrow shards.",
)
