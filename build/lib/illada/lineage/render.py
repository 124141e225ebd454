"""The lineage graph as text (a tree), JSON, Mermaid, or a picture (PNG or SVG).

The tree starts at the checkpoint or run asked about and descends through what it came
from; a node reached a second time is named, not repeated.
"""

from __future__ import annotations

import json
import os

from illada.lineage.graph import Lineage, Node

DIGEST_SHOWN = 16  # hex digits of a digest in text; JSON has them whole
WIDTH = 100  # facts are wrapped at this many characters
COLORS = {"checkpoint": "#f4a261", "training_run": "#e9c46a", "pipeline_run": "#e9c46a", "shards": "#8ab17d", "stage": "#2a9d8f", "raw": "#bcd4e6"}


def fact_text(key: str, value) -> str:
    if isinstance(value, dict):
        value = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()) or "-"
    elif isinstance(value, list):
        value = ", ".join(map(str, value)) or "-"
    elif key == "digest" and isinstance(value, str):
        value = value[:DIGEST_SHOWN]
    return f"{key}: {value}"


def text(lineage: Lineage) -> str:
    lines: list[str] = []
    _tree(lineage, lineage.root, "", None, True, set(), lines)
    problems = [(n, p) for n in lineage.nodes.values() for p in n.problems]
    if problems:
        lines += ["", f"{len(problems)} problem(s):"] + [f"  {n.label}: {p}" for n, p in problems]
    return "\n".join(lines) + "\n"


def _tree(lineage: Lineage, node_id: str, prefix: str, relation: str | None, last: bool, seen: set, out: list[str]) -> None:
    node = lineage.nodes[node_id]
    branch = "" if relation is None else ("└── " if last else "├── ")
    header = node.label if relation is None else f"{relation}: {node.label}"
    if node_id in seen:
        out.append(f"{prefix}{branch}{header}  (shown above)")
        return
    seen.add(node_id)
    out.append(f"{prefix}{branch}{header}  [{node.recorded}]" + ("  !! " + "; ".join(node.problems) if node.problems else ""))
    inner = prefix + ("" if relation is None else ("    " if last else "│   "))
    edges = lineage.parents(node_id)
    rail = "│   " if edges else "    "
    for line in _wrap([fact_text(k, v) for k, v in node.facts.items() if v not in (None, "", {})]):
        out.append(f"{inner}{rail}{line}")
    for i, edge in enumerate(edges):
        _tree(lineage, edge.parent, inner, edge.relation, i == len(edges) - 1, seen, out)


def _wrap(pieces: list[str], width: int = WIDTH) -> list[str]:
    lines, line = [], ""
    for piece in pieces:
        if line and len(line) + 3 + len(piece) > width:
            lines.append(line)
            line = ""
        line = f"{line} · {piece}" if line else piece
    return lines + ([line] if line else [])


def as_json(lineage: Lineage) -> str:
    return json.dumps(lineage.to_dict(), indent=2, default=str) + "\n"


def mermaid(lineage: Lineage) -> str:
    ids = {node_id: f"n{i}" for i, node_id in enumerate(lineage.nodes)}
    lines = ["flowchart TD"]
    for node_id, node in lineage.nodes.items():
        label = "<br/>".join([node.label, *_brief(node)]).replace('"', "'")
        lines.append(f'    {ids[node_id]}["{label}"]:::{node.kind}')
    for e in lineage.edges:
        lines.append(f"    {ids[e.child]} -->|{e.relation}| {ids[e.parent]}")
    for kind, color in COLORS.items():
        lines.append(f"    classDef {kind} fill:{color},stroke:#333")
    return "\n".join(lines) + "\n"


def _brief(node: Node) -> list[str]:
    """A line or two of the node's facts for a box in a picture."""
    keys = {"checkpoint": ("step", "tokens", "digest"), "training_run": ("run", "mix"), "shards": ("shards", "tokens"), "raw": ("records",)}
    chosen = keys.get(node.kind) or [k for k in node.facts if k not in ("run", "pipeline run", "git", "ray job")][:3]
    out = [fact_text(k, node.facts[k]) for k in chosen if node.facts.get(k) not in (None, "", {})]
    if node.kind == "training_run" and "run" in node.facts:
        out[0] = f"run: {node.facts['run'][:12]}"
    return out + (["!! " + node.problems[0][:40]] if node.problems else [])


def layers(lineage: Lineage) -> list[list[str]]:
    """Nodes by depth: the longest path from the root, so sources sit at the bottom."""
    depth = {lineage.root: 0}
    changed = True
    while changed:
        changed = False
        for e in lineage.edges:
            if e.child in depth and depth.get(e.parent, -1) < depth[e.child] + 1 <= len(lineage.nodes):
                depth[e.parent] = depth[e.child] + 1
                changed = True
    out: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for node_id in lineage.nodes:
        if node_id in depth:
            out[depth[node_id]].append(node_id)
    return out


def picture(lineage: Lineage, path: str) -> str:
    """Draw the graph top (the checkpoint) to bottom (raw data); PNG or SVG by extension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    if os.path.splitext(path)[1].lower() not in (".png", ".svg"):
        raise ValueError(f"picture {path}: give a .png or .svg file name")
    rows = layers(lineage)
    width = max(len(r) for r in rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 3.4 * width), 1.45 * len(rows) + 0.6))
    pos = {}
    for y, row in enumerate(rows):
        for x, node_id in enumerate(row):
            pos[node_id] = ((x + 0.5) * width / len(row), -y)
    for e in lineage.edges:
        (x0, y0), (x1, y1) = pos[e.child], pos[e.parent]
        if y0 - y1 < 1.5:  # to the next layer: bottom to top
            y0, y1, rad = y0 - 0.32, y1 + 0.32, 0.0
        else:  # past a layer: from side to side, bending out around the boxes between
            x0, x1, rad = x0 + 0.46, x1 + 0.46, -0.25
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10, color="#555", lw=0.8, connectionstyle=f"arc3,rad={rad}"))
        mx, my = (x0 + x1) / 2 + rad * (y1 - y0) / 2, (y0 + y1) / 2 - rad * (x1 - x0) / 2
        ax.text(mx, my, e.relation, fontsize=6, color="#444", ha="center", va="center", bbox={"fc": "white", "ec": "none", "pad": 0.5})
    for node_id, (x, y) in pos.items():
        node = lineage.nodes[node_id]
        edge = "#c0392b" if node.problems else "#333"
        ax.add_patch(FancyBboxPatch((x - 0.46, y - 0.3), 0.92, 0.6, boxstyle="round,pad=0.02", fc=COLORS.get(node.kind, "#ddd"), ec=edge, lw=1.6 if node.problems else 0.8))
        label = "\n".join([node.label, *(line[:34] for line in _brief(node))])
        ax.text(x, y, label, ha="center", va="center", fontsize=6.5)
    ax.set_xlim(-0.1, width + 0.6)
    ax.set_ylim(-len(rows) + 0.45, 0.5)
    ax.axis("off")
    ax.set_title(f"lineage of {lineage.nodes[lineage.root].label}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
