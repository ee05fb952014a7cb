-- Each node's own lease: how long after its last heartbeat the others may
-- declare it lost (SQLite's 0007). Nodes may be configured differently: the
-- one whose lease it is fences itself within it, so the others wait for it.
ALTER TABLE nodes ADD COLUMN lost_after_ms BIGINT NOT NULL DEFAULT 15000;
