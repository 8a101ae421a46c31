-- Retention (SESSION_RETENTION_DAYS): sessions removed by the sweep whose files the gateway has
-- not yet confirmed removed. The removal and this row are one statement (one transaction), so a
-- session is removed exactly once however many replicas sweep (FOR UPDATE SKIP LOCKED: each
-- takes rows no other is taking), and a sweeper that dies before removing the files leaves the
-- row for the next round of any replica. Rows are deleted when the files are gone. Outbox rows
-- are not touched (money owed stays owed).
CREATE TABLE IF NOT EXISTS expired_sessions (
    session_id  uuid        PRIMARY KEY,
    user_id     uuid        NOT NULL,
    removed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS expired_sessions_removed_idx ON expired_sessions (removed_at);

-- Serves the sweep's scan: oldest activity first.
CREATE INDEX IF NOT EXISTS sessions_updated_idx ON sessions (updated_at);
