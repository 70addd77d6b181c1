-- es-postgres schema version 5: a snapshot names the event it was taken at.
--
-- The repository uses a snapshot only while its stream still holds that event at the snapshot's
-- version (es_core::Repository), so a snapshot of events that were lost or replaced is never
-- trusted. Snapshots written before this migration have none and are checked by version only.

ALTER TABLE __SCHEMA__.snapshots ADD COLUMN event_id uuid;
