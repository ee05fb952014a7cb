-- The broker: per-execution logs, durable agent memory, handler results.

ALTER TABLE executions ADD COLUMN flow_id TEXT NOT NULL DEFAULT 'default';
-- Handler output (JSON) and structured handler error (JSON).
ALTER TABLE executions ADD COLUMN output TEXT;
ALTER TABLE executions ADD COLUMN handler_error TEXT;
-- Why the broker closed the channel early (malformed, oversized,
-- out-of-order frame), for the record.
ALTER TABLE executions ADD COLUMN broker_error TEXT;
-- Egress decisions of the execution (JSON array), when it had egress.
ALTER TABLE executions ADD COLUMN egress TEXT;

CREATE TABLE execution_logs (
    execution_id TEXT NOT NULL REFERENCES executions(id),
    seq          INTEGER NOT NULL,
    ts           INTEGER NOT NULL,
    level        TEXT NOT NULL CHECK (level IN ('debug', 'info', 'warn', 'error')),
    message      TEXT NOT NULL,
    fields       TEXT NOT NULL,
    PRIMARY KEY (execution_id, seq)
) STRICT;

-- Agent memory, scoped to (tenant, flow). Values are JSON text.
CREATE TABLE memory (
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    flow_id    TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    version    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    -- Bytes of key + value, for the per-tenant quota.
    size       INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, flow_id, key)
) STRICT;
