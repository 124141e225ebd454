"""Training metrics: loss, learning rate, gradient norm, tokens/s and MFU, to the log and MLflow.

MFU counts the FLOPs of a bidirectional model: every token attends to every other, so
attention costs twice what a causal model's does (SPEC §5).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from illada.config import Config
from illada.model.config import ModelConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per GPU, by device name.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (forward 2, backward 4), plus full
    (non-causal) attention: QK^T and AV each 2 s h per layer forward, x3 with backward."""
    h, kv = model.hidden_size, model.num_query_groups * model.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * model.ffn_hidden_size
    matmul_params = model.num_layers * per_layer + model.vocab_size * h  # the tied LM head is a matmul
    return 6 * matmul_params + 12 * model.num_layers * seq_len * h


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class MetricsLogger:
    """Logs every `log_interval` steps on global rank 0; MLflow gets every step's metrics and,
    through illada.lineage, the run's data, its parent checkpoint and each checkpoint."""

    def __init__(
        self,
        config: Config,
        flops_per_token: float,
        peak_flops_per_gpu: float | None,
        *,
        data_manifest: dict | None = None,
        mix: dict[str, float] | None = None,
        parent: str | None = None,
    ):
        self.interval = config.train.log_interval
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_gpu
        self.world = dist.get_world_size()
        self.rank0 = dist.get_rank() == 0
        self.mlflow_run = None
        self.lineage = None
        if self.rank0:
            import mlflow

            from illada.lineage.training import TrainingRecorder
            from illada.tracking import open_store, tracking_uri

            _, experiment_id = open_store(config)
            mlflow.set_tracking_uri(tracking_uri(config))
            mlflow.set_experiment(experiment_id=experiment_id)
            self.mlflow_run = mlflow.start_run(run_name=f"{config.name}-train")
            mlflow.log_params({"steps": config.train.steps, "global_batch_size": config.train.global_batch_size, "tp": config.train.parallel.tensor, "pp": config.train.parallel.pipeline, "world_size": self.world})
            if data_manifest is not None:
                run_id = self.mlflow_run.info.run_id
                self.lineage = TrainingRecorder(config, run_id, experiment_id, data_manifest, mix or data_manifest["stats"]["mix"], parent)
                self.lineage.log_start()

    def log_step(self, step: int, loss: float, lr: float, grad_norm, tokens: int, seconds: float, tokens_per_source: dict) -> None:
        if not self.rank0:
            return
        import mlflow

        tokens_per_s = tokens / seconds
        metrics = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.peak:
            metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world)
        metrics.update({f"tokens/{k}": v for k, v in tokens_per_source.items()})
        mlflow.log_metrics(metrics, step=step)
        if step % self.interval == 0 or step == 1:
            mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
            gn = f" grad_norm {metrics['grad_norm']:.3f}" if "grad_norm" in metrics else ""
            log.info("step %d loss %.4f lr %.2e%s tokens/s %.0f%s", step, loss, lr, gn, tokens_per_s, mfu)

    def log_checkpoint(self, path: str) -> None:
        """Record a complete checkpoint (its illada.json says what it holds) as an MLflow
        LoggedModel pointing at it."""
        if self.rank0:
            import mlflow

            mlflow.set_tag("last_checkpoint", path)
            if self.lineage is not None:
                self.lineage.log_checkpoint(path)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run as FINISHED, FAILED or KILLED."""
        if self.lineage is not None:
            self.lineage.close()  # the checkpoint records still being written
        if self.mlflow_run is not None:
            import mlflow

            mlflow.end_run(status)
            self.mlflow_run = None
