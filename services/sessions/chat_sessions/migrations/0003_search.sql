-- Full-text search over one's own history (docs/protocol.md, "Extensions" (search)).
--
-- A stored generated column: PostgreSQL computes it in the INSERT that stores the entry, and the
-- GIN index is updated in that same transaction, so a turn is findable the moment its append
-- commits (no external index to drift out of sync). Only 'user' and 'assistant' entries get a
-- vector ('file' entries are file names); the 'english' configuration stems words, so
-- "payments" finds "payment", and lower-cases them. The text is cut at 100,000 characters for
-- the vector: a tsvector holds at most 1 MB, and an append must never fail because its reply
-- is long (words past the cut are not searchable). Rows go with their session (ON DELETE
-- CASCADE), so a deleted session never matches.
ALTER TABLE entries
    ADD COLUMN IF NOT EXISTS search tsvector GENERATED ALWAYS AS (
        CASE WHEN role IN ('user', 'assistant')
             THEN to_tsvector('english'::regconfig, left(content, 100000))
        END
    ) STORED;

CREATE INDEX IF NOT EXISTS entries_search_idx ON entries USING gin (search);

-- The owner's best matches. A function so that it can be planned for the query it is given
-- (plan_cache_mode): a word in half of everything is best found through the user's sessions
-- (an index scan per session, the vector checked on each of the user's entries), a rare word
-- through the GIN index; a generic plan, blind to the words, would pick one for both.
-- websearch_to_tsquery never fails on input: quotes, operators and punctuation are read as
-- words or ignored, and text with no word left is an empty query, which matches nothing.
CREATE OR REPLACE FUNCTION search_entries(p_user uuid, p_query text, p_limit integer)
RETURNS TABLE (session_id uuid, session_name text, seq integer, role text, content text,
               created_at timestamptz, rank real)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_query tsquery := websearch_to_tsquery('english'::regconfig, p_query);
BEGIN
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
