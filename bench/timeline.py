"""A run's timeline as a picture: one lane per node replica, one bar per stage of each request, transfers marked.

    python bench/timeline.py outputs/<run-id>/report.json timeline.png

Reads the run report (``engine run`` writes ``report.json``; bench/throughput.py draws its own run). Each
segment run is known from the controller's side (dispatched, done, on which replica) and each stage's and each
outgoing transfer's duration from the worker's; a replica runs one segment at a time, stages first, then its
outgoing transfers, so a segment's compute starts when it was dispatched or when the replica finished the
previous one, whichever is later. A light bar behind shows the whole segment from dispatch to done: the part
before the stages is the wait in the replica's queue, the part after the transfer the output writing and the
message back. Needs matplotlib (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: Bar colours by stage name; transfers are hatched.
COLOURS = {"text_encode": "#4c72b0", "image_encode": "#64b5cd", "vae_encode": "#8172b2", "denoise": "#dd8452",
           "vae_decode": "#55a868"}
TRANSFER = "#c44e52"


def bars(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stage and transfer of every request as ``{lane, request, name, kind, start, end}`` on the run's
    clock (seconds since the controller started), plus one ``kind="segment"`` bar per segment run."""
    edges_from = {}
    for edge in report["edges"]:
        edges_from.setdefault(edge["from"], []).append(edge["name"])
    runs = []
    for request in report["requests"]:
        for run in request["segments"]:
            if run["done"] is None:
                continue
            runs.append((request, run, request["submitted_seconds"] + run["dispatched"], request["submitted_seconds"] + run["done"]))
    out: list[dict[str, Any]] = []
    free_at: dict[tuple[str, int], float] = {}
    for request, run, dispatched, done in sorted(runs, key=lambda item: item[2]):
        lane = (run["node"], run["replica"])
        out.append({"lane": lane, "request": request["id"], "name": "segment", "kind": "segment", "start": dispatched, "end": done})
        t = max(dispatched, free_at.get(lane, dispatched))
        if run["outcome"] == "done":
            steps = [(s, "stage", request["stage_seconds"].get(s, 0.0)) for s in run["stages"]]
            steps += [(e, "transfer", request["edges"][e]["seconds"]) for e in edges_from.get(run["node"], []) if e in request["edges"]]
            for name, kind, seconds in steps:
                end = min(t + seconds, done)
                out.append({"lane": lane, "request": request["id"], "name": name, "kind": kind, "start": t, "end": end})
                t = end
        free_at[lane] = done
    return out


def lanes(report: dict[str, Any]) -> list[tuple[str, int]]:
    return [(n["node"], n["replica"]) for n in report["nodes"]]


def draw(report: dict[str, Any], path: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    order = lanes(report)
    row = {lane: len(order) - 1 - i for i, lane in enumerate(order)}
    items = bars(report)
    end = max((b["end"] for b in items), default=1.0)
    start = min((b["start"] for b in items), default=0.0)
    figure, axes = plt.subplots(figsize=(max(8.0, min(24.0, 2.0 + (end - start) * 0.6)), 1.0 + 0.8 * len(order)))
    for bar in items:
        y = row[bar["lane"]]
        width = bar["end"] - bar["start"]
        if bar["kind"] == "segment":
            axes.barh(y, width, left=bar["start"], height=0.8, color="#e8e8e8", edgecolor="#bbbbbb", linewidth=0.5, zorder=1)
        elif bar["kind"] == "stage":
            axes.barh(y, width, left=bar["start"], height=0.6, color=COLOURS.get(bar["name"], "#999999"), edgecolor="white", linewidth=0.5,
                      zorder=2)
            if width > (end - start) * 0.025:
                axes.text(bar["start"] + width / 2, y, bar["request"], ha="center", va="center", fontsize=7, color="white", zorder=4)
        else:
            axes.barh(y, max(width, (end - start) * 0.002), left=bar["start"], height=0.6, color=TRANSFER, hatch="////",
                      edgecolor="black", linewidth=0.5, zorder=3)
    axes.set_yticks([row[lane] for lane in order], [f"{node}[{replica}]" for node, replica in order])
    axes.set_xlabel("seconds since the controller started")
    axes.set_xlim(start - (end - start) * 0.01, end + (end - start) * 0.01)
    used = sorted({b["name"] for b in items if b["kind"] == "stage"}, key=lambda n: list(COLOURS).index(n) if n in COLOURS else 99)
    handles = [Patch(color=COLOURS.get(n, "#999999"), label=n) for n in used]
    handles.append(Patch(facecolor=TRANSFER, hatch="////", edgecolor="black", label="transfer (grant to ack)"))
    handles.append(Patch(facecolor="#e8e8e8", edgecolor="#bbbbbb", label="segment: dispatch to done"))
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(order) < 4 else -0.2), ncol=4, fontsize=8, frameon=False)
    axes.set_title(title or f"run {report['run_id']}: {report['graph']['name']}", fontsize=10)
    axes.grid(axis="x", alpha=0.3, zorder=0)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a run's report.json")
    parser.add_argument("png", type=Path, help="where to write the picture")
    args = parser.parse_args(argv)
    draw(json.loads(args.report.read_text()), args.png)
    print(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
