"""Text tables and graph pictures for the CLI."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from engine.errors import EngineError
from engine.plan.model import PAYLOAD_ALIGNMENT, Plan, PlannedEdge, PlannedNode


def human_bytes(nbytes: int | float) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def sizing_text(plan: Plan, sized_by: Sequence[str]) -> str:
    """``height 480 (limits), num_frames 13 (requests)``: the size fields given, with their values and where each
    came from; what else sized an edge (its input file) as it is; ``fixed shapes`` for none."""
    texts = [f"{name} {plan.limits[name]} ({plan.sized_from[name]})" if name in plan.limits else name
             for name in sized_by]
    return ", ".join(texts) or "fixed shapes"


def _devices_text(node: PlannedNode) -> str:
    """A node's device, or a several-device node's ranks and how they split: ``cpu x4 (cfg 2 x ulysses 2)``."""
    if node.ranks == 1:
        return node.device
    devices = f"{node.device} x{node.ranks}" if len(set(node.devices)) == 1 else ", ".join(node.devices)
    return f"{devices} (cfg {node.parallel.cfg} x ulysses {node.parallel.ulysses})"


def graph_text(plan: Plan) -> str:
    parts = [f"graph {plan.graph} ({plan.file}): {plan.family} {plan.task}, model {plan.model_path}, {plan.dtype}",
             f"sized at {sizing_text(plan, list(plan.limits))}", ""]
    parts.append(table(["node", "stages", "host", "device", "replicas", "dtype"],
                       [[n.name, ", ".join(n.stages), n.host, _devices_text(n), replica_text(n), n.dtype]
                        for n in plan.nodes.values()]))
    parts.append("")
    if not plan.edges:
        parts.append("no edges: every stage runs in one node")
    for edge in plan.edges:
        parts.append(f"edge {edge.name}: {edge.source} -> {edge.target} over {transport_text(edge)} "
                     f"(integrity {edge.integrity}), slot {edge.slot_bytes} bytes ({human_bytes(edge.slot_bytes)}) "
                     f"x {edge.slots}, each tensor {PAYLOAD_ALIGNMENT}-byte aligned; "
                     + (f"sized at {sizing_text(plan, edge.sized_by)}" if edge.sized_by else "fixed shapes"))
        parts.append(table(["tensor", "dtype", "shape", "bytes", "size", "from", "to"],
                           [[t.name + (" (optional)" if t.optional else ""), t.dtype, shape_text(t.shape), t.nbytes,
                             human_bytes(t.nbytes), t.producer, ", ".join(t.consumers)] for t in edge.tensors]))
        parts.append("")
    parts.append("a request runs through: " + " -> ".join(f"{s.node}[{', '.join(s.stages)}]" for s in plan.segments))
    return "\n".join(parts)


def replica_text(node: PlannedNode) -> str:
    """``2``, or ``1-4`` for an elastic node."""
    return f"{node.replicas}-{node.max_replicas}" if node.max_replicas else str(node.replicas)


def transport_text(edge: PlannedEdge) -> str:
    """``mooncake``, or ``mooncake rdma`` where the graph sets the protocol."""
    return f"{edge.transport} {edge.protocol}" if edge.protocol else edge.transport


def graph_dot(plan: Plan) -> str:
    """The graph in Graphviz DOT: one box per node (its stages, placement), one arrow per edge."""
    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = [f"digraph {quote(plan.graph)} {{", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];',
             f"  label={quote(f'{plan.graph}: {plan.family} {plan.task} ({plan.model_path}, {plan.dtype})')}; labelloc=t;"]
    for node in plan.nodes.values():
        replicas = f" x{replica_text(node)}" if node.most_replicas > 1 else ""
        label = f"{node.name}{replicas}\n{node.host} {node.device}\n" + "\n".join(node.stages)
        lines.append(f"  {quote(node.name)} [label={quote(label)}];")
    for edge in plan.edges:
        tensors = "\n".join(f"{t.name} {shape_text(t.shape)} {t.dtype}" for t in edge.tensors)
        label = f"{edge.name} ({transport_text(edge)}, {human_bytes(edge.slot_bytes)})\n{tensors}"
        lines.append(f"  {quote(edge.source)} -> {quote(edge.target)} [label={quote(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_picture(plan: Plan, out: Path) -> None:
    """Write the graph as .dot, or render it to .png / .svg with Graphviz's ``dot``."""
    source = graph_dot(plan)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".svg", ".dot"):
        raise EngineError(f"{out}: the picture must end in .png, .svg or .dot")
    if not out.parent.is_dir():
        raise EngineError(f"{out}: no folder {out.parent} to write the picture into")
    if suffix == ".dot":
        try:
            out.write_text(source)
        except OSError as exc:
            raise EngineError(f"cannot write {out}: {exc.strerror or exc}") from exc
        return
    dot = shutil.which("dot")
    if dot is None:
        raise EngineError("drawing needs Graphviz's `dot` (apt-get install graphviz); or write --out graph.dot")
    result = subprocess.run([dot, f"-T{suffix[1:]}", "-o", str(out)], input=source, text=True, capture_output=True, timeout=60)
    if result.returncode != 0:
        raise EngineError(f"dot failed to draw {out}: {result.stderr.strip()}")
