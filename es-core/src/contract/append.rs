//! Appends: the expected version, the request and its validation, the result, and the rule
//! for retried batches.

use uuid::Uuid;

use super::error::StoreError;
use super::expected::ExpectedVersion;
use super::outbox::OutboxMessage;
use crate::event::{Metadata, NewEvent, RESERVED_PREFIX};
use crate::stream_id::StreamId;

/// One atomic append to one stream.
///
/// Built with [`AppendRequest::new`]; the struct is `#[non_exhaustive]` so that atomic side writes
/// (outbox records, inline projections) can be added to the same request later.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AppendRequest {
    /// The stream to append to.
    pub stream_id: StreamId,
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
    pub fn new(stream_id: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self {
            stream_id,
            expected,
            events,
            outbox: Vec::new(),
        }
    }

    /// The append that closes `stream_id`: its tombstone ([`NewEvent::closing`]) alone, checked
    /// against `expected`. Add why in the tombstone's metadata with [`AppendRequest::because`].
    /// Once it is stored, every later append to the stream fails with
    /// [`StoreError::StreamClosed`]; reads, historical loads and the feed keep the stream whole.
    ///
    /// To write last events with the close, append them in one request with the tombstone last
    /// (`AppendRequest::new(stream, expected, vec![.., NewEvent::closing()])`), or in a
    /// multi-stream append with other streams.
    pub fn close(stream_id: StreamId, expected: ExpectedVersion) -> Self {
        Self::new(stream_id, expected, vec![NewEvent::closing()])
    }

    /// Sets the metadata of this request's tombstone, if it has one (the reason for a close).
    pub fn because(mut self, metadata: Metadata) -> Self {
        if let Some(last) = self.events.last_mut().filter(|e| e.is_tombstone()) {
            last.metadata = metadata;
        }
        self
    }

    /// Whether this request closes its stream: its last event is a tombstone.
    pub fn closes(&self) -> bool {
        self.events.last().is_some_and(NewEvent::is_tombstone)
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
            stream_id: self.stream_id.clone(),
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
                    stream_id: self.stream_id.clone(),
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
            if event.is_tombstone() {
                if i + 1 != self.events.len() {
                    return Err(invalid(format!(
                        "the tombstone {} is event {} of {}: it closes the stream, so it must \
                         be the last event of its batch",
                        event.event_id,
                        i + 1,
                        self.events.len()
                    )));
                }
            } else if event.event_type.starts_with(RESERVED_PREFIX) {
                return Err(StoreError::ReservedEventType {
                    stream_id: self.stream_id.clone(),
                    event_id: event.event_id,
                    event_type: event.event_type.clone(),
                });
            }
            crate::json::check(&event.payload, depth).map_err(|problem| {
                invalid(format!("the payload of event {} {problem}", event.event_id))
            })?;
            if crate::personal::holds_readable_values(&event.payload) {
                return Err(invalid(format!(
                    "the payload of event {} {}",
                    event.event_id,
                    crate::personal::READABLE_REFUSED
                )));
            }
            crate::personal::check_sealed_forms(&event.payload).map_err(|problem| {
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
            stream_id: self.stream_id.clone(),
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
                    stream_id: self.stream_id.clone(),
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
            if crate::personal::holds_readable_values(&message.payload) {
                return Err(invalid(format!(
                    "the payload of outbox message {} {}",
                    message.message_id,
                    crate::personal::READABLE_REFUSED
                )));
            }
            crate::personal::check_sealed_forms(&message.payload).map_err(|problem| {
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
    metadata: &Metadata,
    limits: &AppendLimits,
    depth: usize,
) -> Result<usize, String> {
    if *metadata == Metadata::default() {
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
    if crate::personal::holds_readable_values(&json) {
        return Err(
            "holds a `Personal` value: metadata is never encrypted, so personal data \
                    belongs in the payload (written through `es_core::personal::Encrypted`)"
                .to_owned(),
        );
    }
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
    pub stream_id: StreamId,
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
        stream_id: request.stream_id.clone(),
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
        if f.stream_id != request.stream_id {
            return Err(overlap(
                f.event_id,
                format!("the event is already stored in stream `{}`", f.stream_id),
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

/// Checks a multi-stream append ([`EventStore::append_streams`](super::EventStore::append_streams))
/// before anything is written: every part passes [`AppendRequest::validate`] and holds at least
/// one event; no stream appears twice; no event id or outbox message id appears in two parts; the
/// parts together stay within `limits.max_batch_len` events and `limits.max_append_bytes` bytes.
///
/// Every backend calls this before writing anything. An empty call and a call over the limits
/// as a whole are [`StoreError::InvalidMultiAppend`]; a fault of one part is
/// [`StoreError::InvalidRequest`] (or [`StoreError::PayloadTooLarge`]) naming its stream.
pub fn validate_streams(
    requests: &[AppendRequest],
    limits: &AppendLimits,
) -> Result<(), StoreError> {
    let whole = |reason: String| StoreError::InvalidMultiAppend { reason };
    if requests.is_empty() {
        return Err(whole("the call names no stream".to_owned()));
    }
    let mut streams = std::collections::HashSet::with_capacity(requests.len());
    let mut ids = std::collections::HashSet::new();
    let mut events = 0usize;
    let mut bytes = 0usize;
    for request in requests {
        let invalid = |reason: String| StoreError::InvalidRequest {
            stream_id: request.stream_id.clone(),
            reason,
        };
        if !streams.insert(&request.stream_id) {
            return Err(invalid(
                "the stream appears twice in one multi-stream append: put all of its events \
                 in one part"
                    .to_owned(),
            ));
        }
        request.validate(limits)?;
        if request.events.is_empty() {
            return Err(invalid(
                "every part of a multi-stream append needs at least one event".to_owned(),
            ));
        }
        for id in request
            .events
            .iter()
            .map(|e| e.event_id)
            .chain(request.outbox.iter().map(|m| m.message_id))
        {
            if !ids.insert(id) {
                return Err(invalid(format!(
                    "id {id} appears in two parts of one multi-stream append"
                )));
            }
        }
        events += request.events.len();
        bytes += request
            .events
            .iter()
            .map(|e| e.payload.len() + e.metadata.to_json().len())
            .chain(
                request
                    .outbox
                    .iter()
                    .map(|m| m.payload.len() + m.metadata.to_json().len()),
            )
            .sum::<usize>();
    }
    if events > limits.max_batch_len {
        return Err(whole(format!(
            "{events} events in all, over the limit of {} per append",
            limits.max_batch_len
        )));
    }
    if bytes > limits.max_append_bytes {
        return Err(whole(format!(
            "the parts hold {bytes} bytes of payloads and metadata, over the limit of {}",
            limits.max_append_bytes
        )));
    }
    Ok(())
}

/// Decides what a multi-stream append whose event ids may already be stored must do: the rule
/// of [`classify_retry`] for each part, and one more for the call as a whole.
///
/// `found[i][j]` is the stored copy of `requests[i].events[j]`, if any. Returns `Ok(None)` when
/// no event of any part is stored (append normally), `Ok(Some(results))` when every part is an
/// exact retry (the call was applied before: its results, each marked `duplicate`), and
/// [`StoreError::DuplicateEvent`] when a part overlaps partly, or when some parts are stored and
/// others are not (the call is not the one that was applied: nothing is written, and the error
/// names the first stored part's stream).
pub fn classify_streams_retry(
    requests: &[AppendRequest],
    found: &[Vec<Option<StoredEventRef>>],
) -> Result<Option<Vec<AppendResult>>, StoreError> {
    debug_assert_eq!(found.len(), requests.len());
    let mut results = Vec::with_capacity(requests.len());
    for (request, found) in requests.iter().zip(found) {
        results.push(classify_retry(request, found)?);
    }
    let stored = results.iter().filter(|r| r.is_some()).count();
    if stored == 0 {
        return Ok(None);
    }
    if stored < results.len() {
        let (i, _) = results
            .iter()
            .enumerate()
            .find(|(_, r)| r.is_some())
            .unwrap_or((0, &None));
        let (missing, _) = results
            .iter()
            .enumerate()
            .find(|(_, r)| r.is_none())
            .unwrap_or((0, &None));
        return Err(StoreError::DuplicateEvent {
            stream_id: requests[i].stream_id.clone(),
            event_id: requests[i]
                .events
                .first()
                .map_or(Uuid::nil(), |e| e.event_id),
            reason: format!(
                "this part of a multi-stream append is already stored but the part for `{}` \
                 is not: a retry must resend the call that was applied; nothing was written",
                requests[missing].stream_id
            ),
        });
    }
    Ok(Some(results.into_iter().flatten().collect()))
}
