"""The records database's tables, their migrations, and the states a job, part and hosted run move through.

``PRAGMA user_version`` is the schema version; ``MIGRATIONS[i]`` takes a database from version ``i`` to
``i + 1`` in one transaction (``records.Records`` runs them). Append only: never edit a shipped entry.
"""

from __future__ import annotations

import sqlite3

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = {"succeeded", "failed", "cancelled"}
ALLOWED: dict[str, set[str]] = {"queued": {"running", "failed", "cancelled"},
                                "running": {"succeeded", "failed", "cancelled"}}   # terminal states go nowhere
PART_ENDS = {"succeeded", "failed", "cancelled", "refused", "lost"}   # a part is "running" until one of these
HOSTED_ENDS = {"succeeded", "failed", "cancelled"}
KINDS = ("cpu", "mem", "exec")
STREAMS = ("stdout", "stderr")
ARTIFACT_STATES = ("stored", "refused", "corrupt", "incomplete", "pruned")   # pruned: removed by retention
RESTARTED = "daemon restarted"
BUSY_TIMEOUT_S = 5.0

# Append only: MIGRATIONS[i] takes user_version i to i + 1. Never edit a shipped entry.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, args TEXT NOT NULL,
        submitter TEXT NOT NULL, submitter_fp TEXT NOT NULL,
        created REAL NOT NULL, started REAL, finished REAL, state TEXT NOT NULL,
        exit_code INTEGER, reason TEXT NOT NULL DEFAULT '', result TEXT,
        log_bytes INTEGER NOT NULL DEFAULT 0, log_dropped INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX jobs_created ON jobs(created);
    CREATE TABLE parts (
        id INTEGER PRIMARY KEY, job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        chunk INTEGER NOT NULL, attempt INTEGER NOT NULL, node TEXT NOT NULL, node_fp TEXT NOT NULL,
        started REAL NOT NULL, finished REAL, state TEXT NOT NULL DEFAULT 'running',
        cpu_s REAL NOT NULL DEFAULT 0, mem_mib_s REAL NOT NULL DEFAULT 0,
        exit_code INTEGER, reason TEXT NOT NULL DEFAULT '', result TEXT);
    CREATE INDEX parts_job ON parts(job_id);
    CREATE TABLE logs (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, seq INTEGER NOT NULL,
        stream TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, seq));
    CREATE TABLE hosted (
        id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, chunk INTEGER NOT NULL,
        peer TEXT NOT NULL, peer_fp TEXT NOT NULL, kind TEXT NOT NULL, args TEXT NOT NULL,
        started REAL NOT NULL, finished REAL, state TEXT NOT NULL DEFAULT 'running',
        cpu_s REAL NOT NULL DEFAULT 0, mem_mib_s REAL NOT NULL DEFAULT 0,
        exit_code INTEGER, reason TEXT NOT NULL DEFAULT '');
    CREATE INDEX hosted_started ON hosted(started);
    """,
    """
    CREATE TABLE artifacts (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, path TEXT NOT NULL,
        size INTEGER NOT NULL, sha256 TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
        node TEXT NOT NULL DEFAULT '', PRIMARY KEY (job_id, path));
    """,
    # The exec queue looks for queued jobs every beacon round: without this it would read every job ever run.
    "CREATE INDEX jobs_queued ON jobs(created) WHERE state='queued';",
    # The number of the last write-log entry a commit included (see Durability in the module doc).
    "CREATE TABLE written (seq INTEGER NOT NULL); INSERT INTO written VALUES (0);",
    # vesta rerun: which job runs which again (both ways: `vesta show` names either from the other).
    "CREATE TABLE reruns (job_id TEXT PRIMARY KEY, rerun_of TEXT NOT NULL); "
    "CREATE INDEX reruns_of ON reruns(rerun_of);",
    # Where a job was placed and why not elsewhere: for each node, chosen or not and why (JSON).
    "ALTER TABLE jobs ADD COLUMN placement TEXT;",
    # Sweeps (vesta map): a job group. Each of its jobs names it and its number in it; ``reported`` marks the
    # job whose end was given out as that number's result (joblog, --results, the followers), so none is twice.
    """
    CREATE TABLE sweeps (
        id TEXT PRIMARY KEY, args TEXT NOT NULL, submitter TEXT NOT NULL, created REAL NOT NULL,
        finished REAL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '');
    ALTER TABLE jobs ADD COLUMN sweep TEXT;
    ALTER TABLE jobs ADD COLUMN sweep_seq INTEGER;
    ALTER TABLE jobs ADD COLUMN reported INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX jobs_sweep ON jobs(sweep, sweep_seq) WHERE sweep IS NOT NULL;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def counts(db: sqlite3.Connection) -> list[tuple[str, str, str, int]]:
    """(side, kind, state, how many): the jobs submitted here and the runs hosted for peers (for the metrics)."""
    rows = [("submitted", *r) for r in db.execute("SELECT kind, state, count(*) FROM jobs GROUP BY kind, state")]
    rows += [("hosted", *r) for r in db.execute("SELECT kind, state, count(*) FROM hosted GROUP BY kind, state")]
    return [(side, str(kind), str(state), int(n)) for side, kind, state, n in rows]
