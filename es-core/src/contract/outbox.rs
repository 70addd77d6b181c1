//! The outbox side of a store: records written atomically with events, delivery marks, dead
//! letters and the relay lease. How a relay uses them is described in `es_core::outbox`.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::error::StoreFuture;
use crate::event::Metadata;
use crate::stream_id::StreamId;

/// An outgoing message to record with an append.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// Unique id; the dedupe key consumers use.
    pub message_id: Uuid,
    /// The domain event it was translated from.
    pub source_event_id: Uuid,
    /// Destination (a Kafka topic).
    pub topic: String,
    /// Partitioning key; the source stream id by default, which keeps per-stream order per
    /// partition.
    pub key: String,
    /// Stable message type name (the public contract, not the domain event's name).
    pub message_type: String,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// JSON payload.
    pub payload: Bytes,
    /// Correlation, causation (the source event) and actor.
    pub metadata: Metadata,
}

/// A message stored in the outbox, waiting for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// Position in the outbox: increasing in commit order, like global positions. A re-queued
    /// dead letter gets a new, higher position.
    pub position: u64,
    /// The stream whose append recorded it.
    pub stream_id: StreamId,
    /// When it was recorded (store clock).
    pub recorded_at: DateTime<Utc>,
    /// The message.
    pub message: OutboxMessage,
}

/// A record the broker acknowledged, to mark delivered: its outbox position and its message id.
///
/// A store deletes the record at `position` only while it still holds `message_id` there, so a
/// delivery mark can never remove another record that took the position (after a store lost its
/// tail and handed outbox positions out again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delivered {
    /// The record's outbox position.
    pub position: u64,
    /// Its message id.
    pub message_id: Uuid,
}

impl From<&OutboxRecord> for Delivered {
    fn from(record: &OutboxRecord) -> Self {
        Self {
            position: record.position,
            message_id: record.message.message_id,
        }
    }
}

/// A record to move from the outbox to the dead-letter list (only while the outbox still holds
/// `message_id` at `position`, as for [`Delivered`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The record's outbox position.
    pub position: u64,
    /// Its message id.
    pub message_id: Uuid,
    /// Why it can never be published.
    pub error: String,
    /// How many times it was sent to the broker (0: refused by the publisher's own check before
    /// sending).
    pub attempts: u32,
}

/// A record parked in the dead-letter list: the broker rejected it for good, or the publisher's
/// limits refused it before sending.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The record as it was in the outbox.
    pub record: OutboxRecord,
    /// Why it was parked.
    pub error: String,
    /// How many times the relay that parked it had sent it to the broker.
    pub attempts: u32,
    /// When it was parked (store clock).
    pub dead_at: DateTime<Utc>,
}

/// The most recent dead-lettering, as the store recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastRejection {
    /// Outbox position of the record.
    pub position: u64,
    /// The error text.
    pub error: String,
    /// When (store clock).
    pub at: DateTime<Utc>,
}

/// The relay lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The relay that took it last.
    pub owner: String,
    /// Its generation: raised whenever the lease changes hands.
    pub generation: u64,
    /// Whether it is held now (neither released nor expired).
    pub held: bool,
}

/// What the outbox and its relay look like now, from the store: see
/// [`OutboxStore::relay_status`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RelayStatus {
    /// Records waiting for delivery.
    pub pending: u64,
    /// Records in the dead-letter list.
    pub dead_letters: u64,
    /// The error of the most recent dead-lettering, if any record was ever parked.
    pub last_error: Option<LastRejection>,
    /// The lease, if any relay ever took it.
    pub lease: Option<LeaseState>,
}

/// The outbox side of a store: pending records, delivery marks, dead letters and the relay lease.
///
/// Outbox records are written by [`EventStore::append`](super::EventStore::append) from
/// [`AppendRequest::outbox`](super::AppendRequest::outbox), atomically with the events.
///
/// **Partitions.** A store with several feed [`partition`](super::partition)s keeps either one
/// outbox for the whole store (es-memory, es-postgres: one relay serves every partition; records
/// of different partitions may become visible out of position order, each stream's stay in
/// order) or one outbox per partition (es-redis, where a partition lives in one hash slot: each
/// with its own positions, dead letters and relay lease, reached through the handle
/// [`outbox_partition`](OutboxStore::outbox_partition) returns; its unscoped handle's outbox
/// methods fail with [`StoreError::Partitioned`](super::StoreError::Partitioned)). Either way a
/// key's records stay in order as long as they come from streams of one partition (a key per
/// stream always does); nothing orders records of different partitions.
pub trait OutboxStore: Clone + Send + Sync + 'static {
    /// A handle whose outbox methods address the outbox of feed partition `partition`. The
    /// default, for a store with one partition: partition 0 is the whole outbox, and any other is
    /// [`StoreError::NoSuchPartition`](super::StoreError::NoSuchPartition).
    fn outbox_partition(&self, partition: u32) -> Result<Self, super::StoreError> {
        super::Partitioning::single()
            .check(partition)
            .map(|()| self.clone())
    }

    /// How many outboxes the store keeps, each reached through
    /// [`outbox_partition`](Self::outbox_partition) from 0: 1 for a store with one outbox for
    /// every partition (the default), the feed's partition count for a store with one per
    /// partition.
    fn outbox_partitions(&self) -> u32 {
        1
    }

    /// Takes or renews the relay lease for `owner` until `ttl` from now (store clock). Returns
    /// the lease's generation if `owner` holds it now, `None` if another owner does.
    ///
    /// A lease not renewed within its ttl expires and can be taken by another owner. Taking a
    /// free, released or expired lease raises the generation (whoever takes it, the previous
    /// owner included); renewing a lease the owner still holds keeps it. Generations never go
    /// down, across releases too.
    fn acquire_relay_lease(&self, owner: &str, ttl: Duration) -> impl StoreFuture<Option<u64>>;

    /// Gives the lease up if `owner` holds it in `generation`; keeps the generation counter.
    fn release_relay_lease(&self, owner: &str, generation: u64) -> impl StoreFuture<()>;

    /// Up to `limit` undelivered records, in outbox order.
    fn pending_outbox(&self, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>>;

    /// Up to `limit` undelivered records at outbox positions above `after`, in outbox order: the
    /// relay reads its next batch with it while earlier ones are still being published. Records
    /// become visible in position order (a record is never seen after a higher position was
    /// seen), except re-queued dead letters in PostgreSQL and, in a PostgreSQL store with
    /// several partitions, records of partitions that committed out of position order: a relay
    /// reading past them finds them on its next pass from the head.
    fn pending_outbox_after(&self, after: u64, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>>;

    /// Marks the `delivered` records delivered (removes them from the outbox), if `generation`
    /// is still the lease's generation; otherwise fails with [`StoreError::Fenced`](super::StoreError::Fenced) and marks
    /// nothing. A position that is not pending, or holds another message, is left alone
    /// (idempotent).
    fn mark_delivered(&self, generation: u64, delivered: &[Delivered]) -> impl StoreFuture<()>;

    /// Moves the records of `rejections` from the outbox to the dead-letter list, with their
    /// errors, attempts and the store's time, if `generation` is still the lease's generation;
    /// otherwise fails with [`StoreError::Fenced`](super::StoreError::Fenced) and moves nothing. Atomic: every record is
    /// moved or none. Positions not pending, or holding another message, are ignored. Records
    /// the last error (see
    /// [`relay_status`](Self::relay_status)).
    fn dead_letter(&self, generation: u64, rejections: &[Rejection]) -> impl StoreFuture<()>;

    /// Up to `limit` dead letters, in outbox-position order.
    fn dead_letters(&self, limit: u64) -> impl StoreFuture<Vec<DeadLetter>>;

    /// Moves the dead letters at `positions` back into the outbox, at its end: each gets a new
    /// outbox position, higher than every record's so far, in the order of the old positions;
    /// the message (id, payload, ...) is unchanged. Positions that are not dead letters are
    /// ignored. Returns how many were re-queued. Not fenced: an operator's action. What this does
    /// to per-key order is described with the relay (`es_core::outbox`, "Records that can never
    /// be published").
    fn requeue_dead_letters(&self, positions: &[u64]) -> impl StoreFuture<u64>;

    /// Number of undelivered records.
    fn outbox_len(&self) -> impl StoreFuture<u64>;

    /// Pending and dead-letter counts, the last dead-lettering error and the lease.
    fn relay_status(&self) -> impl StoreFuture<RelayStatus>;
}
