-- Workspace snapshots: what a session's workspace held at one moment, as a
-- manifest of paths with the content hash of each file (the contents are
-- content-addressed blobs beside the database). Kept after the session
-- ends: they are evidence.
CREATE TABLE snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    session_id TEXT NOT NULL,
    execution_id TEXT,
    reason TEXT NOT NULL,
    digest TEXT NOT NULL,
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX snapshots_session ON snapshots(tenant_id, session_id, seq);
ALTER TABLE sessions ADD COLUMN snapshot_after_exec INTEGER NOT NULL DEFAULT 0;
ALTER TABLE executions ADD COLUMN policy TEXT;
CREATE INDEX audit_subject ON audit(tenant_id, subject, seq);
