-- File metadata. The bytes live in the bucket under object_key; a row is written only after
-- its object is stored, and deleted before its object is removed, so a crash leaves at worst
-- an object without a row (removed by the orphan sweep), never a row without bytes.
CREATE TABLE files (
    file_name     text PRIMARY KEY,
    -- NULL while an upload is staged by the gateway before it has read the form's user_id.
    user_id       uuid,
    session_id    uuid,
    original_name text NOT NULL,
    content_type  text NOT NULL,
    size          bigint NOT NULL CHECK (size >= 0),
    sha256        text NOT NULL,
    object_key    text NOT NULL UNIQUE,
    status        text NOT NULL CHECK (status IN ('staged', 'attached', 'used')),
    turn_id       text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    attached_at   timestamptz,
    used_at       timestamptz,
    CHECK (session_id IS NULL OR user_id IS NOT NULL),
    CHECK (status = 'staged' OR session_id IS NOT NULL)
);

CREATE INDEX files_user_idx ON files (user_id);
CREATE INDEX files_session_idx ON files (session_id, user_id);
-- The sweep looks only at files no turn has used yet.
CREATE INDEX files_unused_created_idx ON files (created_at) WHERE status <> 'used';
