//! Conversions between rows and es-core types.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use es_core::{EventPage, Metadata, RecordedEvent, RecordedEventRef, StoreError, StreamId};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{
    PgArgumentBuffer, PgHasArrayType, PgRow, PgTypeInfo, PgValueFormat, PgValueRef,
};
use sqlx::{Column, Postgres, Row, TypeInfo, ValueRef};
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

/// Where the columns of [`crate::schema::LOAD_COLUMNS`] are in the rows of one query, found by
/// name once per page rather than once per value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadColumns {
    position: usize,
    version: usize,
    event_id: usize,
    event_type: usize,
    schema_version: usize,
    payload: usize,
    recorded_at: usize,
}

/// Where the columns of [`crate::schema::EVENT_COLUMNS`] are: those of a load, the stream id and
/// the metadata.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventColumns {
    load: LoadColumns,
    stream: usize,
    metadata: usize,
}

fn ordinal(row: &PgRow, name: &str) -> Result<usize, StoreError> {
    row.try_column(name)
        .map(Column::ordinal)
        .map_err(store_error)
}

/// The ordinal of column `name`, after checking that its values decode as `T`: the rows of one
/// query share their column types, so their values are then decoded without checking each one's
/// type again (`try_get_unchecked`, which still fails on a NULL or malformed value).
fn typed<T: sqlx::Type<Postgres>>(row: &PgRow, name: &str) -> Result<usize, StoreError> {
    let column = row.try_column(name).map_err(store_error)?;
    let ty = column.type_info();
    if !T::compatible(ty) {
        return Err(StoreError::backend(format!(
            "column `{name}` is of type {}, where {} was expected",
            ty.name(),
            T::type_info().name()
        )));
    }
    Ok(column.ordinal())
}

impl LoadColumns {
    /// The ordinals of the load columns in `row` (any row of the query), their types checked.
    pub(crate) fn find(row: &PgRow) -> Result<Self, StoreError> {
        Ok(Self {
            position: typed::<i64>(row, "global_position")?,
            version: typed::<i64>(row, "stream_version")?,
            event_id: typed::<Uuid>(row, "event_id")?,
            event_type: typed::<&str>(row, "event_type")?,
            schema_version: typed::<i64>(row, "schema_version")?,
            payload: ordinal(row, "payload")?,
            recorded_at: typed::<DateTime<Utc>>(row, "recorded_at")?,
        })
    }
}

impl EventColumns {
    /// The ordinals of the event columns in `row` (any row of the query), their types checked.
    pub(crate) fn find(row: &PgRow) -> Result<Self, StoreError> {
        Ok(Self {
            load: LoadColumns::find(row)?,
            stream: typed::<&str>(row, "stream_id")?,
            metadata: ordinal(row, "metadata")?,
        })
    }
}

/// The event of stream `stream_id` in a row with the [`crate::schema::LOAD_COLUMNS`], borrowing
/// its type name and payload from the row.
///
/// Values that the schema's types allow but the envelope does not (a version or position that is
/// not positive, a schema version out of range, a payload not in the `jsonb` format) are
/// [`StoreError::Corrupt`].
pub(crate) fn decode_event_ref<'r>(
    row: &'r PgRow,
    columns: &LoadColumns,
    stream_id: &StreamId,
) -> Result<RecordedEventRef<'r>, StoreError> {
    // Column types were checked when the columns were found (`LoadColumns::find`).
    let position: i64 = row
        .try_get_unchecked(columns.position)
        .map_err(store_error)?;
    let version: i64 = row
        .try_get_unchecked(columns.version)
        .map_err(store_error)?;
    let event_id: Uuid = row
        .try_get_unchecked(columns.event_id)
        .map_err(store_error)?;
    let event_type: &str = row
        .try_get_unchecked(columns.event_type)
        .map_err(store_error)?;
    let schema_version: i64 = row
        .try_get_unchecked(columns.schema_version)
        .map_err(store_error)?;
    let payload = row.try_get_raw(columns.payload).map_err(store_error)?;
    let payload = jsonb_text(&payload).map_err(|e| corrupt_at_position(position, e))?;
    let recorded_at: DateTime<Utc> = row
        .try_get_unchecked(columns.recorded_at)
        .map_err(store_error)?;

    let global_position = u64::try_from(position)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| corrupt_at_position(position, "the global position is not positive"))?;
    let stream_version = u64::try_from(version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            StoreError::corrupt_at(
                stream_id,
                0,
                format!("stream version {version} is not positive"),
            )
        })?;
    let schema_version = u32::try_from(schema_version).map_err(|_| {
        StoreError::corrupt_at(
            stream_id,
            stream_version,
            format!("schema version {schema_version} is out of range"),
        )
    })?;
    Ok(RecordedEventRef {
        event_id,
        stream_version,
        global_position,
        event_type,
        schema_version,
        payload,
        recorded_at,
    })
}

/// Decodes a row of [`crate::schema::EVENT_COLUMNS`], whose columns are where `columns` says.
///
/// Values that the schema's types allow but the envelope does not (an invalid stream id, a
/// negative version, undecodable metadata) are [`StoreError::Corrupt`].
pub(crate) fn decode_event(
    row: &PgRow,
    columns: &EventColumns,
) -> Result<RecordedEvent, StoreError> {
    let position: i64 = row
        .try_get_unchecked(columns.load.position)
        .map_err(store_error)?;
    let stream: &str = row.try_get_unchecked(columns.stream).map_err(store_error)?;
    let stream_id = StreamId::parse(stream)
        .map_err(|e| corrupt_at_position(position, format!("invalid stream id: {e}")))?;
    let event = decode_event_ref(row, &columns.load, &stream_id)?;
    let metadata = row.try_get_raw(columns.metadata).map_err(store_error)?;
    let metadata = jsonb_text(&metadata).map_err(|e| corrupt_at_position(position, e))?;
    let metadata = Metadata::from_json(metadata).map_err(|e| {
        StoreError::corrupt_at(
            &stream_id,
            event.stream_version,
            format!("invalid metadata: {e}"),
        )
    })?;
    Ok(RecordedEvent {
        event_id: event.event_id,
        stream_id,
        stream_version: event.stream_version,
        global_position: event.global_position,
        partition: 0,
        event_type: event.event_type.to_owned(),
        schema_version: event.schema_version,
        payload: Bytes::copy_from_slice(event.payload),
        metadata,
        recorded_at: event.recorded_at,
    })
}

/// Rows of [`crate::schema::LOAD_COLUMNS`] as received, for a load.
pub(crate) struct Rows {
    rows: Vec<PgRow>,
    columns: Option<LoadColumns>,
}

impl Rows {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            rows: Vec::with_capacity(capacity),
            columns: None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Adds the next row of the query.
    pub(crate) fn push(&mut self, row: PgRow) -> Result<(), StoreError> {
        if self.columns.is_none() {
            self.columns = Some(LoadColumns::find(&row)?);
        }
        self.rows.push(row);
        Ok(())
    }

    /// The stream version of the last row, if it has a usable one.
    pub(crate) fn last_version(&self) -> Option<u64> {
        let (row, columns) = (self.rows.last()?, self.columns.as_ref()?);
        let version: i64 = row.try_get(columns.version).ok()?;
        u64::try_from(version).ok()
    }

    /// The payload bytes of the rows, estimated from at most 16 rows spread over them (enough
    /// for sizing the next pages).
    pub(crate) fn payload_bytes(&self) -> u64 {
        let Some(columns) = &self.columns else {
            return 0;
        };
        let step = self.rows.len().div_ceil(16).max(1);
        let (sampled, bytes) = self
            .rows
            .iter()
            .step_by(step)
            .filter_map(|row| row.try_get_raw(columns.payload).ok()?.as_bytes().ok())
            .fold((0u64, 0u64), |(n, sum), payload| {
                (n + 1, sum + payload.len() as u64)
            });
        (bytes * self.rows.len() as u64)
            .checked_div(sampled)
            .unwrap_or(0)
    }
}

/// A page of a stream's rows as received, for a load: each event is read from its row when the
/// load asks for it ([`decode_event_ref`]), its payload decoded where it lies.
pub(crate) struct RowPage {
    pub(crate) stream_id: StreamId,
    pub(crate) rows: Rows,
}

impl EventPage for RowPage {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn event(&self, index: usize) -> Result<RecordedEventRef<'_>, StoreError> {
        // Rows are only added with their columns found.
        let columns = self
            .rows
            .columns
            .as_ref()
            .ok_or_else(|| StoreError::backend("a page of rows without their columns"))?;
        decode_event_ref(&self.rows.rows[index], columns, &self.stream_id)
    }
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
