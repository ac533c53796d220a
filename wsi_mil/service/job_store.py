"""Slide jobs in SQLite (stdlib `sqlite3`, WAL mode): states, progress, reasons, expiry; survives restarts.

One `JobStore` is shared by the request handlers and the worker threads of one service process;
a lock serialises access to its single connection. Claiming a job is one `UPDATE ... RETURNING`,
so a job is never run twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wsi_mil.errors import JobStateError

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
JobSource = Literal["upload", "path"]
TERMINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    slide_name TEXT NOT NULL,
    slide_path TEXT NOT NULL,
    source TEXT NOT NULL,
    mpp_override REAL,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT 'queued',
    error TEXT,
    result TEXT,
    request_id TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    expires REAL
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created);
"""


@dataclass(frozen=True)
class JobRecord:
    """One row of the job table; times are Unix seconds (UTC)."""

    id: str
    state: JobState
    model: str
    slide_name: str
    slide_path: str
    source: JobSource
    mpp_override: float | None
    progress: float
    stage: str
    error: str | None
    result: dict[str, Any] | None
    request_id: str | None
    cancel_requested: bool
    attempts: int
    created: float
    updated: float
    started: float | None
    finished: float | None
    expires: float | None



def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["result"] = json.loads(values["result"]) if values["result"] else None
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRecord(**values)


def new_job_id() -> str:
    """A random 32-hex-digit job id (unguessable, safe in paths and URLs)."""
    return uuid.uuid4().hex


class JobStore:
    """The job table of one data folder; thread-safe; every change is committed at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def journal_mode(self) -> str:
        """SQLite's journal mode of the open database (`wal`)."""
        with self._lock:
            return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def create(
        self,
        *,
        model: str,
        slide_path: str | Path,
        slide_name: str,
        source: JobSource,
        mpp_override: float | None = None,
        request_id: str | None = None,
        job_id: str | None = None,
    ) -> JobRecord:
        """Insert a queued job and return it."""
        now = time.time()
        job_id = job_id or new_job_id()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (id, state, model, slide_name, slide_path, source, mpp_override,"
                " request_id, created, updated) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    model,
                    slide_name,
                    str(slide_path),
                    source,
                    mpp_override,
                    request_id,
                    now,
                    now,
                ),
            )
        record = self.get(job_id)
        assert record is not None
        return record

    def get(self, job_id: str) -> JobRecord | None:
        """The job with this id, or None."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def list_jobs(
        self, *, state: JobState | None = None, limit: int = 100, offset: int = 0
    ) -> list[JobRecord]:
        """Jobs, newest first, optionally of one state."""
        query = "SELECT * FROM jobs"
        params: tuple[Any, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            params = (state,)
        query += " ORDER BY created DESC, id LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._conn.execute(query, (*params, limit, offset)).fetchall()
        return [_record(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs per state (every state present, zero when none)."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(("queued", "running", "done", "failed", "cancelled"), 0)
        counts.update({state: n for state, n in rows})
        return counts

    def claim_next(self) -> JobRecord | None:
        """Move the oldest queued job to `running` and return it (None when none is queued)."""
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'running', stage = 'starting', started = ?, updated = ?,"
                " attempts = attempts + 1 WHERE id = (SELECT id FROM jobs WHERE state = 'queued'"
                " ORDER BY created, id LIMIT 1) RETURNING *",
                (now, now),
            ).fetchone()
        return _record(row) if row else None

    def update_progress(self, job_id: str, progress: float, *, stage: str) -> None:
        """Record a running job's progress (0..1) and stage name."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE jobs SET progress = ?, stage = ?, updated = ? WHERE id = ? AND state = 'running'",
                (min(1.0, max(0.0, progress)), stage, time.time(), job_id),
            )

    def finish(
        self,
        job_id: str,
        state: Literal["done", "failed", "cancelled"],
        *,
        ttl_seconds: float,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Put a job in a terminal state; its results expire `ttl_seconds` from now."""
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, error = ?, result = ?, progress = CASE WHEN ? = 'done'"
                " THEN 1.0 ELSE progress END, stage = ?, updated = ?, finished = ?, expires = ?"
                " WHERE id = ?",
                (
                    state,
                    error,
                    json.dumps(result) if result is not None else None,
                    state,
                    state,
                    now,
                    now,
                    now + ttl_seconds,
                    job_id,
                ),
            )

    def requeue(self, job_id: str) -> None:
        """Put a running job back in the queue (the service stopped while it ran)."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'queued', stage = 'queued', progress = 0, updated = ?"
                " WHERE id = ? AND state = 'running'",
                (time.time(), job_id),
            )

    def fail_running(self, *, max_attempts: int, ttl_seconds: float) -> int:
        """Fail every `running` job already started `max_attempts` times (at start-up, before
        `requeue_running`): a job that was running each time the service died may be what kills it."""
        now = time.time()
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'failed', stage = 'failed', error = ?, updated = ?,"
                " finished = ?, expires = ? WHERE state = 'running' AND attempts >= ?",
                (
                    f"the service stopped while running this job {max_attempts} times; it is not "
                    "started again (WSI_MIL_MAX_JOB_ATTEMPTS). Submit it again once the cause is fixed",
                    now,
                    now,
                    now + ttl_seconds,
                    max_attempts,
                ),
            )
            return cursor.rowcount

    def requeue_running(self) -> int:
        """Re-queue every `running` job (called at start-up: no worker runs them any more)."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'queued', stage = 'queued', progress = 0, updated = ?"
                " WHERE state = 'running'",
                (time.time(),),
            )
            return cursor.rowcount

    def request_cancel(self, job_id: str, *, ttl_seconds: float) -> JobRecord:
        """Cancel a queued job now, or flag a running one for its worker to stop.

        Raises `JobStateError` for a job that already finished, `KeyError` for an unknown id.
        """
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            state = row["state"]
            if state in TERMINAL_STATES:
                raise JobStateError(
                    f"job {job_id} is already {state}; only queued or running jobs can be cancelled"
                )
            if state == "queued":
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', stage = 'cancelled', cancel_requested = 1,"
                    " error = 'cancelled before it started', updated = ?, finished = ?, expires = ?"
                    " WHERE id = ?",
                    (now, now, now + ttl_seconds, job_id),
                )
            else:
                conn.execute(
                    "UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?", (now, job_id)
                )
        record = self.get(job_id)
        assert record is not None
        return record

    def is_cancel_requested(self, job_id: str) -> bool:
        """True when the job was cancelled or deleted since it started."""
        with self._lock:
            row = self._conn.execute(
                "SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return row is None or bool(row[0])

    def delete(self, job_id: str) -> bool:
        """Remove a job's row; False when there was none."""
        with self._transaction() as conn:
            return conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def expired(self, now: float | None = None) -> list[JobRecord]:
        """Finished jobs whose results have expired."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM jobs WHERE expires IS NOT NULL AND expires <= ? ORDER BY expires",
                (now,),
            ).fetchall()
        return [_record(r) for r in rows]
