//! Turning stream entries (`XRANGE` replies) into [`RecordedEvent`]s, with typed
//! [`StoreError::Corrupt`] errors for anything the store did not write.

use bytes::Bytes;
use chrono::DateTime;
use es_core::contract::position::EpochStart;
use es_core::{Metadata, RecordedEvent, StoreError, StreamId};
use redis::Value;
use uuid::Uuid;

/// Which Redis stream an entry comes from, which decides how its id and fields are read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source<'a> {
    /// A per-stream entry: the id is the version, the stream is known.
    Stream(&'a StreamId),
    /// A feed entry: the id is the global position, the stream is a field.
    Feed,
    /// An outbox entry: the id is the outbox position.
    Outbox,
    /// An entry of the epoch history: the id is the epoch.
    Epochs,
}

impl Source<'_> {
    fn location(self, id: Option<u64>) -> String {
        match (self, id) {
            (Source::Stream(s), Some(v)) => format!("stream `{s}` version {v}"),
            (Source::Stream(s), None) => format!("stream `{s}`"),
            (Source::Feed, Some(p)) => format!("global position {p}"),
            (Source::Feed, None) => "the global feed".to_owned(),
            (Source::Outbox, Some(p)) => format!("outbox position {p}"),
            (Source::Outbox, None) => "the outbox".to_owned(),
            (Source::Epochs, Some(e)) => format!("epoch {e} in the epoch history"),
            (Source::Epochs, None) => "the epoch history".to_owned(),
        }
    }
}

fn corrupt(source: Source<'_>, id: Option<u64>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        location: source.location(id),
        reason: reason.into(),
    }
}

/// The entries of an `XRANGE`/`XREVRANGE` reply, as `(id, fields)` pairs.
pub(crate) fn entries(
    reply: Value,
    source: Source<'_>,
) -> Result<Vec<(Value, Vec<Value>)>, StoreError> {
    let Value::Array(items) = reply else {
        return Err(corrupt(source, None, "a range read returned no array"));
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::Array(pair) if pair.len() == 2 => {
                let mut pair = pair.into_iter();
                let id = pair.next().unwrap_or(Value::Nil);
                match pair.next() {
                    Some(Value::Array(fields)) => Ok((id, fields)),
                    _ => Err(corrupt(source, None, "an entry has no field list")),
                }
            }
            _ => Err(corrupt(
                source,
                None,
                "an entry is not an (id, fields) pair",
            )),
        })
        .collect()
}

/// The `<ms>` part of a `<ms>-<seq>` entry id.
pub(crate) fn entry_number(id: &Value) -> Option<u64> {
    let Value::BulkString(bytes) = id else {
        return None;
    };
    let text = std::str::from_utf8(bytes).ok()?;
    let (ms, _seq) = text.split_once('-')?;
    ms.parse().ok()
}

/// Decodes one entry.
pub(crate) fn event(
    id: &Value,
    fields: Vec<Value>,
    source: Source<'_>,
) -> Result<RecordedEvent, StoreError> {
    let number = entry_number(id).ok_or_else(|| corrupt(source, None, "unreadable entry id"))?;
    let fail = |reason: String| corrupt(source, Some(number), reason);
    if fields.len() % 2 != 0 {
        return Err(fail("odd number of field values".to_owned()));
    }
    let mut event_id = None;
    let mut event_type = None;
    let mut schema = None;
    let mut payload = None;
    let mut metadata = None;
    let mut other_number = None;
    let mut recorded_at = None;
    let mut stream = None;
    let mut it = fields.into_iter();
    while let (Some(name), Some(value)) = (it.next(), it.next()) {
        let (Value::BulkString(name), Value::BulkString(value)) = (name, value) else {
            return Err(fail("a field is not a string".to_owned()));
        };
        match name.as_slice() {
            b"event_id" => event_id = Some(value),
            b"type" => event_type = Some(value),
            b"schema" => schema = Some(value),
            b"payload" => payload = Some(value),
            b"metadata" => metadata = Some(value),
            b"position" | b"version" => other_number = Some(value),
            b"recorded_at" => recorded_at = Some(value),
            b"stream" => stream = Some(value),
            _ => {
                return Err(fail(format!(
                    "unexpected field `{}`",
                    String::from_utf8_lossy(&name)
                )))
            }
        }
    }
    let missing = |field: &str| fail(format!("missing field `{field}`"));
    let text = |field: &str, value: Vec<u8>| {
        String::from_utf8(value).map_err(|_| fail(format!("field `{field}` is not UTF-8")))
    };
    let num = |field: &str, value: Vec<u8>| -> Result<u64, StoreError> {
        std::str::from_utf8(&value)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| fail(format!("field `{field}` is not a number")))
    };
    let event_id = text("event_id", event_id.ok_or_else(|| missing("event_id"))?)?;
    let event_id = Uuid::parse_str(&event_id).map_err(|e| fail(format!("bad event id: {e}")))?;
    let event_type = text("type", event_type.ok_or_else(|| missing("type"))?)?;
    let schema = num("schema", schema.ok_or_else(|| missing("schema"))?)?;
    let schema_version =
        u32::try_from(schema).map_err(|_| fail("schema version out of range".to_owned()))?;
    let payload = Bytes::from(payload.ok_or_else(|| missing("payload"))?);
    let metadata = Metadata::from_json(&metadata.ok_or_else(|| missing("metadata"))?)
        .map_err(|e| fail(format!("bad metadata: {e}")))?;
    let micros = num(
        "recorded_at",
        recorded_at.ok_or_else(|| missing("recorded_at"))?,
    )?;
    let recorded_at = i64::try_from(micros)
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| fail("recorded_at out of range".to_owned()))?;
    let (stream_id, stream_version, global_position) = match source {
        Source::Stream(s) => {
            let position = num("position", other_number.ok_or_else(|| missing("position"))?)?;
            (s.clone(), number, position)
        }
        Source::Feed | Source::Outbox | Source::Epochs => {
            let version = num("version", other_number.ok_or_else(|| missing("version"))?)?;
            let stream = text("stream", stream.ok_or_else(|| missing("stream"))?)?;
            let stream =
                StreamId::parse(&stream).map_err(|e| fail(format!("bad stream id: {e}")))?;
            (stream, version, number)
        }
    };
    Ok(RecordedEvent {
        event_id,
        stream_id,
        stream_version,
        global_position,
        partition: 0,
        event_type,
        schema_version,
        payload,
        metadata,
        recorded_at,
    })
}

/// Decodes a whole `XRANGE` reply.
pub(crate) fn page(reply: Value, source: Source<'_>) -> Result<Vec<RecordedEvent>, StoreError> {
    entries(reply, source)?
        .into_iter()
        .map(|(id, fields)| event(&id, fields, source))
        .collect()
}

/// Decodes the epoch history (an `XRANGE` of the epochs stream): one [`EpochStart`] per entry,
/// oldest first.
pub(crate) fn epochs(reply: Value) -> Result<Vec<EpochStart>, StoreError> {
    entries(reply, Source::Epochs)?
        .into_iter()
        .map(|(id, fields)| {
            let epoch = entry_number(&id)
                .ok_or_else(|| corrupt(Source::Epochs, None, "unreadable entry id"))?;
            let previous_head = Fields::new(fields)
                .map_err(str::to_owned)
                .and_then(|mut f| f.number("previous_head"))
                .map_err(|reason| corrupt(Source::Epochs, Some(epoch), reason))?;
            Ok(EpochStart {
                epoch,
                previous_head,
            })
        })
        .collect()
}

/// Reads an optional integer reply (`GET`, `HGET`): nil is 0.
pub(crate) fn counter(value: Value, location: &str) -> Result<u64, StoreError> {
    let bad = || StoreError::Corrupt {
        location: location.to_owned(),
        reason: "not a non-negative integer".to_owned(),
    };
    match value {
        Value::Nil => Ok(0),
        Value::Int(n) => u64::try_from(n).map_err(|_| bad()),
        Value::BulkString(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// The fields of one entry by name, for entries decoded field by field.
pub(crate) struct Fields(Vec<(Vec<u8>, Vec<u8>)>);

impl Fields {
    /// Pairs up a field list; fails on an odd count or a value that is not a string.
    pub(crate) fn new(fields: Vec<Value>) -> Result<Self, &'static str> {
        if fields.len() % 2 != 0 {
            return Err("odd number of field values");
        }
        let mut pairs = Vec::with_capacity(fields.len() / 2);
        let mut it = fields.into_iter();
        while let (Some(name), Some(value)) = (it.next(), it.next()) {
            let (Value::BulkString(name), Value::BulkString(value)) = (name, value) else {
                return Err("a field is not a string");
            };
            pairs.push((name, value));
        }
        Ok(Self(pairs))
    }

    /// Takes the field `name`'s value.
    pub(crate) fn bytes(&mut self, name: &str) -> Result<Vec<u8>, String> {
        let i = self
            .0
            .iter()
            .position(|(n, _)| n == name.as_bytes())
            .ok_or_else(|| format!("missing field `{name}`"))?;
        Ok(self.0.swap_remove(i).1)
    }

    /// Takes the field `name`'s value as UTF-8 text.
    pub(crate) fn text(&mut self, name: &str) -> Result<String, String> {
        String::from_utf8(self.bytes(name)?).map_err(|_| format!("field `{name}` is not UTF-8"))
    }

    /// Takes the field `name`'s value as a decimal number.
    pub(crate) fn number(&mut self, name: &str) -> Result<u64, String> {
        self.text(name)?
            .parse()
            .map_err(|_| format!("field `{name}` is not a number"))
    }
}
