-- The money path of a chat turn as functions: each call is one statement, so one round trip, and
-- each runs in one transaction with the same lock order as before (reservation row, then user
-- row; a reserve takes only the user row). Statements inside a PL/pgSQL function each take a
-- fresh snapshot (READ COMMITTED), exactly like the statements of a client-side transaction.
--
-- Also: reserves are idempotent on turn_id (one hold per turn), summary charges are exactly once
-- per charge key, and a reservation remembers the balance after the call that last changed it,
-- so a repeated call can be answered with the first outcome without the idempotency table.

-- A turn id named by more than one reservation (possible before this migration, when a retried
-- reserve came with a fresh key) keeps it on the oldest one; the ledger rows keep theirs.
UPDATE reservations SET turn_id = NULL
 WHERE id IN (
     SELECT id FROM (
         SELECT id, row_number() OVER (PARTITION BY turn_id ORDER BY created_at, id) AS n
           FROM reservations WHERE turn_id IS NOT NULL
     ) numbered
     WHERE n > 1
 );
CREATE UNIQUE INDEX reservations_by_turn ON reservations (turn_id) WHERE turn_id IS NOT NULL;

-- The user's balance right after the reserve, settle or release that last changed the row.
ALTER TABLE reservations ADD COLUMN balance_after_nanos bigint;

-- A charge sent by key (POST /v1/charges, kind summary): one ledger row per key, ever.
ALTER TABLE ledger ADD COLUMN charge_key text;
CREATE UNIQUE INDEX ledger_by_charge_key ON ledger (charge_key) WHERE charge_key IS NOT NULL;

-- What every reservation call answers: the outcome, the reservation, its model, a balance.
CREATE TYPE reservation_view AS (
    outcome                   text,
    id                        uuid,
    user_id                   uuid,
    model_id                  integer,
    amount_nanos              bigint,
    input_tokens              integer,
    output_tokens             integer,
    status                    text,
    turn_id                   text,
    expires_at                timestamptz,
    created_at                timestamptz,
    released_at               timestamptz,
    release_reason            text,
    settled_at                timestamptz,
    cost_nanos                bigint,
    charged_nanos             bigint,
    shortfall_nanos           bigint,
    model_name                text,
    provider                  text,
    context_length            integer,
    input_price_nanos_per_1k  bigint,
    output_price_nanos_per_1k bigint,
    active                    boolean,
    balance_nanos             bigint
);

-- p_balance NULL: the row's remembered balance, else (rows older than this migration) the current one.
CREATE FUNCTION reservation_view_of(r reservations, p_outcome text, p_balance bigint)
RETURNS reservation_view LANGUAGE sql STABLE AS $$
    SELECT p_outcome, r.id, r.user_id, r.model_id, r.amount_nanos, r.input_tokens, r.output_tokens, r.status,
           r.turn_id, r.expires_at, r.created_at, r.released_at, r.release_reason, r.settled_at, r.cost_nanos,
           r.charged_nanos, r.shortfall_nanos, m.name, m.provider, m.context_length, m.input_price_nanos_per_1k,
           m.output_price_nanos_per_1k, m.active,
           coalesce(p_balance, r.balance_after_nanos,
                    (SELECT u.balance_nanos FROM users u WHERE u.id = r.user_id))
      FROM models m WHERE m.id = r.model_id
$$;

-- Outcomes: reserved | existing (this turn was reserved before) | turn_conflict (by another user)
-- | user_not_found | model_mismatch (model_name holds the name of model_id) | model_not_entitled
-- | insufficient_balance (amount_nanos and balance_nanos tell why).
CREATE FUNCTION billing_reserve(
    p_user uuid, p_model_id integer, p_model_name text, p_input integer, p_output integer,
    p_turn text, p_key text, p_ttl_seconds integer
) RETURNS reservation_view LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    m models;
    v reservation_view;
    amount bigint;
    bal_after bigint;
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
                              expires_at, balance_after_nanos)
    VALUES (gen_random_uuid(), p_user, m.id, amount, p_input, p_output, 'open', p_turn,
            now() + make_interval(secs => p_ttl_seconds), bal_after)
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
           m.output_price_nanos_per_1k, m.active, bal_after)::reservation_view);
    RETURN v;
END
$$;

-- Outcomes: settled | already (settled before: nothing more is charged) | not_found.
-- A reservation released meanwhile (expired, say) is still charged: the turn happened. The
-- balance never goes below zero; what it cannot cover is the shortfall.
CREATE FUNCTION billing_settle(
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
    UPDATE reservations
       SET status = 'settled', settled_at = now(), cost_nanos = p_cost, charged_nanos = charged,
           shortfall_nanos = p_cost - charged, turn_id = coalesce(r.turn_id, p_turn), balance_after_nanos = bal_after
     WHERE id = r.id
    RETURNING * INTO r;
    RETURN reservation_view_of(r, 'settled', bal_after);
END
$$;

-- Only for an open reservation whose row the calling transaction has locked.
CREATE FUNCTION release_open(r reservations, p_reason text, p_key text)
RETURNS reservations LANGUAGE plpgsql AS $$
DECLARE
    bal_after bigint;
BEGIN
    UPDATE users SET balance_nanos = balance_nanos + r.amount_nanos WHERE id = r.user_id
    RETURNING balance_nanos INTO bal_after;
    INSERT INTO ledger (user_id, kind, amount_nanos, balance_after_nanos, model_id, turn_id, reservation_id,
                        idempotency_key, reason)
    VALUES (r.user_id, 'release', r.amount_nanos, bal_after, r.model_id, r.turn_id, r.id, p_key, p_reason);
    UPDATE reservations
       SET status = 'released', released_at = now(), release_reason = p_reason, balance_after_nanos = bal_after
     WHERE id = r.id
    RETURNING * INTO r;
    RETURN r;
END
$$;

-- Outcomes: released | closed (settled or released before: left as it is) | not_found.
CREATE FUNCTION billing_release(p_id uuid, p_user uuid, p_key text)
RETURNS reservation_view LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    v reservation_view;
BEGIN
    SELECT * INTO r FROM reservations WHERE id = p_id AND (p_user IS NULL OR user_id = p_user) FOR UPDATE;
    IF NOT FOUND THEN
        v.outcome := 'not_found';
        RETURN v;
    END IF;
    IF r.status <> 'open' THEN
        RETURN reservation_view_of(r, 'closed', NULL);
    END IF;
    r := release_open(r, 'released', p_key);
    RETURN reservation_view_of(r, 'released', NULL);
END
$$;

-- Outcomes: leased | closed (answered as it is) | not_found (unknown, or another user's).
CREATE FUNCTION billing_lease(p_id uuid, p_user uuid, p_ttl_seconds integer)
RETURNS reservation_view LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    v reservation_view;
BEGIN
    UPDATE reservations SET expires_at = now() + make_interval(secs => p_ttl_seconds)
     WHERE id = p_id AND user_id = p_user AND status = 'open'
    RETURNING * INTO r;
    IF FOUND THEN
        RETURN reservation_view_of(r, 'leased', (SELECT balance_nanos FROM users WHERE id = p_user));
    END IF;
    SELECT * INTO r FROM reservations WHERE id = p_id AND user_id = p_user;
    IF NOT FOUND THEN
        v.outcome := 'not_found';
        RETURN v;
    END IF;
    RETURN reservation_view_of(r, 'closed', NULL);
END
$$;

-- Release up to p_limit open reservations past their expiry. Replicas sweeping at once skip each
-- other's rows; user rows are taken in user order, so two sweeps never deadlock.
CREATE FUNCTION billing_expire(p_limit integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    n integer := 0;
BEGIN
    FOR r IN
        SELECT * FROM reservations WHERE status = 'open' AND expires_at <= now()
         ORDER BY user_id, id LIMIT p_limit FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM release_open(r, 'expired', NULL);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- A summary's cost: a debit of its own, exactly once per key, min(cost, balance) taken and the
-- rest recorded as shortfall. Outcomes: charged | already | user_not_found | key_conflict (the
-- key was used for another user's charge).
CREATE FUNCTION billing_charge_summary(
    p_user uuid, p_key text, p_turn text, p_cost bigint, p_session text, p_model_name text
) RETURNS TABLE (o_outcome text, o_charged bigint, o_shortfall bigint) LANGUAGE plpgsql AS $$
DECLARE
    bal_before bigint;
    charged bigint;
    l ledger;
BEGIN
    -- The user's row first: a concurrent charge of the same key has committed by the time this
    -- lock is granted, and the next statement's snapshot sees its ledger row.
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
        -- Taken meanwhile for another user: roll this back; asked again, it is key_conflict.
        RAISE EXCEPTION 'charge key % was used concurrently', p_key USING ERRCODE = '40001';
    END IF;
    RETURN QUERY SELECT 'charged', charged, p_cost - charged;
END
$$;
