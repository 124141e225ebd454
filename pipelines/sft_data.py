"""The SFT data pipeline: ingest (chat) -> dedup (exact, fuzzy) -> decontaminate -> tokenizer -> chat -> pack.

Conversations are ingested and checked (malformed ones quarantined with their reason),
deduplicated, put through the chat template with the pre-training tokenizer
(data.tokenizer.path) and padded to length buckets in Arrow shards. Selected by
`data.kind: sft`; runs as `illada pipeline run CONFIG`, or as a Ray Job entrypoint:
    python -m pipelines.sft_data CONFIG [--stage S | --from S] [--force] [key=value ...]
"""

from __future__ import annotations

import sys

from illada.data import (
    chat_tokenize,
    decontaminate,
    dedup_exact,
    dedup_fuzzy,
    ingest,
    sft_pack,
    tokenizer,
)
from illada.pipeline.stage import Stage

STAGES: list[Stage] = [ingest.STAGE, dedup_exact.STAGE, dedup_fuzzy.STAGE, decontaminate.STAGE, tokenizer.STAGE, chat_tokenize.STAGE, sft_pack.STAGE]

if __name__ == "__main__":
    from illada.cli import main

    sys.exit(main(["pipeline", "run", *sys.argv[1:]]))
