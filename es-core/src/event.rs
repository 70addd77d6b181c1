//! Events: the typed [`DomainEvent`] side and the serialized envelopes stores work with.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::stream_id::StreamId;

/// The stable name and current schema version of one event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventSchema {
    /// The stable event type name stored with every event (`event_type`).
    pub name: &'static str,
    /// The schema version new events of this type are written with.
    pub version: u32,
}

/// An enum of the events of one aggregate, each variant wrapping one payload type.
///
/// Usually derived with `#[derive(DomainEvent)]` (feature `derive`). The payload of a variant is
/// stored without the enum tag: [`event_type`](DomainEvent::event_type) names it, so the stored
/// form survives renaming the Rust enum and can be upcast.
pub trait DomainEvent: Sized + Send + Sync + 'static {
    /// Every event type of this enum with its current schema version.
    const EVENT_TYPES: &'static [EventSchema];

    /// The stable type name of this event.
    fn event_type(&self) -> &'static str;

    /// The schema version this event is written with.
    fn schema_version(&self) -> u32;

    /// Serializes the payload (without the enum tag) to JSON.
    fn to_payload(&self) -> Result<Vec<u8>, serde_json::Error>;

    /// Deserializes the payload of an event named `event_type` from JSON bytes.
    fn from_payload(event_type: &str, payload: &[u8]) -> Result<Self, PayloadError>;

    /// Deserializes the payload of an event named `event_type` from a JSON value (after upcasting).
    fn from_value(event_type: &str, payload: serde_json::Value) -> Result<Self, PayloadError>;

    /// The current schema of the event type called `name`, if this enum has one.
    fn schema_of(name: &str) -> Option<EventSchema> {
        Self::EVENT_TYPES.iter().copied().find(|s| s.name == name)
    }
}

/// Why a payload could not be turned into a typed event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The event enum has no variant with this type name.
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    /// The payload is not valid JSON for the variant's payload type.
    #[error("payload does not match its type: {0}")]
    Invalid(#[source] serde_json::Error),
}

/// Who and what caused an event: typed correlation, causation and actor, plus free-form JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Groups every event caused, directly or not, by one original request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The message (command or event) that directly caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Who acted: a user, a service, a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Application-defined fields.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub custom: serde_json::Map<String, serde_json::Value>,
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the actor.
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Adds a free-form field.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.custom.insert(key.into(), value.into());
        self
    }

    /// Metadata for a message caused by `event`: same correlation, causation = the event's id.
    pub fn caused_by(event: &RecordedEvent) -> Self {
        Self {
            correlation_id: event.metadata.correlation_id.or(Some(event.event_id)),
            causation_id: Some(event.event_id),
            actor: event.metadata.actor.clone(),
            custom: serde_json::Map::new(),
        }
    }

    /// Serializes to JSON bytes (as stored).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, uuids and a JSON map cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Parses stored metadata.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The event type of a stream's tombstone: the event [`NewEvent::closing`] builds, after which
/// the stream accepts no append (see [`AppendRequest::close`](crate::AppendRequest::close)).
///
/// It begins with [`RESERVED_PREFIX`]: no application event type can take it.
pub const CLOSED_EVENT_TYPE: &str = "$closed";

/// Event types beginning with this character are reserved for the framework's own events
/// ([`CLOSED_EVENT_TYPE`]); an append of any other such type is refused with
/// [`StoreError::ReservedEventType`](crate::StoreError::ReservedEventType).
pub const RESERVED_PREFIX: char = '$';

/// Whether `event_type` names a stream's tombstone ([`CLOSED_EVENT_TYPE`]).
pub fn is_tombstone_type(event_type: &str) -> bool {
    event_type == CLOSED_EVENT_TYPE
}

/// An event to append: serialized, with its id and metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique id; re-sending an event with the same id is idempotent (see the store contract, `es_core::contract`).
    pub event_id: Uuid,
    /// Stable event type name.
    pub event_type: String,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// JSON payload, without an enum tag.
    pub payload: Bytes,
    /// Correlation, causation, actor and custom fields.
    pub metadata: Metadata,
}

/// Why a [`NewEvent`] could not be built.
#[derive(Debug, thiserror::Error)]
#[error("event payload of type `{event_type}` is not valid JSON: {source}")]
pub struct InvalidPayload {
    /// The event type of the rejected payload.
    pub event_type: String,
    /// The JSON parse error.
    #[source]
    pub source: serde_json::Error,
}

impl NewEvent {
    /// Builds an event from a JSON payload, checking that it is valid JSON. The id is a fresh
    /// UUID v7.
    pub fn new(
        event_type: impl Into<String>,
        schema_version: u32,
        payload: impl Into<Bytes>,
    ) -> Result<Self, InvalidPayload> {
        let event_type = event_type.into();
        let payload = payload.into();
        if let Err(source) = serde_json::from_slice::<serde::de::IgnoredAny>(&payload) {
            return Err(InvalidPayload { event_type, source });
        }
        Ok(Self {
            event_id: Uuid::now_v7(),
            event_type,
            schema_version,
            payload,
            metadata: Metadata::default(),
        })
    }

    /// Builds an event from a JSON value. The id is a fresh UUID v7.
    pub fn from_value(
        event_type: impl Into<String>,
        schema_version: u32,
        payload: &serde_json::Value,
    ) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version,
            payload: Bytes::from(payload.to_string()),
            metadata: Metadata::default(),
        }
    }

    /// Serializes a typed domain event. The id is a fresh UUID v7.
    pub fn from_domain<E: DomainEvent>(event: &E) -> Result<Self, serde_json::Error> {
        Ok(Self {
            event_id: Uuid::now_v7(),
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            payload: Bytes::from(event.to_payload()?),
            metadata: Metadata::default(),
        })
    }

    /// A stream's tombstone: the event of type [`CLOSED_EVENT_TYPE`] (schema version 1, payload
    /// `{}`) that closes its stream. It takes a version and a feed position like any event and
    /// reaches subscribers and projections; once it is stored, every store refuses any later
    /// append to the stream with [`StoreError::StreamClosed`](crate::StoreError::StreamClosed).
    /// It must be the last event of its batch. The id is a fresh UUID v7; why the stream was
    /// closed goes in its metadata ([`NewEvent::with_metadata`]).
    pub fn closing() -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: CLOSED_EVENT_TYPE.to_owned(),
            schema_version: 1,
            payload: Bytes::from_static(b"{}"),
            metadata: Metadata::default(),
        }
    }

    /// Whether this event is a stream's tombstone ([`NewEvent::closing`]).
    pub fn is_tombstone(&self) -> bool {
        is_tombstone_type(&self.event_type)
    }

    /// Sets the event id.
    pub fn with_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An event as stored: the full envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Unique event id.
    pub event_id: Uuid,
    /// The stream the event belongs to.
    pub stream_id: StreamId,
    /// Version of the stream after this event; the first event of a stream has version 1.
    pub stream_version: u64,
    /// Position in its partition's feed (the whole feed with one partition): strictly
    /// increasing in commit order, not necessarily dense.
    pub global_position: u64,
    /// The feed partition the event's stream belongs to (0 on a store with one partition).
    pub partition: u32,
    /// Stable event type name.
    pub event_type: String,
    /// Schema version of the payload as stored.
    pub schema_version: u32,
    /// JSON payload as stored.
    pub payload: Bytes,
    /// Metadata as stored.
    pub metadata: Metadata,
    /// When the store recorded the event, by the store's clock, in microseconds.
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// The stream's category (aggregate type).
    pub fn category(&self) -> &str {
        self.stream_id.category()
    }

    /// Whether this event is its stream's tombstone (type [`CLOSED_EVENT_TYPE`]): the stream's
    /// last event, after which it accepts no append.
    pub fn is_tombstone(&self) -> bool {
        is_tombstone_type(&self.event_type)
    }

    /// The payload parsed as a JSON value.
    pub fn payload_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// The envelope as a load reads it, borrowing the type name and the payload.
    pub fn borrowed(&self) -> RecordedEventRef<'_> {
        RecordedEventRef {
            event_id: self.event_id,
            stream_version: self.stream_version,
            global_position: self.global_position,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            payload: &self.payload,
            recorded_at: self.recorded_at,
        }
    }
}

/// A stored event as loading an aggregate reads it: borrowed from a page the store fetched
/// (see [`EventStore::read_stream_pages`](crate::EventStore::read_stream_pages)), so that the
/// payload is decoded where it lies, without copying the envelope first.
///
/// It leaves out the stream id (the load knows which stream it reads) and the metadata (a load
/// does not read it; [`RecordedEvent`] has both).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordedEventRef<'a> {
    /// Unique event id.
    pub event_id: Uuid,
    /// Version of the stream after this event; the first event of a stream has version 1.
    pub stream_version: u64,
    /// Position in the global feed.
    pub global_position: u64,
    /// Stable event type name.
    pub event_type: &'a str,
    /// Schema version of the payload as stored.
    pub schema_version: u32,
    /// JSON payload as stored.
    pub payload: &'a [u8],
    /// When the store recorded the event.
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEventRef<'_> {
    /// Whether this event is its stream's tombstone (type [`CLOSED_EVENT_TYPE`]).
    pub fn is_tombstone(&self) -> bool {
        is_tombstone_type(self.event_type)
    }
}

/// The current time truncated to microseconds, the precision every store keeps.
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}
