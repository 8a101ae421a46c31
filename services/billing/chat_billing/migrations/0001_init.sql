-- Billing schema. Applied with search_path set to the billing schema, so names are unqualified.
-- Money is bigint nano-dollars (1e-9 $) everywhere; dollars exist only in the HTTP layer.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL CHECK (char_length(username) BETWEEN 1 AND 200),
    balance_nanos bigint NOT NULL DEFAULT 0 CHECK (balance_nanos >= 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE models (
    id                        integer PRIMARY KEY CHECK (id >= 0),
    name                      text NOT NULL UNIQUE CHECK (char_length(name) BETWEEN 1 AND 200),
    provider                  text NOT NULL CHECK (char_length(provider) BETWEEN 1 AND 100),
    context_length            integer NOT NULL CHECK (context_length > 0),
    input_price_nanos_per_1k  bigint NOT NULL CHECK (input_price_nanos_per_1k >= 0),
    output_price_nanos_per_1k bigint NOT NULL CHECK (output_price_nanos_per_1k >= 0),
    active                    boolean NOT NULL DEFAULT true,
    updated_at                timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE entitlements (
    user_id    uuid NOT NULL REFERENCES users (id),
    model_id   integer NOT NULL REFERENCES models (id),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, model_id)
);

CREATE TABLE reservations (
    id              uuid PRIMARY KEY,
    user_id         uuid NOT NULL REFERENCES users (id),
    model_id        integer NOT NULL REFERENCES models (id),
    amount_nanos    bigint NOT NULL CHECK (amount_nanos >= 0),
    input_tokens    integer NOT NULL CHECK (input_tokens >= 0),
    output_tokens   integer NOT NULL CHECK (output_tokens >= 0),
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settled', 'released')),
    turn_id         text,
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- When the hold went back to the balance, and why: an explicit release or the expiry sweep.
    released_at     timestamptz,
    release_reason  text CHECK (release_reason IN ('released', 'expired')),
    settled_at      timestamptz,
    cost_nanos      bigint CHECK (cost_nanos >= 0),
    charged_nanos   bigint NOT NULL DEFAULT 0 CHECK (charged_nanos >= 0),
    shortfall_nanos bigint NOT NULL DEFAULT 0 CHECK (shortfall_nanos >= 0)
);

CREATE INDEX reservations_open_by_expiry ON reservations (expires_at) WHERE status = 'open';
CREATE INDEX reservations_open_by_user ON reservations (user_id) WHERE status = 'open';

CREATE TABLE ledger (
    id                  bigserial PRIMARY KEY,
    user_id             uuid NOT NULL REFERENCES users (id),
    kind                text NOT NULL CHECK (kind IN ('credit', 'debit', 'reserve', 'settle', 'release')),
    -- Signed change of balance_nanos: the sum over a user's rows is that user's balance.
    amount_nanos        bigint NOT NULL,
    balance_after_nanos bigint NOT NULL CHECK (balance_after_nanos >= 0),
    model_id            integer,
    turn_id             text,
    reservation_id      uuid,
    idempotency_key     text,
    reason              text,
    -- On settle and debit: what was actually taken, and what could not be (balance hit zero).
    charged_nanos       bigint CHECK (charged_nanos >= 0),
    shortfall_nanos     bigint NOT NULL DEFAULT 0 CHECK (shortfall_nanos >= 0),
    details             jsonb,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_by_user ON ledger (user_id, id DESC);

-- The ledger is the audit trail: refuse any change to a written row, whoever asks.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger is append-only: % refused', TG_OP;
END
$$;

CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

CREATE TABLE idempotency (
    key         text PRIMARY KEY,
    -- Operation and request digest: the same key sent with a different request is refused.
    fingerprint text NOT NULL,
    status_code integer,
    response    text,  -- the exact reply bytes, replayed as sent
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The original catalogue (the original's catalogue (docs/protocol.md, type 5)), dollars per 1K tokens times 1e9.
INSERT INTO models (id, name, provider, context_length, input_price_nanos_per_1k, output_price_nanos_per_1k) VALUES
    (0, 'gpt-3.5-turbo-0125',     'openai', 16385,    500000,   1500000),
    (1, 'gpt-3.5-turbo',          'openai', 16385,   3000000,   6000000),
    (2, 'gpt-3.5-turbo-1106',     'openai', 16385,   1000000,   2000000),
    (3, 'gpt-3.5-turbo-instruct', 'openai', 4096,    1500000,   2000000),
    (4, 'gpt-4-turbo',            'openai', 128000, 10000000,  30000000),
    (5, 'gpt-4-turbo-2024-04-09', 'openai', 128000, 10000000,  30000000),
    (6, 'gpt-4',                  'openai', 8192,   30000000,  60000000),
    (7, 'gpt-4-32k',              'openai', 32768,  60000000, 120000000),
    (8, 'llama3.1:8b',            'ollama', 4096,    1500000,   2000000);
