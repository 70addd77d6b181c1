//! Conversions between rows and es-core types.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use es_core::{Metadata, RecordedEvent, StoreError, StreamId};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{
    PgArgumentBuffer, PgHasArrayType, PgRow, PgTypeInfo, PgValueFormat, PgValueRef,
};
use sqlx::{Column, Postgres, Row, ValueRef};
use uuid::Uuid;

use crate::error::store_error;

const JSONB_OID: Oid = Oid(3802);
const JSONB_ARRAY_OID: Oid = Oid(3807);
const JSON_OID: Oid = Oid(114);
const JSON_ARRAY_OID: Oid = Oid(199);

/// JSON text sent as a `jsonb` parameter without parsing it on the client: PostgreSQL parses it
/// (once, when the parameter is received) and rejects invalid JSON with SQLSTATE 22P02.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawJsonb<'a>(pub(crate) &'a [u8]);

impl sqlx::Type<Postgres> for RawJsonb<'_> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSONB_OID)
    }
}

impl PgHasArrayType for RawJsonb<'_> {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSONB_ARRAY_OID)
    }
}

impl sqlx::Encode<'_, Postgres> for RawJsonb<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        // The binary jsonb format: a version byte (1), then the JSON text.
        buf.push(1);
        buf.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn size_hint(&self) -> usize {
        self.0.len() + 1
    }
}

/// JSON text sent as a `json` parameter as is: PostgreSQL checks it and stores the text byte for
/// byte (invalid JSON is SQLSTATE 22P02).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawJson<'a>(pub(crate) &'a [u8]);

impl sqlx::Type<Postgres> for RawJson<'_> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON_OID)
    }
}

impl PgHasArrayType for RawJson<'_> {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON_ARRAY_OID)
    }
}

impl sqlx::Encode<'_, Postgres> for RawJson<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        // The binary `json` format is the text itself.
        buf.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn size_hint(&self) -> usize {
        self.0.len()
    }
}

/// The text of a `json` column, borrowed from the row.
pub(crate) fn json_text<'r>(value: &PgValueRef<'r>) -> Result<&'r [u8], String> {
    if value.is_null() {
        return Err("the JSON column is NULL".to_owned());
    }
    value.as_bytes().map_err(|e| e.to_string())
}

/// The JSON text of a `jsonb` column, borrowed from the row.
pub(crate) fn jsonb_text<'r>(value: &PgValueRef<'r>) -> Result<&'r [u8], String> {
    if value.is_null() {
        return Err("the JSON column is NULL".to_owned());
    }
    let bytes = value.as_bytes().map_err(|e| e.to_string())?;
    match value.format() {
        PgValueFormat::Binary => match bytes.split_first() {
            Some((1, text)) => Ok(text),
            _ => Err("unsupported jsonb binary format".to_owned()),
        },
        PgValueFormat::Text => Ok(bytes),
    }
}

fn corrupt_at_position(position: i64, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        location: format!("global position {position}"),
        reason: reason.into(),
    }
}

/// Where the columns of [`crate::schema::EVENT_COLUMNS`] are in the rows of one query, found by
/// name once per page rather than once per value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventColumns {
    position: usize,
    stream: usize,
    version: usize,
    event_id: usize,
    event_type: usize,
    schema_version: usize,
    payload: usize,
    metadata: usize,
    recorded_at: usize,
}

impl EventColumns {
    /// The ordinals of the event columns in `row` (any row of the query).
    pub(crate) fn find(row: &PgRow) -> Result<Self, StoreError> {
        let at = |name: &str| {
            row.try_column(name)
                .map(Column::ordinal)
                .map_err(store_error)
        };
        Ok(Self {
            position: at("global_position")?,
            stream: at("stream_id")?,
            version: at("stream_version")?,
            event_id: at("event_id")?,
            event_type: at("event_type")?,
            schema_version: at("schema_version")?,
            payload: at("payload")?,
            metadata: at("metadata")?,
            recorded_at: at("recorded_at")?,
        })
    }
}

/// Decodes a row of [`crate::schema::EVENT_COLUMNS`], whose columns are where `columns` says.
///
/// Values that the schema's types allow but the envelope does not (an invalid stream id, a
/// negative version, undecodable metadata) are [`StoreError::Corrupt`].
pub(crate) fn decode_event(
    row: &PgRow,
    columns: &EventColumns,
) -> Result<RecordedEvent, StoreError> {
    let position: i64 = row.try_get(columns.position).map_err(store_error)?;
    let stream: &str = row.try_get(columns.stream).map_err(store_error)?;
    let stream_id = StreamId::parse(stream)
        .map_err(|e| corrupt_at_position(position, format!("invalid stream id: {e}")))?;
    let version: i64 = row.try_get(columns.version).map_err(store_error)?;
    let event_id: Uuid = row.try_get(columns.event_id).map_err(store_error)?;
    let event_type: String = row.try_get(columns.event_type).map_err(store_error)?;
    let schema_version: i64 = row.try_get(columns.schema_version).map_err(store_error)?;
    let payload = row.try_get_raw(columns.payload).map_err(store_error)?;
    let payload = jsonb_text(&payload).map_err(|e| corrupt_at_position(position, e))?;
    let metadata = row.try_get_raw(columns.metadata).map_err(store_error)?;
    let metadata = jsonb_text(&metadata).map_err(|e| corrupt_at_position(position, e))?;
    let recorded_at: DateTime<Utc> = row.try_get(columns.recorded_at).map_err(store_error)?;

    let global_position = u64::try_from(position)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| corrupt_at_position(position, "the global position is not positive"))?;
    let stream_version = u64::try_from(version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            StoreError::corrupt_at(
                &stream_id,
                0,
                format!("stream version {version} is not positive"),
            )
        })?;
    let schema_version = u32::try_from(schema_version).map_err(|_| {
        StoreError::corrupt_at(
            &stream_id,
            stream_version,
            format!("schema version {schema_version} is out of range"),
        )
    })?;
    let metadata = Metadata::from_json(metadata).map_err(|e| {
        StoreError::corrupt_at(&stream_id, stream_version, format!("invalid metadata: {e}"))
    })?;
    Ok(RecordedEvent {
        event_id,
        stream_id,
        stream_version,
        global_position,
        event_type,
        schema_version,
        payload: Bytes::copy_from_slice(payload),
        metadata,
        recorded_at,
    })
}

/// `u64` to a `bigint` parameter, saturating: versions and positions never reach `i64::MAX`, so a
/// saturated bound behaves like the unbounded one.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored non-negative `bigint` (a version or position) as `u64`.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        location: what.to_owned(),
        reason: format!("negative value {value}"),
    })
}
