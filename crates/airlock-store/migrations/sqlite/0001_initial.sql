-- airlock schema v1. Times are Unix milliseconds.

-- Key check value: proves the master key in use is the one this data
-- directory was created with (a wrong key fails closed at start-up).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    -- The tenant's data key, wrapped (XChaCha20-Poly1305) by the KEK.
    wrapped_dek BLOB NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    -- BLAKE3 keyed hash of the whole key; the key itself is never stored.
    hash       BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) STRICT;
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);

CREATE TABLE secrets (
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    -- nonce || ciphertext || tag, sealed with the tenant's data key.
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, name)
) STRICT;

CREATE TABLE executions (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    status      TEXT NOT NULL CHECK (status IN ('queued', 'running', 'finished', 'failed')),
    language    TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    trace_id    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    started_at  INTEGER,
    finished_at INTEGER,
    reason      TEXT,
    result      TEXT,
    error       TEXT,
    host_state  TEXT
) STRICT;
CREATE INDEX executions_tenant ON executions(tenant_id, seq DESC);
CREATE INDEX executions_unfinished ON executions(status) WHERE status IN ('queued', 'running');

CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    ts         INTEGER NOT NULL,
    tenant_id  TEXT,
    kind       TEXT NOT NULL,
    actor      TEXT NOT NULL,
    subject    TEXT NOT NULL,
    request_id TEXT,
    detail     TEXT NOT NULL,
    prev_hash  BLOB NOT NULL,
    hash       BLOB NOT NULL
) STRICT;
CREATE INDEX audit_tenant ON audit(tenant_id, seq);

-- Append-only, enforced by the database too (the hash chain catches
-- whoever removes these triggers).
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
