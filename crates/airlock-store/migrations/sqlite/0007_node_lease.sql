-- Each node's own lease: how long after its last heartbeat the others may
-- declare it lost. Nodes may be configured differently (or during a rolling
-- change of node.lost_after_ms): the one whose lease it is says how long it
-- waits before fencing itself, so the others must wait that long too.
ALTER TABLE nodes ADD COLUMN lost_after_ms INTEGER NOT NULL DEFAULT 15000;
