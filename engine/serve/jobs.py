"""The service's jobs, kept in SQLite under its state folder.

A job is written when it is accepted and on every change of status or progress, so a restarted service knows
every job it ever accepted: the ones still queued run again, the ones that were running are marked failed
(``interrupted``), and finished ones keep their outputs until the retention limits drop them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

JobStatus: TypeAlias = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    object TEXT NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    api TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error_code TEXT,
    error_message TEXT,
    outputs TEXT NOT NULL,
    output_bytes INTEGER NOT NULL,
    origin TEXT NOT NULL
)
"""


@dataclass
class Job:
    id: str
    object: Literal["video", "image"]
    model: str
    params: dict[str, Any]  #: the family's request, as JSON
    api: dict[str, Any]  #: what the API shows of the request beyond params (size, seconds)
    status: JobStatus = "queued"
    progress: int = 0  #: 0-100, from the denoising steps
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    outputs: list[str] = field(default_factory=list)
    output_bytes: int = 0
    origin: str = "http"  #: "http", or "mqtt:<client id>:<request key>"

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def output(self, suffixes: tuple[str, ...]) -> Path | None:
        """The output file with one of ``suffixes`` (the video or the image), if the job made one."""
        return next((Path(p) for p in self.outputs if Path(p).suffix in suffixes), None)


@dataclass(frozen=True)
class Retention:
    """How many finished jobs (and their outputs) are kept: at most ``count`` jobs, ``max_bytes`` of outputs, each
    for ``max_age_s``; the oldest go first."""

    count: int = 1000
    max_bytes: int = 50 << 30
    max_age_s: float = 7 * 24 * 3600.0


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: every write is on disk at once
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, job: Job) -> None:
        row = self._row(job)
        self._db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))

    def save(self, job: Job) -> None:
        row = self._row(job)
        del row["id"]
        self._db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ?", [*row.values(), job.id])

    def delete(self, job_id: str) -> None:
        self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def get(self, job_id: str) -> Job | None:
        found = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(found) if found else None

    def list(self, *, limit: int = 20, after: str | None = None, order: Literal["asc", "desc"] = "desc") -> list[Job]:
        """Jobs by creation time; ``after`` a job id, as OpenAI's list cursors are."""
        cursor = self.get(after) if after else None
        compare = "<" if order == "desc" else ">"
        where, args = (f"WHERE (created_at, id) {compare} (?, ?)", [cursor.created_at, cursor.id]) if cursor else ("", [])
        rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY created_at {order}, id {order} LIMIT ?",
                                [*args, limit]).fetchall()
        return [self._job(row) for row in rows]

    def find_origin(self, origin: str) -> Job | None:
        found = self._db.execute("SELECT * FROM jobs WHERE origin = ?", (origin,)).fetchone()
        return self._job(found) if found else None

    def ids(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT id FROM jobs")}

    def with_status(self, status: JobStatus) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY created_at, id", (status,)).fetchall()
        return [self._job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def prune(self, retention: Retention, now: float | None = None) -> list[Job]:
        """Delete the finished jobs beyond the retention limits (oldest first) and return them; the caller removes
        their files."""
        now = time.time() if now is None else now
        finished = [self._job(row) for row in self._db.execute(
            "SELECT * FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') ORDER BY finished_at DESC, id DESC")]
        kept_bytes, dropped = 0, []
        for index, job in enumerate(finished):
            kept_bytes += job.output_bytes
            if index >= retention.count or kept_bytes > retention.max_bytes or now - (job.finished_at or now) > retention.max_age_s:
                dropped.append(job)
                kept_bytes -= job.output_bytes
        for job in dropped:
            self.delete(job.id)
        return dropped

    @staticmethod
    def _row(job: Job) -> dict[str, Any]:
        row = dict(job.__dict__)
        for name in ("params", "api", "outputs"):
            row[name] = json.dumps(row[name])
        return row

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        values = dict(row)
        for name in ("params", "api", "outputs"):
            values[name] = json.loads(values[name])
        return Job(**values)

def api_object(job: Job) -> dict[str, Any]:
    """A job as OpenAI's API shows a video (or image) job."""
    shown: dict[str, Any] = {"id": job.id, "object": job.object, "status": job.status, "progress": job.progress,
                             "created_at": int(job.created_at), "model": job.model, **job.api,
                             "completed_at": int(job.finished_at) if job.finished_at and job.status == "completed" else None,
                             "error": {"code": job.error_code or job.status, "message": job.error_message}
                             if job.status == "failed" else None}
    shown.pop("response_format", None)
    return shown
