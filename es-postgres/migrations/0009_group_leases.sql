-- es-postgres schema version 9: the leases of consumer groups, and fencing a checkpoint.
--
-- Placeholders as in 0001_init.sql. Every function is SECURITY DEFINER with a pinned search_path
-- and no EXECUTE for PUBLIC, as migration 6 set for the older ones.

-- One row per lease ever taken in a group: who holds it, until when (the database clock), and
-- its generation, raised whenever the lease changes hands. A release ends the lease by setting
-- its expiry to -infinity (so that a clock stepping back cannot revive it); the row stays, so
-- generations never go down. Names and owners are compared byte by byte ("C"), which is also the
-- order of `held_leases`.
CREATE TABLE __SCHEMA__.group_leases (
    lease_group text COLLATE "C" NOT NULL,
    name        text COLLATE "C" NOT NULL,
    owner       text COLLATE "C" NOT NULL,
    generation  bigint           NOT NULL,
    expires_at  timestamptz      NOT NULL,
    CONSTRAINT group_leases_pkey PRIMARY KEY (lease_group, name)
);

-- Takes lease p_name of p_group for p_owner until p_ttl_micros from now when it is free,
-- released, expired or held by p_owner; the generation goes up unless p_owner renews a lease it
-- still holds. One statement: the conflict clause locks the row and evaluates its WHERE and SET
-- on the latest committed version, after any wait for the lock, so concurrent callers decide one
-- after the other, each on what the one before committed, and the clock is read after the wait.
-- Returns the lease's generation, or NULL if another owner holds it.
CREATE FUNCTION __SCHEMA__.group_lease_acquire(p_group text, p_name text, p_owner text,
                                               p_ttl_micros bigint)
RETURNS bigint LANGUAGE sql AS $fn$
    INSERT INTO __SCHEMA__.group_leases AS l (lease_group, name, owner, generation, expires_at)
    VALUES (p_group, p_name, p_owner, 1,
            clock_timestamp() + p_ttl_micros::float8 * interval '1 microsecond')
    ON CONFLICT (lease_group, name) DO UPDATE SET
        generation = CASE WHEN l.owner = excluded.owner AND l.expires_at > clock_timestamp()
                          THEN l.generation ELSE l.generation + 1 END,
        owner = excluded.owner,
        expires_at = clock_timestamp() + p_ttl_micros::float8 * interval '1 microsecond'
    WHERE l.owner = excluded.owner OR l.expires_at <= clock_timestamp()
    RETURNING l.generation
$fn$;

-- Ends lease p_name of p_group if p_owner holds it in p_generation; otherwise changes nothing.
-- The generation stays.
CREATE FUNCTION __SCHEMA__.group_lease_release(p_group text, p_name text, p_owner text,
                                               p_generation bigint)
RETURNS void LANGUAGE sql AS $fn$
    UPDATE __SCHEMA__.group_leases SET expires_at = '-infinity'
     WHERE lease_group = p_group AND name = p_name AND owner = p_owner
       AND generation = p_generation AND expires_at > clock_timestamp()
$fn$;

-- The leases of p_group held now (neither released nor expired), in name order.
CREATE FUNCTION __SCHEMA__.group_leases_held(p_group text)
RETURNS TABLE (held_name text, held_owner text, held_generation bigint) LANGUAGE sql AS $fn$
    SELECT name, owner, generation FROM __SCHEMA__.group_leases
     WHERE lease_group = p_group AND expires_at > clock_timestamp()
     ORDER BY name
$fn$;

-- Starts a new generation of checkpoint p_name at its current position (creating it at position
-- 0 if missing) and returns both. One statement: the conflict clause waits for a batch that holds
-- the row (checkpoint_lock) to end and raises the generation of what that batch committed, so
-- the position returned is everything any earlier generation recorded, and every later save or
-- batch of an earlier generation is refused.
CREATE FUNCTION __SCHEMA__.checkpoint_fence(p_name text)
RETURNS TABLE (fenced_position bigint, fenced_generation bigint) LANGUAGE sql AS $fn$
    INSERT INTO __SCHEMA__.checkpoints AS c (name, position, generation, updated_at)
    VALUES (p_name, 0, 1, now())
    ON CONFLICT (name) DO UPDATE SET generation = c.generation + 1, updated_at = now()
    RETURNING c.position, c.generation
$fn$;

ALTER FUNCTION __SCHEMA__.group_lease_acquire(text, text, text, bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION __SCHEMA__.group_lease_release(text, text, text, bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION __SCHEMA__.group_leases_held(text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION __SCHEMA__.checkpoint_fence(text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.group_lease_acquire(text, text, text, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.group_lease_release(text, text, text, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.group_leases_held(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.checkpoint_fence(text) FROM PUBLIC;
