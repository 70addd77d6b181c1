//! The backend contract, in one place: the four store traits every backend implements over
//! serialized events, their record types, their error, and the helpers a backend uses to
//! implement them.
//!
//! | trait | what it keeps | records |
//! |---|---|---|
//! | [`EventStore`] | streams and the global feed | [`AppendRequest`], [`AppendResult`], [`ReadStream`], [`ReadAll`], [`EventFilter`], [`EventStream`], [`EventPages`], [`ListStreams`], [`StreamPage`] |
//! | [`SnapshotStore`] | aggregate snapshots | [`SnapshotRecord`] |
//! | [`OutboxStore`] | outbox records, dead letters, the relay lease | [`OutboxMessage`], [`OutboxRecord`], [`Delivered`], [`Rejection`], [`DeadLetter`], [`RelayStatus`] |
//! | [`CheckpointStore`] | projection checkpoints | [`Checkpoint`] |
//! | [`LeaseStore`] | named leases of consumer groups | [`HeldLease`] |
//!
//! [`Store`] (events and snapshots) is what the repository runs on; [`StreamingStore`] adds the
//! outbox and checkpoints, for relays and projections. Every method fails with a [`StoreError`].
//!
//! Helpers for backends: [`AppendRequest::validate`] (the limits and the JSON rule every store
//! applies), [`classify_retry`] (the rule for a batch whose event ids may be stored already),
//! [`validate_streams`] and [`classify_streams_retry`] (the same for multi-stream appends),
//! [`position`] and [`verify_resume`] (epochs, and telling readers that a store lost a tail),
//! [`pages_of`] (pages of borrowed events from a stream of events) and [`wait_on_watch`]
//! (waiting for appends through a `tokio::sync::watch` of the head). [`EventStore::subscribe`]
//! has a default, catch-up-then-live subscription built on `read_all`, `head_position` and
//! `wait_for_append`.
//!
//! This module depends on the shared vocabulary of the crate (events, stream ids, the JSON rule,
//! the backoff) and on nothing of the runtime: the repository, the outbox relay and the projection
//! runner use the contract, never the reverse.
//!
//! # Contract (proven for every backend by the conformance suites of `es-testkit`)
//!
//! - **Versions.** The first event of a stream has version 1; a stream with no events is at 0.
//! - **Append** is atomic: all events of an [`AppendRequest`] are stored, or none. The
//!   [`ExpectedVersion`] is checked against the stream's version by data; a mismatch is
//!   [`StoreError::Conflict`].
//! - **Idempotency.** Event ids are unique in the store. Re-sending a batch whose events are all
//!   stored already, in the same stream at consecutive versions in the same order, returns the
//!   original [`AppendResult`] and writes nothing. A batch that partly overlaps stored events is
//!   [`StoreError::DuplicateEvent`].
//! - **Multi-stream appends** ([`EventStore::append_streams`]) are atomic across their streams:
//!   every part's expected version is checked and every part is written, or nothing is. The same
//!   call re-sent returns its first results; a call only partly stored is refused.
//! - **Closing.** A stream whose last event is its tombstone ([`NewEvent::closing`](crate::NewEvent::closing),
//!   type [`CLOSED_EVENT_TYPE`](crate::CLOSED_EVENT_TYPE), appended like any event, last in its
//!   batch) is closed: every later append to it fails with [`StoreError::StreamClosed`], whatever
//!   its expected version, decided atomically with the append (in a multi-stream append, for
//!   every part before anything is written). The retry rule runs first: an exact retry of a
//!   batch stored before, the close included, returns its first result. Event types beginning
//!   with `$` are reserved ([`StoreError::ReservedEventType`]).
//! - **Global order, never skip.** Every event gets a global position, strictly increasing in
//!   commit order (not necessarily dense). Once [`EventStore::read_all`] or a subscription has
//!   returned position `p`, no event at or below `p` becomes visible later. Per-stream order in the
//!   global feed matches stream versions.
//! - **Partitions.** A store with several feed [`partition`]s keeps each of the above per
//!   partition: a stream lives in one partition, each partition's positions are its own, and
//!   nothing orders events of different partitions. Single-feed calls on such a store fail with
//!   [`StoreError::Partitioned`].
//! - **Reads** are lazy async streams that page through the store; they never buffer a whole large
//!   stream.
//! - **Archiving** ([`EventStore::archive_stream`]) moves a stream's old events out of hot
//!   storage without changing what any read returns; the last event of a stream stays hot.
//! - **Listing** ([`EventStore::list_streams`]) returns the streams holding at least one event,
//!   in stream-id byte order, a page at a time, each with its version when listed.
//! - **Outbox** records are written by the append that carries them, atomically with its events;
//!   marks and dead letters are fenced by the relay lease's generation.
//! - **Checkpoints** only move forward within a generation; a save naming an older generation is
//!   [`StoreError::Fenced`].

mod append;
pub mod archive;
mod checkpoint;
mod error;
mod event_store;
mod expected;
mod lease;
mod outbox;
pub mod partition;
pub mod position;
mod read;
mod redact;
mod snapshot;
mod streams;

pub use append::{
    classify_retry, classify_streams_retry, validate_streams, AppendLimits, AppendRequest,
    AppendResult, StoredEventRef,
};
pub use archive::{
    check_archive, merge_feed_read, merge_stream_read, Archived, EventArchive, HotFeed,
};
pub use checkpoint::{Checkpoint, CheckpointStore};
pub use error::{StoreError, StoreFuture};
pub use event_store::{
    verify_resume, wait_for_any_append, wait_on_watch, EventStore, Store, StreamingStore,
};
pub use expected::ExpectedVersion;
pub use lease::{
    check_lease, check_lease_name, HeldLease, LeaseStore, MAX_LEASE_NAME, MAX_LEASE_TTL,
};
pub use outbox::{
    DeadLetter, Delivered, LastRejection, LeaseState, OutboxMessage, OutboxRecord, OutboxStore,
    Rejection, RelayStatus,
};
pub use partition::{FeedPosition, PartitionKey, Partitioning, MAX_PARTITIONS};
pub use position::EpochStart;
pub use read::{
    failed_read, pages_of, Direction, EventFilter, EventPage, EventPages, EventStream, ReadAll,
    ReadStream,
};
pub use redact::redact_url;
pub use snapshot::{SnapshotRecord, SnapshotStore};
pub use streams::{ListStreams, StreamPage, StreamSummary};
