-- tollgate control plane, schema version 2: notifications name the tokens
-- that changed.
--
-- Version 1 notified only that the tokens table changed, so every instance
-- reloaded the whole table on every change: at 100,000 tokens that load took
-- about 0.95 s here, most of it the server building each row's document,
-- and a revocation took that long to arrive. Now a statement that changes up
-- to 500 tokens notifies their ids ('tokens:<id>,<id>,...', under the 8000
-- byte payload limit; ids are [a-z0-9]{12}), and instances read back only
-- those rows. A larger statement, a TRUNCATE or an unknown payload still
-- means "reload everything". Changes to revoked_jwts notify 'revoked_jwts',
-- and instances reload only that table.
--
-- Instances of schema version 1 ignore the payload and reload everything,
-- as before, so a fleet may run both during a rolling upgrade.

-- Replacing a trigger takes an ACCESS EXCLUSIVE lock on the table (and
-- needs its owner): rather than queue every token read of the fleet behind
-- a long transaction on the table, give up after a few seconds. The
-- migration then fails with that error, a starting instance exits with it,
-- and a running one tries again when it next reconnects.
SET LOCAL lock_timeout = '5s';

DROP TRIGGER IF EXISTS tokens_changed ON tollgate.tokens;

CREATE FUNCTION tollgate.notify_token_ids() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids text[];
    payload text;
BEGIN
    -- Transition tables: an UPDATE may change a token's id, so both the
    -- old and the new one are named. (plpgsql plans each statement when it
    -- first runs it, so the branches may name tables the others lack.)
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT id) INTO ids FROM (SELECT id FROM new_rows LIMIT 501) s;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT id) INTO ids FROM (SELECT id FROM old_rows LIMIT 501) s;
    ELSE
        -- Each side cut first: a bulk UPDATE need not sort all its rows
        -- to learn that there are more than 500.
        SELECT array_agg(DISTINCT id) INTO ids FROM (
            (SELECT id FROM old_rows LIMIT 501) UNION (SELECT id FROM new_rows LIMIT 501)
        ) s;
    END IF;
    IF ids IS NULL THEN
        RETURN NULL;  -- the statement changed no row
    END IF;
    payload := 'tokens:' || array_to_string(ids, ',');
    -- Past 500 ids, or should ids ever grow longer than the CHECK of
    -- version 1 allows, a payload over NOTIFY's 8000 bytes would fail the
    -- writer's transaction: name no id instead.
    IF cardinality(ids) > 500 OR octet_length(payload) >= 8000 THEN
        payload := 'tokens';
    END IF;
    PERFORM pg_notify('tollgate_tokens', payload);
    RETURN NULL;
END
$$;

-- A trigger with transition tables serves one event only.
CREATE TRIGGER tokens_inserted
    AFTER INSERT ON tollgate.tokens REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate.notify_token_ids();
CREATE TRIGGER tokens_updated
    AFTER UPDATE ON tollgate.tokens REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate.notify_token_ids();
CREATE TRIGGER tokens_deleted
    AFTER DELETE ON tollgate.tokens REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate.notify_token_ids();
-- TRUNCATE has no transition table: 'tokens', reload everything.
CREATE TRIGGER tokens_truncated
    AFTER TRUNCATE ON tollgate.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate.notify_tokens();
