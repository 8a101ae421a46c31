-- The charge outbox, and the append and summary writes as functions: each is one statement
-- (one round trip, its own transaction when called outside one), and every statement inside
-- a function takes a fresh snapshot, so reads made after the row lock see what the writer
-- before us committed.

-- What a stored turn or summary owes billing, written in the transaction that stores it.
-- No foreign key to sessions on purpose: money owed stays owed after the chat is deleted.
-- Rows are deleted only when the gateway's outbox worker acks them (billing applied the key).
CREATE TABLE IF NOT EXISTS outbox (
    id              bigserial   PRIMARY KEY,
    -- billing's exactly-once key: 'turn:{turn_id}' or 'summary:{session_id}:{summarized_upto}'
    key             text        NOT NULL UNIQUE,
    kind            text        NOT NULL CHECK (kind IN ('turn', 'summary')),
    user_id         uuid        NOT NULL,
    session_id      uuid        NOT NULL,
    turn_id         uuid        NOT NULL,
    cost_nanos      bigint      NOT NULL CHECK (cost_nanos >= 0),
    reservation_id  text,
    model_name      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Serves the worker's page: oldest first, older than a bound.
CREATE INDEX IF NOT EXISTS outbox_created_idx ON outbox (created_at, id);

-- Append one turn under the session's row lock. o_status:
--   'missing'  no such session of this user (nothing else set)
--   'replay'   turn_id already stored: its first_seq and count (whatever the count is now)
--   'stale'    p_expected given and not the session's entry_count (o_entry_count = the current)
--   'full'     the entries would overflow the integer seq
--   'created'  stored now, with the outbox row when p_cost is given
CREATE OR REPLACE FUNCTION append_turn(
    p_session uuid, p_user uuid, p_turn uuid, p_roles text[], p_contents text[],
    p_expected integer, p_prompt text, p_model text,
    p_cost bigint, p_reservation text, p_charge_model text,
    OUT o_status text, OUT o_first_seq integer, OUT o_count integer, OUT o_entry_count integer
) LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
    v_n integer := cardinality(p_roles);
    v_now timestamptz;
BEGIN
    SELECT s.entry_count INTO v_count
      FROM sessions s WHERE s.id = p_session AND s.user_id = p_user
       FOR UPDATE;
    IF NOT FOUND THEN
        o_status := 'missing';
        RETURN;
    END IF;
    -- Replay first: a stored turn is answered whatever the count is now.
    SELECT t.first_seq, t.count INTO o_first_seq, o_count
      FROM turns t WHERE t.session_id = p_session AND t.turn_id = p_turn;
    IF FOUND THEN
        o_status := 'replay';
        o_entry_count := o_first_seq + o_count;
        RETURN;
    END IF;
    IF p_expected IS NOT NULL AND p_expected <> v_count THEN
        o_status := 'stale';
        o_entry_count := v_count;
        RETURN;
    END IF;
    IF v_count::bigint + v_n > 2147483647 THEN
        o_status := 'full';
        RETURN;
    END IF;
    -- Read after the lock: timestamps follow the order writers were serialized in (now() is
    -- the transaction's start, which may precede a writer we waited for).
    v_now := clock_timestamp();
    INSERT INTO entries (session_id, seq, role, content, turn_id, created_at)
    SELECT p_session, v_count + (e.n - 1)::integer, e.role, e.content, p_turn, v_now
      FROM unnest(p_roles, p_contents) WITH ORDINALITY AS e (role, content, n);
    INSERT INTO turns (session_id, turn_id, first_seq, count, created_at)
    VALUES (p_session, p_turn, v_count, v_n, v_now);
    UPDATE sessions
       SET entry_count = v_count + v_n,
           updated_at = v_now,
           prompt = coalesce(p_prompt, prompt),
           model_name = coalesce(p_model, model_name)
     WHERE id = p_session;
    IF p_cost IS NOT NULL THEN
        INSERT INTO outbox (key, kind, user_id, session_id, turn_id, cost_nanos, reservation_id,
                            model_name, created_at)
        VALUES ('turn:' || p_turn::text, 'turn', p_user, p_session, p_turn, p_cost, p_reservation,
                p_charge_model, v_now)
        ON CONFLICT (key) DO NOTHING;
    END IF;
    o_status := 'created';
    o_first_seq := v_count;
    o_count := v_n;
    o_entry_count := v_count + v_n;
END
$$;

-- Store a summary fold under the row lock; returns the session as it is afterwards (NULL when
-- no such session of this user). Ignored (the current row returned, nothing written) when it
-- is a replay of the turn whose summary is stored, or older than the stored one.
CREATE OR REPLACE FUNCTION store_summary(
    p_session uuid, p_user uuid, p_summary text, p_upto integer, p_turn uuid,
    p_cost bigint, p_reservation text, p_charge_model text
) RETURNS sessions LANGUAGE plpgsql AS $$
DECLARE
    v sessions;
BEGIN
    SELECT * INTO v FROM sessions WHERE id = p_session AND user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v.summary_turn_id = p_turn OR p_upto < v.summarized_upto THEN
        RETURN v;
    END IF;
    UPDATE sessions
       SET summary = p_summary, summarized_upto = p_upto, summary_turn_id = p_turn,
           updated_at = clock_timestamp()
     WHERE id = p_session
    RETURNING * INTO v;
    IF p_cost IS NOT NULL THEN
        INSERT INTO outbox (key, kind, user_id, session_id, turn_id, cost_nanos, reservation_id,
                            model_name)
        VALUES ('summary:' || p_session::text || ':' || p_upto::text, 'summary', p_user, p_session,
                p_turn, p_cost, p_reservation, p_charge_model)
        ON CONFLICT (key) DO NOTHING;
    END IF;
    RETURN v;
END
$$;
