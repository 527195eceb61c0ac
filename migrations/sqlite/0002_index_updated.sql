-- Each registry reads the rows changed since its last look, to keep its
-- in-memory worker index current with other replicas; this index serves
-- that range scan on every refresh.
CREATE INDEX IF NOT EXISTS worker_updated_idx ON worker (updated);
