-- A receipt per charge: what each charged turn cost and what the agent was given, written by
-- the same statement (and transaction) as the charge itself, so exactly once with it.
--
-- key: the turn id for a turn's reply (kind 'turn', written by billing_settle); the charge key
-- 'summary:{session}:{upto}' for a summary fold (kind 'summary', written by
-- billing_charge_summary), whose turn_id is the turn that folded it. A fold is a usage row of
-- its own rather than a column of its turn's receipt: a fold done before a turn's AI call is
-- charged before that turn's receipt exists, and one charged from the outbox may come later.
-- charged_nanos is what the ledger row took, so usage totals equal the ledger's charges.
-- What the gateway reports (tokens, window, summary extent, prompt hash) arrives with the
-- settle or charge (p_receipt); a charge replayed from the sessions outbox carries none of it,
-- and its receipt has the money, the session and the model only (NULL for the rest).

CREATE TABLE receipts (
    key               text PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('turn', 'summary')),
    turn_id           text NOT NULL,
    user_id           uuid NOT NULL REFERENCES users (id),
    session_id        text,
    model_id          integer,
    model_name        text,
    input_tokens      bigint,
    output_tokens     bigint,
    first_seq         integer,
    last_seq          integer,
    summarized_upto   integer,
    prompt_sha256     text,
    cost_nanos        bigint NOT NULL,
    charged_nanos     bigint NOT NULL,
    shortfall_nanos   bigint NOT NULL DEFAULT 0,
    reservation_id    uuid,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX receipts_by_user ON receipts (user_id, created_at);
CREATE INDEX receipts_by_session ON receipts (session_id, created_at);

-- Charges before this migration get receipts of what the ledger knows.
INSERT INTO receipts (key, kind, turn_id, user_id, session_id, model_id, model_name, cost_nanos, charged_nanos,
                      shortfall_nanos, reservation_id, created_at)
SELECT coalesce(l.turn_id, 'reservation:' || r.id::text), 'turn', coalesce(l.turn_id, r.id::text), l.user_id,
       r.session_id, l.model_id, m.name,
       coalesce(r.cost_nanos, l.charged_nanos + l.shortfall_nanos), coalesce(l.charged_nanos, 0), l.shortfall_nanos,
       r.id, l.created_at
  FROM ledger l JOIN reservations r ON r.id = l.reservation_id LEFT JOIN models m ON m.id = l.model_id
 WHERE l.kind = 'settle'
ON CONFLICT (key) DO NOTHING;
INSERT INTO receipts (key, kind, turn_id, user_id, session_id, model_id, model_name, cost_nanos, charged_nanos,
                      shortfall_nanos, created_at)
SELECT l.charge_key, 'summary', coalesce(l.turn_id, ''), l.user_id, l.details->>'session_id', l.model_id, m.name,
       coalesce(l.charged_nanos, 0) + l.shortfall_nanos, coalesce(l.charged_nanos, 0), l.shortfall_nanos, l.created_at
  FROM ledger l LEFT JOIN models m ON m.id = l.model_id
 WHERE l.kind = 'debit' AND l.charge_key IS NOT NULL
ON CONFLICT (key) DO NOTHING;

CREATE FUNCTION receipt_int(p jsonb, p_field text) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(p -> p_field) = 'number' THEN (p ->> p_field)::numeric::bigint END
$$;

CREATE FUNCTION billing_settle(
    p_id uuid, p_user uuid, p_cost bigint, p_turn text, p_key text, p_details jsonb, p_receipt jsonb
) RETURNS reservation_view LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    v reservation_view;
    returned bigint;
    bal_before bigint;
    charged bigint;
    bal_after bigint;
BEGIN
    SELECT * INTO r FROM reservations WHERE id = p_id AND (p_user IS NULL OR user_id = p_user) FOR UPDATE;
    IF NOT FOUND THEN
        v.outcome := 'not_found';
        RETURN v;
    END IF;
    IF r.status = 'settled' THEN
        RETURN reservation_view_of(r, 'already', NULL);
    END IF;
    returned := CASE WHEN r.status = 'open' THEN r.amount_nanos ELSE 0 END;
    SELECT balance_nanos INTO bal_before FROM users WHERE id = r.user_id FOR NO KEY UPDATE;
    charged := least(p_cost, bal_before + returned);
    bal_after := bal_before + returned - charged;
    UPDATE users SET balance_nanos = bal_after WHERE id = r.user_id;
    INSERT INTO ledger (user_id, kind, amount_nanos, balance_after_nanos, model_id, turn_id, reservation_id,
                        idempotency_key, reason, charged_nanos, shortfall_nanos, details)
    VALUES (r.user_id, 'settle', returned - charged, bal_after, r.model_id, coalesce(p_turn, r.turn_id), r.id, p_key,
            CASE WHEN returned = 0 THEN 'settled after the reservation was ' || r.release_reason END,
            charged, p_cost - charged, p_details);
    PERFORM spend_add(r.user_id, r.session_id, charged);
    INSERT INTO receipts (key, kind, turn_id, user_id, session_id, model_id, model_name, input_tokens, output_tokens,
                          first_seq, last_seq, summarized_upto, prompt_sha256, cost_nanos, charged_nanos,
                          shortfall_nanos, reservation_id)
    VALUES (coalesce(p_turn, r.turn_id, 'reservation:' || r.id::text), 'turn', coalesce(p_turn, r.turn_id, r.id::text),
            r.user_id, r.session_id, r.model_id, (SELECT name FROM models WHERE id = r.model_id),
            receipt_int(p_receipt, 'input_tokens'), receipt_int(p_receipt, 'output_tokens'),
            receipt_int(p_receipt, 'first_seq'), receipt_int(p_receipt, 'last_seq'),
            receipt_int(p_receipt, 'summarized_upto'), p_receipt ->> 'prompt_sha256',
            p_cost, charged, p_cost - charged, r.id)
    ON CONFLICT (key) DO NOTHING;
    UPDATE reservations
       SET status = 'settled', settled_at = now(), cost_nanos = p_cost, charged_nanos = charged,
           shortfall_nanos = p_cost - charged, turn_id = coalesce(r.turn_id, p_turn), balance_after_nanos = bal_after
     WHERE id = r.id
    RETURNING * INTO r;
    RETURN reservation_view_of(r, 'settled', bal_after);
END
$$;

-- The 0002 signature: a settle without a receipt's details.
CREATE OR REPLACE FUNCTION billing_settle(
    p_id uuid, p_user uuid, p_cost bigint, p_turn text, p_key text, p_details jsonb
) RETURNS reservation_view LANGUAGE sql AS $$
    SELECT * FROM billing_settle(p_id, p_user, p_cost, p_turn, p_key, p_details, NULL::jsonb)
$$;

CREATE FUNCTION billing_charge_summary(
    p_user uuid, p_key text, p_turn text, p_cost bigint, p_session text, p_model_name text, p_receipt jsonb
) RETURNS TABLE (o_outcome text, o_charged bigint, o_shortfall bigint) LANGUAGE plpgsql AS $$
DECLARE
    bal_before bigint;
    charged bigint;
    l ledger;
    model integer;
BEGIN
    SELECT balance_nanos INTO bal_before FROM users WHERE id = p_user FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'user_not_found', 0::bigint, 0::bigint;
        RETURN;
    END IF;
    SELECT * INTO l FROM ledger WHERE charge_key = p_key;
    IF FOUND THEN
        RETURN QUERY SELECT CASE WHEN l.user_id = p_user THEN 'already' ELSE 'key_conflict' END,
                            coalesce(l.charged_nanos, 0), l.shortfall_nanos;
        RETURN;
    END IF;
    charged := least(p_cost, bal_before);
    model := (SELECT id FROM models WHERE name = p_model_name);
    UPDATE users SET balance_nanos = bal_before - charged WHERE id = p_user;
    INSERT INTO ledger (user_id, kind, amount_nanos, balance_after_nanos, model_id, turn_id, idempotency_key,
                        reason, charged_nanos, shortfall_nanos, details, charge_key)
    VALUES (p_user, 'debit', -charged, bal_before - charged, model,
            p_turn, p_key, 'summary', charged, p_cost - charged,
            jsonb_build_object('session_id', p_session), p_key)
    ON CONFLICT (charge_key) WHERE charge_key IS NOT NULL DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'charge key % was used concurrently', p_key USING ERRCODE = '40001';
    END IF;
    PERFORM spend_add(p_user, p_session, charged);
    INSERT INTO receipts (key, kind, turn_id, user_id, session_id, model_id, model_name, input_tokens, output_tokens,
                          first_seq, last_seq, summarized_upto, prompt_sha256, cost_nanos, charged_nanos,
                          shortfall_nanos)
    VALUES (p_key, 'summary', p_turn, p_user, p_session, model, p_model_name,
            receipt_int(p_receipt, 'input_tokens'), receipt_int(p_receipt, 'output_tokens'),
            receipt_int(p_receipt, 'first_seq'), receipt_int(p_receipt, 'last_seq'),
            receipt_int(p_receipt, 'summarized_upto'), p_receipt ->> 'prompt_sha256',
            p_cost, charged, p_cost - charged)
    ON CONFLICT (key) DO NOTHING;
    RETURN QUERY SELECT 'charged', charged, p_cost - charged;
END
$$;

CREATE OR REPLACE FUNCTION billing_charge_summary(
    p_user uuid, p_key text, p_turn text, p_cost bigint, p_session text, p_model_name text
) RETURNS TABLE (o_outcome text, o_charged bigint, o_shortfall bigint) LANGUAGE sql AS $$
    SELECT * FROM billing_charge_summary(p_user, p_key, p_turn, p_cost, p_session, p_model_name, NULL::jsonb)
$$;
