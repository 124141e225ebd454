"""Re-hash the shards and checkpoints a checkpoint depends on; report what changed or vanished.

The reference is what was recorded when they were used: a checkpoint's checksum on its
LoggedModel (its illada.json where MLflow has no record) and a shard set's digest on the
training run that read it (the pack manifest's where MLflow has none). Each file is also
compared with the sha256 its illada.json or manifest lists, to name the file that differs.

An ancestor checkpoint that `train.checkpoint.keep_last` removed once a newer one was saved
beside it is reported as pruned, not as a problem: its record stays in MLflow and in its
children's illada.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from illada import storage
from illada.lineage.graph import CHECKPOINT_MARKER, Lineage, pruned, read_checkpoint_info
from illada.lineage.record import shard_set_digest, shard_sets

OK, CHANGED, VANISHED, PRUNED = "ok", "changed", "vanished", "pruned"
FINE = (OK, PRUNED)  # states that are not problems


@dataclass
class Finding:
    kind: str  # checkpoint | checkpoint file | shard set | shard | released model | released file
    path: str
    state: str  # ok | pruned | changed | vanished
    detail: str = ""


@dataclass
class VerifyReport:
    target: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.state not in FINE]

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    def to_dict(self) -> dict:
        return {"target": self.target, "ok": not self.problems, "findings": [asdict(f) for f in self.findings]}


def checkpoint_digest(files: dict[str, dict]) -> str:
    """The checksum illada.train.checkpoint.files_digest computes (kept in step by a test;
    importing that module would load megatron)."""
    h = hashlib.sha256()
    for name, meta in sorted(files.items()):
        h.update(f"{name}\0{meta['sha256']}\n".encode())
    return h.hexdigest()


def _hashes(urls: list[str], workers: int = 8) -> dict[str, str | None]:
    """sha256 of each file; None for one that is gone."""
    from illada.progress import progress

    with progress(len(urls), "verifying", unit="file") as bar:

        def one(url: str) -> str | None:
            try:
                return storage.sha256_file(url)
            except FileNotFoundError:
                return None
            finally:
                bar.update(1)

        with ThreadPoolExecutor(workers) as pool:
            return dict(zip(urls, pool.map(one, urls)))


def verify(lineage: Lineage) -> VerifyReport:
    report = VerifyReport(lineage.nodes[lineage.root].label)
    for node in lineage.of_kind("checkpoint"):
        report.findings += verify_checkpoint(node.facts["path"], node.facts.get("digest"), ancestor=node.id != lineage.root)
    for node in (n for n in lineage.of_kind("raw") if n.id.startswith("released:")):
        report.findings += verify_released(node.facts["path"], node.detail["files"])
    shard_nodes = lineage.of_kind("shards")
    for node in shard_nodes:
        report.findings += verify_shard_set(node.facts["where"], node.facts["digest"], node.detail.get("files"), node.detail.get("data_root"))
    if not shard_nodes:  # no MLflow record of the shard sets: the pack manifests as they are
        for node in (n for n in lineage.of_kind("stage") if n.label == "pack" and "stats" in n.detail):
            root = node.detail["manifest"].rsplit("/", 2)[0]
            manifest = storage.read_json(node.detail["manifest"])
            for source, files in sorted(shard_sets(manifest).items()):
                report.findings += verify_shard_set(storage.join(root, "pack", "shards", source), shard_set_digest(files), files, root)
    return report


def verify_released(path: str, recorded: dict[str, str]) -> list[Finding]:
    """The files of released weights a checkpoint was imported from, against their hashes then."""
    hashes = _hashes([os.path.join(path, n) for n in sorted(recorded)])
    out = []
    for name, listed in sorted(recorded.items()):
        sha = hashes[os.path.join(path, name)]
        if sha != listed:
            status, why = (VANISHED, "the file is gone") if sha is None else (CHANGED, f"sha256 {sha[:16]}, recorded {listed[:16]}")
            out.append(Finding("released file", os.path.join(path, name), status, why))
    return out or [Finding("released model", path, OK, f"{len(recorded)} files as imported")]


def verify_checkpoint(path: str, recorded_digest: str | None, ancestor: bool = False) -> list[Finding]:
    info = read_checkpoint_info(path)
    if info is None and ancestor and pruned(path):
        return [Finding("checkpoint", path, PRUNED, "removed by train.checkpoint.keep_last after a newer checkpoint was saved beside it")]
    if info is None:
        return [Finding("checkpoint", path, VANISHED, f"no {CHECKPOINT_MARKER} at {path}")]
    names = sorted(info.files)
    hashes = _hashes([os.path.join(path, n) for n in names])
    out, now = [], {}
    for name in names:
        sha = hashes[os.path.join(path, name)]
        listed = info.files[name]["sha256"]
        if sha is None:
            out.append(Finding("checkpoint file", os.path.join(path, name), VANISHED, "the file is gone"))
            continue
        now[name] = {"sha256": sha}
        if sha != listed:
            out.append(Finding("checkpoint file", os.path.join(path, name), CHANGED, f"sha256 {sha[:16]}, recorded {listed[:16]}"))
    reference = recorded_digest or info.digest
    digest = checkpoint_digest(now) if len(now) == len(names) else None
    if digest == reference:
        out.append(Finding("checkpoint", path, OK, f"{len(names)} files, checksum {reference[:16]}"))
    else:
        out.append(Finding("checkpoint", path, CHANGED, f"checksum {(digest or 'incomplete')[:16]}, recorded {reference[:16]}"))
    return out


def verify_shard_set(where: str, recorded_digest: str, files: list[dict] | None, data_root: str | None) -> list[Finding]:
    if files is None or data_root is None:
        return [Finding("shard set", where, VANISHED, "the pack manifest listing these shards is gone")]
    urls = [storage.join(data_root, f["path"]) for f in files]
    hashes = _hashes(urls)
    out, now = [], []
    for f, url in zip(files, urls):
        sha = hashes[url]
        if sha is None:
            out.append(Finding("shard", url, VANISHED, "the file is gone"))
            continue
        now.append({"path": f["path"], "sha256": sha})
        if sha != f["sha256"]:
            out.append(Finding("shard", url, CHANGED, f"sha256 {sha[:16]}, recorded {f['sha256'][:16]}"))
    digest = shard_set_digest(now) if len(now) == len(files) else None
    if digest == recorded_digest:
        out.append(Finding("shard set", where, OK, f"{len(files)} shards, digest {recorded_digest[:16]}"))
    else:
        out.append(Finding("shard set", where, CHANGED, f"digest {(digest or 'incomplete')[:16]}, recorded {recorded_digest[:16]}"))
    return out


def text(report: VerifyReport) -> str:
    checked = f"{report.count('checkpoint')} checkpoint(s) and {report.count('shard set')} shard set(s)"
    lines = [f"verified {checked} that {report.target} depends on"]
    for f in report.findings:
        if f.state not in FINE or f.kind in ("checkpoint", "shard set"):
            lines.append(f"  {f.state.upper():<9}{f.kind:<16}{f.path}  {f.detail}")
    lines.append(f"{len(report.problems)} problem(s)" if report.problems else "everything matches what was recorded")
    return "\n".join(lines) + "\n"


def as_json(report: VerifyReport) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"
