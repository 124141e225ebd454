"""Tokens a checkpoint has consumed per source, against the mix its run was told to follow.

A checkpoint's own count runs from the start of its training (resumed runs continue it);
tokens seen by a checkpoint it was initialised from are reported beside it as inherited,
so "seen in all" is everything the weights have been trained on. Beside each source: the
documents the filter stage dropped from the data it trained on, by filter. Below the mix:
what the decontaminate stage of its data took out (or flagged), per benchmark.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from illada.lineage.graph import Lineage, LineageError


@dataclass
class MixRow:
    source: str
    target: float  # the run's normalised weight (0 when the run did not list the source)
    tokens: int  # consumed by this checkpoint's training, resumes included
    share: float  # tokens / all its tokens
    inherited: int = 0  # through initialised-from checkpoints
    filtered: dict[str, int] = field(default_factory=dict)  # documents dropped by each filter (the filter stage)

    @property
    def seen(self) -> int:
        return self.tokens + self.inherited


@dataclass
class MixReport:
    checkpoint: str
    step: int | None
    rows: list[MixRow] = field(default_factory=list)
    inherited_from: list[str] = field(default_factory=list)
    decontamination: dict = field(default_factory=dict)  # {action, ngram, benchmarks: {name: {documents, words, tokens}}}

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rows)

    def to_dict(self) -> dict:
        rows = [asdict(r) | {"seen": r.seen} for r in self.rows]
        return {
            "checkpoint": self.checkpoint,
            "step": self.step,
            "tokens": self.tokens,
            "inherited_from": self.inherited_from,
            "rows": rows,
            "decontamination": self.decontamination,
        }


def mix_report(lineage: Lineage) -> MixReport:
    root = lineage.nodes[lineage.root]
    if root.kind != "checkpoint":
        raise LineageError(f"`lineage mix` needs a checkpoint; {root.label} is a {root.kind.replace('_', ' ')}")
    tokens = root.facts.get("tokens per source") or {}
    target = _target_mix(lineage, lineage.root)
    inherited, ancestors = _inherited(lineage, lineage.root)
    total = sum(tokens.values()) or 1
    filtered = _filtered(lineage, lineage.root)
    names = sorted(set(tokens) | set(target) | set(inherited))
    rows = [MixRow(n, target.get(n, 0.0), int(tokens.get(n, 0)), tokens.get(n, 0) / total, int(inherited.get(n, 0)), filtered.get(n, {})) for n in names]
    return MixReport(root.facts.get("path", root.label), root.facts.get("step"), rows, ancestors, _decontamination(lineage))


def _decontamination(lineage: Lineage) -> dict:
    """The decontaminate stage of the data this checkpoint trained on (not through other
    checkpoints): its action and per-benchmark counts as its manifest recorded them, with
    the tokens of those documents that the tokenize stage counted."""
    seen, todo, tokens = {lineage.root}, [lineage.root], None
    while todo:
        for edge in lineage.parents(todo.pop()):
            node = lineage.nodes[edge.parent]
            if edge.parent in seen or node.kind == "checkpoint":
                continue
            seen.add(edge.parent)
            todo.append(edge.parent)
            stats = node.detail.get("stats") or {}
            if node.kind == "stage" and node.label == "tokenize":
                tokens = stats.get("contaminated_tokens")  # None from a run before it was counted
            if node.kind == "stage" and node.label == "decontaminate" and "benchmarks" in stats:
                benchmarks = stats["benchmarks"]
                if tokens is not None:
                    benchmarks = {name: b | {"tokens": tokens.get(name, 0)} for name, b in benchmarks.items()}
                return {"action": stats.get("action"), "ngram": stats.get("ngram"), "benchmarks": benchmarks}
    return {}


def _target_mix(lineage: Lineage, checkpoint_id: str) -> dict[str, float]:
    for edge in lineage.parents(checkpoint_id):
        if edge.relation == "trained by":
            return lineage.nodes[edge.parent].facts.get("mix") or {}
    # No MLflow record: the data it trained on carries the mix the pack stage was given.
    for edge in lineage.parents(checkpoint_id):
        if edge.relation == "trained on":
            return lineage.nodes[edge.parent].detail.get("stats", {}).get("mix", {})
    return {}


def _filtered(lineage: Lineage, checkpoint_id: str) -> dict[str, dict[str, int]]:
    """Per source, the documents each filter dropped, from the filter stage upstream of the
    data this checkpoint's own run trained on (not of checkpoints it started from)."""
    queue = [e.parent for e in lineage.parents(checkpoint_id) if e.relation in ("trained by", "trained on")]
    seen: set[str] = set()
    while queue:
        node_id = queue.pop(0)
        if node_id in seen:
            continue
        seen.add(node_id)
        node = lineage.nodes[node_id]
        if node.kind == "stage" and node.label == "filter":
            sources = node.detail.get("stats", {}).get("sources", {})
            return {name: dict(s.get("by_filter", {})) for name, s in sources.items()}
        queue += [e.parent for e in lineage.parents(node_id) if e.relation not in ("initialised from", "resumed from")]
    return {}


def _inherited(lineage: Lineage, checkpoint_id: str) -> tuple[dict[str, int], list[str]]:
    """Tokens of the checkpoints this one was initialised from (their own inheritance too).
    A resumed-from parent's tokens are already in the child's count."""
    out: dict[str, int] = {}
    ancestors: list[str] = []
    node_id = checkpoint_id
    while True:
        parent = next((e.parent for e in lineage.parents(node_id) if e.relation in ("initialised from", "resumed from")), None)
        if parent is None:
            return out, ancestors
        relation = next(e.relation for e in lineage.parents(node_id) if e.parent == parent)
        if relation == "initialised from":
            ancestors.append(lineage.nodes[parent].facts.get("path", parent))
            for name, n in (lineage.nodes[parent].facts.get("tokens per source") or {}).items():
                out[name] = out.get(name, 0) + int(n)
        node_id = parent


def table(report: MixReport) -> str:
    lines = [f"tokens consumed by {report.checkpoint} (step {report.step})", ""]
    lines.append(f"{'source':<20}{'target':>8}{'tokens':>14}{'share':>8}{'vs target':>11}{'inherited':>12}{'seen in all':>13}")
    for r in report.rows:
        lines.append(f"{r.source:<20}{r.target:>8.3f}{r.tokens:>14,}{r.share:>8.3f}{r.share - r.target:>+11.3f}{r.inherited:>12,}{r.seen:>13,}")
    inherited = sum(r.inherited for r in report.rows)
    lines.append(f"{'total':<20}{'':>8}{report.tokens:>14,}{'':>8}{'':>11}{inherited:>12,}{report.tokens + inherited:>13,}")
    if report.inherited_from:
        lines += ["", "inherited through initialisation from: " + " <- ".join(report.inherited_from)]
    filtered = [r for r in report.rows if r.filtered]
    if filtered:
        lines += ["", "documents dropped by the filter stage:"]
        lines += [f"  {r.source:<18}{sum(r.filtered.values()):>8,}  " + ", ".join(f"{k} {v:,}" for k, v in sorted(r.filtered.items())) for r in filtered]
    if report.decontamination:
        d = report.decontamination
        verb = "flagged" if d["action"] == "flag" else "removed"
        lines += ["", f"{verb} by decontamination ({d['ngram']}-word n-grams shared with evaluation sets), before tokenization:"]
        lines.append(f"{'benchmark':<20}{'documents':>12}{'words':>14}{'tokens':>14}")
        for name, b in d["benchmarks"].items():
            tokens = f"{b['tokens']:,}" if "tokens" in b else "-"
            lines.append(f"{name:<20}{b['documents']:>12,}{b['words']:>14,}{tokens:>14}")
    return "\n".join(lines) + "\n"


def as_json(report: MixReport) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def plot(report: MixReport, path: str) -> str:
    """Bars per source: target share and consumed share; PNG or SVG by extension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if os.path.splitext(path)[1].lower() not in (".png", ".svg"):
        raise ValueError(f"plot {path}: give a .png or .svg file name")
    names = [r.source for r in report.rows]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(names) + 2), 3.6))
    ax.bar([x - 0.2 for x in xs], [r.target for r in report.rows], 0.4, label="target", color="#bbbbbb")
    bars = ax.bar([x + 0.2 for x in xs], [r.share for r in report.rows], 0.4, label="consumed", color="#2a9d8f")
    for bar, r in zip(bars, report.rows):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r.tokens:,}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("share of tokens")
    ax.set_title(f"{os.path.basename(report.checkpoint)}: {report.tokens:,} tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
