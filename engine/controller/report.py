"""The run report: ``report.json`` beside the outputs, and the summary printed at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from engine.display import human_bytes, table
from engine.plan.model import Plan
from engine.controller.controller import RunResult


def build_report(result: RunResult, plan: Plan, source: Path) -> dict[str, Any]:
    requests = []
    for request in result.requests:
        transfer_s = sum(e["seconds"] for e in request.edges.values())
        compute_s = sum(request.stage_seconds.values())
        segments_s = sum(request.segment_seconds.values())
        requests.append({
            "id": request.id,
            "state": request.state.value,
            "error": request.error,
            "attempts": request.attempt + 1,
            "seconds": round(request.seconds, 4),
            "params": request.params.model_dump(mode="json"),
            "outputs": request.outputs,
            "stage_seconds": {k: round(v, 4) for k, v in request.stage_seconds.items()},
            # Per stage with a DiT loop: the step caching in force, DiT passes run and skipped, seconds saved.
            "step_cache": {stage: stats.model_dump() for stage, stats in request.step_cache.items()},
            # Cacheable stages: whether each one's outputs came from a replica's output cache, and what that saved.
            "output_cache": {"hits": sorted(s for s, hit in request.cached.items() if hit),
                             "misses": sorted(s for s, hit in request.cached.items() if not hit),
                             "saved_seconds": round(request.saved_s, 4)},
            # engine run --preview DIR: the previews of its denoising written there, in the order they came.
            "previews": request.previews_written,
            "edges": request.edges,
            # Stages with a backend chain: the backend asked for and the one used, each passed over with its reason.
            "backends": request.backends,
            # Time a request spent neither computing nor on an edge: waiting in a replica's queue, messaging.
            "queue_wait_seconds": round(max(0.0, segments_s - compute_s - transfer_s), 4),
            # The request's clock (timeline, segments) starts this long after the run's (ready_seconds).
            "submitted_seconds": round(request.clock_zero - result.started, 4),
            "timeline": [{"t": round(e.time, 4), "state": e.state.value, "detail": e.detail} for e in request.events],
            # Each segment dispatch: on which replica, from dispatch to the controller hearing it end.
            "segments": [{"segment": run.segment, "node": plan.segments[run.segment].node, "replica": run.replica,
                          "stages": list(plan.segments[run.segment].stages), "attempt": run.attempt,
                          "dispatched": round(run.dispatched, 4),
                          "done": round(run.done, 4) if run.done is not None else None, "outcome": run.outcome}
                         for run in request.runs],
        })
    return {
        "run_id": result.run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "graph": {"name": plan.graph, "file": plan.file, "family": plan.family, "task": plan.task},
        "model": {"path": plan.model_path, "source": str(source), "dtype": plan.dtype},
        "ready_seconds": round(result.ready_s, 4),
        "seconds": round(result.seconds, 4),
        "nodes": [{"node": r.node, "replica": r.replica, "host": r.where[0] if r.where else plan.nodes[r.node].host,
                   "device": r.where[1] if r.where else plan.nodes[r.node].device, "pid": r.pid, "state": r.state,
                   "down": r.down,
                   "load_seconds": r.load_s, "param_bytes": r.param_bytes, "peak_rss_bytes": r.peak_rss_bytes,
                   "refused_messages": r.rejected, "receives_at": r.receives_at}
                  for r in result.replicas.values()],
        # Control messages the controller dropped (unsigned, bad signature, replayed, too large or deep, invalid,
        # impostor: signed by a client speaking for another or answering what it was not asked), by reason.
        "control": {"refused_messages": {k: v for k, v in result.refused.items() if v},
                    "broker_reconnects": result.broker_reconnects},
        "edges": [{"name": e.name, "from": e.source, "to": e.target, "transport": e.transport,
                   "slot_bytes": e.slot_bytes, "slots": e.slots} for e in plan.edges],
        "requests": requests,
        "output_cache": {"hits": sum(len(r["output_cache"]["hits"]) for r in requests),
                         "misses": sum(len(r["output_cache"]["misses"]) for r in requests),
                         "saved_seconds": round(sum(r["output_cache"]["saved_seconds"] for r in requests), 4),
                         # per cacheable stage, or stage/part (text_encode/negative_prompt) for one cached by parts
                         "parts": cache_parts(requests)},
    }


def cache_parts(requests: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Hits and misses of each cacheable stage or part over ``requests``."""
    parts: dict[str, dict[str, int]] = {}
    for request in requests:
        for result in ("hits", "misses"):
            for part in request["output_cache"][result]:
                parts.setdefault(part, {"hits": 0, "misses": 0})[result] += 1
    return dict(sorted(parts.items()))


def write_report(result: RunResult, plan: Plan, source: Path) -> dict[str, Any]:
    report = build_report(result, plan, source)
    (result.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def print_summary(result: RunResult, report: dict[str, Any]) -> None:
    rows = []
    for request in report["requests"]:
        edges = ", ".join(f"{n} {human_bytes(e['nbytes'])}" for n, e in request["edges"].items()) or "-"
        rows.append([request["id"], request["state"], f"{request['seconds']:.2f}", edges,
                     ", ".join(request["outputs"]) or (request["error"] or "").splitlines()[0]])
    print(table(["request", "state", "seconds", "edges", "outputs"], rows))
    nodes = [[f"{n['node']}[{n['replica']}]", f"{n['load_seconds'] or 0:.2f}", human_bytes(n["param_bytes"] or 0),
              human_bytes(n["peak_rss_bytes"])] for n in report["nodes"]]
    print()
    print(table(["replica", "load s", "weights", "peak RSS"], nodes))
    print(f"\nrun {result.run_id}: ready in {result.ready_s:.1f} s, total {result.seconds:.1f} s; "
          f"report: {result.out_dir / 'report.json'}")
    failed = [r for r in report["requests"] if r["state"] != "done"]
    for request in failed:
        print(f"\nerror: request {request['id']}: {request['error']}")
