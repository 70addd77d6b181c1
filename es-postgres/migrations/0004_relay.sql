-- es-postgres schema version 4: fencing tokens for the relay lease and projection checkpoints,
-- and the outbox's dead letters.
--
-- Placeholders as in 0001_init.sql.

-- The relay lease gets a generation, raised whenever the lease changes hands (a relay takes it
-- free, released or expired); a release now only ends the lease (the row and its generation
-- stay, so generations never go down). Every write a relay makes under the lease names its
-- generation and is refused once the generation moved on. The row also keeps the last
-- dead-lettering error, for the relay status.
ALTER TABLE __SCHEMA__.relay_leases
    ADD COLUMN generation          bigint      NOT NULL DEFAULT 0,
    ADD COLUMN last_error_position bigint,
    ADD COLUMN last_error          text,
    ADD COLUMN last_error_at       timestamptz;

-- Checkpoints get a generation, raised by every reset (a rebuild); a save naming an older
-- generation is refused. A reset keeps the row (at position 0) instead of deleting it.
ALTER TABLE __SCHEMA__.checkpoints
    ADD COLUMN generation bigint NOT NULL DEFAULT 0;

-- Outbox records the broker rejected for good (or the publisher's limits refused), moved out of
-- the outbox by the relay with the error, the attempts and the time. Same columns as the outbox,
-- keyed by the record's outbox position.
CREATE TABLE __SCHEMA__.outbox_dead_letters (
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
    error           text             NOT NULL,
    attempts        integer          NOT NULL,
    dead_at         timestamptz      NOT NULL,
    CONSTRAINT outbox_dead_letters_pkey PRIMARY KEY (position)
);

-- Deletes the outbox records at p_positions that still hold the messages p_message_ids (arrays
-- in step; a position that holds another message, after a lost tail handed it out again, is left
-- alone) if p_generation is the lease's generation. The lease row is share-locked for the
-- statement, so a relay taking the lease over (which updates the row) waits for this to commit,
-- and a mark that comes after the takeover is refused: a mark is either before the takeover or
-- refused, never after it. Returns whether it was allowed.
CREATE FUNCTION __SCHEMA__.relay_mark_delivered(p_generation bigint, p_positions bigint[],
                                                p_message_ids uuid[])
RETURNS boolean LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM 1 FROM __SCHEMA__.relay_leases
      WHERE name = 'outbox' AND generation = p_generation FOR SHARE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM __SCHEMA__.outbox o
     USING unnest(p_positions, p_message_ids) AS d(position, message_id)
     WHERE o.position = d.position AND o.message_id = d.message_id;
    RETURN true;
END
$fn$;

-- Moves the outbox records at p_positions that still hold the messages p_message_ids to the dead
-- letters with their errors and attempts (arrays in step), if p_generation is the lease's
-- generation, and records the last one moved (in the order given) as the lease's last error.
-- Positions not in the outbox, or holding other messages, are ignored. Returns whether it was
-- allowed.
CREATE FUNCTION __SCHEMA__.relay_dead_letter(p_generation bigint, p_positions bigint[],
                                             p_message_ids uuid[], p_errors text[],
                                             p_attempts integer[])
RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    now_ts   timestamptz := clock_timestamp();
    last_pos bigint;
    last_err text;
BEGIN
    PERFORM 1 FROM __SCHEMA__.relay_leases
      WHERE name = 'outbox' AND generation = p_generation FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    WITH r AS (
        SELECT * FROM unnest(p_positions, p_message_ids, p_errors, p_attempts) WITH ORDINALITY
               AS r(position, message_id, error, attempts, ord)
    ), gone AS (
        DELETE FROM __SCHEMA__.outbox o USING r
         WHERE o.position = r.position AND o.message_id = r.message_id
        RETURNING o.*, r.error AS error, r.attempts AS attempts, r.ord AS ord
    ), parked AS (
        INSERT INTO __SCHEMA__.outbox_dead_letters (position, stream_id, message_id,
            source_event_id, topic, key, message_type, schema_version, payload, metadata,
            recorded_at, error, attempts, dead_at)
        SELECT position, stream_id, message_id, source_event_id, topic, key, message_type,
               schema_version, payload, metadata, recorded_at, error, attempts, now_ts
          FROM gone
    )
    SELECT g.position, g.error INTO last_pos, last_err FROM gone g ORDER BY g.ord DESC LIMIT 1;
    IF last_pos IS NOT NULL THEN
        UPDATE __SCHEMA__.relay_leases
           SET last_error_position = last_pos, last_error = last_err, last_error_at = now_ts
         WHERE name = 'outbox';
    END IF;
    RETURN true;
END
$fn$;

-- Moves the dead letters at p_positions back to the end of the outbox, in the order of their old
-- positions, each with a new outbox position. Returns how many were moved.
CREATE FUNCTION __SCHEMA__.relay_requeue(p_positions bigint[])
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    d record;
    n bigint := 0;
BEGIN
    FOR d IN SELECT * FROM __SCHEMA__.outbox_dead_letters
              WHERE position = ANY (p_positions) ORDER BY position FOR UPDATE LOOP
        INSERT INTO __SCHEMA__.outbox (position, stream_id, message_id, source_event_id, topic,
                                       key, message_type, schema_version, payload, metadata,
                                       recorded_at)
        VALUES (nextval('__SCHEMA__.outbox_positions'), d.stream_id, d.message_id,
                d.source_event_id, d.topic, d.key, d.message_type, d.schema_version, d.payload,
                d.metadata, d.recorded_at);
        DELETE FROM __SCHEMA__.outbox_dead_letters WHERE position = d.position;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$fn$;

-- Raises a checkpoint within its generation: 1 if written, 0 if the stored position is as high,
-- -1 if p_generation is not the stored generation (nothing written). The row is locked, so a
-- reset and a save are ordered.
CREATE FUNCTION __SCHEMA__.checkpoint_save(p_name text, p_generation bigint, p_position bigint)
RETURNS smallint LANGUAGE plpgsql AS $fn$
DECLARE
    g bigint;
    p bigint;
BEGIN
    INSERT INTO __SCHEMA__.checkpoints (name, position, generation, updated_at)
    VALUES (p_name, 0, 0, now())
    ON CONFLICT (name) DO NOTHING;
    SELECT generation, position INTO g, p FROM __SCHEMA__.checkpoints
     WHERE name = p_name FOR UPDATE;
    IF g <> p_generation THEN
        RETURN -1;
    END IF;
    IF p_position <= p THEN
        RETURN 0;
    END IF;
    UPDATE __SCHEMA__.checkpoints SET position = p_position, updated_at = now()
     WHERE name = p_name;
    RETURN 1;
END
$fn$;
