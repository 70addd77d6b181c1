//! Names of the Kafka headers every published message carries.
//!
//! Values are UTF-8 text: UUIDs in their hyphenated form, numbers in decimal, the time in
//! RFC 3339. Headers marked *optional* are left out when the outbox record has no value.

use std::fmt::Write as _;

use es_core::OutboxRecord;
use rdkafka::message::{Header, OwnedHeaders};
use uuid::Uuid;

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
    let mut headers = Some(OwnedHeaders::new_with_capacity(12));
    let mut text = String::with_capacity(64);
    for_each(record, &mut text, |key, value| {
        headers = headers.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
    });
    headers.unwrap_or_default()
}

/// Calls `f` with each header name and value of `record`, as [`encode`] sends them, in order.
/// Values are formatted in `text`, reused from one header to the next, and UUIDs on the stack:
/// building the headers allocates nothing per header (the optional `metadata` header aside).
pub(crate) fn for_each(
    record: &OutboxRecord,
    text: &mut String,
    mut f: impl FnMut(&'static str, &str),
) {
    let m = &record.message;
    let mut uuid = Uuid::encode_buffer();
    let mut formatted = |key: &'static str,
                         value: &dyn std::fmt::Display,
                         f: &mut dyn FnMut(&'static str, &str)| {
        text.clear();
        // Writing to a `String` cannot fail.
        let _ = write!(text, "{value}");
        f(key, text);
    };
    f(
        MESSAGE_ID,
        m.message_id.hyphenated().encode_lower(&mut uuid),
    );
    f(
        SOURCE_EVENT_ID,
        m.source_event_id.hyphenated().encode_lower(&mut uuid),
    );
    f(MESSAGE_TYPE, &m.message_type);
    formatted(SCHEMA_VERSION, &m.schema_version, &mut f);
    formatted(STREAM_ID, &record.stream_id, &mut f);
    formatted(OUTBOX_POSITION, &record.position, &mut f);
    // RFC 3339 as `DateTime::to_rfc3339` writes it (`%+`: sub-second digits as needed).
    formatted(RECORDED_AT, &record.recorded_at.format("%+"), &mut f);
    if let Some(id) = m.metadata.correlation_id {
        f(CORRELATION_ID, id.hyphenated().encode_lower(&mut uuid));
    }
    if let Some(id) = m.metadata.causation_id {
        f(CAUSATION_ID, id.hyphenated().encode_lower(&mut uuid));
    }
    if let Some(actor) = &m.metadata.actor {
        f(ACTOR, actor);
    }
    if !m.metadata.custom.is_empty() {
        formatted(
            METADATA,
            &serde_json::Value::Object(m.metadata.custom.clone()),
            &mut f,
        );
    }
    f(CONTENT_TYPE, "application/json");
}

/// The bytes of the header names and values [`for_each`] passes, each counted by `size` from
/// its name and value lengths: what [`encode`] sends, measured without formatting the fixed-width
/// values (UUIDs, the time, numbers).
pub(crate) fn sized(record: &OutboxRecord, size: impl Fn(usize, usize) -> usize) -> usize {
    const UUID: usize = 36;
    let m = &record.message;
    let mut total = size(MESSAGE_ID.len(), UUID)
        + size(SOURCE_EVENT_ID.len(), UUID)
        + size(MESSAGE_TYPE.len(), m.message_type.len())
        + size(
            SCHEMA_VERSION.len(),
            decimal_len(u64::from(m.schema_version)),
        )
        + size(STREAM_ID.len(), record.stream_id.as_str().len())
        + size(OUTBOX_POSITION.len(), decimal_len(record.position))
        + size(RECORDED_AT.len(), rfc3339_len(&record.recorded_at));
    if m.metadata.correlation_id.is_some() {
        total += size(CORRELATION_ID.len(), UUID);
    }
    if m.metadata.causation_id.is_some() {
        total += size(CAUSATION_ID.len(), UUID);
    }
    if let Some(actor) = &m.metadata.actor {
        total += size(ACTOR.len(), actor.len());
    }
    if !m.metadata.custom.is_empty() {
        let json = serde_json::Value::Object(m.metadata.custom.clone()).to_string();
        total += size(METADATA.len(), json.len());
    }
    total + size(CONTENT_TYPE.len(), "application/json".len())
}

/// Digits of `n` in decimal.
fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |digits| digits as usize + 1)
}

/// Length of `at` as `to_rfc3339` writes it: `YYYY-MM-DDTHH:MM:SS`, the sub-second digits in
/// groups of 3 as needed, `+00:00`. Years outside 0..=9999 are formatted and measured.
fn rfc3339_len(at: &chrono::DateTime<chrono::Utc>) -> usize {
    use chrono::{Datelike as _, Timelike as _};
    if !(0..=9999).contains(&at.year()) {
        return at.to_rfc3339().len();
    }
    let nanos = at.nanosecond() % 1_000_000_000;
    let fraction = if nanos == 0 {
        0
    } else if nanos % 1_000_000 == 0 {
        4
    } else if nanos % 1_000 == 0 {
        7
    } else {
        10
    };
    // A leap second (nanosecond() >= 1e9) prints as second 60 with the same fraction.
    19 + fraction + 6
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Timelike, Utc};
    use es_core::{Metadata, OutboxMessage, StreamId};

    fn record(nanos: u32, custom: bool) -> OutboxRecord {
        let mut metadata = Metadata::new()
            .with_correlation_id(Uuid::now_v7())
            .with_causation_id(Uuid::now_v7())
            .with_actor("alice");
        if custom {
            metadata
                .custom
                .insert("tenant".into(), serde_json::json!("t-1"));
        }
        OutboxRecord {
            position: 1234,
            stream_id: StreamId::new("account", "42").unwrap(),
            recorded_at: Utc
                .with_ymd_and_hms(2024, 2, 29, 23, 59, 59)
                .unwrap()
                .with_nanosecond(nanos)
                .unwrap(),
            message: OutboxMessage {
                message_id: Uuid::now_v7(),
                source_event_id: Uuid::now_v7(),
                topic: "t".into(),
                key: "account-42".into(),
                message_type: "account.opened".into(),
                schema_version: 3,
                payload: bytes::Bytes::from_static(b"{}"),
                metadata,
            },
        }
    }

    /// The values as they were built before headers were formatted in place: `to_string` of
    /// each, `to_rfc3339` for the time.
    fn expected(r: &OutboxRecord) -> Vec<(&'static str, String)> {
        let m = &r.message;
        let mut pairs = vec![
            (MESSAGE_ID, m.message_id.to_string()),
            (SOURCE_EVENT_ID, m.source_event_id.to_string()),
            (MESSAGE_TYPE, m.message_type.clone()),
            (SCHEMA_VERSION, m.schema_version.to_string()),
            (STREAM_ID, r.stream_id.to_string()),
            (OUTBOX_POSITION, r.position.to_string()),
            (RECORDED_AT, r.recorded_at.to_rfc3339()),
            (
                CORRELATION_ID,
                m.metadata.correlation_id.unwrap().to_string(),
            ),
            (CAUSATION_ID, m.metadata.causation_id.unwrap().to_string()),
            (ACTOR, "alice".into()),
        ];
        if !m.metadata.custom.is_empty() {
            pairs.push((
                METADATA,
                serde_json::Value::Object(m.metadata.custom.clone()).to_string(),
            ));
        }
        pairs.push((CONTENT_TYPE, "application/json".into()));
        pairs
    }

    #[test]
    fn header_sizes_are_measured_without_formatting() {
        for nanos in [0, 120_000_000, 123_456_000, 123_456_789, 1_500_000_000] {
            for custom in [false, true] {
                let r = record(nanos, custom);
                let mut formatted = 0;
                for_each(&r, &mut String::new(), |k, v| {
                    formatted += k.len() * 1000 + v.len();
                });
                assert_eq!(sized(&r, |k, v| k * 1000 + v), formatted, "nanos {nanos}");
            }
        }
        for n in [0, 9, 10, 99, 100, 12_345, u64::MAX] {
            assert_eq!(decimal_len(n), n.to_string().len(), "{n}");
        }
    }

    #[test]
    fn headers_are_formatted_like_their_display() {
        use rdkafka::message::Headers as _;
        for nanos in [0, 120_000_000, 123_456_000, 123_456_789] {
            for custom in [false, true] {
                let r = record(nanos, custom);
                let mut seen = Vec::new();
                for_each(&r, &mut String::new(), |k, v| seen.push((k, v.to_owned())));
                assert_eq!(seen, expected(&r), "nanos {nanos}, custom {custom}");
                let encoded = encode(&r);
                let names: Vec<(&str, Vec<u8>)> = encoded
                    .iter()
                    .map(|h| (h.key, h.value.unwrap_or_default().to_vec()))
                    .collect();
                let want: Vec<(&str, Vec<u8>)> = expected(&r)
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                assert_eq!(names, want);
            }
        }
    }
}
