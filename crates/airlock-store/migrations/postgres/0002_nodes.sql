-- Nodes: the `airlock serve` processes that share this database, and
-- whether each is alive (a heartbeat every few seconds). Every execution and
-- session names the node that runs it: a node recovering from a crash
-- touches only its own work, and the others fail the work of a node whose
-- heartbeat stopped (`node_lost`). The same table as SQLite's 0006.
CREATE TABLE nodes (
    id           TEXT COLLATE "C" PRIMARY KEY,
    name         TEXT COLLATE "C" NOT NULL,
    url          TEXT COLLATE "C",
    pid          BIGINT NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    state        TEXT COLLATE "C" NOT NULL CHECK (state IN ('active', 'stopped', 'lost'))
);
ALTER TABLE executions ADD COLUMN node_id TEXT COLLATE "C";
ALTER TABLE sessions ADD COLUMN node_id TEXT COLLATE "C";
CREATE INDEX executions_leftover ON executions(node_id)
    WHERE status IN ('queued', 'running') OR host_state IS NOT NULL;
CREATE INDEX sessions_node_open ON sessions(node_id) WHERE ended_at IS NULL;
