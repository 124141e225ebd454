"""Recording a training run's lineage: the data it reads, where it started, its checkpoints.

The run gets the resolved config and the target mix (`mix.<source>`) as params, the shard
sets it reads as datasets (the pack manifest, digest = its content hash, and one set per
source, digest = a hash of its shards' sha256s) and the parent checkpoint it resumed from
or was initialised from.
Each complete checkpoint becomes an external LoggedModel: the weights stay where they are;
the model carries their path, step, tokens consumed per source, parent and checksum.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

from illada import layout, storage
from illada.config import Config
from illada.lineage.record import (
    CHECKPOINT_DIGEST,
    CHECKPOINT_URI,
    KIND,
    MODEL_TYPE,
    PACK_DATASET,
    PARENT,
    SHARDS_PREFIX,
    TRAINING,
    Redactor,
    code_version,
    config_params,
    dataset,
    dataset_input,
    log_batch,
    shard_set_digest,
    shard_sets,
)

log = logging.getLogger(__name__)

RESUMED, INITIALISED = "resumed", "initialised"
TRAINING_SECTIONS = ("name", "root", "storage", "model", "train")  # the resolved config, as params


def parent_relation(config: Config, parent: str | None) -> str | None:
    """How a run relates to the checkpoint it loaded: its own earlier one, or another's."""
    if parent is None:
        return None
    from illada.layout import checkpoint_root

    same_root = os.path.dirname(os.path.abspath(parent)) == os.path.abspath(checkpoint_root(config.root, config.train.checkpoint.dir))
    return RESUMED if same_root else INITIALISED


class TrainingRecorder:
    """Lineage records of one training run, on global rank 0, into the run MetricsLogger
    owns (the tracking URI and experiment are already set).

    The records are written by a background thread, so rank 0 does not keep the other
    ranks waiting at the next collective while MLflow answers; `close` waits for them."""

    def __init__(self, config: Config, run_id: str, experiment_id: str, manifest: dict, mix: dict[str, float], parent: str | None):
        from mlflow.tracking import MlflowClient

        self.config = config
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.manifest = manifest
        self.mix = mix
        self.parent = parent
        self.redact = Redactor(config)
        self.version = code_version()
        self.client = MlflowClient()
        self.manifest_url = layout.manifest_url(config.train.data_root, "pack")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="illada-lineage")
        self._pending: list[tuple[str, Future]] = []

    def log_start(self) -> None:
        self._submit("the run's mix, data and parent", self._log_start)

    def log_checkpoint(self, path: str) -> None:
        """Queue an external LoggedModel for a complete checkpoint. Its illada.json is read
        now: keep_last may remove the checkpoint before the record is written."""
        path = os.path.abspath(path)
        self._submit(f"checkpoint {path}", self._log_checkpoint, path, layout.checkpoint_info(path))

    def close(self) -> list[str]:
        """Wait for every record; returns the LoggedModel ids. A record that failed is
        logged as an error (the training itself succeeded; its checkpoints have their
        illada.json) rather than raised."""
        models = []
        for what, future in self._pending:
            try:
                result = future.result()
            except Exception as e:  # noqa: BLE001
                log.error("could not record %s in MLflow (%s: %s); `illada lineage` follows it on storage instead", what, type(e).__name__, e)
                continue
            if result:
                models.append(result)
        self._writer.shutdown()
        self._pending.clear()
        return models

    def _submit(self, what: str, fn, *args) -> None:
        self._pending.append((what, self._writer.submit(fn, *args)))

    def _log_start(self) -> None:
        total = sum(self.mix.values())
        params = {f"mix.{name}": f"{weight / total:.6g}" for name, weight in self.mix.items()}
        params |= {"data_root": self.config.train.data_root, "data_digest": self.manifest["digest"], "init_from": self.config.train.init_from or ""}
        params |= {"parent": self.parent or "", "parent_relation": parent_relation(self.config, self.parent) or ""}
        params |= config_params(self.config, TRAINING_SECTIONS)
        # A restarted worker group continues the same run: keep what the first attempt logged.
        existing = self.client.get_run(self.run_id).data.params
        params = {k: v for k, v in params.items() if k not in existing}
        log_batch(self.client, self.run_id, self.redact, params=params, tags={KIND: "train", PARENT: self.parent or "", **self.version})
        self.client.log_inputs(self.run_id, self._datasets())

    def _datasets(self) -> list:
        out = [dataset_input(PACK_DATASET, self.manifest_url, self.manifest["digest"], TRAINING, self.redact)]
        for source, shards in sorted(shard_sets(self.manifest).items()):
            where = storage.join(self.config.train.data_root, "pack", "shards", source)
            out.append(dataset_input(SHARDS_PREFIX + source, where, shard_set_digest(shards), TRAINING, self.redact))
        return out

    def _log_checkpoint(self, path: str, info: layout.CheckpointInfo) -> str:
        import mlflow
        from mlflow.entities import LoggedModelOutput

        tokens = {name: int(n) for name, n in info.tokens_per_source.items()}
        params = {"uri": path, "step": info.step, "digest": info.digest, "parent": info.parent or "", "init_from": info.init_from or ""}
        params |= {"data_root": info.data_root, "tokens": sum(tokens.values())} | {f"tokens.{name}": n for name, n in tokens.items()}
        tags = {KIND: "checkpoint", CHECKPOINT_URI: path, CHECKPOINT_DIGEST: info.digest, PARENT: info.parent or "", **self.version}
        model = mlflow.create_external_model(
            name=f"{self.config.name}-{os.path.basename(path)}",
            source_run_id=self.run_id,
            tags=self.redact.all(tags),
            params=self.redact.all(params),
            model_type=MODEL_TYPE,
            experiment_id=self.experiment_id,
        )
        # Tokens as model metrics tied to the shards: search_logged_models(datasets=...) finds
        # every checkpoint trained on a shard set.
        pack = dataset(PACK_DATASET, self.redact(self.manifest_url), self.manifest["digest"])
        metrics = {f"tokens_seen/{name}": float(n) for name, n in tokens.items()} | {"tokens_seen": float(sum(tokens.values()))}
        mlflow.log_metrics(metrics, step=info.step, run_id=self.run_id, model_id=model.model_id, dataset=pack)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, info.step)])
        log.info("checkpoint %s recorded as MLflow model %s", path, model.model_id)
        return model.model_id
