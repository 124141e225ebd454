"""Pre-training on a Ray cluster: check the run against the cluster (illada.train.preflight),
then start one training worker per GPU (per `cpus_per_worker` CPUs on a CPU-only cluster)
with Ray Train and restart the whole group from the latest complete checkpoint when one
fails. `pipelines/pretrain.py` is the Ray job entrypoint that calls `launch`.

Why Ray Train's TorchTrainer (Ray Train v2, the default in Ray 2.60) rather than our own
actors: it already does the parts that are easy to get subtly wrong, and nothing in it is
in megatron's way.

- Placement: a placement group of one bundle per worker, PACK-ed onto as few nodes as
  possible, ranks ordered by node and GPU id (so consecutive ranks, which megatron puts
  in the same tensor-parallel group, share a node).
- torch.distributed: MASTER_ADDR/PORT from rank 0, the torchrun variables (RANK,
  LOCAL_RANK, WORLD_SIZE, ...), CUDA_VISIBLE_DEVICES per node, `init_process_group`
  with NCCL or gloo and our timeout. `init_parallel` finds the group set up and adds
  megatron's TP/PP/DP groups on top of it — the same `train_loop` as `illada train`.
- Failure handling: the controller polls every worker; a dead actor (process or node
  gone) or a raising worker is a failure, and on a failure it tears the whole group down
  and starts a fresh one, up to `FailureConfig.max_failures` times. A group that cannot
  be placed (a node lost, its replacement not there yet) is retried until nodes appear.

What we do not take from Ray Train: its checkpoints and `ray.train.report`. Our trainer
writes megatron dist_checkpointing checkpoints itself, completes them with a marker and
resumes from the latest complete one on start (data position included), so a restarted
group picks up where the last checkpoint left off with no Ray Checkpoint object. And
`ray.train.report` is a barrier across all workers through an actor, which torch's
collective timeout does not cover: a hung worker there would hang the run.

Hung collectives: the process group (Ray's) and megatron's groups (init_parallel) get
`train.collective_timeout_s`. With gloo the waiting ranks raise; with NCCL, Ray sets
TORCH_NCCL_ASYNC_ERROR_HANDLING=1 and the watchdog ends the process. Either is a failure
the controller restarts from.

Restarts are printed to the job log and recorded on the run's MLflow run (a `restarts`
metric at the step resumed from, and an `illada.restart.<n>` tag saying why) by
`RecoveryLog`, a callback that runs in Ray Train's controller (ControllerCallback: a
developer API, so its import is pinned with Ray's version; tests/train/test_ray_launch.py
exercises it on a real cluster).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

import ray

# A developer API of Ray 2.60 (pinned): the hook that sees the controller restart the group.
from ray.train.v2._internal.execution.callback import ControllerCallback

from illada import redaction, storage
from illada.config import Config
from illada.train.preflight import LaunchError, Plan, checkpoint_dir, validate

log = logging.getLogger(__name__)

__all__ = ["LaunchError", "Outcome", "RecoveryLog", "describe_failure", "launch", "train_worker", "worker_arguments"]


# --- the workers ----------------------------------------------------------------------------------


def worker_arguments(config: Config, env: dict[str, str]) -> tuple[dict, dict]:
    """What the training workers get: the config without the S3 credentials as their
    argument (Ray Train keeps train_loop_config in its run state), and the credentials in
    their environment, as the pipeline's tasks get them."""
    loop_config = {"config": config.model_copy(update={"storage": storage.without_credentials(config.storage)}), "env": env}
    return loop_config, storage.worker_env(config.storage).get("runtime_env", {})


def train_worker(loop_config: dict) -> dict:
    """One training process: Ray Train has set up torch.distributed; run `train_loop`."""
    config: Config = loop_config["config"]
    _log_to_stderr(ray.train.get_context().get_world_rank())
    os.environ.update(loop_config["env"])  # which MLflow run rank 0 continues
    import torch

    if torch.cuda.is_available():
        from ray.train.torch import get_device

        # init_parallel selects cuda:LOCAL_RANK; make it the GPU Ray gave this worker.
        os.environ["LOCAL_RANK"] = str(get_device().index)
    else:
        torch.set_num_threads(max(1, int(config.train.cluster.cpus_per_worker)))
    from illada.parallel import destroy_parallel
    from illada.train.trainer import train_loop

    state = train_loop(config)
    destroy_parallel()
    return {"step": state.step, "tokens_per_source": state.tokens_per_source}


def _log_to_stderr(rank: int) -> None:
    """illada's log lines in the job log, from rank 0 only (others: warnings), timestamped.
    (Ray has set up the worker's root logger already; ours gets a handler of its own.)"""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(redaction.RedactingFilter())
    illada = logging.getLogger("illada")
    illada.addHandler(handler)
    illada.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    illada.propagate = False
    logging.getLogger("megatron").setLevel(logging.WARNING)


# --- restarts in the job log and MLflow --------------------------------------------------------------


class RecoveryLog(ControllerCallback):
    """Runs in Ray Train's controller: each time the controller restarts the worker group
    after a failure, say so in the job log and on the MLflow run. Recording happens on a
    thread of its own (in order), so the restart itself never waits for MLflow; nothing
    raises into the controller (a raising callback would fail the run)."""

    def __init__(self, tracking_uri: str, run_id: str, checkpoints: str, max_failures: int):
        self.tracking_uri, self.run_id, self.checkpoints, self.max_failures = tracking_uri, run_id, checkpoints, max_failures
        self.restarts = 0
        self._recorder = None  # made in the controller (a thread pool does not pickle)

    def after_controller_state_update(self, previous_state, current_state) -> None:
        from ray.train.v2._internal.execution.controller.state import (
            ReschedulingState,
            RestartingState,
        )

        try:
            if isinstance(current_state, ReschedulingState):  # the group did not start: not a restart
                why = describe_failure(current_state.training_failed_error).removeprefix("a failure of ")
                print(f"illada: the worker group could not be started ({why}); trying again", flush=True)
            elif isinstance(current_state, RestartingState):
                self.restarts += 1
                if self._recorder is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="illada-recovery-log")
                self._recorder.submit(self._record, self.restarts, describe_failure(current_state.training_failed_error), self.latest_complete())
        except Exception as e:  # noqa: BLE001
            print(f"illada: could not record a restart of the worker group: {e!r}", flush=True)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_recorder": None}

    def latest_complete(self) -> str | None:
        """The checkpoint a restarted group resumes from (as Checkpointer.restore finds it)."""
        from illada.layout import complete_checkpoints

        complete = complete_checkpoints(self.checkpoints)
        return os.path.basename(complete[-1]) if complete else None

    def _record(self, restart: int, why: str, resume: str | None) -> None:
        try:
            self._record_now(restart, why, resume)
        except Exception as e:  # noqa: BLE001
            print(f"illada: could not record restart {restart}: {e!r}", flush=True)

    def _record_now(self, restart: int, why: str, resume: str | None) -> None:
        from illada.layout import STEP_DIR

        step = int(STEP_DIR.match(resume).group(1)) if resume else 0
        limit = "no limit" if self.max_failures < 0 else f"at most {self.max_failures}"
        message = (
            f"restart {restart} ({limit}) after {why}; the whole worker group restarts from "
            + (f"checkpoint {resume} (step {step})" if resume else "the start (no complete checkpoint yet)")
        )
        print(f"illada: {message}", flush=True)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        client.log_metric(self.run_id, "restarts", restart, step=step)
        client.set_tag(self.run_id, f"illada.restart.{restart}", f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}"[:4000])


def describe_failure(error: BaseException) -> str:
    """One line per failed rank: the exception's type and the first line of its message."""
    failures = getattr(error, "worker_failures", None) or {None: error}
    parts = []
    for rank, e in sorted(failures.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        parts.append(f"{'rank ' + str(rank) if rank is not None else 'the controller'}: {type(e).__name__}" + (f": {first[:300]}" if first else ""))
    return "a failure of " + "; ".join(parts)


# --- the run -----------------------------------------------------------------------------------------


def start_mlflow_run(config: Config, plan: Plan) -> tuple[str, str]:
    """The MLflow run this job records into, whichever attempt of the worker group is training
    (rank 0 continues it through MLFLOW_RUN_ID). Returns (tracking URI, run id)."""
    from illada.tracking import open_store, tracking_uri

    uri = tracking_uri(config)
    client, experiment_id = open_store(config)
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
    tags = {
        "illada.launcher": "ray",
        "illada.workers": str(plan.workers),
        "illada.device": "gpu" if plan.use_gpu else "cpu",
        **({"illada.ray_job": job["job_submission_id"]} if "job_submission_id" in job else {}),
    }
    run = client.create_run(experiment_id, run_name=f"{config.name}-train", tags=tags)
    return uri, run.info.run_id


@dataclass
class Outcome:
    step: int
    tokens_per_source: dict[str, int]
    mlflow_run_id: str


def launch(config: Config) -> Outcome:
    """Validate, then train on the cluster this process is connected to (or will connect
    to: a Ray job's driver joins its own). Raises LaunchError before anything is scheduled,
    or Ray Train's TrainingFailedError once the failures exceed train.cluster.max_failures."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from illada.ray_runtime import ensure_ray

    ensure_ray(config.ray)
    plan = validate(config)
    train = config.train
    checkpoints = checkpoint_dir(config)
    uri, run_id = start_mlflow_run(config, plan)
    log.info(
        "training on %d %s worker(s) (TP %d, PP %d, DP %d); checkpoints in %s; MLflow run %s",
        plan.workers, "GPU" if plan.use_gpu else "CPU", train.parallel.tensor, train.parallel.pipeline,
        plan.workers // (train.parallel.tensor * train.parallel.pipeline), checkpoints, run_id,
    )  # fmt: skip
    loop_config, worker_env = worker_arguments(config, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=plan.workers, use_gpu=plan.use_gpu, resources_per_worker=plan.resources_per_worker, placement_strategy="PACK"
        ),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo", timeout_s=math.ceil(train.collective_timeout_s)),
        run_config=RunConfig(
            name=f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=os.path.join(checkpoints, ".ray_train"),
            failure_config=FailureConfig(max_failures=train.cluster.max_failures),
            callbacks=[RecoveryLog(uri, run_id, checkpoints, train.cluster.max_failures)],
            worker_runtime_env=worker_env,
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as e:  # Ctrl-C too: the run is closed as KILLED, never left RUNNING
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    done = result.return_value
    return Outcome(done["step"], done["tokens_per_source"], run_id)
