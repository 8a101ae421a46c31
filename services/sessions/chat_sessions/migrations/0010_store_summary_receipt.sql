-- store_summary takes the receipt's details itself, as append_turn does since 0009. 0007 passed
-- them through a transaction-local setting that the outbox column's default read, around an
-- unchanged original; with both functions writing the column, that setting and the default go.
DROP FUNCTION IF EXISTS store_summary(uuid, uuid, text, integer, uuid, bigint, text, text, jsonb);
DROP FUNCTION IF EXISTS store_summary(uuid, uuid, text, integer, uuid, bigint, text, text);

ALTER TABLE outbox ALTER COLUMN receipt DROP DEFAULT;

-- As in 0002, with p_receipt written to the outbox row.
CREATE FUNCTION store_summary(
    p_session uuid, p_user uuid, p_summary text, p_upto integer, p_turn uuid,
    p_cost bigint, p_reservation text, p_charge_model text, p_receipt jsonb
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
                            model_name, receipt)
        VALUES ('summary:' || p_session::text || ':' || p_upto::text, 'summary', p_user, p_session,
                p_turn, p_cost, p_reservation, p_charge_model, p_receipt)
        ON CONFLICT (key) DO NOTHING;
    END IF;
    RETURN v;
END
$$;
