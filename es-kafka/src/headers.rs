//! Names of the Kafka headers every published message carries.
//!
//! Values are UTF-8 text: UUIDs in their hyphenated form, numbers in decimal, the time in
//! RFC 3339. Headers marked *optional* are left out when the outbox record has no value.

use es_core::OutboxRecord;
use rdkafka::message::{Header, OwnedHeaders};

/// The message's unique id: the dedupe key. A consumer that sees it twice has a duplicate.
pub const MESSAGE_ID: &str = "message_id";
/// The id of the domain event the message was translated from.
pub const SOURCE_EVENT_ID: &str = "source_event_id";
/// The integration event's type name (the public contract, not the domain event's name).
pub const MESSAGE_TYPE: &str = "message_type";
/// The payload's schema version.
pub const SCHEMA_VERSION: &str = "schema_version";
/// The stream whose append recorded the message.
pub const STREAM_ID: &str = "stream_id";
/// The record's position in the outbox: increasing per stream, in commit order.
pub const OUTBOX_POSITION: &str = "outbox_position";
/// When the store recorded the message (RFC 3339); also the Kafka timestamp, in milliseconds.
pub const RECORDED_AT: &str = "recorded_at";
/// Optional: groups every message caused by one original request.
pub const CORRELATION_ID: &str = "correlation_id";
/// Optional: what directly caused the message (the source event, when the repository wrote it).
pub const CAUSATION_ID: &str = "causation_id";
/// Optional: who acted.
pub const ACTOR: &str = "actor";
/// Optional: the application-defined metadata fields, as a JSON object.
pub const METADATA: &str = "metadata";
/// Always `application/json`.
pub const CONTENT_TYPE: &str = "content_type";

/// The headers [`KafkaPublisher`](crate::KafkaPublisher) sends with `record`, in the order
/// listed in this module.
pub fn encode(record: &OutboxRecord) -> OwnedHeaders {
    let pairs = pairs(record);
    pairs.iter().fold(
        OwnedHeaders::new_with_capacity(pairs.len()),
        |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_str()),
            })
        },
    )
}

/// The header names and values of `record`, as [`encode`] sends them.
pub(crate) fn pairs(record: &OutboxRecord) -> Vec<(&'static str, String)> {
    let m = &record.message;
    let mut pairs = vec![
        (MESSAGE_ID, m.message_id.to_string()),
        (SOURCE_EVENT_ID, m.source_event_id.to_string()),
        (MESSAGE_TYPE, m.message_type.clone()),
        (SCHEMA_VERSION, m.schema_version.to_string()),
        (STREAM_ID, record.stream_id.to_string()),
        (OUTBOX_POSITION, record.position.to_string()),
        (RECORDED_AT, record.recorded_at.to_rfc3339()),
    ];
    if let Some(id) = m.metadata.correlation_id {
        pairs.push((CORRELATION_ID, id.to_string()));
    }
    if let Some(id) = m.metadata.causation_id {
        pairs.push((CAUSATION_ID, id.to_string()));
    }
    if let Some(actor) = &m.metadata.actor {
        pairs.push((ACTOR, actor.clone()));
    }
    if !m.metadata.custom.is_empty() {
        pairs.push((
            METADATA,
            serde_json::Value::Object(m.metadata.custom.clone()).to_string(),
        ));
    }
    pairs.push((CONTENT_TYPE, "application/json".to_owned()));
    pairs
}
