-- es-postgres schema version 13: the archive of events moved out of hot storage.
--
-- Placeholders as in 0001_init.sql.
--
-- archived_events has the columns, constraints and indexes of events; archive_stream moves a
-- stream's events below a version from events into it in one statement (a DELETE whose
-- RETURNING rows are the INSERT's), so every reader's snapshot finds each event in exactly one of
-- the two tables. Every read unions the two: stream reads, read_feed, and the look-up of stored
-- event ids that tells an exact retry from a conflict. The last event of a stream stays in
-- events, so a stream's version, a partition's head and the append path read events alone.
--
-- The table can be moved to a cheaper tablespace (ALTER TABLE ... SET TABLESPACE) without the
-- store noticing. A later migration that adds a column to events must add it here too, in the
-- same place: archive_stream moves rows column by column in table order.
CREATE TABLE __SCHEMA__.archived_events (LIKE __SCHEMA__.events INCLUDING ALL);

-- Moves the events of p_stream with versions below p_before into archived_events, unless that
-- would move the stream's last event (p_before above its version) or the stream has no events.
-- Returns the stream's version, how many events moved and the lowest version left in events.
-- Concurrent calls for one stream wait for each other's row locks; the later one moves only what
-- is left. Appends to the stream go on meanwhile: they add versions above p_before.
CREATE FUNCTION __SCHEMA__.archive_stream(p_stream text, p_before bigint)
RETURNS TABLE (out_version bigint, out_moved bigint, out_hot_from bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    v bigint;
    n bigint := 0;
BEGIN
    SELECT coalesce(max(e.stream_version), 0) INTO v
      FROM __SCHEMA__.events e WHERE e.stream_id = p_stream;
    IF v > 0 AND p_before <= v THEN
        WITH moved AS (
            DELETE FROM __SCHEMA__.events e
             WHERE e.stream_id = p_stream AND e.stream_version < p_before
            RETURNING e.*
        )
        INSERT INTO __SCHEMA__.archived_events SELECT * FROM moved;
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    RETURN QUERY
    SELECT v, n, coalesce((SELECT min(e.stream_version) FROM __SCHEMA__.events e
                            WHERE e.stream_id = p_stream), 1);
END
$fn$;

-- read_feed (version 8) over both tables: each branch is the ordered index range scan it was,
-- once per table, merged in position order (Merge Append) and cut at the limit. With an empty
-- archive the second scan reads one index page.
CREATE OR REPLACE FUNCTION __SCHEMA__.read_feed(p_partition integer, p_after bigint,
                                                p_limit bigint, p_categories text[],
                                                p_types text[])
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
        SELECT f.* FROM (
            (SELECT e.global_position, e.stream_id, e.stream_version, e.event_id, e.event_type,
                    e.schema_version, e.payload, e.metadata, e.recorded_at
               FROM __SCHEMA__.events e
              WHERE e.category = p_categories[1] AND e.partition = p_partition
                AND e.global_position > p_after
                AND (p_types IS NULL OR e.event_type = ANY (p_types))
              ORDER BY e.global_position
              LIMIT p_limit)
            UNION ALL
            (SELECT a.global_position, a.stream_id, a.stream_version, a.event_id, a.event_type,
                    a.schema_version, a.payload, a.metadata, a.recorded_at
               FROM __SCHEMA__.archived_events a
              WHERE a.category = p_categories[1] AND a.partition = p_partition
                AND a.global_position > p_after
                AND (p_types IS NULL OR a.event_type = ANY (p_types))
              ORDER BY a.global_position
              LIMIT p_limit)
        ) f
        ORDER BY f.global_position
        LIMIT p_limit;
    ELSE
        RETURN QUERY
        SELECT f.* FROM (
            (SELECT e.global_position, e.stream_id, e.stream_version, e.event_id, e.event_type,
                    e.schema_version, e.payload, e.metadata, e.recorded_at
               FROM __SCHEMA__.events e
              WHERE e.partition = p_partition AND e.global_position > p_after
                AND (p_categories IS NULL OR e.category = ANY (p_categories))
                AND (p_types IS NULL OR e.event_type = ANY (p_types))
              ORDER BY e.global_position
              LIMIT p_limit)
            UNION ALL
            (SELECT a.global_position, a.stream_id, a.stream_version, a.event_id, a.event_type,
                    a.schema_version, a.payload, a.metadata, a.recorded_at
               FROM __SCHEMA__.archived_events a
              WHERE a.partition = p_partition AND a.global_position > p_after
                AND (p_categories IS NULL OR a.category = ANY (p_categories))
                AND (p_types IS NULL OR a.event_type = ANY (p_types))
              ORDER BY a.global_position
              LIMIT p_limit)
        ) f
        ORDER BY f.global_position
        LIMIT p_limit;
    END IF;
END
$fn$;

ALTER FUNCTION __SCHEMA__.archive_stream(text, bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION __SCHEMA__.read_feed(integer, bigint, bigint, text[], text[])
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.archive_stream(text, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.read_feed(integer, bigint, bigint, text[], text[])
    FROM PUBLIC;
