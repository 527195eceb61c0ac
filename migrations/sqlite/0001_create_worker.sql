-- The worker table, with the same logical schema as the PostgreSQL one.
-- Enum values are CHECK constraints, JSON is text, and timestamps are
-- fixed-width UTC text (2026-01-31T12:00:00.000Z) so text order is time order.
CREATE TABLE IF NOT EXISTS worker (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    name                  TEXT    NOT NULL UNIQUE,
    worker_type           TEXT    NOT NULL DEFAULT 'local'
                                  CHECK (worker_type IN ('local', 'remote', 'container')),
    worker_role           TEXT    NOT NULL DEFAULT 'action'
                                  CHECK (worker_role IN ('action', 'sensor', 'hybrid')),
    host                  TEXT,
    port                  INTEGER,
    status                TEXT    NOT NULL DEFAULT 'inactive'
                                  CHECK (status IN ('active', 'inactive', 'busy', 'error')),
    capabilities          TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(capabilities)),
    meta                  TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(meta)),
    last_heartbeat        TEXT,
    created               TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated               TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- Lease and session state owned by the registry.
    instance_id           TEXT    NOT NULL DEFAULT '',
    session_token_hash    BLOB,
    lease_expires         TEXT,
    lease_ttl_ms          INTEGER NOT NULL DEFAULT 0,
    heartbeat_interval_ms INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS worker_role_idx ON worker (worker_role);
CREATE INDEX IF NOT EXISTS worker_role_status_idx ON worker (worker_role, status);
CREATE INDEX IF NOT EXISTS worker_last_heartbeat_idx ON worker (last_heartbeat);
CREATE INDEX IF NOT EXISTS worker_status_lease_idx ON worker (status, lease_expires);
