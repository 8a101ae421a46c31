-- The search vector, made from each word's first uses rather than the whole text (and
-- append_turn one function again).
--
-- Measured (bench/turns.py): parsing an entry for its vector is most of what PostgreSQL spends
-- on a turn, about 0.1 us per character with the default parser whatever the configuration,
-- and a long reply repeats its words. The sessions service now hands the append the entry's
-- words with each distinct word kept at its first three uses, in order (sessions/search.py),
-- and the vector is made from that: every word of the entry is still in it, and how often it
-- occurs still ranks (up to three, past which ts_rank hardly moves). What the vector no longer
-- holds is every position, so a search is a set of words (plainto_tsquery: all of them must
-- occur; quotes, operators and punctuation are read as words or ignored), never a phrase.
-- Entries stored before keep their vectors, which the new queries read the same way.
ALTER TABLE entries ALTER COLUMN search DROP EXPRESSION;

-- An entry's vector, from the text given (its words, or its content): one definition for the
-- append and the import. Only 'user' and 'assistant' entries get one ('file' entries are file
-- names); cut at 100,000 characters, since a tsvector holds at most 1 MB and an append must
-- never fail because its reply is long. A plain SQL function, inlined where it is called.
CREATE OR REPLACE FUNCTION entry_vector(p_role text, p_text text) RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_role IN ('user', 'assistant')
                THEN to_tsvector('english'::regconfig, left(p_text, 100000))
           END
$$;

-- append_turn becomes one function again: 0007's overload (receipt through a setting, then the
-- original) goes, and the original's body takes p_receipt and p_words itself.
DROP FUNCTION IF EXISTS append_turn(uuid, uuid, uuid, text[], text[], integer, text, text, bigint, text, text, jsonb);
DROP FUNCTION IF EXISTS append_turn(uuid, uuid, uuid, text[], text[], integer, text, text, bigint, text, text);

-- As in 0002, with p_receipt (0007: the receipt's details, kept with the owed charge) and
-- p_words: per entry, the text its vector is made from (NULL: the content).
CREATE FUNCTION append_turn(
    p_session uuid, p_user uuid, p_turn uuid, p_roles text[], p_contents text[],
    p_expected integer, p_prompt text, p_model text,
    p_cost bigint, p_reservation text, p_charge_model text, p_receipt jsonb, p_words text[] DEFAULT NULL,
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
    -- unnest pads a shorter (or NULL) p_words with NULLs
    INSERT INTO entries (session_id, seq, role, content, turn_id, created_at, search)
    SELECT p_session, v_count + (e.n - 1)::integer, e.role, e.content, p_turn, v_now,
           entry_vector(e.role, coalesce(e.words, e.content))
      FROM unnest(p_roles, p_contents, p_words) WITH ORDINALITY AS e (role, content, words, n);
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
                            model_name, created_at, receipt)
        VALUES ('turn:' || p_turn::text, 'turn', p_user, p_session, p_turn, p_cost, p_reservation,
                p_charge_model, v_now, p_receipt)
        ON CONFLICT (key) DO NOTHING;
    END IF;
    o_status := 'created';
    o_first_seq := v_count;
    o_count := v_n;
    o_entry_count := v_count + v_n;
END
$$;

-- As in 0005, with the words read by plainto_tsquery (a set of words, see above).
CREATE OR REPLACE FUNCTION search_entries(p_user uuid, p_query text, p_limit integer)
RETURNS TABLE (session_id uuid, session_name text, seq integer, role text, content text,
               created_at timestamptz, rank real)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_custom_plan
SET enable_bitmapscan = on
AS $$
DECLARE
    v_query tsquery := plainto_tsquery('english'::regconfig, p_query);
    v_entries bigint;
BEGIN
    IF numnode(v_query) = 0 THEN
        RETURN;  -- no searchable word (only punctuation or stop words): nothing matches
    END IF;
    SELECT coalesce(sum(s.entry_count), 0) INTO v_entries FROM sessions AS s WHERE s.user_id = p_user;
    IF v_entries = 0 THEN
        RETURN;
    END IF;
    -- local to this call: the function's SET clause restores the setting when it returns
    PERFORM set_config('enable_bitmapscan', CASE WHEN v_entries <= 20000 THEN 'off' ELSE 'on' END, true);
    RETURN QUERY
    SELECT e.session_id, s.name, e.seq, e.role, e.content, e.created_at, ts_rank(e.search, v_query)
      FROM sessions AS s
      JOIN entries AS e ON e.session_id = s.id
     WHERE s.user_id = p_user
       AND e.search @@ v_query
     ORDER BY 7 DESC, e.created_at DESC, e.session_id, e.seq
     LIMIT p_limit;
END
$$;
