"""Stage 3, dedup-fuzzy: MinHash LSH near-duplicate removal (placeholder: passes through)."""

from __future__ import annotations

from illada.data.dedup_exact import passthrough
from illada.pipeline.stage import Stage, StageContext


def run_dedup_fuzzy(ctx: StageContext) -> dict:
    return passthrough(ctx.input_files("dedup_exact", "documents"), ctx.stage)


STAGE = Stage(
    name="dedup_fuzzy",
    inputs=("dedup_exact",),
    run=run_dedup_fuzzy,
    identity=lambda config: config.data.dedup.fuzzy.model_dump(mode="json"),
    description="Drop near-duplicate documents: datatrove MinHash signatures and LSH buckets, connected components on Ray.",
)
