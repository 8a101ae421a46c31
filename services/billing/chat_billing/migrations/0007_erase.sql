-- Erasing a user (chat-admin erase-user) keeps the ledger for accounting under a pseudonymous
-- id: the user's row goes, the ledger rows stay with user_id moved to an id no user has.
--
-- The ledger's foreign key to users goes, so the rows can outlive their user; what it checked
-- is kept by the functions that write the ledger (each writes rows only for a user it has just
-- locked). The append-only trigger now lets exactly one change through: an UPDATE that changes
-- user_id and nothing else, from an id no user has (the user's row is deleted first, in the same
-- transaction) to an id no user has, and only when the transaction declared that pseudonym
-- (SET LOCAL billing.pseudonym). Every other UPDATE, every DELETE and TRUNCATE is refused as
-- before.
ALTER TABLE ledger DROP CONSTRAINT IF EXISTS ledger_user_id_fkey;

CREATE OR REPLACE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_someone boolean;
BEGIN
    IF TG_OP = 'UPDATE'
       AND NEW.user_id IS DISTINCT FROM OLD.user_id
       AND NEW.user_id::text = current_setting('billing.pseudonym', true)
       AND (to_jsonb(NEW) - 'user_id') = (to_jsonb(OLD) - 'user_id')
    THEN
        -- the table's own schema, whatever the caller's search_path
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.users WHERE id = $1 OR id = $2)', TG_TABLE_SCHEMA)
           INTO v_someone USING OLD.user_id, NEW.user_id;
        IF NOT v_someone THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'ledger is append-only: % refused', TG_OP;
END
$$;
