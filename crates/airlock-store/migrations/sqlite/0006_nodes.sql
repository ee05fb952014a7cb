-- Nodes: the `airlock serve` processes that use this database, and whether
-- each is alive. Every execution and session names the node that runs it,
-- so a node recovering from a crash touches only its own work, and the
-- others can fail the work of a node that stopped heartbeating
-- (`node_lost`). Rows from before nodes (node_id NULL) are this one's:
-- an SQLite database has one server.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    url TEXT,
    pid INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'stopped', 'lost'))
);
ALTER TABLE executions ADD COLUMN node_id TEXT;
ALTER TABLE sessions ADD COLUMN node_id TEXT;
-- What a node may still hold on its host: unfinished work, and work another
-- node failed while its host state was not yet reaped.
CREATE INDEX executions_leftover ON executions(node_id)
    WHERE status IN ('queued', 'running') OR host_state IS NOT NULL;
CREATE INDEX sessions_node_open ON sessions(node_id) WHERE ended_at IS NULL;
