-- es-postgres schema version 3: a commit order that holds whatever way a transaction ends,
-- bounded stalls, and epochs that detect a lost tail.
--
-- Placeholders as in 0001_init.sql, plus `__INCARNATION_GUC__`, the name of the session setting
-- (a string literal) that records that this session has checked the server's incarnation.
--
-- Commit order. Version 2 made an allocation wait for the previous *ticket* to end. When that
-- ticket rolled back after allocating (an inline projection failed, an idempotent retry hit the
-- unique key, a timeout, a deadlock, a terminated backend), the next one committed while earlier
-- allocations were still open, and a reader could pass positions that became visible later.
-- Now an allocation holds a transaction-level lock keyed by its *last position*, so the
-- allocation before it is found from its own first position, and `wait_for_predecessors`
-- returns only once every allocation below it has ended:
--
--   1. wait for the lock of the position just below (the previous allocation's last position);
--   2. if that row is visible, the previous allocation committed, and it committed only after
--      every allocation before it had ended (by this same rule): done;
--   3. otherwise it rolled back. Every allocation that may still be running lies between the
--      highest committed position below ours and our first position (one below the highest
--      committed one has ended, by the same argument), and above the first position of the
--      epoch this server began (allocations of an earlier incarnation are gone), so wait for the
--      lock of each of those positions in turn, taking and dropping it (session-level, so none
--      accumulate).
--
-- Positions whose allocation rolled back stay empty; readers never wait for them, they only
-- never see anything there.

-- One row per epoch (see es_core::position): the epoch, the highest position stored when it
-- began, the server incarnation (postmaster start time) that began it, and when.
CREATE TABLE __SCHEMA__.epochs (
    epoch         bigint      NOT NULL,
    previous_head bigint      NOT NULL,
    incarnation   text        NOT NULL,
    started_at    timestamptz NOT NULL,
    CONSTRAINT epochs_pkey PRIMARY KEY (epoch)
);

-- Events stored before this migration were written by the server running now, in epoch 0. A
-- schema without events gets its first epoch from the clock at its first append.
INSERT INTO __SCHEMA__.epochs (epoch, previous_head, incarnation, started_at)
SELECT 0, 0, pg_postmaster_start_time()::text, now()
 WHERE EXISTS (SELECT 1 FROM __SCHEMA__.events);

-- Commits no longer follow tickets.
DROP SEQUENCE __SCHEMA__.tickets;

-- Run by the store in a statement of its own, once per session, before the session's first
-- allocation (append_events refuses to allocate in a session that has not run it, with SQLSTATE
-- ES001): if the server
-- is not the incarnation that began the current epoch (the schema's first append, a restart, a
-- restore from a backup, a promoted standby), start a new epoch (es_core::position::next_epoch:
-- the seconds since 2024-01-01, or above every epoch and position known). Its positions (and
-- outbox positions) begin above anything an earlier incarnation can have handed out, even one
-- whose epochs were lost with a restore, and the row records the head that survived, so a reader
-- that had passed it learns that events were lost instead of skipping the new ones.
CREATE FUNCTION __SCHEMA__.check_incarnation() RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    now_incarnation text := pg_postmaster_start_time()::text;
    cur_epoch       bigint;
    cur_incarnation text;
    head            bigint;
    handed_out      bigint;
    new_epoch       bigint;
BEGIN
    -- Held to commit, so a concurrent check waits and then sees this one's epoch, and no
    -- allocation of this incarnation happens before the epoch is committed.
    PERFORM pg_advisory_xact_lock(__GLOBAL_LOCK__);
    SELECT epoch, incarnation INTO cur_epoch, cur_incarnation
      FROM __SCHEMA__.epochs ORDER BY epoch DESC LIMIT 1;
    IF cur_incarnation IS DISTINCT FROM now_incarnation THEN
        SELECT coalesce(max(global_position), 0) INTO head FROM __SCHEMA__.events;
        SELECT greatest(CASE WHEN is_called THEN last_value ELSE 0 END, head) INTO handed_out
          FROM __SCHEMA__.positions;
        new_epoch := greatest(
            floor(extract(epoch FROM clock_timestamp()))::bigint - 1704067200,
            coalesce(cur_epoch + 1, 0),
            CASE WHEN handed_out > 0 THEN (handed_out >> 22) + 1 ELSE 0 END);
        IF new_epoch >= 2147483648 THEN
            RAISE EXCEPTION 'es-postgres: no epoch left after %', cur_epoch;
        END IF;
        INSERT INTO __SCHEMA__.epochs (epoch, previous_head, incarnation, started_at)
        VALUES (new_epoch, head, now_incarnation, now());
        PERFORM setval('__SCHEMA__.positions', new_epoch << 22);
        PERFORM setval('__SCHEMA__.outbox_positions',
                       greatest((SELECT last_value FROM __SCHEMA__.outbox_positions),
                                new_epoch << 22));
    END IF;
    -- Session-level: this session may allocate from now on (a restart ends the session). If the
    -- statement fails, so does the setting, and the check runs again.
    PERFORM set_config(__INCARNATION_GUC__, now_incarnation, false);
END
$fn$;

-- Returns once every allocation of a position below `p_first` has ended. See above.
CREATE FUNCTION __SCHEMA__.wait_for_predecessors(p_first bigint) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    committed bigint;
    pos       bigint;
BEGIN
    IF p_first <= 1 THEN
        RETURN;
    END IF;
    -- Bounded by the predecessors' own bounds, not by this session's lock time-out.
    PERFORM set_config('lock_timeout', '0', true);
    PERFORM pg_advisory_xact_lock_shared(__TICKET_SPACE__, ((p_first - 1) % 2147483648)::integer);
    IF EXISTS (SELECT 1 FROM __SCHEMA__.events WHERE global_position = p_first - 1) THEN
        RETURN;
    END IF;
    SELECT coalesce(max(global_position), 0) INTO committed
      FROM __SCHEMA__.events WHERE global_position < p_first - 1;
    -- Positions below the epoch this server began were allocated by an earlier incarnation,
    -- whose transactions are all gone.
    SELECT greatest(committed, coalesce(max(epoch << 22), 0))
      INTO committed
      FROM __SCHEMA__.epochs WHERE incarnation = pg_postmaster_start_time()::text;
    pos := p_first - 2;
    BEGIN
        WHILE pos > committed LOOP
            PERFORM pg_advisory_lock_shared(__TICKET_SPACE__, (pos % 2147483648)::integer);
            PERFORM pg_advisory_unlock_shared(__TICKET_SPACE__, (pos % 2147483648)::integer);
            pos := pos - 1;
        END LOOP;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        -- Cut off while waiting: drop the session lock if it was granted.
        PERFORM pg_advisory_unlock_shared(__TICKET_SPACE__, (pos % 2147483648)::integer);
        RAISE;
    END;
END
$fn$;

DROP FUNCTION __SCHEMA__.append_events(text[], text[], smallint[], bigint[], integer[], integer[],
                                       integer[], uuid[], text[], bigint[], jsonb[], jsonb[],
                                       boolean, boolean, integer[], integer[], integer[], uuid[],
                                       uuid[], text[], text[], text[], bigint[], json[], json[]);

-- Appends a group of independent appends in one transaction (see 0001_init.sql and
-- 0002_outbox.sql for the arrays and outcomes).
--
-- `p_lock_timeout_ms` bounds every lock wait of the append's own work (the streams' locks, the
-- inserts); the wait for earlier allocations is bounded by their own bounds instead. With
-- `p_defer_wait` the function returns without waiting for earlier allocations: the caller runs
-- more statements in the transaction (inline projections), then calls
-- `wait_for_predecessors(base)` right before COMMIT.
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

    -- Allocation, the only serialized step: in a session that has checked the server's
    -- incarnation, under a session-level lock held for microseconds (released even on error),
    -- draw a block of consecutive positions (and outbox positions), and lock the block's last
    -- position until this transaction ends.
    IF current_setting(__INCARNATION_GUC__, true) IS DISTINCT FROM
       pg_postmaster_start_time()::text THEN
        RAISE EXCEPTION 'this session has not checked the server incarnation'
              USING ERRCODE = 'ES001',
                    HINT = 'run check_incarnation() in a statement of its own, then retry';
    END IF;
    BEGIN
        PERFORM pg_advisory_lock(__GLOBAL_LOCK__);
        base := nextval('__SCHEMA__.positions');
        IF total > 1 THEN
            PERFORM setval('__SCHEMA__.positions', base + total - 1);
        END IF;
        PERFORM pg_advisory_xact_lock(__TICKET_SPACE__,
                                      ((base + total - 1) % 2147483648)::integer);
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

    -- Commit only after every earlier allocation has ended. This is the last step: the commit
    -- follows.
    IF NOT p_defer_wait THEN
        PERFORM __SCHEMA__.wait_for_predecessors(base);
    END IF;
END
$fn$;
