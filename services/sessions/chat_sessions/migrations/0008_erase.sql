-- Erasing a user (chat-admin erase-user, run by the gateway across every store) records its
-- progress here, so an erase that stopped midway (a service killed, a store down) is finished
-- by the next run. The record never names the user: `subject` is an HMAC-SHA256 of the user id
-- with the gateway's secret, so only someone holding both can tell whose erase a row was.
-- `steps` holds what each finished step removed (counts per store, no ids).
CREATE TABLE IF NOT EXISTS erasures (
    subject      text        PRIMARY KEY CHECK (subject ~ '^[0-9a-f]{64}$'),
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    runs         integer     NOT NULL DEFAULT 1,
    steps        jsonb       NOT NULL DEFAULT '{}'::jsonb
);
