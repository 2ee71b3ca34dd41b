"""Live progress of a run on the terminal: per request, per segment, per denoising step.

On a terminal the step counter of each busy replica is redrawn in place; elsewhere (logs, CI) only stage
transitions are printed, one line each.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from engine.control.messages import Heartbeat, StageDone
from engine.display import human_bytes
from engine.plan.model import Segment


class ProgressView:
    def __init__(self, *, quiet: bool = False, stream: TextIO = sys.stderr):
        self.quiet = quiet
        self.stream = stream
        self.live = stream.isatty() and not quiet
        self.started = time.monotonic()
        self._stages: dict[tuple[str, int], str | None] = {}
        self._line_open = False
        self._refused_from: set[str] = set()

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        if self._line_open:
            self.stream.write("\r\033[K")
            self._line_open = False
        self.stream.write(f"[{time.monotonic() - self.started:7.2f}s] {text}\n")
        self.stream.flush()

    def deploying(self, replicas: int) -> None:
        self._print(f"starting {replicas} worker process(es), loading weights ...")

    def ready(self, seconds: float, replicas: dict[Any, Any]) -> None:
        loads = ", ".join(f"{r.node}[{r.replica}] {r.load_s:.1f} s" for r in replicas.values() if r.load_s is not None)
        self._print(f"all workers ready in {seconds:.1f} s (load: {loads})")

    def segment_started(self, request: Any, segment: Segment, replica: int) -> None:
        work = ", ".join(segment.stages) or f"carries {', '.join(segment.outputs)}"  # the feeder, the collector
        self._print(f"{request.id}: {segment.node}[{replica}] {work} ...")

    def segment_done(self, request: Any, segment: Segment, done: StageDone) -> None:
        facts = [f"{name} {seconds:.2f} s" for name, seconds in done.timings.items()]
        facts += [f"{name} skipped {s.passes_skipped} of {s.passes_run + s.passes_skipped} DiT passes ({s.method} "
                  f"{s.threshold:g})" for name, s in done.step_cache.items() if s.method != "none"]
        facts += [f"{name} {human_bytes(s.nbytes)} in {s.seconds * 1e3:.1f} ms" for name, s in done.edges.items()]
        self._print(f"{request.id}: {segment.node}[{done.replica}] done ({'; '.join(facts)})")

    def heartbeat(self, beat: Heartbeat) -> None:
        self._stages[(beat.node, beat.replica)] = beat.stage
        if self.live and beat.request_id and beat.total_steps:
            width = 24
            filled = width * beat.step // beat.total_steps
            self.stream.write(f"\r\033[K  {beat.request_id}: {beat.node}[{beat.replica}] {beat.stage} "
                              f"[{'#' * filled}{'.' * (width - filled)}] step {beat.step}/{beat.total_steps}")
            self.stream.flush()
            self._line_open = True

    def current_stage(self, node: str, replica: int) -> str | None:
        return self._stages.get((node, replica))

    def replica_down(self, info: Any, why: str) -> None:
        self._print(f"!! {info.node}[{info.replica}] is out: {why}")

    def replica_restarting(self, info: Any, delay_s: float) -> None:
        self._print(f"{info.node}[{info.replica}]: starting it again in {delay_s:g} s (restart {info.restarts + 1})")

    def replica_back(self, info: Any) -> None:
        self._print(f"{info.node}[{info.replica}] is back: ready in {info.load_s or 0:.1f} s (restart {info.restarts})")

    def replica_added(self, info: Any) -> None:
        self._print(f"{info.node}[{info.replica}] is ready (scaled out): loaded in {info.load_s or 0:.1f} s")

    def scaled(self, decision: Any, replica: int, where: str = "") -> None:
        action = "starting" if decision.direction == "out" else "draining"
        self._print(f"{decision} ({action} {decision.node}[{replica}]{' ' + where if where else ''})")

    def not_scaled(self, decision: Any, why: str) -> None:
        self._print(f"{decision}; {why}: not scaled out")

    def retired(self, info: Any) -> None:
        self._print(f"{info.node}[{info.replica}] drained: stopping it (scaled in)")

    def replica_left_down(self, info: Any, restarts: int, window_s: float) -> None:
        self._print(f"!! {info.node}[{info.replica}] stays out: restarted {restarts} times in the last {window_s:g} s")

    def refused(self, sender: str, what: str) -> None:
        """A message the controller refused; shown once per sender (the rest are counted in the report)."""
        if sender not in self._refused_from:
            self._refused_from.add(sender)
            self._print(f"!! refused a message signed by {sender}: {what} (further ones from it are only counted)")

    def agents_broker(self, display: str, password_from: str, commands: list[str]) -> None:
        """Where the agents on other hosts connect (the embedded broker listens on an address), and the command that
        starts each: shown also when quiet, as the run waits for them."""
        quiet, self.quiet = self.quiet, False
        self._print(f"broker on {display}; the agents' password is {password_from}; on each agent's host:")
        for command in commands:
            self._print(f"  {command}")
        self.quiet = quiet

    def placed(self, where: dict[str, str]) -> None:
        self._print("placed on agents: " + ", ".join(f"{node} on {spot}" for node, spot in where.items()))

    def broker_back(self) -> None:
        self._print("the broker is back; heartbeat timeouts count from now")

    def retry(self, request: Any, why: str) -> None:
        self._print(f"{request.id}: retrying from the start (attempt {request.attempt + 1})")

    def request_finished(self, request: Any) -> None:
        if request.state.value == "cancelled":
            self._print(f"{request.id}: cancelled after {request.seconds:.2f} s ({request.events[-1].detail})")
        elif request.error:
            self._print(f"{request.id}: FAILED after {request.seconds:.2f} s: {request.error}")
        else:
            previews = request.previews_written
            written = f" ({len(previews)} preview(s) written: {', '.join(previews)})" if previews else ""
            self._print(f"{request.id}: done in {request.seconds:.2f} s -> {', '.join(request.outputs)}{written}")
