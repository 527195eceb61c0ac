-- The worker table and its enum types. Every statement is guarded
-- (IF NOT EXISTS, or a duplicate_object handler for the types), so running
-- this file on a database that already has the schema changes nothing.

DO $$
BEGIN
    CREATE TYPE worker_type_enum AS ENUM ('local', 'remote', 'container');
EXCEPTION
    WHEN duplicate_object THEN NULL;
END
$$;

DO $$
BEGIN
    CREATE TYPE worker_role_enum AS ENUM ('action', 'sensor', 'hybrid');
EXCEPTION
    WHEN duplicate_object THEN NULL;
END
$$;

DO $$
BEGIN
    CREATE TYPE worker_status_enum AS ENUM ('active', 'inactive', 'busy', 'error');
EXCEPTION
    WHEN duplicate_object THEN NULL;
END
$$;

CREATE TABLE IF NOT EXISTS worker (
    id                    BIGSERIAL          PRIMARY KEY,
    name                  TEXT               NOT NULL UNIQUE,
    worker_type           worker_type_enum   NOT NULL DEFAULT 'local',
    worker_role           worker_role_enum   NOT NULL DEFAULT 'action',
    host                  TEXT,
    port                  INTEGER,
    status                worker_status_enum NOT NULL DEFAULT 'inactive',
    capabilities          JSONB              NOT NULL DEFAULT '{}',
    meta                  JSONB              NOT NULL DEFAULT '{}',
    last_heartbeat        TIMESTAMPTZ,
    created               TIMESTAMPTZ        NOT NULL DEFAULT now(),
    updated               TIMESTAMPTZ        NOT NULL DEFAULT now(),
    -- Lease and session state owned by the registry.
    instance_id           TEXT               NOT NULL DEFAULT '',
    session_token_hash    BYTEA,
    lease_expires         TIMESTAMPTZ,
    lease_ttl_ms          BIGINT             NOT NULL DEFAULT 0,
    heartbeat_interval_ms BIGINT             NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS worker_role_idx ON worker (worker_role);
CREATE INDEX IF NOT EXISTS worker_role_status_idx ON worker (worker_role, status);
CREATE INDEX IF NOT EXISTS worker_last_heartbeat_idx ON worker (last_heartbeat);
-- The sweeper scans live workers in lease order.
CREATE INDEX IF NOT EXISTS worker_status_lease_idx ON worker (status, lease_expires);
-- Serves runtime membership filters: capabilities->'runtimes' ? 'python' and ?& ARRAY[...].
CREATE INDEX IF NOT EXISTS worker_runtimes_idx ON worker USING GIN ((capabilities -> 'runtimes'));
