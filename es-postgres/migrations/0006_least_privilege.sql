-- es-postgres schema version 6: least privilege.
--
-- Every write the store makes now goes through a function of this schema, and every function
-- runs with the rights of its owner (the role that ran the migrations): SECURITY DEFINER, with
-- search_path pinned to pg_catalog so that no object of the caller's can stand in for one the
-- function names. An application role then needs only USAGE on the schema, SELECT on its tables
-- and EXECUTE on its functions (es_postgres::grants_script prints the statements): it cannot
-- insert or change events, move the sequences, or write snapshots, checkpoints or leases other
-- than as the functions do. EXECUTE is no longer granted to PUBLIC: a role that used the store
-- before this migration through PUBLIC's EXECUTE and table grants of its own needs the grants.
--
-- A later migration that adds a function must do the same (the test
-- `every_function_runs_as_its_owner_with_a_pinned_search_path` checks the schema).

-- Writes a snapshot unless one at the same or a later version is stored. Returns whether it wrote.
CREATE FUNCTION __SCHEMA__.snapshot_save(p_stream text, p_version bigint,
                                         p_schema_version bigint, p_payload jsonb,
                                         p_recorded_at timestamptz, p_event_id uuid)
RETURNS boolean LANGUAGE sql AS $fn$
    WITH saved AS (
        INSERT INTO __SCHEMA__.snapshots AS t (stream_id, version, schema_version, payload,
                                               recorded_at, event_id)
        VALUES (p_stream, p_version, p_schema_version, p_payload, p_recorded_at, p_event_id)
        ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version,
            schema_version = excluded.schema_version, payload = excluded.payload,
            recorded_at = excluded.recorded_at, event_id = excluded.event_id
        WHERE t.version < excluded.version
        RETURNING 1
    )
    SELECT count(*) = 1 FROM saved
$fn$;

-- Deletes a stream's snapshot if it is at p_version. Returns whether it deleted one.
CREATE FUNCTION __SCHEMA__.snapshot_delete(p_stream text, p_version bigint)
RETURNS boolean LANGUAGE sql AS $fn$
    WITH gone AS (
        DELETE FROM __SCHEMA__.snapshots WHERE stream_id = p_stream AND version = p_version
        RETURNING 1
    )
    SELECT count(*) = 1 FROM gone
$fn$;

-- Takes the lease p_name for p_owner for p_ttl_micros when it is free, released, expired or
-- already p_owner's; the generation goes up unless the owner renews a lease it still holds. The
-- conflict clause locks the row, so concurrent relays decide one after the other on the latest
-- committed lease. Returns the lease's generation, or NULL if another owner holds it.
CREATE FUNCTION __SCHEMA__.relay_lease_acquire(p_name text, p_owner text, p_ttl_micros bigint)
RETURNS bigint LANGUAGE sql AS $fn$
    INSERT INTO __SCHEMA__.relay_leases AS l (name, owner, expires_at, generation)
    VALUES (p_name, p_owner,
            clock_timestamp() + p_ttl_micros::float8 * interval '1 microsecond', 1)
    ON CONFLICT (name) DO UPDATE SET
        generation = CASE WHEN l.owner = excluded.owner AND l.expires_at > clock_timestamp()
                          THEN l.generation ELSE l.generation + 1 END,
        owner = excluded.owner, expires_at = excluded.expires_at
    WHERE l.owner = excluded.owner OR l.expires_at <= clock_timestamp()
    RETURNING generation
$fn$;

-- Ends the lease p_name if p_owner still holds it at p_generation (the row and its generation
-- stay, so generations never go down).
CREATE FUNCTION __SCHEMA__.relay_lease_release(p_name text, p_owner text, p_generation bigint)
RETURNS void LANGUAGE sql AS $fn$
    UPDATE __SCHEMA__.relay_leases SET expires_at = clock_timestamp()
     WHERE name = p_name AND owner = p_owner AND generation = p_generation
       AND expires_at > clock_timestamp()
$fn$;

-- Starts a new generation of a checkpoint at position 0 (the row is kept, so generations never go
-- down). Returns the generation.
CREATE FUNCTION __SCHEMA__.checkpoint_reset(p_name text)
RETURNS bigint LANGUAGE sql AS $fn$
    INSERT INTO __SCHEMA__.checkpoints AS c (name, position, generation, updated_at)
    VALUES (p_name, 0, 1, now())
    ON CONFLICT (name) DO UPDATE SET position = 0, generation = c.generation + 1,
        updated_at = now()
    RETURNING generation
$fn$;

-- Locks a checkpoint's row until the end of the calling transaction (creating it at position 0,
-- generation 0, if missing) and returns its position and generation: an exactly-once projection
-- calls it first in the transaction of its read-model writes.
CREATE FUNCTION __SCHEMA__.checkpoint_lock(p_name text)
RETURNS TABLE (locked_position bigint, locked_generation bigint) LANGUAGE sql AS $fn$
    INSERT INTO __SCHEMA__.checkpoints AS c (name, position, generation, updated_at)
    VALUES (p_name, 0, 0, now())
    ON CONFLICT (name) DO UPDATE SET name = c.name
    RETURNING c.position, c.generation
$fn$;

-- Raises a checkpoint locked by checkpoint_lock in the same transaction (never lowers it).
CREATE FUNCTION __SCHEMA__.checkpoint_raise(p_name text, p_position bigint)
RETURNS void LANGUAGE sql AS $fn$
    UPDATE __SCHEMA__.checkpoints SET position = p_position, updated_at = now()
     WHERE name = p_name AND position < p_position
$fn$;

-- Every function of the schema, the older ones included: run as the owner, with a pinned
-- search_path, and callable only by roles granted EXECUTE.
DO $do$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = '__SCHEMA__'::regnamespace
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp',
                       f);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$do$;
