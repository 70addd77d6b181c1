-- es-postgres schema version 1: events, positions, snapshots and the append function.
--
-- `__SCHEMA__` stands for the validated, double-quoted schema name, `__CHANNEL__` for the NOTIFY
-- channel (a string literal), `__LOCK_SPACE__`, `__TICKET_SPACE__` and `__GLOBAL_LOCK__` for the
-- schema's advisory lock keys (integers); the migration runner (or
-- `es_postgres::migration_script`) substitutes them.

CREATE TABLE __SCHEMA__.events (
    global_position bigint           NOT NULL,
    stream_id       text COLLATE "C" NOT NULL,
    category        text COLLATE "C" NOT NULL,
    stream_version  bigint           NOT NULL,
    event_id        uuid             NOT NULL,
    event_type      text COLLATE "C" NOT NULL,
    schema_version  bigint           NOT NULL,
    payload         jsonb            NOT NULL,
    metadata        jsonb            NOT NULL,
    recorded_at     timestamptz      NOT NULL,
    CONSTRAINT events_pkey PRIMARY KEY (global_position),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

-- Category reads of the global feed (`read_all` with a category filter, category subscriptions).
CREATE INDEX events_category_idx ON __SCHEMA__.events (category, global_position);

-- Stream reads and as-of loads (by version, position or time) use events_stream_version_key:
-- `recorded_at` and `global_position` never decrease along a stream, so a historical load reads
-- the stream forward and stops at the first event past the bound. Global reads use the primary key.

-- Allocation state, changed only inside append_events' short allocation section (under the
-- schema's allocation lock). Sequences, because their changes are not transactional: a rolled-back
-- append leaves them where they were moved. CACHE 1, so no session holds a private range.
--   positions: the last allocated global position;
--   tickets:   the number of the last allocating transaction (commits happen in ticket order);
--   clock:     the last recorded_at handed out, in microseconds since 1970 (keeps recorded_at
--              non-decreasing even if the server clock steps back).
CREATE SEQUENCE __SCHEMA__.positions AS bigint MINVALUE 1 CACHE 1;
CREATE SEQUENCE __SCHEMA__.tickets AS bigint MINVALUE 1 CACHE 1;
CREATE SEQUENCE __SCHEMA__.clock AS bigint MINVALUE 1 CACHE 1;

CREATE TABLE __SCHEMA__.snapshots (
    stream_id      text COLLATE "C" NOT NULL,
    version        bigint           NOT NULL,
    schema_version bigint           NOT NULL,
    payload        jsonb            NOT NULL,
    recorded_at    timestamptz      NOT NULL,
    CONSTRAINT snapshots_pkey PRIMARY KEY (stream_id)
);

-- Appends a group of independent appends in one transaction.
--
-- The appends of one call go to distinct streams. Each gets its own outcome:
--   0 = written (or an empty append whose expected version held), versions[i] = new version;
--   1 = expected-version conflict, versions[i] = the actual version;
--   2 = some event ids are stored already: nothing written, the stored copies are in found_*.
-- Events of written appends get positions base + offsets[i] + 0, 1, ...
--
-- Order of work (the global lock is taken last and held to commit):
--   1. a transaction-scoped advisory lock per stream, in ascending key order (no deadlocks);
--      it orders concurrent appends to one stream across sessions and processes;
--   2. in a new snapshot (so a concurrent append we waited for is seen): each stream's version,
--      its highest stored version;
--   3. decide each append in memory. Stored copies of the event ids are looked up only where
--      they matter: for appends that conflict (a retry of a stored batch usually does), or for
--      all appends when p_lookup is set. Without the look-up, an already stored id makes the
--      insert fail on events_event_id_key; the caller then calls again with p_lookup;
--   4. allocate positions in a short serialized section, insert all events, NOTIFY the new head,
--      and wait for the previous allocation's transaction to end, so commits follow positions.
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
    conflicted uuid[] := '{}';
    total      bigint := 0;
    last_pos   bigint;
    off        integer := 1;
    cnt        integer;
    cur        bigint;
    satisfied  boolean;
    ticket     bigint;
    now_us     bigint;
BEGIN
    outcomes := array_fill(0::smallint, ARRAY[n]);
    versions := array_fill(0::bigint, ARRAY[n]);
    offsets := array_fill(NULL::bigint, ARRAY[n]);
    firsts := array_fill(NULL::bigint, ARRAY[n]);

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

    -- Allocation, the only serialized step: under a session-level advisory lock held for a few
    -- microseconds, draw a ticket and a block of consecutive positions, and take the ticket's
    -- transaction-level lock. Commits then happen in ticket order (below), so positions become
    -- visible in increasing order: a reader that has seen position p never later sees an event
    -- at or below p. The block runs as a subtransaction so that any error releases the lock.
    BEGIN
        PERFORM pg_advisory_lock(__GLOBAL_LOCK__);
        ticket := nextval('__SCHEMA__.tickets');
        PERFORM pg_advisory_xact_lock(__TICKET_SPACE__, (ticket % 2147483648)::integer);
        base := nextval('__SCHEMA__.positions');
        IF total > 1 THEN
            PERFORM setval('__SCHEMA__.positions', base + total - 1);
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

    PERFORM pg_notify(__CHANNEL__, last_pos::text);

    -- Commit only after the previous ticket's transaction has ended (its locks are released once
    -- its commit is visible, or at its rollback). This is the last step: the commit follows.
    PERFORM pg_advisory_xact_lock_shared(__TICKET_SPACE__, ((ticket - 1) % 2147483648)::integer);
END
$fn$;
