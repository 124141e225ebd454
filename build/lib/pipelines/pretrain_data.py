"""The pre-training data pipeline as a Ray Job entrypoint (illada.data.stages.PRETRAIN):

    python -m pipelines.pretrain_data CONFIG [--stage S | --from S] [--force] [key=value ...]

the same as `illada pipeline run CONFIG ...` on the cluster the job runs in.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from illada.cli import main

    sys.exit(main(["pipeline", "run", *sys.argv[1:]]))
