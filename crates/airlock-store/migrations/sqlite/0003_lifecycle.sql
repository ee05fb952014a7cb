-- Tenants over time: keys that expire, tenants that are deleted (their row
-- stays, renamed, with its data key destroyed, so the audit records that
-- name it stay meaningful and the chain verifiable).
ALTER TABLE api_keys ADD COLUMN expires_at INTEGER;
ALTER TABLE tenants ADD COLUMN deleted_at INTEGER;
CREATE INDEX executions_finished ON executions(finished_at) WHERE finished_at IS NOT NULL;
