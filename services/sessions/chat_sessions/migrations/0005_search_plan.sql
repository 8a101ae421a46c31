-- search_entries, planned by the size of the asking user's history (bench/search.py, 1,000,000
-- entries over 1,000 users: two moderately common words were estimated rare, so the planner
-- went through the GIN index, whose posting lists span every user: p95 264 ms). The cost of
-- checking the user's own entries is bounded by their number, whatever the words: up to
-- 20,000 entries (a few milliseconds of vectors) the search goes through the user's sessions
-- and their entries (bitmap scans, the only way a GIN index is read, are off for the call);
-- past that the planner chooses, and a rare word is found through the index.
CREATE OR REPLACE FUNCTION search_entries(p_user uuid, p_query text, p_limit integer)
RETURNS TABLE (session_id uuid, session_name text, seq integer, role text, content text,
               created_at timestamptz, rank real)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_custom_plan
SET enable_bitmapscan = on
AS $$
DECLARE
    v_query tsquery := websearch_to_tsquery('english'::regconfig, p_query);
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
