-- es-postgres schema version 12: closing streams.
--
-- Placeholders as in 0003_commit_order.sql.
--
-- A stream is closed by its tombstone, an event of type `$closed` (es_core::CLOSED_EVENT_TYPE),
-- appended like any event, last in its batch (the client checks that). Every later append to
-- the stream is refused, whatever its expected version, with the outcome 3 (closed), decided
-- by `append_events` with the stream's append lock held, in the statement that reads its
-- version: no append can slip in between a close and the check. The idempotency rule comes
-- first: an append whose ids are all stored (an exact retry, the close's own included) is
-- classified by its stored copies, as before.
--
-- Tombstones are found through a partial unique index: it holds one row per closed stream and
-- nothing else, so an append to an open stream pays one probe of an index that does not grow
-- with the events, and a second tombstone in one stream is impossible even for data written
-- behind the store's back. Multi-stream appends check the same index in their own check step
-- (es_postgres::writer::streams), with the same locks held.

CREATE UNIQUE INDEX events_closed_idx ON __SCHEMA__.events (stream_id)
    WHERE event_type = '$closed';

-- Version 7's append function, with the closed check (outcome 3). Replaced in place: its
-- grants stay; it still runs as its owner with a pinned search_path (see version 6).
CREATE OR REPLACE FUNCTION __SCHEMA__.append_events(
    p_streams         text[],
    p_categories      text[],
    p_kinds           smallint[],
    p_expected        bigint[],
    p_counts          integer[],
    p_event_append    integer[],
    p_event_seq       integer[],
    p_ids             uuid[],
    p_types           text[],
    p_schema_versions bigint[],
    p_payloads        jsonb[],
    p_metadata        jsonb[],
    p_lookup          boolean,
    p_defer_wait      boolean,
    p_ob_counts       integer[],
    p_ob_append       integer[],
    p_ob_seq          integer[],
    p_ob_ids          uuid[],
    p_ob_sources      uuid[],
    p_ob_topics       text[],
    p_ob_keys         text[],
    p_ob_types        text[],
    p_ob_versions     bigint[],
    p_ob_payloads     json[],
    p_ob_metadata     json[],
    p_lock_timeout_ms integer,
    p_partition       integer,
    OUT outcomes        smallint[],
    OUT versions        bigint[],
    OUT offsets         bigint[],
    OUT base            bigint,
    OUT recorded        timestamptz,
    OUT found_ids       uuid[],
    OUT found_streams   text[],
    OUT found_versions  bigint[],
    OUT found_positions bigint[]
) LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    n          integer := coalesce(cardinality(p_streams), 0);
    currents   bigint[];
    closed     boolean[];
    firsts     bigint[];
    ob_offsets bigint[];
    ob_drawn   bigint[];
    conflicted uuid[] := '{}';
    total      bigint := 0;
    ob_total   bigint := 0;
    last_pos   bigint;
    off        integer := 1;
    cnt        integer;
    cur        bigint;
    satisfied  boolean;
    now_us     bigint;
    pos_seq    regclass;
    clock_seq  regclass;
BEGIN
    outcomes := array_fill(0::smallint, ARRAY[n]);
    versions := array_fill(0::bigint, ARRAY[n]);
    offsets := array_fill(NULL::bigint, ARRAY[n]);
    firsts := array_fill(NULL::bigint, ARRAY[n]);
    ob_offsets := array_fill(NULL::bigint, ARRAY[n]);

    IF p_lock_timeout_ms > 0 THEN
        PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
    END IF;

    PERFORM pg_advisory_xact_lock(__LOCK_SPACE__, k)
       FROM (SELECT DISTINCT hashtext(s) AS k FROM unnest(p_streams) AS s ORDER BY 1) AS keys;

    -- The version of each stream, and whether it is closed: a probe of the partial index of
    -- tombstones, empty for an open stream (so the hot path costs one more index probe in the
    -- same statement). Read with the streams' locks held, so a close committed before the lock
    -- was granted is seen, and none can commit before this call ends.
    SELECT array_agg(coalesce((SELECT max(e.stream_version) FROM __SCHEMA__.events e
                                WHERE e.stream_id = u.s), 0) ORDER BY u.i),
           array_agg(EXISTS (SELECT 1 FROM __SCHEMA__.events c
                              WHERE c.stream_id = u.s AND c.event_type = '$closed') ORDER BY u.i)
      INTO currents, closed
      FROM unnest(p_streams) WITH ORDINALITY AS u(s, i);

    IF p_lookup THEN
        SELECT array_agg(e.event_id), array_agg(e.stream_id), array_agg(e.stream_version),
               array_agg(e.global_position)
          INTO found_ids, found_streams, found_versions, found_positions
          FROM __SCHEMA__.events e
         WHERE e.event_id = ANY (p_ids);
    END IF;

    FOR i IN 1 .. n LOOP
        cnt := p_counts[i];
        cur := currents[i];
        versions[i] := cur;
        satisfied := CASE p_kinds[i]
                         WHEN 0 THEN true
                         WHEN 1 THEN cur = 0
                         WHEN 2 THEN cur > 0
                         ELSE cur = p_expected[i]
                     END;
        IF found_ids IS NOT NULL AND cnt > 0 AND p_ids[off : off + cnt - 1] && found_ids THEN
            outcomes[i] := 2;
        ELSIF closed[i] THEN
            -- Closed: refused whatever the expected version (an exact retry of a stored batch
            -- is told apart by the lookup below).
            outcomes[i] := 3;
            IF NOT p_lookup AND cnt > 0 THEN
                conflicted := conflicted || p_ids[off : off + cnt - 1];
            END IF;
        ELSIF satisfied THEN
            versions[i] := cur + cnt;
            IF cnt > 0 THEN
                offsets[i] := total;
                firsts[i] := cur + 1;
                total := total + cnt;
                IF p_ob_counts[i] > 0 THEN
                    ob_offsets[i] := ob_total;
                    ob_total := ob_total + p_ob_counts[i];
                END IF;
            END IF;
        ELSE
            outcomes[i] := 1;
            IF NOT p_lookup AND cnt > 0 THEN
                conflicted := conflicted || p_ids[off : off + cnt - 1];
            END IF;
        END IF;
        off := off + cnt;
    END LOOP;

    IF cardinality(conflicted) > 0 THEN
        SELECT array_agg(e.event_id), array_agg(e.stream_id), array_agg(e.stream_version),
               array_agg(e.global_position)
          INTO found_ids, found_streams, found_versions, found_positions
          FROM __SCHEMA__.events e
         WHERE e.event_id = ANY (conflicted);
        IF found_ids IS NOT NULL THEN
            off := 1;
            FOR i IN 1 .. n LOOP
                cnt := p_counts[i];
                IF outcomes[i] IN (1, 3) AND cnt > 0
                   AND p_ids[off : off + cnt - 1] && found_ids THEN
                    outcomes[i] := 2;
                END IF;
                off := off + cnt;
            END LOOP;
        END IF;
    END IF;

    IF total = 0 THEN
        RETURN;
    END IF;

    IF current_setting(__INCARNATION_GUC__, true) IS DISTINCT FROM
       pg_postmaster_start_time()::text THEN
        RAISE EXCEPTION 'this session has not checked the server incarnation'
              USING ERRCODE = 'ES001',
                    HINT = 'run check_incarnation() in a statement of its own, then retry';
    END IF;
    IF p_partition = 0 THEN
        pos_seq := '__SCHEMA__.positions'::regclass;
        clock_seq := '__SCHEMA__.clock'::regclass;
    ELSE
        pos_seq := ('__SCHEMA__.positions_' || p_partition)::regclass;
        clock_seq := ('__SCHEMA__.clock_' || p_partition)::regclass;
    END IF;
    -- Allocation, the only serialized step of the partition (see version 3).
    BEGIN
        PERFORM pg_advisory_lock((__GLOBAL_LOCK__) # p_partition::bigint);
        base := nextval(pos_seq);
        IF total > 1 THEN
            PERFORM setval(pos_seq, base + total - 1);
        END IF;
        PERFORM pg_advisory_xact_lock((__TICKET_SPACE__) # p_partition,
                                      ((base + total - 1) % 2147483648)::integer);
        IF ob_total > 0 THEN
            -- One at a time: other partitions draw from the same sequence concurrently.
            SELECT array_agg(nextval('__SCHEMA__.outbox_positions') ORDER BY i) INTO ob_drawn
              FROM generate_series(1, ob_total) AS i;
        END IF;
        now_us := greatest((extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
                           nextval(clock_seq));
        PERFORM setval(clock_seq, now_us);
        PERFORM pg_advisory_unlock((__GLOBAL_LOCK__) # p_partition::bigint);
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        PERFORM pg_advisory_unlock((__GLOBAL_LOCK__) # p_partition::bigint);
        RAISE;
    END;
    recorded := timestamptz 'epoch' + now_us * interval '1 microsecond';
    last_pos := base + total - 1;

    INSERT INTO __SCHEMA__.events (partition, global_position, stream_id, category,
                                   stream_version, event_id, event_type, schema_version, payload,
                                   metadata, recorded_at)
    SELECT p_partition, base + offsets[e.a] + e.q, p_streams[e.a], p_categories[e.a],
           firsts[e.a] + e.q, e.id, e.ty, e.sv, e.pl, e.md, recorded
      FROM unnest(p_event_append, p_event_seq, p_ids, p_types, p_schema_versions, p_payloads,
                  p_metadata) AS e(a, q, id, ty, sv, pl, md)
     WHERE offsets[e.a] IS NOT NULL;

    IF ob_total > 0 THEN
        INSERT INTO __SCHEMA__.outbox (position, stream_id, message_id, source_event_id, topic,
                                       key, message_type, schema_version, payload, metadata,
                                       recorded_at)
        SELECT ob_drawn[ob_offsets[m.a] + m.q + 1], p_streams[m.a], m.id, m.src, m.tp, m.k,
               m.ty, m.sv, m.pl, m.md, recorded
          FROM unnest(p_ob_append, p_ob_seq, p_ob_ids, p_ob_sources, p_ob_topics, p_ob_keys,
                      p_ob_types, p_ob_versions, p_ob_payloads, p_ob_metadata)
               AS m(a, q, id, src, tp, k, ty, sv, pl, md)
         WHERE ob_offsets[m.a] IS NOT NULL;
    END IF;

    IF NOT p_defer_wait THEN
        PERFORM __SCHEMA__.wait_for_predecessors(base, p_partition);
    END IF;
END
$fn$;

REVOKE EXECUTE ON FUNCTION __SCHEMA__.append_events(text[], text[], smallint[], bigint[], integer[],
    integer[], integer[], uuid[], text[], bigint[], jsonb[], jsonb[], boolean, boolean, integer[],
    integer[], integer[], uuid[], uuid[], text[], text[], text[], bigint[], json[], json[], integer,
    integer) FROM PUBLIC;
