"""The pre-training data pipeline: ingest -> dedup (exact, fuzzy) -> decontaminate -> tokenizer -> tokenize -> pack.

Runs as `illada pipeline run CONFIG`, or as a Ray Job entrypoint:
    python -m pipelines.pretrain_data CONFIG [--stage S | --from S] [--force] [key=value ...]
"""

from __future__ import annotations

import sys

from illada.data import decontaminate, dedup_exact, dedup_fuzzy, ingest, pack, tokenize, tokenizer
from illada.pipeline.stage import Stage

STAGES: list[Stage] = [ingest.STAGE, dedup_exact.STAGE, dedup_fuzzy.STAGE, decontaminate.STAGE, tokenizer.STAGE, tokenize.STAGE, pack.STAGE]

if __name__ == "__main__":
    from illada.cli import main

    sys.exit(main(["pipeline", "run", *sys.argv[1:]]))
