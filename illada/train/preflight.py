"""Checks before training on a Ray cluster, all done in seconds before anything is
scheduled: how many workers and what each reserves (the plan), that the parallel layout
divides them, that the cluster holds them, that the data is all there and fits the model,
and that every node that can host a worker reaches the checkpoint directory (a shared
filesystem) and the data. A failed check raises LaunchError saying what to fix.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass

import ray

from illada import layout, storage
from illada.config import Config, TrainConfig
from illada.errors import UserError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 300  # a node sets up the job's runtime env (the working dir) on its first task; slow when loaded


class LaunchError(UserError, ValueError):
    """The run cannot start on this cluster as configured; the message says what to fix."""


# --- the plan: how many workers, with what ----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    workers: int
    use_gpu: bool
    cpus_per_worker: float

    @property
    def resources_per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}


def slots(node: dict[str, float], use_gpu: bool, cpus_per_worker: float) -> int:
    """How many workers fit on a node with these resources."""
    by_cpu = math.floor(node.get("CPU", 0) / cpus_per_worker + 1e-9)
    return min(by_cpu, int(node.get("GPU", 0))) if use_gpu else by_cpu


def make_plan(train: TrainConfig, nodes: list[dict[str, float]]) -> Plan:
    """The workers for this run on nodes with these resources; LaunchError if they do not
    fit or do not divide into the parallel layout."""
    cluster = train.cluster
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    use_gpu = cluster.use_gpu if cluster.use_gpu is not None else gpus > 0
    capacity = sum(slots(n, use_gpu, cluster.cpus_per_worker) for n in nodes)
    workers = cluster.workers or (gpus if use_gpu else capacity)
    per_worker = f"1 GPU + {cluster.cpus_per_worker:g} CPUs" if use_gpu else f"{cluster.cpus_per_worker:g} CPUs"
    if workers == 0 or workers > capacity:
        have = f"{gpus} GPUs, {sum(n.get('CPU', 0) for n in nodes):g} CPUs"
        raise LaunchError(
            f"{workers or 'a'} worker(s) of {per_worker} do not fit: the cluster's {len(nodes)} node(s) ({have}) hold "
            f"{capacity}; add nodes, lower train.cluster.workers or train.cluster.cpus_per_worker, or let nodes "
            "still joining come up with train.cluster.resource_wait_s"
        )
    check_layout(train, workers)
    return Plan(workers, use_gpu, cluster.cpus_per_worker)


def check_layout(train: TrainConfig, workers: int) -> None:
    tp, pp = train.parallel.tensor, train.parallel.pipeline
    if workers % (tp * pp):
        raise LaunchError(
            f"world size {workers} is not divisible by tensor x pipeline parallel = {tp} x {pp}; "
            "set train.cluster.workers to a multiple, or change train.parallel"
        )
    dp = workers // (tp * pp)
    if train.global_batch_size % (dp * train.micro_batch_size):
        raise LaunchError(
            f"train.global_batch_size ({train.global_batch_size}) is not divisible by data-parallel size ({dp}) "
            f"x train.micro_batch_size ({train.micro_batch_size})"
        )


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def plan_on_cluster(train: TrainConfig) -> Plan:
    """make_plan on the live cluster, waiting up to resource_wait_s for nodes still joining."""
    deadline = time.monotonic() + train.cluster.resource_wait_s
    while True:
        try:
            return make_plan(train, [n["Resources"] for n in alive_nodes()])
        except LaunchError as e:
            if time.monotonic() >= deadline or "do not fit" not in str(e):
                raise
            log.info("waiting for nodes: %s", e)
            time.sleep(5)


# --- checks before launching ------------------------------------------------------------------


def check_data(config: Config) -> dict:
    """The pack manifest exists, every shard it lists is there, the mix names sources it has
    and the model fits the data. Returns the manifest."""
    train = config.train
    url = layout.manifest_url(train.data_root, "pack")
    if not storage.exists(url):
        raise LaunchError(f"no pack manifest at {url}; run the data pipeline first (illada submit pipeline ...) or fix train.data_root")
    manifest = storage.read_json(url)
    shards = {storage.join(train.data_root, f["path"]) for f in manifest["files"] if f["kind"] == "shard"}
    missing = sorted(shards - set(storage.list_files(storage.join(train.data_root, "pack"))))
    if missing:
        raise LaunchError(f"{len(missing)} of the {len(shards)} shards in {url} are missing, e.g. {missing[0]}; re-run the pack stage")
    sources = {f["source"] for f in manifest["files"] if f["kind"] == "shard"}
    unknown = sorted(set(train.mix or {}) - sources)
    if unknown:
        raise LaunchError(f"train.mix names sources with no shards: {unknown}; the data has {sorted(sources)}")
    stats, model = manifest["stats"], config.model
    if stats["vocab_size"] > model.vocab_size:
        raise LaunchError(f"the tokenizer has {stats['vocab_size']} tokens but model.vocab_size is {model.vocab_size}")
    if stats["seq_len"] > model.max_seq_len:
        raise LaunchError(f"the shards hold {stats['seq_len']}-token sequences but model.max_seq_len is {model.max_seq_len}")
    return manifest


def checkpoint_dir(config: Config) -> str:
    from illada.layout import checkpoint_root

    try:
        return checkpoint_root(config.root, config.train.checkpoint.dir)
    except UserError as e:
        raise LaunchError(str(e)) from None


def check_checkpoint_dir(config: Config, plan: Plan) -> None:
    """The checkpoint directory is writable here and is the same directory on every node
    that can host a worker (a shared filesystem): a probe file written here must be visible
    there, and each node must be able to write one of its own."""
    root = checkpoint_dir(config)
    probe = os.path.join(root, f".probe-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as f:
            f.write("illada")
    except OSError as e:
        raise LaunchError(f"the checkpoint directory {root} is not writable from the driver: {e}; fix train.checkpoint.dir") from None
    try:
        hosts = [n for n in alive_nodes() if slots(n["Resources"], plan.use_gpu, plan.cpus_per_worker) > 0]
        problems = _probe_nodes(hosts, probe, config)
    finally:
        os.remove(probe)
    if problems:
        raise LaunchError("\n  ".join(["the checkpoint directory or the data cannot be reached from every node:", *problems]))


@ray.remote(num_cpus=0, max_retries=0)
def _probe(probe: str, manifest_url: str, storage_config) -> str | None:
    storage.configure(storage_config)
    if not os.path.exists(probe):
        return f"{probe} (written by the driver) is not there: {os.path.dirname(probe)} is not a filesystem shared by all nodes"
    mine = f"{probe}-{os.getpid()}"
    try:
        with open(mine, "w") as f:
            f.write("illada")
        os.remove(mine)
    except OSError as e:
        return f"cannot write to {os.path.dirname(probe)}: {e}"
    if not storage.exists(manifest_url):
        return f"{manifest_url} is not readable here (credentials? a filesystem not mounted?)"
    return None


def _probe_nodes(nodes: list[dict], probe: str, config: Config) -> list[str]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    manifest_url = layout.manifest_url(config.train.data_root, "pack")
    refs = {
        n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": _probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False), **storage.worker_env(config.storage)
        ).remote(probe, manifest_url, storage.without_credentials(config.storage))
        for n in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    problems = []
    for node, ref in refs.items():
        if ref not in ready:
            problems.append(f"node {node}: did not answer a probe in {PROBE_TIMEOUT_S} s")
            continue
        try:
            problem = ray.get(ref)
        except Exception as e:  # noqa: BLE001  (the node cannot run illada at all)
            problem = f"the probe failed: {str(e).strip().splitlines()[-1]}"
        if problem is not None:
            problems.append(f"node {node}: {problem}")
    return problems


def validate(config: Config) -> Plan:
    """Everything that can be checked before scheduling, in seconds: LaunchError otherwise."""
    config.require("model", "train")
    check_v2()
    storage.configure(config.storage)
    manifest = check_data(config)
    plan = plan_on_cluster(config.train)
    check_memory(config, plan, manifest["stats"]["seq_len"], [n["Resources"] for n in alive_nodes()])
    check_checkpoint_dir(config, plan)
    log.info("checked: data, %d worker(s) fit the cluster, every node reaches the checkpoint directory", plan.workers)
    return plan


def gpu_memory_bytes(train: TrainConfig, nodes: list[dict[str, float]]) -> float | None:
    """Memory per GPU: train.gpu_memory_gib, else from the GPU type Ray reports for the nodes
    (the smallest, when they differ); None when neither tells."""
    from illada.train.plan import GPU_MEMORY_GIB, GiB

    if train.gpu_memory_gib:
        return train.gpu_memory_gib * GiB
    types = {key.removeprefix("accelerator_type:") for n in nodes for key in n if key.startswith("accelerator_type:") and n.get("GPU")}
    sizes = [GPU_MEMORY_GIB.get(t) for t in types]
    if not sizes or None in sizes:
        return None
    return min(sizes) * GiB


def check_memory(config: Config, plan: Plan, seq_len: int, nodes: list[dict[str, float]]) -> None:
    """The planner's preflight (illada.train.plan): LaunchError, with the numbers, when the
    layout does not fit a GPU. Skipped on CPU workers and GPUs of unknown size."""
    from illada.config import ConfigError
    from illada.train.plan import check_fits

    if not plan.use_gpu:
        return
    gpu_bytes = gpu_memory_bytes(config.train, nodes)
    if gpu_bytes is None:
        log.info("memory preflight skipped: the GPU type does not tell its memory; set train.gpu_memory_gib to check")
        return
    train = config.train
    try:
        check_fits(config, plan.workers // (train.parallel.tensor * train.parallel.pipeline), seq_len, gpu_bytes)
    except ConfigError as e:
        raise LaunchError(str(e)) from None


def check_v2() -> None:
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise LaunchError("RAY_TRAIN_V2_ENABLED is off: illada trains with Ray Train v2 (Ray's default); unset it")
