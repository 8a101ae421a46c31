-- Spending limits per user (UTC day, UTC month) and per session, checked by the reserve in the
-- same statement (and transaction) that takes the hold from the balance.
--
-- Spend is what settled charges actually took (the ledger's charged_nanos of settle and debit
-- rows), kept as running sums so the check is a few primary-key reads, whatever the history:
-- daily_spend per user and UTC day (a month is the sum of at most 31 of its rows) and
-- session_spend per session. They are written by billing_settle and billing_charge_summary in
-- the same transaction as the ledger row they sum, under the user's row lock.
--
-- Why the check cannot be raced past: a reserve of a user with limits first locks the user's row
-- (FOR NO KEY UPDATE, the lock every reserve, settle, release and charge of that user takes
-- anyway), and only then reads spend and open holds, each statement with a fresh snapshot
-- (READ COMMITTED). So a reserve sees every hold and charge of that user committed before it,
-- and the next one waits for it. A user without limits pays one primary-key read more.

ALTER TABLE reservations ADD COLUMN session_id text;

CREATE TABLE limits (
    user_id           uuid PRIMARY KEY REFERENCES users (id),
    daily_nanos       bigint CHECK (daily_nanos >= 0),
    monthly_nanos     bigint CHECK (monthly_nanos >= 0),
    per_session_nanos bigint CHECK (per_session_nanos >= 0),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE daily_spend (
    user_id     uuid NOT NULL REFERENCES users (id),
    day         date NOT NULL,
    spent_nanos bigint NOT NULL DEFAULT 0 CHECK (spent_nanos >= 0),
    PRIMARY KEY (user_id, day)
);

CREATE TABLE session_spend (
    session_id  text PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (id),
    spent_nanos bigint NOT NULL DEFAULT 0 CHECK (spent_nanos >= 0)
);

-- What was charged before this migration counts too.
INSERT INTO daily_spend (user_id, day, spent_nanos)
SELECT user_id, (created_at AT TIME ZONE 'UTC')::date, sum(charged_nanos)
  FROM ledger
 WHERE (kind = 'settle' OR (kind = 'debit' AND charge_key IS NOT NULL)) AND coalesce(charged_nanos, 0) > 0
 GROUP BY 1, 2;
INSERT INTO session_spend (session_id, user_id, spent_nanos)
SELECT details->>'session_id', user_id, sum(charged_nanos)
  FROM ledger
 WHERE kind = 'debit' AND charge_key IS NOT NULL AND details->>'session_id' IS NOT NULL
   AND coalesce(charged_nanos, 0) > 0
 GROUP BY 1, 2
ON CONFLICT (session_id) DO NOTHING;

-- The refusal tells which limit, what it is, and what is spent and held against it.
ALTER TYPE reservation_view ADD ATTRIBUTE limit_nanos bigint;
ALTER TYPE reservation_view ADD ATTRIBUTE spent_nanos bigint;
ALTER TYPE reservation_view ADD ATTRIBUTE held_nanos bigint;

CREATE OR REPLACE FUNCTION reservation_view_of(r reservations, p_outcome text, p_balance bigint)
RETURNS reservation_view LANGUAGE sql STABLE AS $$
    SELECT p_outcome, r.id, r.user_id, r.model_id, r.amount_nanos, r.input_tokens, r.output_tokens, r.status,
           r.turn_id, r.expires_at, r.created_at, r.released_at, r.release_reason, r.settled_at, r.cost_nanos,
           r.charged_nanos, r.shortfall_nanos, m.name, m.provider, m.context_length, m.input_price_nanos_per_1k,
           m.output_price_nanos_per_1k, m.active,
           coalesce(p_balance, r.balance_after_nanos,
                    (SELECT u.balance_nanos FROM users u WHERE u.id = r.user_id)),
           NULL::bigint, NULL::bigint, NULL::bigint
      FROM models m WHERE m.id = r.model_id
$$;

-- Add what a charge took to the user's UTC day and to its session. The caller holds the user's row.
CREATE FUNCTION spend_add(p_user uuid, p_session text, p_charged bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_charged IS NULL OR p_charged <= 0 THEN
        RETURN;
    END IF;
    INSERT INTO daily_spend AS d (user_id, day, spent_nanos)
    VALUES (p_user, (now() AT TIME ZONE 'UTC')::date, p_charged)
    ON CONFLICT (user_id, day) DO UPDATE SET spent_nanos = d.spent_nanos + EXCLUDED.spent_nanos;
    IF p_session IS NOT NULL THEN
        INSERT INTO session_spend AS s (session_id, user_id, spent_nanos)
        VALUES (p_session, p_user, p_charged)
        ON CONFLICT (session_id) DO UPDATE SET spent_nanos = s.spent_nanos + EXCLUDED.spent_nanos;
    END IF;
END
$$;

-- Outcomes as in 0002, and daily_limit | monthly_limit | session_limit (limit_nanos, spent_nanos,
-- held_nanos and amount_nanos tell why). A refusal changes nothing.
CREATE FUNCTION billing_reserve(
    p_user uuid, p_model_id integer, p_model_name text, p_input integer, p_output integer,
    p_turn text, p_key text, p_ttl_seconds integer, p_session text
) RETURNS reservation_view LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    m models;
    lim limits;
    v reservation_view;
    amount bigint;
    bal_after bigint;
    held bigint;
    session_held bigint;
    spent bigint;
    today date;
BEGIN
    IF p_turn IS NOT NULL THEN
        SELECT * INTO r FROM reservations WHERE turn_id = p_turn;
        IF FOUND THEN
            RETURN reservation_view_of(r, CASE WHEN r.user_id = p_user THEN 'existing' ELSE 'turn_conflict' END, NULL);
        END IF;
    END IF;
    SELECT models.* INTO m
      FROM models JOIN entitlements e ON e.model_id = models.id AND e.user_id = p_user
     WHERE models.active
       AND (p_model_id IS NULL OR models.id = p_model_id)
       AND (p_model_name IS NULL OR models.name = p_model_name);
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM users WHERE id = p_user) THEN
            v.outcome := 'user_not_found';
            RETURN v;
        END IF;
        IF p_model_id IS NOT NULL AND p_model_name IS NOT NULL THEN
            SELECT name INTO v.model_name FROM models WHERE id = p_model_id;
            IF v.model_name IS NOT NULL AND v.model_name <> p_model_name THEN
                v.outcome := 'model_mismatch';
                RETURN v;
            END IF;
        END IF;
        v.outcome := 'model_not_entitled';
        RETURN v;
    END IF;
    amount := ceil((p_input::numeric * m.input_price_nanos_per_1k
                    + p_output::numeric * m.output_price_nanos_per_1k) / 1000)::bigint;
    SELECT * INTO lim FROM limits WHERE user_id = p_user;
    IF FOUND AND (lim.daily_nanos IS NOT NULL OR lim.monthly_nanos IS NOT NULL
                  OR (lim.per_session_nanos IS NOT NULL AND p_session IS NOT NULL)) THEN
        -- The user's row first: every hold and charge of this user committed before is seen by
        -- the statements below, and a concurrent reserve of the user waits for this one.
        PERFORM 1 FROM users WHERE id = p_user FOR NO KEY UPDATE;
        SELECT coalesce(sum(amount_nanos), 0),
               coalesce(sum(amount_nanos) FILTER (WHERE session_id = p_session), 0)
          INTO held, session_held
          FROM reservations WHERE user_id = p_user AND status = 'open';
        today := (now() AT TIME ZONE 'UTC')::date;
        IF lim.daily_nanos IS NOT NULL THEN
            SELECT coalesce(sum(spent_nanos), 0) INTO spent FROM daily_spend WHERE user_id = p_user AND day = today;
            IF spent + held + amount > lim.daily_nanos THEN
                v.outcome := 'daily_limit';
                v.amount_nanos := amount; v.limit_nanos := lim.daily_nanos; v.spent_nanos := spent; v.held_nanos := held;
                RETURN v;
            END IF;
        END IF;
        IF lim.monthly_nanos IS NOT NULL THEN
            SELECT coalesce(sum(spent_nanos), 0) INTO spent FROM daily_spend
             WHERE user_id = p_user AND day >= date_trunc('month', today)::date AND day <= today;
            IF spent + held + amount > lim.monthly_nanos THEN
                v.outcome := 'monthly_limit';
                v.amount_nanos := amount; v.limit_nanos := lim.monthly_nanos; v.spent_nanos := spent; v.held_nanos := held;
                RETURN v;
            END IF;
        END IF;
        IF lim.per_session_nanos IS NOT NULL AND p_session IS NOT NULL THEN
            SELECT coalesce(sum(spent_nanos), 0) INTO spent FROM session_spend WHERE session_id = p_session;
            IF spent + session_held + amount > lim.per_session_nanos THEN
                v.outcome := 'session_limit';
                v.amount_nanos := amount; v.limit_nanos := lim.per_session_nanos; v.spent_nanos := spent;
                v.held_nanos := session_held;
                RETURN v;
            END IF;
        END IF;
    END IF;
    UPDATE users SET balance_nanos = balance_nanos - amount
     WHERE id = p_user AND balance_nanos >= amount AND balance_nanos > 0
    RETURNING balance_nanos INTO bal_after;
    IF NOT FOUND THEN
        IF p_turn IS NOT NULL THEN
            -- A concurrent reserve of this same turn may have taken the money and committed.
            SELECT * INTO r FROM reservations WHERE turn_id = p_turn;
            IF FOUND THEN
                RETURN reservation_view_of(r, CASE WHEN r.user_id = p_user THEN 'existing' ELSE 'turn_conflict' END, NULL);
            END IF;
        END IF;
        v.outcome := 'insufficient_balance';
        v.amount_nanos := amount;
        SELECT balance_nanos INTO v.balance_nanos FROM users WHERE id = p_user;
        RETURN v;
    END IF;
    INSERT INTO reservations (id, user_id, model_id, amount_nanos, input_tokens, output_tokens, status, turn_id,
                              expires_at, balance_after_nanos, session_id)
    VALUES (gen_random_uuid(), p_user, m.id, amount, p_input, p_output, 'open', p_turn,
            now() + make_interval(secs => p_ttl_seconds), bal_after, p_session)
    ON CONFLICT (turn_id) WHERE turn_id IS NOT NULL DO NOTHING
    RETURNING * INTO r;
    IF NOT FOUND THEN
        -- The same turn was reserved concurrently and committed first: undo this one's
        -- balance change (the whole call rolls back); the caller asks again and finds it.
        RAISE EXCEPTION 'turn % was reserved concurrently', p_turn USING ERRCODE = '40001';
    END IF;
    INSERT INTO ledger (user_id, kind, amount_nanos, balance_after_nanos, model_id, turn_id, reservation_id,
                        idempotency_key)
    VALUES (p_user, 'reserve', -amount, bal_after, m.id, p_turn, r.id, p_key);
    v := (('reserved', r.id, r.user_id, r.model_id, r.amount_nanos, r.input_tokens, r.output_tokens, r.status,
           r.turn_id, r.expires_at, r.created_at, r.released_at, r.release_reason, r.settled_at, r.cost_nanos,
           r.charged_nanos, r.shortfall_nanos, m.name, m.provider, m.context_length, m.input_price_nanos_per_1k,
           m.output_price_nanos_per_1k, m.active, bal_after, NULL, NULL, NULL)::reservation_view);
    RETURN v;
END
$$;

-- The 0002 signature, for a caller that sends no session (an older replica during a rollout).
CREATE OR REPLACE FUNCTION billing_reserve(
    p_user uuid, p_model_id integer, p_model_name text, p_input integer, p_output integer,
    p_turn text, p_key text, p_ttl_seconds integer
) RETURNS reservation_view LANGUAGE sql AS $$
    SELECT * FROM billing_reserve(p_user, p_model_id, p_model_name, p_input, p_output, p_turn, p_key,
                                  p_ttl_seconds, NULL::text)
$$;

-- As in 0002, and what the charge took is added to the day's and the session's spend.
CREATE OR REPLACE FUNCTION billing_settle(
    p_id uuid, p_user uuid, p_cost bigint, p_turn text, p_key text, p_details jsonb
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
    UPDATE reservations
       SET status = 'settled', settled_at = now(), cost_nanos = p_cost, charged_nanos = charged,
           shortfall_nanos = p_cost - charged, turn_id = coalesce(r.turn_id, p_turn), balance_after_nanos = bal_after
     WHERE id = r.id
    RETURNING * INTO r;
    RETURN reservation_view_of(r, 'settled', bal_after);
END
$$;

CREATE OR REPLACE FUNCTION billing_charge_summary(
    p_user uuid, p_key text, p_turn text, p_cost bigint, p_session text, p_model_name text
) RETURNS TABLE (o_outcome text, o_charged bigint, o_shortfall bigint) LANGUAGE plpgsql AS $$
DECLARE
    bal_before bigint;
    charged bigint;
    l ledger;
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
    UPDATE users SET balance_nanos = bal_before - charged WHERE id = p_user;
    INSERT INTO ledger (user_id, kind, amount_nanos, balance_after_nanos, model_id, turn_id, idempotency_key,
                        reason, charged_nanos, shortfall_nanos, details, charge_key)
    VALUES (p_user, 'debit', -charged, bal_before - charged, (SELECT id FROM models WHERE name = p_model_name),
            p_turn, p_key, 'summary', charged, p_cost - charged,
            jsonb_build_object('session_id', p_session), p_key)
    ON CONFLICT (charge_key) WHERE charge_key IS NOT NULL DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'charge key % was used concurrently', p_key USING ERRCODE = '40001';
    END IF;
    PERFORM spend_add(p_user, p_session, charged);
    RETURN QUERY SELECT 'charged', charged, p_cost - charged;
END
$$;
