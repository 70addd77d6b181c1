-- es-postgres schema version 11: the subject keys of crypto-shredding (es_core::personal).
--
-- Placeholders as in 0001_init.sql. Every function is SECURITY DEFINER with a pinned search_path
-- and no EXECUTE for PUBLIC, as migration 6 set for the older ones; the application role reads
-- keys with its SELECT on the schema's tables and writes them only through the functions.

-- One row per subject: its key (as the application's key wrap stored it) while it has one, a
-- tombstone once it was forgotten. Forgetting sets the key's columns to NULL: the row version
-- holding the key is dead from then on and its bytes are gone from the table once VACUUM (or
-- autovacuum) has cleared it; backups, replicas and the WAL keep it until they age out.
CREATE TABLE __SCHEMA__.subject_keys (
    subject      text COLLATE "C" NOT NULL,
    key_version  integer,
    material     bytea,
    created_at   timestamptz      NOT NULL DEFAULT now(),
    forgotten_at timestamptz,
    CONSTRAINT subject_keys_pkey PRIMARY KEY (subject),
    CONSTRAINT subject_keys_key_or_tombstone CHECK (
        (material IS NULL) = (key_version IS NULL)
        AND (material IS NULL) = (forgotten_at IS NOT NULL))
);

-- Stores p_material as version p_version of p_subject's key unless the subject has a key or a
-- tombstone, and returns what it has now (NULLs for a tombstone). Two statements: the insert
-- waits for a concurrent insert of the same subject to end, and the select, with a snapshot taken
-- after that, sees the row that won; so concurrent callers all get the same key.
CREATE FUNCTION __SCHEMA__.subject_key_create(p_subject text, p_version integer, p_material bytea)
RETURNS TABLE (out_version integer, out_material bytea) LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO __SCHEMA__.subject_keys (subject, key_version, material)
    VALUES (p_subject, p_version, p_material)
    ON CONFLICT (subject) DO NOTHING;
    RETURN QUERY SELECT k.key_version, k.material FROM __SCHEMA__.subject_keys k
                  WHERE k.subject = p_subject;
END
$fn$;

-- Destroys p_subject's key and leaves a tombstone (one for a subject that had no key, too).
-- Returns whether a key was destroyed: the conflict clause updates only a row that still holds
-- a key, and an updated row (xmax set) is told from an inserted tombstone.
CREATE FUNCTION __SCHEMA__.subject_key_forget(p_subject text)
RETURNS boolean LANGUAGE sql AS $fn$
    WITH gone AS (
        INSERT INTO __SCHEMA__.subject_keys AS k (subject, key_version, material, forgotten_at)
        VALUES (p_subject, NULL, NULL, now())
        ON CONFLICT (subject) DO UPDATE SET key_version = NULL, material = NULL,
                                            forgotten_at = now()
        WHERE k.material IS NOT NULL
        RETURNING (k.xmax <> 0) AS destroyed
    )
    SELECT coalesce((SELECT destroyed FROM gone), false)
$fn$;

ALTER FUNCTION __SCHEMA__.subject_key_create(text, integer, bytea)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION __SCHEMA__.subject_key_forget(text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.subject_key_create(text, integer, bytea) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.subject_key_forget(text) FROM PUBLIC;
