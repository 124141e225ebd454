"""Pre-training on a Ray cluster: the Ray job entrypoint of `illada submit train`.

    python -m pipelines.pretrain [CONFIG] [key.sub=value ...]

Checks the run against the cluster (fails in seconds, before anything is scheduled), then
trains with one worker per GPU and restarts the whole group from the latest complete
checkpoint when a worker or node fails (illada.train.ray_launch). Without CONFIG the
config's YAML is read from $ILLADA_JOB_CONFIG (jobs started from a container image,
which have no working directory to carry a file). Exit status: 0 trained, 1 training
failed, 2 the run could not start.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="YAML config (default: the YAML in $ILLADA_JOB_CONFIG)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    from ray.train.v2.api.exceptions import TrainingFailedError

    from illada import redaction
    from illada.config import ConfigError
    from illada.jobs import load_job_config
    from illada.train.preflight import LaunchError
    from illada.train.ray_launch import launch

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redaction.install()  # as the CLI does: no credential in the job's log
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        config = load_job_config(args.config, args.overrides)
        outcome = launch(config)
    except (ConfigError, LaunchError) as e:
        print(f"illada: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingFailedError as e:  # out of restarts (train.cluster.max_failures), or not retryable
        print(f"illada: error: training failed: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"trained {outcome.step} steps; tokens per source: {outcome.tokens_per_source}; MLflow run {outcome.mlflow_run_id}", flush=True)
    return 0


if __name__ == "__main__":  # (megatron's checkpoint writer re-imports __main__ in a spawned process)
    sys.exit(main(sys.argv[1:]))
