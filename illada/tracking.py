"""MLflow: where runs are recorded. The default is a sqlite database under the run root;
MLFLOW_TRACKING_URI points everything at a server instead."""

from __future__ import annotations

import logging
import os

from illada import storage
from illada.config import Config

log = logging.getLogger(__name__)


def tracking_uri(config: Config) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_local(config.root):
        os.makedirs(config.root, exist_ok=True)
        return f"sqlite:///{os.path.join(config.root, 'mlflow.db')}"
    log.warning("root %s is not local; recording MLflow runs in ./mlflow.db (set MLFLOW_TRACKING_URI for a server)", config.root)
    return "sqlite:///mlflow.db"


def experiment_name(config: Config) -> str:
    return f"illada/{config.name}"
