//! The error every store operation returns.

use std::future::Future;

use uuid::Uuid;

use super::expected::ExpectedVersion;
use crate::stream_id::{InvalidStreamId, StreamId};

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream's version did not match the expected version; nothing was written (in a
    /// multi-stream append: to any of its streams; `stream_id` names the first part, in the
    /// call's order, whose version did not match).
    #[error(
        "conflict on stream `{stream_id}`: expected {expected}, but it is at version {actual}"
    )]
    Conflict {
        /// The stream.
        stream_id: StreamId,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's actual version.
        actual: u64,
    },
    /// The stream is closed: its last event, at `version`, is its tombstone
    /// ([`NewEvent::closing`](crate::NewEvent::closing)), and it accepts no append, whatever the
    /// expected version. Nothing was written (in a multi-stream append: to any of its streams;
    /// `stream_id` names the first closed part, in the call's order). Not transient: retrying
    /// the same append fails the same way. An exact retry of a batch stored before the close
    /// (the close itself included) still returns its first result.
    #[error("stream `{stream_id}` is closed (its tombstone is version {version}): it accepts no more events")]
    StreamClosed {
        /// The stream.
        stream_id: StreamId,
        /// The version of its tombstone, the stream's last.
        version: u64,
    },
    /// An event's type begins with the reserved prefix
    /// [`RESERVED_PREFIX`](crate::event::RESERVED_PREFIX) (`$`) but is not one of the framework's
    /// own event types; nothing was written.
    #[error(
        "event {event_id} for `{stream_id}` has the type `{event_type}`: event types beginning \
         with `$` are reserved for the framework"
    )]
    ReservedEventType {
        /// The stream appended to.
        stream_id: StreamId,
        /// The offending event.
        event_id: Uuid,
        /// Its type.
        event_type: String,
    },
    /// Some events of the batch are already stored, but the batch is not an exact retry.
    #[error("event {event_id} appended to `{stream_id}` is already stored: {reason}")]
    DuplicateEvent {
        /// The stream appended to.
        stream_id: StreamId,
        /// The first offending event id.
        event_id: Uuid,
        /// What does not match.
        reason: String,
    },
    /// An event payload exceeds the store's configured limit.
    #[error(
        "event {event_id} for `{stream_id}` has a {size}-byte payload, over the limit of {limit}"
    )]
    PayloadTooLarge {
        /// The stream appended to.
        stream_id: StreamId,
        /// The oversized event.
        event_id: Uuid,
        /// Its payload size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The request itself is malformed; nothing was written.
    #[error("invalid append to `{stream_id}`: {reason}")]
    InvalidRequest {
        /// The stream appended to.
        stream_id: StreamId,
        /// What is wrong.
        reason: String,
    },
    /// A multi-stream append ([`EventStore::append_streams`](super::EventStore::append_streams))
    /// that is malformed as a whole: it names no stream, or its parts together exceed the
    /// store's limits, or (Redis) its streams cannot be written by one script. Nothing was
    /// written. A fault of one part names that part's stream in [`StoreError::InvalidRequest`].
    #[error("invalid multi-stream append: {reason}")]
    InvalidMultiAppend {
        /// What is wrong.
        reason: String,
    },
    /// An inline projection (one that runs inside the append) failed; nothing was written.
    #[error("inline projection `{projection}` rejected the append to `{stream_id}`: {reason}")]
    InlineProjection {
        /// The stream appended to.
        stream_id: StreamId,
        /// The projection.
        projection: String,
        /// Its error.
        reason: String,
    },
    /// An archive request that cannot be carried out ([`EventStore::archive_stream`](super::EventStore::archive_stream)):
    /// it would move the stream's last event, or the stream has no events. Nothing was moved.
    #[error("cannot archive `{stream_id}`: {reason}")]
    InvalidArchive {
        /// The stream.
        stream_id: StreamId,
        /// What is wrong.
        reason: String,
    },
    /// A stream id, category or aggregate id failed validation.
    #[error(transparent)]
    InvalidStreamId(#[from] InvalidStreamId),
    /// Stored data cannot be read back (written behind the store's back, or damaged).
    #[error("corrupt data in the store at {location}: {reason}")]
    Corrupt {
        /// Where: a stream and version, or a global position.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// The store cannot be reached right now (connection refused or dropped, server restarting).
    /// Whether a write in flight was applied is unknown: retry the same request, which is
    /// idempotent by event id.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store lost acknowledged events after `head` (a restart that replayed a short log, a
    /// failover to a replica that lagged, a restore from a backup), and `position`, read from it
    /// earlier, lies in the lost part. Whatever was built from events after `head` (a read model,
    /// a checkpoint) holds events the store no longer has: rebuild it. See
    /// [`position`](super::position).
    #[error(
        "the store lost events after position {head} (epoch {epoch} began there after a restart, \
         failover or restore); position {position}, read earlier, is no longer in its history"
    )]
    LostTail {
        /// The position the reader had reached.
        position: u64,
        /// The highest position that survived.
        head: u64,
        /// The epoch that began after the loss.
        epoch: u64,
    },
    /// A lease or a generation this caller held has been taken over by another owner; the caller
    /// must stop writing under it (nothing was written by this call).
    #[error("fenced off `{resource}`: {reason}")]
    Fenced {
        /// What was taken over: a relay lease, a projection.
        resource: String,
        /// Who holds it now, or what changed.
        reason: String,
    },
    /// A lease call named an empty or overlong group, lease or owner, or an out-of-range ttl
    /// (see [`LeaseStore`](super::LeaseStore)); nothing was changed.
    #[error("invalid lease: {reason}")]
    InvalidLease {
        /// What is wrong.
        reason: String,
    },
    /// A single-feed call (`head_position`, `read_all` without a partition, `subscribe`) on a
    /// store with several feed partitions: name the partition, or follow them all (see
    /// [`partition`](super::partition)).
    #[error(
        "the store has {partitions} feed partitions: name the partition to read, or follow \
         them all with subscribe_all"
    )]
    Partitioned {
        /// How many partitions the store has.
        partitions: u32,
    },
    /// A partition the store does not have.
    #[error("partition {partition} does not exist: the store has {partitions} (0 to {})", partitions - 1)]
    NoSuchPartition {
        /// The partition asked for.
        partition: u32,
        /// How many partitions the store has.
        partitions: u32,
    },
    /// A partition count or layout that cannot be used: out of range, or not the one the store
    /// was created with.
    #[error("invalid partitioning: {reason}")]
    InvalidPartitioning {
        /// What is wrong.
        reason: String,
    },
    /// Any other backend failure.
    #[error("store error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Wraps a backend error that means the store is unreachable.
    pub fn unavailable(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable(err.into())
    }

    /// Wraps any other backend error.
    pub fn backend(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(err.into())
    }

    /// A corruption error at a stream version.
    pub fn corrupt_at(stream_id: &StreamId, version: u64, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            location: format!("stream `{stream_id}` version {version}"),
            reason: reason.into(),
        }
    }
}

/// Shorthand for futures returned by store methods.
pub trait StoreFuture<T>: Future<Output = Result<T, StoreError>> + Send {}
impl<T, F: Future<Output = Result<T, StoreError>> + Send> StoreFuture<T> for F {}

impl ExpectedVersion {
    /// Checks `actual` against this expectation, returning the typed conflict on mismatch.
    pub fn check(self, stream_id: &StreamId, actual: u64) -> Result<(), StoreError> {
        if self.is_satisfied_by(actual) {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                stream_id: stream_id.clone(),
                expected: self,
                actual,
            })
        }
    }
}
