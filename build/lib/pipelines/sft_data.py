"""The SFT data pipeline as a Ray Job entrypoint (illada.data.stages.SFT, chosen by
`data.kind: sft`): conversations are ingested and checked, deduplicated, put through the
chat template with the pre-training tokenizer and padded to length buckets.

    python -m pipelines.sft_data CONFIG [--stage S | --from S] [--force] [key=value ...]
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from illada.cli import main

    sys.exit(main(["pipeline", "run", *sys.argv[1:]]))
