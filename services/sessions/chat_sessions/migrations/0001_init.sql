-- Applied with search_path set to the service schema (chat_common.db.apply_migrations).

CREATE TABLE IF NOT EXISTS sessions (
    id               uuid PRIMARY KEY,
    user_id          uuid        NOT NULL,
    name             text        NOT NULL,
    model_name       text        NOT NULL,
    prompt           text        NOT NULL DEFAULT '',
    summary          text        NOT NULL DEFAULT '',
    summarized_upto  integer     NOT NULL DEFAULT 0 CHECK (summarized_upto >= 0),
    -- The turn whose summary is stored: a replayed summary update is recognised by it.
    summary_turn_id  uuid,
    entry_count      integer     NOT NULL DEFAULT 0 CHECK (entry_count >= 0),
    -- Create-call idempotency, scoped to the owner so users cannot collide on keys.
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Serves the per-user listing (newest first) without a sort.
CREATE INDEX IF NOT EXISTS sessions_user_created_idx
    ON sessions (user_id, created_at DESC, id DESC);

CREATE UNIQUE INDEX IF NOT EXISTS sessions_user_idempotency_key_idx
    ON sessions (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS entries (
    session_id  uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq         integer     NOT NULL CHECK (seq >= 0),
    role        text        NOT NULL CHECK (role IN ('user', 'assistant', 'file')),
    content     text        NOT NULL,
    turn_id     uuid        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq)
);

-- One row per applied turn: what makes an append idempotent on (session_id, turn_id).
CREATE TABLE IF NOT EXISTS turns (
    session_id  uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    turn_id     uuid        NOT NULL,
    first_seq   integer     NOT NULL CHECK (first_seq >= 0),
    count       integer     NOT NULL CHECK (count > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, turn_id)
);
