-- es-postgres schema version 7: feed partitions.
--
-- Placeholders as in 0003_commit_order.sql.
--
-- A store has P feed partitions (es_core::Partitioning), fixed when the schema is first used:
-- every stream belongs to one, chosen by the client from a stable hash of its id (or category),
-- and each partition is a feed of its own with its own commit chain. Per partition: the position
-- counter (sequence `positions` for partition 0, `positions_<p>` for the others), the
-- recorded_at clock (`clock`, `clock_<p>`), the session lock around allocation (key
-- `__GLOBAL_LOCK__ # p`, so partition 0's is the lock of schema version 3), and the transaction
-- locks keyed by an allocation's last position (key `(__TICKET_SPACE__ # p, position)`), which
-- `wait_for_predecessors` waits on. Commits of different partitions never wait for each other;
-- within a partition the commit order of version 3 holds unchanged. Epochs stay global (an epoch
-- is a server incarnation) and record the surviving head of every partition.
--
-- Outbox positions stay global: they are drawn one by one from `outbox_positions` (a sequence,
-- atomic without a lock), so concurrent allocations of different partitions never overlap.

-- Events stored so far belong to partition 0. Positions are unique per partition: the primary
-- key (partition, global_position) serves reads of a partition's feed as an index range scan.
ALTER TABLE __SCHEMA__.events ADD COLUMN partition integer NOT NULL DEFAULT 0;
ALTER TABLE __SCHEMA__.events ALTER COLUMN partition DROP DEFAULT;
ALTER TABLE __SCHEMA__.events
    DROP CONSTRAINT events_pkey,
    ADD CONSTRAINT events_pkey PRIMARY KEY (partition, global_position);
DROP INDEX __SCHEMA__.events_category_idx;
CREATE INDEX events_category_idx ON __SCHEMA__.events (category, partition, global_position);

-- The schema's partitioning, recorded once (one row): the number of partitions and what a
-- stream's partition is the hash of. A schema that holds events or has begun an epoch was used
-- with one partition; otherwise the first store built on it records its own (claim_partitioning).
CREATE TABLE __SCHEMA__.partitioning (
    single        boolean     NOT NULL DEFAULT true,
    partitions    integer     NOT NULL,
    partition_key text        NOT NULL,
    recorded_at   timestamptz NOT NULL,
    CONSTRAINT partitioning_pkey PRIMARY KEY (single),
    CONSTRAINT partitioning_single CHECK (single),
    CONSTRAINT partitioning_count CHECK (partitions BETWEEN 1 AND 1024),
    CONSTRAINT partitioning_key CHECK (partition_key IN ('stream', 'category'))
);
INSERT INTO __SCHEMA__.partitioning (partitions, partition_key, recorded_at)
SELECT 1, 'stream', now()
 WHERE EXISTS (SELECT 1 FROM __SCHEMA__.events) OR EXISTS (SELECT 1 FROM __SCHEMA__.epochs);

-- The surviving head of partitions 1 and up at the start of each epoch (partition 0's is in
-- `epochs.previous_head`).
CREATE TABLE __SCHEMA__.partition_epochs (
    partition     integer NOT NULL,
    epoch         bigint  NOT NULL,
    previous_head bigint  NOT NULL,
    CONSTRAINT partition_epochs_pkey PRIMARY KEY (partition, epoch)
);

-- The position counter of partition p.
CREATE FUNCTION __SCHEMA__.position_sequence(p integer) RETURNS regclass
LANGUAGE sql STABLE AS $fn$
    SELECT CASE WHEN p = 0 THEN '__SCHEMA__.positions'::regclass
                ELSE ('__SCHEMA__.positions_' || p)::regclass END
$fn$;

-- Records the partitioning p_partitions / p_key unless one is recorded already (then nothing
-- changes), creating the counters of partitions 1 and up, and returns the recorded one. The
-- caller refuses a schema whose recorded partitioning is not its own.
CREATE FUNCTION __SCHEMA__.claim_partitioning(p_partitions integer, p_key text,
                                              OUT partitions integer, OUT partition_key text)
LANGUAGE plpgsql AS $fn$
BEGIN
    -- Ordered with check_incarnation, which reads the partitioning.
    PERFORM pg_advisory_xact_lock(__GLOBAL_LOCK__);
    INSERT INTO __SCHEMA__.partitioning (partitions, partition_key, recorded_at)
    VALUES (p_partitions, p_key, now())
    ON CONFLICT (single) DO NOTHING;
    IF FOUND THEN
        FOR p IN 1 .. p_partitions - 1 LOOP
            EXECUTE format('CREATE SEQUENCE %s.%I AS bigint MINVALUE 1 CACHE 1',
                           '__SCHEMA__', 'positions_' || p);
            EXECUTE format('CREATE SEQUENCE %s.%I AS bigint MINVALUE 1 CACHE 1',
                           '__SCHEMA__', 'clock_' || p);
        END LOOP;
    END IF;
    SELECT t.partitions, t.partition_key INTO partitions, partition_key
      FROM __SCHEMA__.partitioning t;
END
$fn$;

-- As in version 3, for every partition: a new incarnation starts one epoch (global), records
-- the surviving head of each partition, and moves every partition's counter to the epoch.
CREATE OR REPLACE FUNCTION __SCHEMA__.check_incarnation() RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    now_incarnation text := pg_postmaster_start_time()::text;
    cur_epoch       bigint;
    cur_incarnation text;
    parts           integer;
    heads           bigint[];
    head            bigint;
    last_drawn      bigint;
    handed_out      bigint := 0;
    new_epoch       bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(__GLOBAL_LOCK__);
    SELECT epoch, incarnation INTO cur_epoch, cur_incarnation
      FROM __SCHEMA__.epochs ORDER BY epoch DESC LIMIT 1;
    IF cur_incarnation IS DISTINCT FROM now_incarnation THEN
        SELECT coalesce(max(t.partitions), 1) INTO parts FROM __SCHEMA__.partitioning t;
        heads := array_fill(0::bigint, ARRAY[parts]);
        FOR p IN 0 .. parts - 1 LOOP
            SELECT coalesce(max(global_position), 0) INTO head
              FROM __SCHEMA__.events WHERE partition = p;
            heads[p + 1] := head;
            EXECUTE format('SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM %s',
                           __SCHEMA__.position_sequence(p))
               INTO last_drawn;
            handed_out := greatest(handed_out, last_drawn, head);
        END LOOP;
        new_epoch := greatest(
            floor(extract(epoch FROM clock_timestamp()))::bigint - 1704067200,
            coalesce(cur_epoch + 1, 0),
            CASE WHEN handed_out > 0 THEN (handed_out >> 22) + 1 ELSE 0 END);
        IF new_epoch >= 2147483648 THEN
            RAISE EXCEPTION 'es-postgres: no epoch left after %', cur_epoch;
        END IF;
        INSERT INTO __SCHEMA__.epochs (epoch, previous_head, incarnation, started_at)
        VALUES (new_epoch, heads[1], now_incarnation, now());
        INSERT INTO __SCHEMA__.partition_epochs (partition, epoch, previous_head)
        SELECT p, new_epoch, heads[p + 1] FROM generate_series(1, parts - 1) AS p;
        FOR p IN 0 .. parts - 1 LOOP
            PERFORM setval(__SCHEMA__.position_sequence(p), new_epoch << 22);
        END LOOP;
        PERFORM setval('__SCHEMA__.outbox_positions',
                       greatest((SELECT last_value FROM __SCHEMA__.outbox_positions),
                                new_epoch << 22));
    END IF;
    PERFORM set_config(__INCARNATION_GUC__, now_incarnation, false);
END
$fn$;

-- Version 3's wait, within partition p_partition: returns once every allocation of the
-- partition below `p_first` has ended.
DROP FUNCTION __SCHEMA__.wait_for_predecessors(bigint);
CREATE FUNCTION __SCHEMA__.wait_for_predecessors(p_first bigint, p_partition integer)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    space     integer := (__TICKET_SPACE__) # p_partition;
    committed bigint;
    pos       bigint;
BEGIN
    IF p_first <= 1 THEN
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', '0', true);
    PERFORM pg_advisory_xact_lock_shared(space, ((p_first - 1) % 2147483648)::integer);
    IF EXISTS (SELECT 1 FROM __SCHEMA__.events
                WHERE partition = p_partition AND global_position = p_first - 1) THEN
        RETURN;
    END IF;
    SELECT coalesce(max(global_position), 0) INTO committed
      FROM __SCHEMA__.events WHERE partition = p_partition AND global_position < p_first - 1;
    SELECT greatest(committed, coalesce(max(epoch << 22), 0))
      INTO committed
      FROM __SCHEMA__.epochs WHERE incarnation = pg_postmaster_start_time()::text;
    pos := p_first - 2;
    BEGIN
        WHILE pos > committed LOOP
            PERFORM pg_advisory_lock_shared(space, (pos % 2147483648)::integer);
            PERFORM pg_advisory_unlock_shared(space, (pos % 2147483648)::integer);
            pos := pos - 1;
        END LOOP;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        PERFORM pg_advisory_unlock_shared(space, (pos % 2147483648)::integer);
        RAISE;
    END;
END
$fn$;

DROP FUNCTION __SCHEMA__.append_events(text[], text[], smallint[], bigint[], integer[], integer[],
                                       integer[], uuid[], text[], bigint[], jsonb[], jsonb[],
                                       boolean, boolean, integer[], integer[], integer[], uuid[],
                                       uuid[], text[], text[], text[], bigint[], json[], json[],
                                       integer);

-- Version 3's append function for a group of appends whose streams all belong to partition
-- `p_partition`: the allocation, the commit-order locks and the wait are the partition's. It
-- sends no NOTIFY: PostgreSQL commits the transactions that notify one at a time, database-wide,
-- so a NOTIFY here would serialize the commits of every partition. The store notifies after
-- the commit instead (payload `<position>` for partition 0, `<partition>:<position>` for the
-- others), from a task of its own.
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
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    n          integer := coalesce(cardinality(p_streams), 0);
    currents   bigint[];
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

-- Every function of the schema, the new ones included: run as the owner, with a pinned
-- search_path, and callable only by roles granted EXECUTE (see version 6).
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
