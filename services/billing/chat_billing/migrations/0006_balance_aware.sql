-- Balance-aware turns (issue 14), opt-in per user or per model, off by default: when the balance
-- or a spending limit leaves less than the usual reservation, the turn is not refused but
-- reserves what is left and asks the AI for fewer output tokens, down to a floor the caller sends
-- (the gateway's BALANCE_AWARE_MIN_OUTPUT_TOKENS); below the floor it is refused as before. Its
-- settle never takes more than that reservation.
--
-- Built around the functions of 0003/0004 rather than replacing them: billing_reserve_aware
-- calls billing_reserve as it is (same checks, same locks), and only when that refuses for money
-- (balance, daily, monthly or per-session limit) and the turn is balance-aware does it ask again
-- with the output tokens that fit in what the refusal says is left. A limit's check has locked
-- the user's row by then, and that lock is kept to the end of this one call (one transaction),
-- so nothing can slip in between the refusal and the smaller reserve. billing_settle_within
-- calls billing_settle with the cost cut to the reservation's cap (cap_nanos, set only on a
-- reservation made smaller this way); the AI's own figure is kept in the ledger row's details.

-- A user's own setting wins (true: on, false: off even for a balance-aware model); without one,
-- the model's setting counts; with neither, off.
CREATE TABLE balance_aware_users (
    user_id    uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    enabled    boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE balance_aware_models (
    model_id   integer PRIMARY KEY REFERENCES models (id) ON DELETE CASCADE,
    enabled    boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Set only on a reservation made smaller than asked: the most its settle may take.
ALTER TABLE reservations ADD COLUMN cap_nanos bigint CHECK (cap_nanos >= 0);

CREATE FUNCTION balance_aware(p_user uuid, p_model integer) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT enabled FROM balance_aware_users WHERE user_id = p_user),
        (SELECT enabled FROM balance_aware_models WHERE model_id = p_model),
        false)
$$;

-- billing_reserve's outcomes and view, plus o_max_output_tokens: the output tokens the turn may
-- ask the AI for when its reservation was made smaller (NULL: as asked). p_min_output NULL: the
-- caller does not do balance-aware turns; exactly billing_reserve.
CREATE FUNCTION billing_reserve_aware(
    p_user uuid, p_model_id integer, p_model_name text, p_input integer, p_output integer,
    p_turn text, p_key text, p_ttl_seconds integer, p_session text, p_min_output integer,
    OUT o_view reservation_view, OUT o_max_output_tokens integer
) LANGUAGE plpgsql AS $$
DECLARE
    m models;
    fits numeric;
    want integer := p_output;
    tries integer := 0;
BEGIN
    o_view := billing_reserve(p_user, p_model_id, p_model_name, p_input, p_output, p_turn, p_key, p_ttl_seconds,
                              p_session);
    IF o_view.outcome = 'existing' THEN
        o_max_output_tokens := (SELECT output_tokens FROM reservations WHERE id = o_view.id AND cap_nanos IS NOT NULL);
        RETURN;
    END IF;
    IF p_min_output IS NULL
       OR o_view.outcome NOT IN ('insufficient_balance', 'daily_limit', 'monthly_limit', 'session_limit') THEN
        RETURN;
    END IF;
    SELECT models.* INTO m
      FROM models JOIN entitlements e ON e.model_id = models.id AND e.user_id = p_user
     WHERE models.active
       AND (p_model_id IS NULL OR models.id = p_model_id)
       AND (p_model_name IS NULL OR models.name = p_model_name);
    IF NOT FOUND OR m.output_price_nanos_per_1k = 0 OR NOT balance_aware(p_user, m.id) THEN
        RETURN;
    END IF;
    LOOP
        tries := tries + 1;
        -- the most output tokens whose hold, with the input's, fits in what the refusal left:
        -- ceil((in * in_price + out * out_price) / 1000) <= left
        fits := floor(((CASE WHEN o_view.outcome = 'insufficient_balance' THEN o_view.balance_nanos
                             ELSE o_view.limit_nanos - o_view.spent_nanos - o_view.held_nanos END)::numeric * 1000
                       - p_input::numeric * m.input_price_nanos_per_1k) / m.output_price_nanos_per_1k);
        IF fits < greatest(p_min_output, 0) THEN
            RETURN;  -- below the floor: refused as before, with this refusal
        END IF;
        want := least(want, fits)::integer;
        o_view := billing_reserve(p_user, p_model_id, p_model_name, p_input, want, p_turn, p_key, p_ttl_seconds,
                                  p_session);
        IF o_view.outcome = 'reserved' THEN
            IF want < p_output THEN
                UPDATE reservations SET cap_nanos = o_view.amount_nanos WHERE id = o_view.id;
                o_max_output_tokens := want;
            END IF;
            RETURN;
        END IF;
        IF o_view.outcome = 'existing' THEN
            o_max_output_tokens := (SELECT output_tokens FROM reservations WHERE id = o_view.id AND cap_nanos IS NOT NULL);
            RETURN;
        END IF;
        -- refused again: another limit is tighter (or the balance moved); at most one round each
        IF tries >= 5
           OR o_view.outcome NOT IN ('insufficient_balance', 'daily_limit', 'monthly_limit', 'session_limit') THEN
            RETURN;
        END IF;
    END LOOP;
END
$$;

-- billing_settle, with the cost cut to the reservation's cap: a balance-aware turn never pays
-- more than it reserved. The receipt shows what was charged; the AI's figure is in the ledger
-- row's details ({"balance_aware": {"cost_nanos", "cap_nanos"}}).
CREATE FUNCTION billing_settle_within(
    p_id uuid, p_user uuid, p_cost bigint, p_turn text, p_key text, p_details jsonb, p_receipt jsonb
) RETURNS reservation_view LANGUAGE plpgsql AS $$
DECLARE
    cap bigint;
BEGIN
    SELECT cap_nanos INTO cap FROM reservations WHERE id = p_id;
    IF cap IS NULL OR p_cost <= cap THEN
        RETURN billing_settle(p_id, p_user, p_cost, p_turn, p_key, p_details, p_receipt);
    END IF;
    RETURN billing_settle(
        p_id, p_user, cap, p_turn, p_key,
        coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('balance_aware', jsonb_build_object('cost_nanos', p_cost, 'cap_nanos', cap)),
        p_receipt);
END
$$;
