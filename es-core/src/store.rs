//! The storage contract every backend implements, over serialized events.
//!
//! Backends implement [`EventStore`] and [`SnapshotStore`]; serialization, upcasting, snapshot
//! policy and command handling happen once, in [`crate::repository`].
//!
//! # Contract (proven for every backend by the conformance suite, feature `testing`)
//!
//! - **Versions.** The first event of a stream has version 1; a stream with no events is at 0.
//! - **Append** is atomic: all events of an [`AppendRequest`] are stored, or none. The
//!   [`ExpectedVersion`] is checked against the stream's version by data; a mismatch is
//!   [`StoreError::Conflict`].
//! - **Idempotency.** Event ids are unique in the store. Re-sending a batch whose events are all
//!   stored already, in the same stream at consecutive versions in the same order, returns the
//!   original [`AppendResult`] and writes nothing. A batch that partly overlaps stored events is
//!   [`StoreError::DuplicateEvent`].
//! - **Global order, never skip.** Every event gets a global position, strictly increasing in commit
//!   order (not necessarily dense). Once [`EventStore::read_all`] or a subscription has returned
//!   position `p`, no event at or below `p` becomes visible later. Per-stream order in the global feed
//!   matches stream versions.
//! - **Reads** are lazy async streams that page through the store; they never buffer a whole large
//!   stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;
use uuid::Uuid;

use crate::event::{NewEvent, RecordedEvent};
use crate::outbox::OutboxMessage;
use crate::position::EpochStart;
use crate::stream_id::{InvalidStreamId, StreamId};

/// What the writer believes the stream's version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream must be at exactly this version (`Exact(0)` is the same as `NoStream`).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at version `actual` satisfies this expectation.
    pub fn is_satisfied_by(self, actual: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual == 0,
            Self::StreamExists => actual > 0,
            Self::Exact(v) => actual == v,
        }
    }

    /// Checks `actual` against this expectation, returning the typed conflict on mismatch.
    pub fn check(self, stream: &StreamId, actual: u64) -> Result<(), StoreError> {
        if self.is_satisfied_by(actual) {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                stream: stream.clone(),
                expected: self,
                actual,
            })
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::StreamExists => f.write_str("an existing stream"),
            Self::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// One atomic append to one stream.
///
/// Built with [`AppendRequest::new`]; the struct is `#[non_exhaustive]` so that atomic side writes
/// (outbox records, inline projections) can be added to the same request later.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AppendRequest {
    /// The stream to append to.
    pub stream: StreamId,
    /// The version the stream must be at.
    pub expected: ExpectedVersion,
    /// The events, in order. May be empty: then only the expected version is checked.
    pub events: Vec<NewEvent>,
    /// Outgoing messages recorded in the outbox atomically with the events (only with at least
    /// one event; an idempotent retry records nothing new).
    pub outbox: Vec<OutboxMessage>,
}

impl AppendRequest {
    /// An append of `events` to `stream`, checked against `expected`.
    pub fn new(stream: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self {
            stream,
            expected,
            events,
            outbox: Vec::new(),
        }
    }

    /// Records `messages` in the outbox with this append.
    pub fn with_outbox(mut self, messages: Vec<OutboxMessage>) -> Self {
        self.outbox = messages;
        self
    }

    /// Checks the request against `limits`: sizes, names, duplicate ids within the batch, and
    /// the JSON rule of [`crate::json`] for every payload and metadata. Nothing that one store
    /// would refuse or could not read back passes, so every store accepts the same appends.
    ///
    /// Every backend calls this before writing anything.
    pub fn validate(&self, limits: &AppendLimits) -> Result<(), StoreError> {
        let invalid = |reason: String| StoreError::InvalidRequest {
            stream: self.stream.clone(),
            reason,
        };
        if self.events.len() > limits.max_batch_len {
            return Err(invalid(format!(
                "batch of {} events exceeds the limit of {}",
                self.events.len(),
                limits.max_batch_len
            )));
        }
        let depth = limits.max_json_depth.min(crate::json::MAX_DEPTH);
        let mut total = 0usize;
        for (i, event) in self.events.iter().enumerate() {
            let size = event.payload.len();
            if size > limits.max_payload_bytes {
                return Err(StoreError::PayloadTooLarge {
                    stream: self.stream.clone(),
                    event_id: event.event_id,
                    size,
                    limit: limits.max_payload_bytes,
                });
            }
            if !valid_name(&event.event_type, MAX_NAME_BYTES) {
                return Err(invalid(format!(
                    "event {} has an empty or overlong type name, or one with control \
                     characters",
                    event.event_id
                )));
            }
            crate::json::check(&event.payload, depth).map_err(|problem| {
                invalid(format!("the payload of event {} {problem}", event.event_id))
            })?;
            total += size
                + check_metadata(&event.metadata, limits, depth).map_err(|reason| {
                    invalid(format!("the metadata of event {} {reason}", event.event_id))
                })?;
            if self.events[..i]
                .iter()
                .any(|e| e.event_id == event.event_id)
            {
                return Err(invalid(format!(
                    "event id {} appears twice in one batch",
                    event.event_id
                )));
            }
        }
        total += self.validate_outbox(limits, depth)?;
        if total > limits.max_append_bytes {
            return Err(invalid(format!(
                "the append holds {total} bytes of payloads and metadata, over the limit of {}",
                limits.max_append_bytes
            )));
        }
        Ok(())
    }

    /// Checks the outbox messages; returns their payload and metadata bytes.
    fn validate_outbox(&self, limits: &AppendLimits, depth: usize) -> Result<usize, StoreError> {
        let invalid = |reason: String| StoreError::InvalidRequest {
            stream: self.stream.clone(),
            reason,
        };
        if !self.outbox.is_empty() && self.events.is_empty() {
            return Err(invalid(
                "outbox messages need at least one event in the same append".to_owned(),
            ));
        }
        let mut total = 0;
        for (i, message) in self.outbox.iter().enumerate() {
            if message.payload.len() > limits.max_payload_bytes {
                return Err(StoreError::PayloadTooLarge {
                    stream: self.stream.clone(),
                    event_id: message.message_id,
                    size: message.payload.len(),
                    limit: limits.max_payload_bytes,
                });
            }
            if !valid_name(&message.topic, MAX_NAME_BYTES)
                || !valid_name(&message.message_type, MAX_NAME_BYTES)
            {
                return Err(invalid(format!(
                    "outbox message {} has an empty or overlong topic or type, or one with \
                     control characters",
                    message.message_id
                )));
            }
            if message.key.len() > MAX_KEY_BYTES || message.key.contains('\0') {
                return Err(invalid(format!(
                    "outbox message {} has a key over {MAX_KEY_BYTES} bytes or with a NUL \
                     character",
                    message.message_id
                )));
            }
            crate::json::check(&message.payload, depth).map_err(|problem| {
                invalid(format!(
                    "the payload of outbox message {} {problem}",
                    message.message_id
                ))
            })?;
            total += message.payload.len()
                + check_metadata(&message.metadata, limits, depth).map_err(|reason| {
                    invalid(format!(
                        "the metadata of outbox message {} {reason}",
                        message.message_id
                    ))
                })?;
            if self.outbox[..i]
                .iter()
                .any(|m| m.message_id == message.message_id)
            {
                return Err(invalid(format!(
                    "message id {} appears twice in one batch",
                    message.message_id
                )));
            }
        }
        Ok(total)
    }
}

/// Longest event type name, outbox topic or message type, in bytes.
const MAX_NAME_BYTES: usize = 256;

/// Longest outbox message key, in bytes.
const MAX_KEY_BYTES: usize = 4096;

/// A name (event type, topic, message type): 1 to `max` bytes, no control characters.
fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty() && name.len() <= max && !name.chars().any(char::is_control)
}

/// Checks serialized metadata against the limits and the JSON rule; returns its size.
fn check_metadata(
    metadata: &crate::event::Metadata,
    limits: &AppendLimits,
    depth: usize,
) -> Result<usize, String> {
    if *metadata == crate::event::Metadata::default() {
        return Ok(2);
    }
    let json = metadata.to_json();
    if json.len() > limits.max_metadata_bytes {
        return Err(format!(
            "is {} bytes, over the limit of {}",
            json.len(),
            limits.max_metadata_bytes
        ));
    }
    crate::json::check(&json, depth).map_err(|problem| problem.to_string())?;
    Ok(json.len())
}

/// Size limits a backend enforces on appends, the same for every store (see
/// [`AppendRequest::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendLimits {
    /// Largest accepted payload of one event or outbox message, in bytes (default 1 MiB).
    pub max_payload_bytes: usize,
    /// Most events in one append (default 10 000).
    pub max_batch_len: usize,
    /// Largest serialized metadata of one event or outbox message, in bytes (default 64 KiB).
    pub max_metadata_bytes: usize,
    /// Largest whole append: every payload and metadata of its events and outbox messages, in
    /// bytes (default 32 MiB).
    pub max_append_bytes: usize,
    /// Deepest nesting of arrays and objects in a payload or metadata (default and most
    /// [`crate::json::MAX_DEPTH`]).
    pub max_json_depth: usize,
}

impl Default for AppendLimits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_batch_len: 10_000,
            max_metadata_bytes: 64 * 1024,
            max_append_bytes: 32 * 1024 * 1024,
            max_json_depth: crate::json::MAX_DEPTH,
        }
    }
}

/// The outcome of a successful append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append (the version of its last event).
    pub stream_version: u64,
    /// The global position of each appended event, in order.
    pub positions: Vec<u64>,
    /// True when every event was already stored and nothing was written (an idempotent retry).
    pub duplicate: bool,
}

impl AppendResult {
    /// Version of the first appended event, if any.
    pub fn first_version(&self) -> Option<u64> {
        (!self.positions.is_empty()).then(|| self.stream_version + 1 - self.positions.len() as u64)
    }
}

/// Where stored copies of a batch's event ids were found, for [`classify_retry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEventRef {
    /// The event id.
    pub event_id: Uuid,
    /// The stream holding it.
    pub stream: StreamId,
    /// Its stream version.
    pub stream_version: u64,
    /// Its global position.
    pub global_position: u64,
}

/// Decides what an append whose event ids may already be stored must do.
///
/// `found[i]` is the stored copy of `request.events[i]`, if any. Returns `Ok(None)` when no event
/// is stored (append normally), `Ok(Some(result))` for an exact retry, and
/// [`StoreError::DuplicateEvent`] for a partial overlap.
pub fn classify_retry(
    request: &AppendRequest,
    found: &[Option<StoredEventRef>],
) -> Result<Option<AppendResult>, StoreError> {
    debug_assert_eq!(found.len(), request.events.len());
    let stored = found.iter().filter(|f| f.is_some()).count();
    if stored == 0 {
        return Ok(None);
    }
    let overlap = |event_id: Uuid, reason: String| StoreError::DuplicateEvent {
        stream: request.stream.clone(),
        event_id,
        reason,
    };
    if stored < found.len() {
        let (i, _) = found
            .iter()
            .enumerate()
            .find(|(_, f)| f.is_some())
            .unwrap_or((0, &None));
        return Err(overlap(
            request.events[i].event_id,
            format!(
                "{stored} of the {} events are already stored; a retry must resend the same batch",
                found.len()
            ),
        ));
    }
    let mut positions = Vec::with_capacity(found.len());
    let mut last_version = 0;
    for (i, f) in found.iter().enumerate() {
        let f = f.as_ref().expect("all events are stored");
        if f.stream != request.stream {
            return Err(overlap(
                f.event_id,
                format!("the event is already stored in stream `{}`", f.stream),
            ));
        }
        if i > 0 && f.stream_version != last_version + 1 {
            return Err(overlap(
                f.event_id,
                "the stored events are not in the order of this batch".to_owned(),
            ));
        }
        last_version = f.stream_version;
        positions.push(f.global_position);
    }
    Ok(Some(AppendResult {
        stream_version: last_version,
        positions,
        duplicate: true,
    }))
}

/// Direction of a stream read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Ascending versions.
    Forward,
    /// Descending versions.
    Backward,
}

/// Which part of a stream to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStream {
    /// Read direction.
    pub direction: Direction,
    /// First version to return (inclusive). Backward reads from `u64::MAX` start at the end.
    pub from: u64,
    /// Most events to return; `None` for all.
    pub limit: Option<u64>,
}

impl ReadStream {
    /// The whole stream, oldest first.
    pub fn forward() -> Self {
        Self {
            direction: Direction::Forward,
            from: 1,
            limit: None,
        }
    }

    /// The whole stream, newest first.
    pub fn backward() -> Self {
        Self {
            direction: Direction::Backward,
            from: u64::MAX,
            limit: None,
        }
    }

    /// Starts at version `from` (inclusive).
    pub fn from(mut self, from: u64) -> Self {
        self.from = from;
        self
    }

    /// Returns at most `limit` events.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Whether `version` lies in the requested direction from `from`.
    pub fn includes(&self, version: u64) -> bool {
        match self.direction {
            Direction::Forward => version >= self.from,
            Direction::Backward => version <= self.from,
        }
    }
}

/// Which events of the global feed to return.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EventFilter {
    /// Only events of these stream categories; empty means every category.
    pub categories: Vec<String>,
    /// Only events of these types; empty means every type.
    pub event_types: Vec<String>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only events of streams in `category` (can be chained to allow several).
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.categories.push(category.into());
        self
    }

    /// Only events of type `event_type` (can be chained to allow several).
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_types.push(event_type.into());
        self
    }

    /// Whether the filter lets everything through.
    pub fn is_empty(&self) -> bool {
        self.categories.is_empty() && self.event_types.is_empty()
    }

    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        (self.categories.is_empty() || self.categories.iter().any(|c| c == event.category()))
            && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
    }
}

/// Which part of the global feed to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadAll {
    /// Return events with a global position strictly greater than this (0 reads from the start).
    pub after: u64,
    /// Most events to return; `None` for all.
    pub limit: Option<u64>,
    /// Which events to return.
    pub filter: EventFilter,
}

impl ReadAll {
    /// Every event after `after`.
    pub fn after(after: u64) -> Self {
        Self {
            after,
            ..Self::default()
        }
    }

    /// Returns at most `limit` events.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Returns only events that pass `filter`.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }
}

/// A lazy stream of recorded events. It owns what it needs, so it can outlive the store handle.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<RecordedEvent, StoreError>> + Send>>;

/// A stored snapshot of an aggregate's state.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// The stream version the snapshot was taken at.
    pub version: u64,
    /// The aggregate's snapshot schema version.
    pub schema_version: u32,
    /// The serialized state (JSON).
    pub payload: Bytes,
    /// When the snapshot was taken.
    pub recorded_at: DateTime<Utc>,
    /// The id of the stream's event at `version`, if known: a snapshot is used only while the
    /// stream still holds that event there (see [`crate::Repository`]).
    pub event_id: Option<Uuid>,
}

impl SnapshotRecord {
    /// Checks the payload against the JSON rule of [`crate::json`], so that every store keeps
    /// the same snapshots. Backends call this before writing one.
    pub fn validate(&self) -> Result<(), StoreError> {
        crate::json::check(&self.payload, crate::json::MAX_DEPTH).map_err(|problem| {
            StoreError::InvalidRequest {
                stream: self.stream_id.clone(),
                reason: format!("the snapshot at version {} {problem}", self.version),
            }
        })
    }
}

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream's version did not match the expected version; nothing was written.
    #[error("conflict on stream `{stream}`: expected {expected}, but it is at version {actual}")]
    Conflict {
        /// The stream.
        stream: StreamId,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's actual version.
        actual: u64,
    },
    /// Some events of the batch are already stored, but the batch is not an exact retry.
    #[error("event {event_id} appended to `{stream}` is already stored: {reason}")]
    DuplicateEvent {
        /// The stream appended to.
        stream: StreamId,
        /// The first offending event id.
        event_id: Uuid,
        /// What does not match.
        reason: String,
    },
    /// An event payload exceeds the store's configured limit.
    #[error(
        "event {event_id} for `{stream}` has a {size}-byte payload, over the limit of {limit}"
    )]
    PayloadTooLarge {
        /// The stream appended to.
        stream: StreamId,
        /// The oversized event.
        event_id: Uuid,
        /// Its payload size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The request itself is malformed; nothing was written.
    #[error("invalid append to `{stream}`: {reason}")]
    InvalidRequest {
        /// The stream appended to.
        stream: StreamId,
        /// What is wrong.
        reason: String,
    },
    /// An inline projection (one that runs inside the append) failed; nothing was written.
    #[error("inline projection `{projection}` rejected the append to `{stream}`: {reason}")]
    InlineProjection {
        /// The stream appended to.
        stream: StreamId,
        /// The projection.
        projection: String,
        /// Its error.
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
    /// [`crate::position`].
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
    pub fn corrupt_at(stream: &StreamId, version: u64, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            location: format!("stream `{stream}` version {version}"),
            reason: reason.into(),
        }
    }
}

/// Shorthand for futures returned by store methods.
pub trait StoreFuture<T>: Future<Output = Result<T, StoreError>> + Send {}
impl<T, F: Future<Output = Result<T, StoreError>> + Send> StoreFuture<T> for F {}

/// An event store over serialized events. Implemented by every backend.
///
/// Handles are cheap to clone (an `Arc` inside) and shared between tasks.
pub trait EventStore: Clone + Send + Sync + 'static {
    /// Appends a batch atomically, honouring the expected version and event-id idempotency.
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult>;

    /// The stream's current version (0 if it has no events).
    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64>;

    /// Reads a stream lazily, in pages.
    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream;

    /// Reads the global feed lazily, in pages, in position order.
    fn read_all(&self, read: ReadAll) -> EventStream;

    /// The highest global position visible to readers now (0 if the store is empty). Every event at
    /// or below it that will ever be visible is visible now.
    fn head_position(&self) -> impl StoreFuture<u64>;

    /// Resolves when an event after `after` may have been appended, or after the backend's polling
    /// interval at the latest. Spurious wake-ups are allowed; missed ones are not (beyond the
    /// polling interval).
    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send;

    /// The recorded epoch starts of this store, oldest first (see [`crate::position`]). A store
    /// that cannot lose acknowledged events has none.
    fn epochs(&self) -> impl StoreFuture<Vec<EpochStart>> {
        std::future::ready(Ok(Vec::new()))
    }

    /// Follows the global feed from `after`: catches up, then delivers live appends as they commit.
    ///
    /// Transient failures (a dropped connection, a restarting server) are retried with backoff and
    /// the subscription resumes after the last delivered position. The stream ends only after
    /// yielding an error that retrying cannot fix.
    fn subscribe(&self, after: u64, filter: EventFilter) -> EventStream {
        crate::subscription::subscribe(self.clone(), after, filter)
    }
}

/// Stores aggregate snapshots apart from events.
pub trait SnapshotStore: Clone + Send + Sync + 'static {
    /// The latest snapshot of `stream`, if any.
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>>;

    /// Stores `snapshot` unless one at the same or a newer version is stored (upsert-if-newer).
    /// Returns whether it was written. A payload that breaks the JSON rule of [`crate::json`] is
    /// [`StoreError::InvalidRequest`] ([`SnapshotRecord::validate`]).
    fn save_snapshot(&self, snapshot: SnapshotRecord) -> impl StoreFuture<bool>;

    /// Deletes the snapshot of `stream` if it is the one at `version` (so a newer one saved in
    /// the meantime stays). Returns whether one was deleted. The repository calls it for a
    /// snapshot that does not match its stream, which upsert-if-newer could never replace.
    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool>;
}

/// An event store that also keeps snapshots: what a [`crate::Repository`] runs on.
pub trait Store: EventStore + SnapshotStore {}
impl<T: EventStore + SnapshotStore> Store for T {}

/// A store with everything streaming out needs: the outbox and projection checkpoints.
pub trait StreamingStore:
    Store + crate::outbox::OutboxStore + crate::projection::CheckpointStore
{
}
impl<T: Store + crate::outbox::OutboxStore + crate::projection::CheckpointStore> StreamingStore
    for T
{
}

impl<T: EventStore> EventStore for Arc<T> {
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        (**self).append(request)
    }
    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
        (**self).stream_version(stream)
    }
    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
        (**self).read_stream(stream, read)
    }
    fn read_all(&self, read: ReadAll) -> EventStream {
        (**self).read_all(read)
    }
    fn head_position(&self) -> impl StoreFuture<u64> {
        (**self).head_position()
    }
    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send {
        (**self).wait_for_append(after)
    }
    fn epochs(&self) -> impl StoreFuture<Vec<EpochStart>> {
        (**self).epochs()
    }
    fn subscribe(&self, after: u64, filter: EventFilter) -> EventStream {
        (**self).subscribe(after, filter)
    }
}

impl<T: SnapshotStore> SnapshotStore for Arc<T> {
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>> {
        (**self).load_snapshot(stream)
    }
    fn save_snapshot(&self, snapshot: SnapshotRecord) -> impl StoreFuture<bool> {
        (**self).save_snapshot(snapshot)
    }
    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool> {
        (**self).delete_snapshot(stream, version)
    }
}
