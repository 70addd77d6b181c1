-- es-postgres schema version 2: the transactional outbox, the relay lease, projection checkpoints,
-- and append_events writing outbox records in the append's transaction.
--
-- Placeholders as in 0001_init.sql.

-- Outbox records waiting for delivery. Written only by append_events, in the transaction of the
-- append that recorded them; deleted by the relay once the broker acknowledged them (the events
-- stay the audit trail). `position` increases in commit order: it is drawn in the same serialized
-- allocation section as the events' global positions, and commits follow that order.
-- `payload` and `metadata` are `json`, not `jsonb`: PostgreSQL checks the JSON and keeps the text
-- byte for byte, so the broker gets exactly what the translator produced.
CREATE TABLE __SCHEMA__.outbox (
    position        bigint           NOT NULL,
    stream_id       text COLLATE "C" NOT NULL,
    message_id      uuid             NOT NULL,
    source_event_id uuid             NOT NULL,
    topic           text COLLATE "C" NOT NULL,
    key             text COLLATE "C" NOT NULL,
    message_type    text COLLATE "C" NOT NULL,
    schema_version  bigint           NOT NULL,
    payload         json             NOT NULL,
    metadata        json             NOT NULL,
    recorded_at     timestamptz      NOT NULL,
    CONSTRAINT outbox_pkey PRIMARY KEY (position)
);

-- The last allocated outbox position (allocation state, like `positions`).
CREATE SEQUENCE __SCHEMA__.outbox_positions AS bigint MINVALUE 1 CACHE 1;

-- The relay lease: at most one row per lease name (the outbox relay uses 'outbox'). Times come
-- from the database clock, so relays on hosts with skewed clocks agree on expiry.
CREATE TABLE __SCHEMA__.relay_leases (
    name       text COLLATE "C" NOT NULL,
    owner      text COLLATE "C" NOT NULL,
    expires_at timestamptz      NOT NULL,
    CONSTRAINT relay_leases_pkey PRIMARY KEY (name)
);

-- Projection checkpoints: the global position each projection has handled up to. Only raised;
-- exactly-once projections update their row in the transaction of their read-model writes.
CREATE TABLE __SCHEMA__.checkpoints (
    name       text COLLATE "C" NOT NULL,
    position   bigint           NOT NULL,
    updated_at timestamptz      NOT NULL,
    CONSTRAINT checkpoints_pkey PRIMARY KEY (name)
);

DROP FUNCTION __SCHEMA__.append_events(text[], text[], smallint[], bigint[], integer[], integer[],
                                       integer[], uuid[], text[], bigint[], jsonb[], jsonb[],
                                       boolean);

-- Appends a group of independent appends in one transaction (see 0001_init.sql for the design),
-- now with their outbox records.
--
-- Outbox messages come as arrays like the events: p_ob_counts per append, then per message its
-- append (1-based), its index within the append, and its fields. The messages of written appends
-- get outbox positions ob_base + ob_offsets[i] + 0, 1, ..., drawn in the allocation section with
-- the global positions; conflicting, duplicate and failed appends write none.
--
-- With p_defer_wait the function does not wait for the previous ticket's transaction: the caller
-- runs more statements in the same transaction (inline projections), then waits with
-- `pg_advisory_xact_lock_shared(<ticket space>, ((ticket - 1) % 2147483648)::integer)` right
-- before COMMIT. `ticket` is returned for that (NULL when nothing was allocated).
CREATE FUNCTION __SCHEMA__.append_events(
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
    OUT outcomes        smallint[],
    OUT versions        bigint[],
    OUT offsets         bigint[],
    OUT base            bigint,
    OUT recorded        timestamptz,
    OUT found_ids       uuid[],
    OUT found_streams   text[],
    OUT found_versions  bigint[],
    OUT found_positions bigint[],
    OUT ticket          bigint
) LANGUAGE plpgsql
-- The statements below see arrays of varying length; re-planning them on every call (custom
-- plans) costs more than the whole append. Their generic plans are right for any size.
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    n          integer := coalesce(cardinality(p_streams), 0);
    currents   bigint[];
    firsts     bigint[];
    ob_offsets bigint[];
    conflicted uuid[] := '{}';
    total      bigint := 0;
    ob_total   bigint := 0;
    ob_base    bigint;
    last_pos   bigint;
    off        integer := 1;
    cnt        integer;
    cur        bigint;
    satisfied  boolean;
    now_us     bigint;
BEGIN
    outcomes := array_fill(0::smallint, ARRAY[n]);
    versions := array_fill(0::bigint, ARRAY[n]);
    offsets := array_fill(NULL::bigint, ARRAY[n]);
    firsts := array_fill(NULL::bigint, ARRAY[n]);
    ob_offsets := array_fill(NULL::bigint, ARRAY[n]);

    PERFORM pg_advisory_xact_lock(__LOCK_SPACE__, k)
       FROM (SELECT DISTINCT hashtext(s) AS k FROM unnest(p_streams) AS s ORDER BY 1) AS keys;

    SELECT array_agg(coalesce((SELECT max(e.stream_version) FROM __SCHEMA__.events e
                                WHERE e.stream_id = u.s), 0) ORDER BY u.i)
      INTO currents
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

    -- A conflicting append may be the retry of a stored batch: then it is not a conflict.
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
                IF outcomes[i] = 1 AND cnt > 0 AND p_ids[off : off + cnt - 1] && found_ids THEN
                    outcomes[i] := 2;
                END IF;
                off := off + cnt;
            END LOOP;
        END IF;
    END IF;

    IF total = 0 THEN
        RETURN;
    END IF;

    -- Allocation, the only serialized step (see 0001_init.sql). Outbox positions are drawn here
    -- too, so they follow the same commit order as the global positions.
    BEGIN
        PERFORM pg_advisory_lock(__GLOBAL_LOCK__);
        ticket := nextval('__SCHEMA__.tickets');
        PERFORM pg_advisory_xact_lock(__TICKET_SPACE__, (ticket % 2147483648)::integer);
        base := nextval('__SCHEMA__.positions');
        IF total > 1 THEN
            PERFORM setval('__SCHEMA__.positions', base + total - 1);
        END IF;
        IF ob_total > 0 THEN
            ob_base := nextval('__SCHEMA__.outbox_positions');
            IF ob_total > 1 THEN
                PERFORM setval('__SCHEMA__.outbox_positions', ob_base + ob_total - 1);
            END IF;
        END IF;
        now_us := greatest((extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
                           nextval('__SCHEMA__.clock'));
        PERFORM setval('__SCHEMA__.clock', now_us);
        PERFORM pg_advisory_unlock(__GLOBAL_LOCK__);
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        PERFORM pg_advisory_unlock(__GLOBAL_LOCK__);
        RAISE;
    END;
    recorded := timestamptz 'epoch' + now_us * interval '1 microsecond';
    last_pos := base + total - 1;

    -- The inserts of concurrent groups run in parallel.
    INSERT INTO __SCHEMA__.events (global_position, stream_id, category, stream_version, event_id,
                                   event_type, schema_version, payload, metadata, recorded_at)
    SELECT base + offsets[e.a] + e.q, p_streams[e.a], p_categories[e.a], firsts[e.a] + e.q,
           e.id, e.ty, e.sv, e.pl, e.md, recorded
      FROM unnest(p_event_append, p_event_seq, p_ids, p_types, p_schema_versions, p_payloads,
                  p_metadata) AS e(a, q, id, ty, sv, pl, md)
     WHERE offsets[e.a] IS NOT NULL;

    IF ob_total > 0 THEN
        INSERT INTO __SCHEMA__.outbox (position, stream_id, message_id, source_event_id, topic,
                                       key, message_type, schema_version, payload, metadata,
                                       recorded_at)
        SELECT ob_base + ob_offsets[m.a] + m.q, p_streams[m.a], m.id, m.src, m.tp, m.k, m.ty,
               m.sv, m.pl, m.md, recorded
          FROM unnest(p_ob_append, p_ob_seq, p_ob_ids, p_ob_sources, p_ob_topics, p_ob_keys,
                      p_ob_types, p_ob_versions, p_ob_payloads, p_ob_metadata)
               AS m(a, q, id, src, tp, k, ty, sv, pl, md)
         WHERE ob_offsets[m.a] IS NOT NULL;
    END IF;

    PERFORM pg_notify(__CHANNEL__, last_pos::text);

    -- Commit only after the previous ticket's transaction has ended (its locks are released once
    -- its commit is visible, or at its rollback). This is the last step: the commit follows.
    IF NOT p_defer_wait THEN
        PERFORM pg_advisory_xact_lock_shared(__TICKET_SPACE__,
                                             ((ticket - 1) % 2147483648)::integer);
    END IF;
END
$fn$;
