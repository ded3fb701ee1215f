"""A circuit as an SVG picture: layers bottom to top, edges coloured by sign, width by |score|.

Node rows: ``embed`` at the bottom, then each layer's heads and MLP, ``logits`` on top.
Only the circuit's nodes are drawn; blue edges raise the metric, red ones lower it.
Plain SVG text (no plotting library), viewable in any browser.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmatlas.causal.faithfulness import Circuit

ROW, COLUMN, MARGIN = 90, 110, 60


def input_node(target: str) -> str:
    """The node an edge target belongs to: ``L5.H3.q -> L5.H3``, ``L5.KV1.k -> L5.KV1``, else itself."""
    if ".KV" in target or target.endswith(".q"):
        return target.rsplit(".", 1)[0]
    return target


def _row(node: str, n_layers: int) -> int:
    if node == "embed":
        return 0
    if node == "logits":
        return n_layers + 1
    return int(node.split(".")[0][1:]) + 1


def circuit_svg(circuit: "Circuit", n_layers: int) -> str:
    """The SVG document of ``circuit``."""
    nodes = set(circuit.nodes) | {input_node(t) for _, t, _ in circuit.edges} | {s for s, _, _ in circuit.edges}
    by_row: dict[int, list[str]] = {}
    for node in sorted(nodes, key=lambda n: (_row(n, n_layers), n)):
        by_row.setdefault(_row(node, n_layers), []).append(node)
    width = MARGIN * 2 + COLUMN * max(len(v) for v in by_row.values())
    rows = sorted(by_row)
    height = MARGIN * 2 + ROW * (len(rows) - 1)
    y_of = {r: height - MARGIN - i * ROW for i, r in enumerate(rows)}
    where = {
        node: (MARGIN + COLUMN * i + COLUMN // 2, y_of[r])
        for r, names in by_row.items()
        for i, node in enumerate(names)
    }
    biggest = max((abs(v) for _, _, v in circuit.edges), default=1.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<text x="8" y="16">{escape(circuit.graph.task)}: {len(circuit.edges)} edges, '
        f"faithfulness {circuit.faithfulness:.2f} ({escape(circuit.graph.method)})</text>",
    ]
    for source, target, score in circuit.edges:
        (x1, y1), (x2, y2) = where[source], where[input_node(target)]
        colour = "#2563eb" if score > 0 else "#dc2626"
        stroke = 0.8 + 5 * abs(score) / biggest
        label = escape(f"{source} -> {target}: {score:+.3f}")
        parts.append(
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{colour}" stroke-width="{stroke:.2f}" '
            f'stroke-opacity="0.7"><title>{label}</title></line>'
        )
    for node, (x, y) in where.items():
        parts.append(
            f'<rect x="{x - 40}" y="{y - 13}" width="80" height="26" rx="6" fill="#f8fafc" stroke="#334155"/>'
            f'<text x="{x}" y="{y + 4}" text-anchor="middle">{escape(node)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)
