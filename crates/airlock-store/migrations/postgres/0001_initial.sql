-- airlock schema on PostgreSQL: the same tables as the SQLite schema after
-- its migrations 0001-0005, in one step. Times are Unix milliseconds;
-- integers are BIGINT (the store reads them as i64), flags are BIGINT 0/1
-- as in SQLite; JSON is kept as the exact text written (the audit chain
-- hashes it). Every text column compares byte-wise (COLLATE "C"), as
-- SQLite's do: listings, prefix ranges and cursors must not depend on the
-- database's locale.

-- Key check value: proves the master key in use is the one this database
-- was created with (a wrong key fails closed at start-up, on every node).
CREATE TABLE meta (
    key   TEXT COLLATE "C" PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE tenants (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT COLLATE "C" NOT NULL UNIQUE,
    -- The tenant's data key, wrapped (XChaCha20-Poly1305) by the KEK;
    -- emptied when the tenant is deleted.
    wrapped_dek BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    deleted_at  BIGINT
);

CREATE TABLE api_keys (
    id         TEXT COLLATE "C" PRIMARY KEY,
    tenant_id  TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
    -- BLAKE3 keyed hash of the whole key; the key itself is never stored.
    hash       BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    expires_at BIGINT
);
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);

CREATE TABLE secrets (
    tenant_id  TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
    name       TEXT COLLATE "C" NOT NULL,
    version    BIGINT NOT NULL,
    -- nonce || ciphertext || tag, sealed with the tenant's data key.
    sealed     BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE executions (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            TEXT COLLATE "C" NOT NULL UNIQUE,
    tenant_id     TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
    status        TEXT COLLATE "C" NOT NULL
                  CHECK (status IN ('queued', 'running', 'finished', 'failed')),
    language      TEXT COLLATE "C" NOT NULL,
    request_id    TEXT COLLATE "C" NOT NULL,
    trace_id      TEXT COLLATE "C" NOT NULL,
    created_at    BIGINT NOT NULL,
    started_at    BIGINT,
    finished_at   BIGINT,
    reason        TEXT COLLATE "C",
    result        TEXT COLLATE "C",
    error         TEXT COLLATE "C",
    host_state    TEXT COLLATE "C",
    flow_id       TEXT COLLATE "C" NOT NULL DEFAULT 'default',
    output        TEXT COLLATE "C",
    handler_error TEXT COLLATE "C",
    broker_error  TEXT COLLATE "C",
    egress        TEXT COLLATE "C",
    session_id    TEXT COLLATE "C",
    policy        TEXT COLLATE "C"
);
CREATE INDEX executions_tenant ON executions(tenant_id, seq DESC);
CREATE INDEX executions_unfinished ON executions(status) WHERE status IN ('queued', 'running');
CREATE INDEX executions_finished ON executions(finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX executions_session ON executions(session_id, seq) WHERE session_id IS NOT NULL;

CREATE TABLE execution_logs (
    execution_id TEXT COLLATE "C" NOT NULL REFERENCES executions(id),
    seq          BIGINT NOT NULL,
    ts           BIGINT NOT NULL,
    level        TEXT COLLATE "C" NOT NULL CHECK (level IN ('debug', 'info', 'warn', 'error')),
    message      TEXT COLLATE "C" NOT NULL,
    fields       TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (execution_id, seq)
);

-- Agent memory, scoped to (tenant, flow). Values are JSON text.
CREATE TABLE memory (
    tenant_id  TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
    flow_id    TEXT COLLATE "C" NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    value      TEXT COLLATE "C" NOT NULL,
    version    BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- Bytes of key + value, for the per-tenant quota.
    size       BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, flow_id, key)
);

CREATE TABLE sessions (
    seq                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                  TEXT COLLATE "C" NOT NULL UNIQUE,
    tenant_id           TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
    language            TEXT COLLATE "C" NOT NULL,
    backend             TEXT COLLATE "C" NOT NULL,
    policy              TEXT COLLATE "C" NOT NULL,
    workspace_mib       BIGINT NOT NULL,
    workspace_files     BIGINT NOT NULL,
    idle_timeout_ms     BIGINT NOT NULL,
    created_at          BIGINT NOT NULL,
    expires_at          BIGINT NOT NULL,
    ended_at            BIGINT,
    end_reason          TEXT COLLATE "C",
    snapshot_after_exec BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX sessions_tenant ON sessions(tenant_id, seq);
CREATE INDEX sessions_open ON sessions(ended_at) WHERE ended_at IS NULL;

CREATE TABLE snapshots (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT COLLATE "C" NOT NULL UNIQUE,
    tenant_id    TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
    session_id   TEXT COLLATE "C" NOT NULL,
    execution_id TEXT COLLATE "C",
    reason       TEXT COLLATE "C" NOT NULL,
    digest       TEXT COLLATE "C" NOT NULL,
    entries      BIGINT NOT NULL,
    bytes        BIGINT NOT NULL,
    truncated    BIGINT NOT NULL,
    manifest     TEXT COLLATE "C" NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX snapshots_session ON snapshots(tenant_id, session_id, seq);

-- The audit chain. `pos` is the storage order (appends are serialised, so
-- it follows the chain); the verifier walks by it, so a reordered or
-- renumbered chain shows.
CREATE TABLE audit (
    seq        BIGINT PRIMARY KEY,
    pos        BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    ts         BIGINT NOT NULL,
    tenant_id  TEXT COLLATE "C",
    kind       TEXT COLLATE "C" NOT NULL,
    actor      TEXT COLLATE "C" NOT NULL,
    subject    TEXT COLLATE "C" NOT NULL,
    request_id TEXT COLLATE "C",
    detail     TEXT COLLATE "C" NOT NULL,
    prev_hash  BYTEA NOT NULL,
    hash       BYTEA NOT NULL
);
CREATE INDEX audit_tenant ON audit(tenant_id, seq);
CREATE INDEX audit_subject ON audit(tenant_id, subject, seq);

-- Append-only, enforced by the database too (the hash chain catches
-- whoever removes these triggers): no row changes or goes, and the table
-- is never truncated. Roles other than the owner get no right to try.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only';
END
$$;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON audit FROM PUBLIC;
