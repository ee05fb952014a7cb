-- Sessions: a tenant's long-lived workspace in which many executions run,
-- each in a fresh sandbox. The row outlives the session (its end and why),
-- so what ran in it stays reviewable.
CREATE TABLE sessions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    language TEXT NOT NULL,
    backend TEXT NOT NULL,
    policy TEXT NOT NULL,
    workspace_mib INTEGER NOT NULL,
    workspace_files INTEGER NOT NULL,
    idle_timeout_ms INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    ended_at INTEGER,
    end_reason TEXT
);
CREATE INDEX sessions_tenant ON sessions(tenant_id, seq);
CREATE INDEX sessions_open ON sessions(ended_at) WHERE ended_at IS NULL;
ALTER TABLE executions ADD COLUMN session_id TEXT;
CREATE INDEX executions_session ON executions(session_id, seq) WHERE session_id IS NOT NULL;
