"""The lineage graph: from a checkpoint or an MLflow run back to the raw data.

    checkpoint <- parent checkpoints <- training run <- shards <- pack <- tokenize
        <- tokenizer, decontaminate <- dedup_fuzzy <- dedup_exact <- ingest <- raw sources

Each link is looked up in MLflow first: a checkpoint's LoggedModel (by its path), the run
that made it, the datasets that run read, and for each dataset the stage run whose output
has that digest. Where MLflow has no record (a stage that was skipped in every recorded
run, a store that was lost) the link is followed on storage instead: a checkpoint's
illada.json, a stage's manifest.json and the digests of its inputs. A node says which it
came from (`recorded`), and what no longer matches (`problems`).

The tracking store of a location is the one illada.tracking.tracking_uri_near names: an
explicit URI or MLFLOW_TRACKING_URI, else the mlflow.db of the run root holding it, so a
chain across run roots with the default sqlite stores is followed store by store.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from illada import layout, storage
from illada.lineage.record import (
    CHECKPOINT_URI,
    FULL_DIGEST,
    INPUT,
    KIND,
    OUTPUT,
    PACK_DATASET,
    SHARDS_PREFIX,
    SOURCE,
    TRAINING,
    shard_set_digest,
    shard_sets,
    short,
)
from illada.errors import UserError
from illada.layout import CHECKPOINT_MARKER, STEP_DIR, CheckpointInfo, checkpoint_info, complete_checkpoints, is_complete_checkpoint, resolve_checkpoint
from illada.tracking import tracking_uri_near

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
STAGE_ORDER = ("ingest", "filter", "dedup_exact", "dedup_fuzzy", "decontaminate", "tokenizer", "tokenize", "pack")
SUMMARY = (
    "documents", "quarantined", "documents_in", "filtered", "duplicates", "near_duplicates", "contaminated",
    "documents_out", "disabled", "vocab_size", "tokens", "sequences", "seq_len",
)  # fmt: skip


class LineageError(UserError):
    """Lineage cannot be built; the message says what was missing and what to pass."""


@dataclass
class Node:
    id: str
    kind: str  # checkpoint | training_run | shards | stage | raw | pipeline_run
    label: str
    facts: dict[str, Any] = field(default_factory=dict)  # what `show` prints, in order
    detail: dict[str, Any] = field(default_factory=dict)  # more, for JSON: full stats, paths
    recorded: str = "storage"  # "mlflow" when a tracking store holds its record
    problems: list[str] = field(default_factory=list)


@dataclass
class Edge:
    child: str
    parent: str
    relation: str  # trained by, resumed from, initialised from, read, packed by, input, ...


@dataclass
class Lineage:
    root: str = ""
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def add(self, node: Node) -> Node:
        return self.nodes.setdefault(node.id, node)

    def link(self, child: str, parent: str, relation: str) -> None:
        if not any(e.child == child and e.parent == parent for e in self.edges):
            self.edges.append(Edge(child, parent, relation))

    def parents(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.child == node_id]

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def to_dict(self) -> dict:
        nodes = [{"id": n.id, "kind": n.kind, "label": n.label, "recorded": n.recorded, "facts": n.facts, "detail": n.detail, "problems": n.problems} for n in self.nodes.values()]
        return {"root": self.root, "nodes": nodes, "edges": [e.__dict__ for e in self.edges]}


# --- where records are ------------------------------------------------------------------------


class Stores:
    """The MLflow tracking stores records are looked up in, one client per URI."""

    def __init__(self, explicit_uri: str | None = None):
        self.explicit = explicit_uri
        self._clients: dict[str, Any] = {}
        self._experiments: dict[str, list[str]] = {}

    def near(self, location: str):
        """(uri, client) of the store for something at `location`, or None."""
        uri = tracking_uri_near(location, self.explicit)
        return (uri, self.client(uri)) if uri else None

    def client(self, uri: str):
        if uri not in self._clients:
            self._clients[uri] = open_store(uri)
        return self._clients[uri]

    def experiments(self, uri: str) -> list[str]:
        if uri not in self._experiments:
            self._experiments[uri] = [e.experiment_id for e in self.client(uri).search_experiments()]
        return self._experiments[uri]

    def checkpoint_model(self, path: str):
        """(uri, client, LoggedModel) recorded for the checkpoint at `path`, newest first."""
        found = self.near(path)
        if found is None:
            return None
        uri, client = found
        quoted = path.replace("'", "\\'")
        models = client.search_logged_models(self.experiments(uri), filter_string=f"tags.`{CHECKPOINT_URI}` = '{quoted}'")
        models = sorted(models, key=lambda m: m.creation_timestamp, reverse=True)
        return (uri, client, models[0]) if models else None

    def producing_run(self, location: str, digest: str):
        """(uri, client, Run) of the newest stage run whose output dataset has `digest`."""
        found = self.near(location)
        if found is None:
            return None
        uri, client = found
        runs = client.search_runs(
            self.experiments(uri), filter_string=f"dataset.digest = '{short(digest)}' AND tags.`{KIND}` = 'stage'", order_by=["attributes.start_time DESC"]
        )
        for run in runs:
            if any(d["digest"] == short(digest) and d["context"] == OUTPUT for d in datasets_of(run)):
                return uri, client, run
        return None


def open_store(uri: str):
    """A client of an existing, readable tracking store. MLflow would create an empty sqlite
    database at a mistyped path (and find nothing in it); a damaged one fails deep in
    SQLAlchemy. Both become one LineageError naming the store."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        database = uri.removeprefix("sqlite:///")
        if not os.path.isfile(database):
            raise LineageError(f"no MLflow database at {database} ({uri}); check --tracking-uri or MLFLOW_TRACKING_URI")
    try:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001  (whatever the store's driver raises)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LineageError(f"cannot read the MLflow store {uri}: {first_line}") from None
    return client


def datasets_of(run) -> list[dict]:
    """A run's dataset inputs as plain dicts: name, digest (full where recorded), source (where
    this run used it), context."""
    out = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        tags = {t.key: t.value for t in item.tags}
        source = tags.get(SOURCE) or json.loads(item.dataset.source).get("uri", item.dataset.source)
        out.append({"name": item.dataset.name, "digest": item.dataset.digest, "full_digest": tags.get(FULL_DIGEST, item.dataset.digest), "source": source, "context": tags.get("mlflow.data.context")})
    return out


# --- building ---------------------------------------------------------------------------------


def build(target: str, tracking_uri: str | None = None) -> Lineage:
    """The lineage of a checkpoint (a step directory, a checkpoint folder or a run root: its
    latest checkpoint), an MLflow run id, or a LoggedModel id (m-...)."""
    builder = Builder(Stores(tracking_uri))
    if not os.path.exists(target) and (RUN_ID.match(target) or target.startswith(("m-", "models:/"))):
        builder.lineage.root = builder.recorded(target)
    else:
        builder.lineage.root = builder.checkpoint(resolve_checkpoint(target), asked=True)
    return builder.lineage


def pruned(path: str) -> bool:
    """Whether a checkpoint directory that is gone looks removed by keep_last: a newer
    complete checkpoint is in the same folder (and training did not move it aside as
    damaged: <step>.damaged)."""
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.exists(path) or os.path.exists(f"{path}.damaged") or not STEP_DIR.match(name):
        return False
    return any(os.path.basename(newer) > name for newer in complete_checkpoints(folder))


def read_checkpoint_info(path: str) -> CheckpointInfo | None:
    return checkpoint_info(path) if is_complete_checkpoint(path) else None


def read_json_if_exists(url: str) -> dict | None:
    try:
        return storage.read_json(url) if storage.exists(url) else None
    except (OSError, ValueError):
        return None


def summary(stats: dict) -> dict:
    out = {k: stats[k] for k in SUMMARY if k in stats}
    if "benchmarks" in stats:  # decontaminate: what each evaluation set took out
        verb = "flagged" if stats.get("action") == "flag" else "removed"
        out[f"{verb} per benchmark"] = {name: f"{b['documents']} docs / {b['words']} words" for name, b in stats["benchmarks"].items()}
    if stats.get("contaminated_tokens"):  # tokenize: the same documents in tokens
        out["tokens of decontaminated documents per benchmark"] = stats["contaminated_tokens"]
    return out


class Builder:
    def __init__(self, stores: Stores):
        self.stores = stores
        self.lineage = Lineage()

    # checkpoints ---------------------------------------------------------------------------

    def checkpoint(self, path: str, asked: bool = False) -> str:
        """A checkpoint and what it came from; `asked`: the one the audit started from."""
        path = os.path.abspath(path)
        node_id = f"checkpoint:{path}"
        if node_id in self.lineage.nodes:
            return node_id
        info = read_checkpoint_info(path)
        record = self.stores.checkpoint_model(path)
        if info is None and record is None and asked:
            raise LineageError(f"checkpoint {path} has no {CHECKPOINT_MARKER} and no MLflow record; check the path")
        node = self.lineage.add(Node(node_id, "checkpoint", f"checkpoint {os.path.basename(path)}"))
        node.detail["path"] = path
        params = record[2].params if record else {}
        tokens = (info and info.tokens_per_source) or {k.removeprefix("tokens."): int(v) for k, v in params.items() if k.startswith("tokens.")}
        node.facts = {
            "path": path,
            "step": info.step if info else params.get("step"),
            "digest": params.get("digest") or (info and info.digest),
            "tokens": sum(tokens.values()),
            "tokens per source": tokens,
        }
        if record:
            uri, _, model = record
            node.recorded = "mlflow"
            node.facts |= {"model": model.model_id, "run": model.source_run_id}
            node.detail |= {"tracking_uri": uri, "experiment_id": model.experiment_id}
        if not info and not asked and pruned(path):
            node.facts["pruned"] = "removed by keep_last after a newer checkpoint was saved" + ("" if record else "; MLflow has no record of it")
        elif not info:
            node.problems.append("vanished: the checkpoint directory or its illada.json is gone" + ("" if record else ", and MLflow has no record of it"))
        elif record and params.get("digest") and params["digest"] != info.digest:
            node.problems.append(f"changed: illada.json says digest {info.digest}, MLflow recorded {params['digest']}")

        parent = params.get("parent") or (info and info.parent) or None
        if parent:
            same_folder = os.path.dirname(os.path.abspath(parent)) == os.path.dirname(path)
            self.lineage.link(node_id, self.checkpoint(parent), "resumed from" if same_folder else "initialised from")
        if record:
            uri, client, model = record
            self.lineage.link(node_id, self.training_run(uri, client, model.source_run_id), "trained by")
        elif info and info.data_root:  # no MLflow record: the data it names, as it is now
            pack_url = layout.manifest_url(info.data_root, "pack")
            manifest = read_json_if_exists(pack_url)
            if manifest:
                self.lineage.link(node_id, self.stage(pack_url, manifest["digest"], "pack"), "trained on")
        if info and info.source:  # imported from released weights (illada import hf)
            self.lineage.link(node_id, self.released_model(info.source), "converted from")
        return node_id

    def released_model(self, source: dict) -> str:
        """Weights from outside (a Hugging Face directory), as recorded at import: its files' hashes."""
        node = self.lineage.add(Node(f"released:{source['path']}", "raw", f"{source['format']} {os.path.basename(source['path'])}"))
        node.facts = {"path": source["path"], "format": source["format"], "dtype": source.get("dtype"), "files": len(source.get("files", {}))}
        node.detail["files"] = source.get("files", {})
        return node.id

    # training runs -------------------------------------------------------------------------

    def training_run(self, uri: str, client, run_id: str) -> str:
        node_id = f"run:{run_id}"
        if node_id in self.lineage.nodes:
            return node_id
        run = client.get_run(run_id)
        params, tags = run.data.params, run.data.tags
        mix = {k.removeprefix("mix."): float(v) for k, v in params.items() if k.startswith("mix.")}
        node = self.lineage.add(Node(node_id, "training_run", f"training run {run.info.run_name}", recorded="mlflow"))
        node.facts = {"run": run_id, "status": run.info.status, **_code_facts(tags), "mix": mix}
        node.facts |= {k: params[k] for k in ("steps", "global_batch_size", "world_size") if k in params}
        if params.get("parent"):
            node.facts["parent"] = f"{params['parent']} ({params.get('parent_relation') or 'loaded'})"
        node.detail |= {"tracking_uri": uri, "experiment_id": run.info.experiment_id, "params": dict(params)}
        read = [d for d in datasets_of(run) if d["context"] == TRAINING]
        pack = next((d for d in read if d["name"] == PACK_DATASET), None)
        pack_id = self.stage(pack["source"], pack["full_digest"], "pack") if pack else None
        manifest = read_json_if_exists(pack["source"]) if pack else None
        sets = shard_sets(manifest) if manifest else {}
        for d in (d for d in read if d["name"].startswith(SHARDS_PREFIX)):
            shards_id = self.shards(d, sets.get(d["name"].removeprefix(SHARDS_PREFIX)), pack["source"].rsplit("/", 2)[0] if pack else None)
            self.lineage.link(node_id, shards_id, "read")
            if pack_id:
                self.lineage.link(shards_id, pack_id, "packed by")
        if pack_id and not any(d["name"].startswith(SHARDS_PREFIX) for d in read):
            self.lineage.link(node_id, pack_id, "read")
        return node_id

    def shards(self, dataset: dict, files: list[dict] | None, data_root: str | None) -> str:
        """A source's shard set as a training run read it (files: as its pack manifest lists them now).
        One node per place it was read from: a copy of a data root holds the same digest, and
        verify must hash every copy a run actually read."""
        source = dataset["name"].removeprefix(SHARDS_PREFIX)
        node_id = f"shards:{source}:{dataset['digest']}:{dataset['source']}"
        node = self.lineage.add(Node(node_id, "shards", f"shards {source}", recorded="mlflow"))
        node.facts = {"where": dataset["source"], "digest": dataset["full_digest"]}
        node.detail["data_root"] = data_root
        if files is None:
            node.problems.append("vanished: the pack manifest that lists these shards is gone")
            return node_id
        node.facts |= {"shards": len(files), "sequences": sum(f.get("sequences", 0) for f in files), "tokens": sum(f.get("tokens", 0) for f in files)}
        node.detail["files"] = files
        if shard_set_digest(files) != dataset["full_digest"]:
            node.problems.append("changed: the pack manifest now lists other shards than were read")
        return node_id

    # pipeline stages -----------------------------------------------------------------------

    def stage(self, manifest_url: str, digest: str, name: str) -> str:
        """A stage's output by the digest it had when it was used."""
        node_id = f"stage:{name}:{short(digest)}"
        if node_id in self.lineage.nodes:
            return node_id
        node = self.lineage.add(Node(node_id, "stage", name))
        node.facts = {"digest": digest}
        node.detail["manifest"] = manifest_url
        manifest = read_json_if_exists(manifest_url)
        if manifest is None:
            node.problems.append(f"vanished: {manifest_url} is gone")
        elif manifest["digest"] != digest:
            node.problems.append(f"changed: {manifest_url} now has digest {manifest['digest'][:16]} (the stage was re-run since)")
            manifest = None
        record = self.stores.producing_run(manifest_url, digest)
        if record:
            uri, _, run = record
            node.recorded = "mlflow"
            node.facts |= {"run": run.info.run_id, "pipeline run": run.data.tags.get("mlflow.parentRunId"), **_code_facts(run.data.tags)}
            node.detail |= {"tracking_uri": uri, "experiment_id": run.info.experiment_id}
        if manifest is not None:
            node.facts |= summary(manifest["stats"])
            node.detail["stats"] = manifest["stats"]
        elif record:
            node.facts |= {k: v for k, v in record[2].data.metrics.items() if k in SUMMARY}
        for up_name, up_url, up_digest in self._stage_inputs(manifest_url, manifest, record):
            self.lineage.link(node_id, self.stage(up_url, up_digest, up_name), "input")
        if name == "ingest":
            self._raw_sources(node_id, manifest_url, manifest, record)
        return node_id

    def _stage_inputs(self, manifest_url: str, manifest: dict | None, record) -> list[tuple[str, str, str]]:
        if record:
            return [(d["name"], d["source"], d["full_digest"]) for d in datasets_of(record[2]) if d["context"] == INPUT]
        if manifest:
            root = manifest_url.rsplit("/", 2)[0]
            return [(n, layout.manifest_url(root, n), d) for n, d in manifest.get("inputs", {}).items()]
        return []

    def _raw_sources(self, ingest_id: str, manifest_url: str, manifest: dict | None, record) -> None:
        sources = _sources_from_params(record[2].data.params) if record else []
        if not sources:
            config = storage.join(manifest_url.rsplit("/", 1)[0], "config.yaml")
            if storage.exists(config):
                sources = ((yaml.safe_load(storage.read_bytes(config)) or {}).get("data") or {}).get("sources") or []
        stats = (manifest or {}).get("stats", {}).get("sources", {})
        for source in sources:
            name = source["name"]
            node = self.lineage.add(Node(f"raw:{name}:{ingest_id}", "raw", f"raw {name}", recorded="mlflow" if record else "storage"))
            node.facts = {"paths": source.get("paths", []), "weight": source.get("weight")}
            node.facts |= {k: v for k, v in stats.get(name, {}).items() if k in ("records", "documents", "quarantined")}
            self.lineage.link(ingest_id, node.id, "read")

    # a run or model id as the starting point -----------------------------------------------

    def recorded(self, target: str) -> str:
        if not self.stores.explicit and not os.environ.get("MLFLOW_TRACKING_URI"):
            raise LineageError(f"{target} is an MLflow id: say which store holds it with --tracking-uri (e.g. sqlite:///<root>/mlflow.db) or MLFLOW_TRACKING_URI")
        uri = self.stores.explicit or os.environ["MLFLOW_TRACKING_URI"]
        client = self.stores.client(uri)
        if not RUN_ID.match(target):
            model = client.get_logged_model(target.removeprefix("models:/"))
            return self.checkpoint(model.tags.get(CHECKPOINT_URI) or model.params["uri"], asked=True)
        run = client.get_run(target)
        kind = run.data.tags.get(KIND)
        if kind == "train":
            node_id = self.training_run(uri, client, target)
            parent = run.data.params.get("parent")
            if parent:
                self.lineage.link(node_id, self.checkpoint(parent), f"started from ({run.data.params.get('parent_relation') or 'loaded'})")
            return node_id
        if kind == "stage":
            out = next(d for d in datasets_of(run) if d["context"] == OUTPUT)
            return self.stage(out["source"], out["full_digest"], out["name"])
        if kind == "pipeline":
            return self.pipeline_run(uri, client, run)
        raise LineageError(f"run {target} is not an illada pipeline, stage or training run (its {KIND} tag is {kind!r})")

    def pipeline_run(self, uri: str, client, run) -> str:
        node_id = f"run:{run.info.run_id}"
        node = self.lineage.add(Node(node_id, "pipeline_run", f"pipeline run {run.info.run_name}", recorded="mlflow"))
        node.facts = {"run": run.info.run_id, "status": run.info.status, **_code_facts(run.data.tags)}
        node.facts |= {"stages": {k.removeprefix("illada.stage."): v for k, v in run.data.tags.items() if k.startswith("illada.stage.")}}
        children = client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        outputs = [d for child in children for d in datasets_of(child) if d["context"] == OUTPUT]
        outputs += [d for d in datasets_of(run) if d["context"] == "reused"]
        for d in sorted(outputs, key=lambda d: -STAGE_ORDER.index(d["name"]) if d["name"] in STAGE_ORDER else 0):
            self.lineage.link(node_id, self.stage(d["source"], d["full_digest"], d["name"]), "ran" if d["context"] == OUTPUT else "reused")
        return node_id


def _code_facts(tags: dict) -> dict:
    from illada.lineage.record import GIT_COMMIT, GIT_DIRTY, RAY_JOB, RAY_SUBMISSION

    out = {}
    if GIT_COMMIT in tags:
        out["git"] = tags[GIT_COMMIT][:12] + (" (dirty)" if tags.get(GIT_DIRTY) == "true" else "")
    if RAY_SUBMISSION in tags or RAY_JOB in tags:
        out["ray job"] = tags.get(RAY_SUBMISSION) or tags.get(RAY_JOB)
    return out


def _sources_from_params(params: dict) -> list[dict]:
    """data.sources.<i>.name / .weight / .paths.<j> params back into source dicts."""
    sources: dict[int, dict] = {}
    for key, value in params.items():
        m = re.match(r"^data\.sources\.(\d+)\.(name|weight|paths\.\d+)$", key)
        if m:
            s = sources.setdefault(int(m.group(1)), {"paths": []})
            if m.group(2).startswith("paths."):
                s["paths"].append((int(m.group(2).split(".")[1]), value))
            else:
                s[m.group(2)] = float(value) if m.group(2) == "weight" else value
    out = []
    for _, s in sorted(sources.items()):
        s["paths"] = [p for _, p in sorted(s["paths"])]
        out.append(s)
    return out
