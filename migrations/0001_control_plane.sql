-- tollgate control plane, schema version 1.
--
-- Applied by tollgate itself (src/controldb/schema.rs) inside one transaction,
-- under an advisory lock, when `[tokens] postgres` names this database.
-- Never edit a released migration: add the next numbered file instead.

CREATE TABLE tollgate.tokens (
    -- The public part of the token: tg_<id>_<secret><checksum>.
    id text PRIMARY KEY CHECK (id ~ '^[a-z0-9]{12}$'),
    -- The PostgreSQL role the token logs in as.
    role text NOT NULL CHECK (role <> ''),
    -- SHA-256 of the secret, hex; the secret itself is never stored.
    secret_sha256 text NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    -- After a rotation: the old secret's hash and the end of its grace.
    previous_secret_sha256 text CHECK (previous_secret_sha256 ~ '^[0-9a-f]{64}$'),
    previous_valid_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    not_before timestamptz,
    expires_at timestamptz,
    revoked_at timestamptz,
    -- Everything else, in the token file's field names: databases (required),
    -- cidrs, max_connections, replication, lock_session, on_expiry, session,
    -- comment, upstreams.
    rules jsonb NOT NULL CHECK (jsonb_typeof(rules) = 'object' AND rules ? 'databases'),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((previous_secret_sha256 IS NULL) = (previous_valid_until IS NULL))
);

-- JWT ids revoked before their expiry.
CREATE TABLE tollgate.revoked_jwts (
    jti text PRIMARY KEY CHECK (jti <> ''),
    revoked_at timestamptz NOT NULL DEFAULT now()
);

-- The running instances, so that any of them can forward a CancelRequest to
-- the one that owns the session. Rows whose seen_at is old are free to claim.
CREATE TABLE tollgate.instances (
    id integer PRIMARY KEY CHECK (id BETWEEN 1 AND 255),
    address text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now()
);

-- Every committed change to the tokens reaches every instance, whoever made
-- it: tollgate, the functions below, or a hand-written UPDATE.
CREATE FUNCTION tollgate.notify_tokens() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_tokens', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER tokens_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tollgate.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate.notify_tokens();
CREATE TRIGGER revoked_jwts_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tollgate.revoked_jwts
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate.notify_tokens();

CREATE FUNCTION tollgate.notify_instances() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_instances', '');
    RETURN NULL;
END
$$;

-- Heartbeats (seen_at) do not notify; joins, leaves and moves do.
CREATE TRIGGER instances_changed
    AFTER INSERT OR DELETE OR UPDATE OF address ON tollgate.instances
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate.notify_instances();

-- Revokes a token: new logins are refused and its open sessions end, on
-- every instance, within a second. True if the token exists.
CREATE FUNCTION tollgate.revoke_token(token_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tollgate.tokens
       SET revoked_at = coalesce(revoked_at, now()), updated_at = now()
     WHERE id = token_id;
    RETURN FOUND;
END
$$;

-- Revokes a JWT by its jti claim.
CREATE FUNCTION tollgate.revoke_jwt(jwt_id text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO tollgate.revoked_jwts (jti) VALUES (jwt_id) ON CONFLICT (jti) DO NOTHING;
$$;

-- Creates or replaces a token from a document in the token file's field
-- names (id, user, secret_sha256, databases, ...; times in RFC 3339).
-- `tollgate token create` writes through this function too.
CREATE FUNCTION tollgate.put_token(doc jsonb) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO tollgate.tokens AS t (
        id, role, secret_sha256, previous_secret_sha256, previous_valid_until,
        created_at, not_before, expires_at, revoked_at, rules, updated_at)
    VALUES (
        doc->>'id', doc->>'user', doc->>'secret_sha256',
        doc->>'previous_secret_sha256', (doc->>'previous_valid_until')::timestamptz,
        coalesce((doc->>'created_at')::timestamptz, now()),
        (doc->>'not_before')::timestamptz, (doc->>'expires_at')::timestamptz,
        (doc->>'revoked_at')::timestamptz,
        doc - ARRAY['id', 'user', 'secret_sha256', 'previous_secret_sha256',
                    'previous_valid_until', 'created_at', 'not_before',
                    'expires_at', 'revoked_at'],
        now())
    ON CONFLICT (id) DO UPDATE SET
        role = EXCLUDED.role,
        secret_sha256 = EXCLUDED.secret_sha256,
        previous_secret_sha256 = EXCLUDED.previous_secret_sha256,
        previous_valid_until = EXCLUDED.previous_valid_until,
        created_at = EXCLUDED.created_at,
        not_before = EXCLUDED.not_before,
        expires_at = EXCLUDED.expires_at,
        -- Once revoked, always revoked: a document without revoked_at (a
        -- tool updating the comment, or racing revoke_token) cannot revive it.
        revoked_at = LEAST(t.revoked_at, EXCLUDED.revoked_at),  -- LEAST skips NULLs
        rules = EXCLUDED.rules,
        updated_at = now();
$$;
