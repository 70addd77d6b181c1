-- es-postgres schema version 8: feed pages read by ordered index scans, whatever the statistics.
--
-- Placeholders as in 0001_init.sql.
--
-- A page of a partition's feed is "the first p_limit events of partition p_partition after
-- p_after, in position order". Read as an ordered index range scan that stops at the limit, a
-- page costs the rows it returns. Sent as a plain query, the plan depended on the table's
-- statistics: on an events table PostgreSQL had not analyzed yet (fresh, after a bulk import,
-- autovacuum busy elsewhere) `partition = $1` gets the default selectivity of 0.5%, so the
-- planner expected a handful of rows and chose a bitmap scan of *every* entry after the cursor
-- plus a sort, and reading a feed in pages cost the square of its length.
--
-- Pages are now read by read_feed, whose settings leave the planner only plans that read in
-- position order from the cursor and stop at the limit:
--
--   * enable_bitmapscan = off, enable_sort = off: a bitmap scan or a sort is chosen only if no
--     other plan exists, and an ordered index scan always exists for these queries;
--   * plan_cache_mode = force_generic_plan: one plan per session, the same for every value;
--   * jit = off: a page is short, compiling it never pays off.
--
-- The settings hold only while the function runs, so they do not depend on how the client's
-- pool is built and change nothing else the session does.
--
-- Each page is one range scan that starts at the cursor and stops at the page's last event, so
-- the pages of a read never scan the same entries twice and a whole read costs one pass:
--
--   * no category filter, or several categories: the primary key (partition, global_position),
--     the filters applied on the way;
--   * one category (a category subscription or projection): events_category_idx (category,
--     partition, global_position), which holds that category's events in position order, so a
--     rare category is read without passing over the others.
--
-- NULL or an empty array means "no filter", as in es_core::EventFilter.
CREATE FUNCTION __SCHEMA__.read_feed(p_partition integer, p_after bigint, p_limit bigint,
                                     p_categories text[], p_types text[])
RETURNS TABLE (global_position bigint, stream_id text, stream_version bigint, event_id uuid,
               event_type text, schema_version bigint, payload jsonb, metadata jsonb,
               recorded_at timestamptz)
LANGUAGE plpgsql STABLE
SET enable_bitmapscan = off
SET enable_sort = off
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $fn$
BEGIN
    IF cardinality(p_types) = 0 THEN
        p_types := NULL;
    END IF;
    IF cardinality(p_categories) = 0 THEN
        p_categories := NULL;
    END IF;
    IF p_categories <@ ARRAY[p_categories[1]] THEN
        RETURN QUERY
        SELECT e.global_position, e.stream_id, e.stream_version, e.event_id, e.event_type,
               e.schema_version, e.payload, e.metadata, e.recorded_at
          FROM __SCHEMA__.events e
         WHERE e.category = p_categories[1] AND e.partition = p_partition
           AND e.global_position > p_after
           AND (p_types IS NULL OR e.event_type = ANY (p_types))
         ORDER BY e.global_position
         LIMIT p_limit;
    ELSE
        RETURN QUERY
        SELECT e.global_position, e.stream_id, e.stream_version, e.event_id, e.event_type,
               e.schema_version, e.payload, e.metadata, e.recorded_at
          FROM __SCHEMA__.events e
         WHERE e.partition = p_partition AND e.global_position > p_after
           AND (p_categories IS NULL OR e.category = ANY (p_categories))
           AND (p_types IS NULL OR e.event_type = ANY (p_types))
         ORDER BY e.global_position
         LIMIT p_limit;
    END IF;
END
$fn$;

-- As every function of the schema (see version 6): run as the owner, with a pinned
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
