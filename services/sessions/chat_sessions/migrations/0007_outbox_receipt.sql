-- The receipt's details in the outbox (issue 14): what the charged call saw (tokens in and out,
-- the window's first and last seq, the summary's extent, the prompt's SHA-256; the gateway's
-- ReceiptDetails), kept as jsonb with the owed charge, so that a charge replayed from here (its
-- inline settle failed) gets the same complete receipt as one settled inline. NULL: not sent
-- (an older gateway), or a row written before this migration.
--
-- append_turn and store_summary gain an overload with p_receipt and otherwise stay as they are
-- (this migration does not copy their bodies, so a later change to them is kept): the overload
-- puts the receipt in a transaction-local setting, calls the original, and the outbox row the
-- original inserts takes it through the column's default, in the same transaction. No second
-- write of the row. The setting is emptied again before the call returns, so nothing else
-- inserted in the transaction picks it up.

ALTER TABLE outbox ADD COLUMN IF NOT EXISTS receipt jsonb
    DEFAULT nullif(current_setting('chat_sessions.outbox_receipt', true), '')::jsonb;

CREATE OR REPLACE FUNCTION append_turn(
    p_session uuid, p_user uuid, p_turn uuid, p_roles text[], p_contents text[],
    p_expected integer, p_prompt text, p_model text,
    p_cost bigint, p_reservation text, p_charge_model text, p_receipt jsonb,
    OUT o_status text, OUT o_first_seq integer, OUT o_count integer, OUT o_entry_count integer
) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('chat_sessions.outbox_receipt', coalesce(p_receipt::text, ''), true);
    SELECT a.o_status, a.o_first_seq, a.o_count, a.o_entry_count
      INTO o_status, o_first_seq, o_count, o_entry_count
      FROM append_turn(p_session, p_user, p_turn, p_roles, p_contents, p_expected, p_prompt, p_model,
                       p_cost, p_reservation, p_charge_model) AS a;
    PERFORM set_config('chat_sessions.outbox_receipt', '', true);
END
$$;

CREATE OR REPLACE FUNCTION store_summary(
    p_session uuid, p_user uuid, p_summary text, p_upto integer, p_turn uuid,
    p_cost bigint, p_reservation text, p_charge_model text, p_receipt jsonb
) RETURNS sessions LANGUAGE plpgsql AS $$
DECLARE
    v sessions;
BEGIN
    PERFORM set_config('chat_sessions.outbox_receipt', coalesce(p_receipt::text, ''), true);
    v := store_summary(p_session, p_user, p_summary, p_upto, p_turn, p_cost, p_reservation, p_charge_model);
    PERFORM set_config('chat_sessions.outbox_receipt', '', true);
    RETURN v;
END
$$;
