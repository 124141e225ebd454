"""MLflow: where runs are recorded. The default is a sqlite database under the run root;
MLFLOW_TRACKING_URI points everything at a server instead.

This is the one place that decides where a run is recorded (`tracking_uri`) and where an
existing record is looked up (`tracking_uri_near`)."""

from __future__ import annotations

import logging
import os

from illada import storage
from illada.config import Config
from illada.errors import UserError

log = logging.getLogger(__name__)

DATABASE = "mlflow.db"  # the default store, under a local run root
ARTIFACTS = "mlartifacts"  # beside it: what MLflow itself stores (model metadata)


def tracking_uri(config: Config) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_local(config.root):
        os.makedirs(config.root, exist_ok=True)
        return f"sqlite:///{os.path.join(config.root, DATABASE)}"
    log.warning("root %s is not local; recording MLflow runs in ./mlflow.db (set MLFLOW_TRACKING_URI for a server)", config.root)
    return "sqlite:///mlflow.db"


def experiment_name(config: Config) -> str:
    return f"illada/{config.name}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps MLflow's own artifacts (model metadata): beside a sqlite
    database rather than ./mlruns in whatever the working directory is; a server decides
    for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///")
    return f"file://{os.path.join(os.path.dirname(os.path.abspath(database)), ARTIFACTS)}"


class TrackingStoreError(UserError):
    """The MLflow store cannot be opened (a damaged database, a server that does not answer)."""


def open_store(config: Config):
    """(an MlflowClient of the config's store, the id of its experiment, created if missing)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment_name(config))
        experiment_id = found.experiment_id if found else client.create_experiment(experiment_name(config), artifact_location=artifact_location(uri))
    except Exception as e:  # whatever the store raised, it could not be used
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingStoreError(
            f"cannot open the MLflow store {uri} ({reason}); move a damaged database aside (a new one is made) "
            "or point MLFLOW_TRACKING_URI at a working store"
        ) from e
    return client, experiment_id


def tracking_uri_near(path: str, explicit: str | None = None) -> str | None:
    """The store holding the record of something at `path` (a checkpoint, a manifest):
    `explicit`, else MLFLOW_TRACKING_URI, else the default database of the run root that
    contains `path` (the nearest mlflow.db above it). None when there is none."""
    if explicit or os.environ.get("MLFLOW_TRACKING_URI"):
        return explicit or os.environ["MLFLOW_TRACKING_URI"]
    if not storage.is_local(path):
        return None
    folder = os.path.abspath(path.removeprefix("file://"))
    while True:
        candidate = os.path.join(folder, DATABASE)
        if os.path.isfile(candidate):
            return f"sqlite:///{candidate}"
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def ui_command(uri: str) -> str:
    """How to open the MLflow UI on a store: a server already serves it."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def ui_link(uri: str, experiment_id: str, model_id: str | None = None) -> str:
    """The UI page of an experiment, or of a LoggedModel in it."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}" + (f"/models/{model_id}" if model_id else "")
