//! [`PgEventArchive`]: a cold event archive ([`EventArchive`]) on PostgreSQL, for a store whose
//! hot storage is elsewhere (the Redis store keeps everything in memory and moves archived
//! events here).

use std::ops::RangeInclusive;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use es_core::contract::{Direction, EventArchive, EventFilter};
use es_core::{Metadata, RecordedEvent, StoreError, StreamId};
use futures::future::BoxFuture;
use sqlx::postgres::PgPool;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::error::{store_error, timed};
use crate::schema::SchemaName;
use crate::Error;

/// The tables of an archive in schema `{s}` (the quoted name): one row naming the store that
/// owns the archive, and the archived events, each once by feed position, by stream version
/// and (indexed, not unique) by event id.
const TABLES: &str = r"CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.archive_owner (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    owner text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.archive_events (
    partition integer NOT NULL,
    global_position bigint NOT NULL,
    stream_id text NOT NULL,
    category text NOT NULL,
    stream_version bigint NOT NULL,
    event_id uuid NOT NULL,
    event_type text NOT NULL,
    schema_version bigint NOT NULL,
    payload bytea NOT NULL,
    metadata bytea NOT NULL,
    recorded_at timestamptz NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, global_position),
    UNIQUE (stream_id, stream_version)
);
CREATE INDEX IF NOT EXISTS archive_events_event_id ON {s}.archive_events (event_id);
";

const COLUMNS: &str = "partition, global_position, stream_id, stream_version, event_id, \
                       event_type, schema_version, payload, metadata, recorded_at";

type Row = (
    i32,
    i64,
    String,
    i64,
    Uuid,
    String,
    i64,
    Vec<u8>,
    Vec<u8>,
    DateTime<Utc>,
);

/// A cold event archive in a PostgreSQL schema of its own: tables `archive_owner` and
/// `archive_events` (primary key `(partition, global_position)`, unique `(stream_id,
/// stream_version)`, an index on `event_id`). Payloads and metadata are kept as the bytes the
/// store recorded (`bytea`), so they read back byte for byte.
///
/// [`create`](Self::create) makes the tables if they are missing (the role needs `CREATE` on
/// the database or the schema); [`open`](Self::open) only uses them, so the role that runs the
/// store needs nothing but what [`grants_script`](Self::grants_script) gives it, after an
/// administrator ran [`setup_script`](Self::setup_script).
///
/// The archive belongs to one store: the first [`claim`](EventArchive::claim) records the
/// store's identity, and a claim by any other fails with [`Error::ArchiveOwned`] (inside
/// [`StoreError::Backend`]), so two stores can never mix their positions and versions in one
/// archive.
#[derive(Clone)]
pub struct PgEventArchive {
    pool: PgPool,
    schema: SchemaName,
    query_timeout: Duration,
    sql: Sql,
}

impl std::fmt::Debug for PgEventArchive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventArchive")
            .field("schema", &self.schema.as_str())
            .field("query_timeout", &self.query_timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Sql {
    insert: String,
    verify: String,
    stream_forward: String,
    stream_backward: String,
    partition: String,
    claim: String,
    owner: String,
}

impl PgEventArchive {
    /// The statements that create the archive's tables in `schema` (if missing), for an
    /// administrator to run before [`open`](Self::open).
    pub fn setup_script(schema: &str) -> Result<String, Error> {
        let s = SchemaName::new(schema)?.quoted();
        Ok(TABLES.replace("{s}", &s))
    }

    /// The grants `role` needs to run an archive on `schema` and nothing more: the schema's
    /// usage, and `SELECT` and `INSERT` on the two tables (no update, no delete).
    pub fn grants_script(schema: &str, role: &str) -> Result<String, Error> {
        // Validates both names the way the store's own grants do.
        crate::grants_script(schema, role)?;
        let s = SchemaName::new(schema)?.quoted();
        let role = format!("\"{}\"", role.replace('"', "\"\""));
        Ok(format!(
            "GRANT USAGE ON SCHEMA {s} TO {role};\n\
             GRANT SELECT, INSERT ON {s}.archive_owner, {s}.archive_events TO {role};\n"
        ))
    }

    /// An archive on `schema`, creating its tables if they are missing.
    pub async fn create(pool: PgPool, schema: &str) -> Result<Self, Error> {
        let script = Self::setup_script(schema)?;
        sqlx::raw_sql(AssertSqlSafe(script))
            .execute(&pool)
            .await
            .map_err(Error::Database)?;
        Self::open(pool, schema).await
    }

    /// An archive on `schema`, whose tables exist (made by [`create`](Self::create) or
    /// [`setup_script`](Self::setup_script)); checks that they can be read.
    pub async fn open(pool: PgPool, schema: &str) -> Result<Self, Error> {
        let schema = SchemaName::new(schema)?;
        let archive = Self {
            sql: Sql::new(&schema.quoted()),
            pool,
            schema,
            query_timeout: Duration::from_secs(30),
        };
        sqlx::query(AssertSqlSafe(archive.sql.owner.clone()))
            .fetch_optional(&archive.pool)
            .await
            .map_err(Error::Database)?;
        Ok(archive)
    }

    /// How long a call may take before it fails as [`StoreError::Unavailable`] (default 30 s).
    #[must_use]
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// The schema the archive is in.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// The identity of the store that owns the archive, if one claimed it.
    pub async fn owner(&self) -> Result<Option<String>, StoreError> {
        timed(self.query_timeout, async {
            sqlx::query_scalar(AssertSqlSafe(self.sql.owner.clone()))
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)
        })
        .await
    }

    async fn claim_owner(&self, owner: &str) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        let recorded: String = sqlx::query_scalar(AssertSqlSafe(self.sql.owner.clone()))
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?;
        if recorded == owner {
            Ok(())
        } else {
            Err(StoreError::backend(Error::ArchiveOwned {
                schema: self.schema.as_str().to_owned(),
                owner: recorded,
                claimant: owner.to_owned(),
            }))
        }
    }

    async fn store_events(&self, events: &[RecordedEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len();
        let mut partitions = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut streams = Vec::with_capacity(n);
        let mut categories = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut schemas = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        for e in events {
            let out_of_range = |what: &str| StoreError::InvalidRequest {
                stream_id: e.stream_id.clone(),
                reason: format!(
                    "event {} of `{}`: its {what} is beyond PostgreSQL's bigint",
                    e.event_id, e.stream_id
                ),
            };
            partitions.push(i32::try_from(e.partition).map_err(|_| out_of_range("partition"))?);
            positions.push(i64::try_from(e.global_position).map_err(|_| out_of_range("position"))?);
            streams.push(e.stream_id.as_str().to_owned());
            categories.push(e.stream_id.category().to_owned());
            versions.push(i64::try_from(e.stream_version).map_err(|_| out_of_range("version"))?);
            ids.push(e.event_id);
            types.push(e.event_type.clone());
            schemas.push(i64::from(e.schema_version));
            payloads.push(e.payload.to_vec());
            metadata.push(e.metadata.to_json());
            times.push(e.recorded_at);
        }
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        sqlx::query(AssertSqlSafe(self.sql.insert.clone()))
            .bind(&partitions)
            .bind(&positions)
            .bind(&streams)
            .bind(&categories)
            .bind(&versions)
            .bind(&ids)
            .bind(&types)
            .bind(&schemas)
            .bind(&payloads)
            .bind(&metadata)
            .bind(&times)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        // Every event is now stored, unless a different one holds its position or version.
        let clash: Option<(String, i64)> = sqlx::query_as(AssertSqlSafe(self.sql.verify.clone()))
            .bind(&partitions)
            .bind(&positions)
            .bind(&ids)
            .bind(&streams)
            .bind(&versions)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        if let Some((stream, version)) = clash {
            tx.rollback().await.map_err(store_error)?;
            return Err(StoreError::Corrupt {
                location: format!(
                    "the archive in schema `{}`, stream `{stream}` version {version}",
                    self.schema
                ),
                reason: "another event is archived at this event's version or position".to_owned(),
            });
        }
        tx.commit().await.map_err(store_error)
    }

    async fn stream_events(
        &self,
        stream: &StreamId,
        versions: RangeInclusive<u64>,
        direction: Direction,
        limit: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = match direction {
            Direction::Forward => &self.sql.stream_forward,
            Direction::Backward => &self.sql.stream_backward,
        };
        let rows: Vec<Row> = sqlx::query_as(AssertSqlSafe(sql.clone()))
            .bind(stream.as_str())
            .bind(clamp(*versions.start()))
            .bind(clamp(*versions.end()))
            .bind(clamp(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.into_iter().map(decode).collect()
    }

    async fn partition_events(
        &self,
        partition: u32,
        after: u64,
        up_to: u64,
        filter: &EventFilter,
        limit: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let Ok(partition) = i32::try_from(partition) else {
            return Ok(Vec::new());
        };
        let rows: Vec<Row> = sqlx::query_as(AssertSqlSafe(self.sql.partition.clone()))
            .bind(partition)
            .bind(clamp(after))
            .bind(clamp(up_to))
            .bind(&filter.categories)
            .bind(&filter.event_types)
            .bind(clamp(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.into_iter().map(decode).collect()
    }
}

impl Sql {
    fn new(s: &str) -> Self {
        let t = format!("{s}.archive_events");
        Self {
            insert: format!(
                "INSERT INTO {t} (partition, global_position, stream_id, category, \
                 stream_version, event_id, event_type, schema_version, payload, metadata, \
                 recorded_at) \
                 SELECT * FROM unnest($1::integer[], $2::bigint[], $3::text[], $4::text[], \
                 $5::bigint[], $6::uuid[], $7::text[], $8::bigint[], $9::bytea[], $10::bytea[], \
                 $11::timestamptz[]) \
                 ON CONFLICT DO NOTHING"
            ),
            verify: format!(
                "SELECT n.stream_id, n.stream_version \
                 FROM unnest($1::integer[], $2::bigint[], $3::uuid[], $4::text[], $5::bigint[]) \
                 AS n(partition, global_position, event_id, stream_id, stream_version) \
                 WHERE NOT EXISTS (SELECT 1 FROM {t} a WHERE a.partition = n.partition \
                 AND a.global_position = n.global_position AND a.event_id = n.event_id \
                 AND a.stream_id = n.stream_id AND a.stream_version = n.stream_version) \
                 LIMIT 1"
            ),
            stream_forward: format!(
                "SELECT {COLUMNS} FROM {t} WHERE stream_id = $1 \
                 AND stream_version BETWEEN $2 AND $3 ORDER BY stream_version LIMIT $4"
            ),
            stream_backward: format!(
                "SELECT {COLUMNS} FROM {t} WHERE stream_id = $1 \
                 AND stream_version BETWEEN $2 AND $3 ORDER BY stream_version DESC LIMIT $4"
            ),
            partition: format!(
                "SELECT {COLUMNS} FROM {t} WHERE partition = $1 \
                 AND global_position > $2 AND global_position <= $3 \
                 AND (cardinality($4::text[]) = 0 OR category = ANY($4::text[])) \
                 AND (cardinality($5::text[]) = 0 OR event_type = ANY($5::text[])) \
                 ORDER BY global_position LIMIT $6"
            ),
            claim: format!(
                "INSERT INTO {s}.archive_owner (only_row, owner) VALUES (true, $1) \
                 ON CONFLICT (only_row) DO NOTHING"
            ),
            owner: format!("SELECT owner FROM {s}.archive_owner"),
        }
    }
}

/// A `u64` bound as a bigint (bounds past `i64::MAX` mean "all").
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn decode(row: Row) -> Result<RecordedEvent, StoreError> {
    let (partition, position, stream, version, event_id, event_type, schema, payload, meta, at) =
        row;
    let location = || format!("archived event {event_id} (position {position})");
    let corrupt = |reason: String| StoreError::Corrupt {
        location: location(),
        reason,
    };
    Ok(RecordedEvent {
        event_id,
        stream_id: StreamId::parse(&stream).map_err(|e| corrupt(format!("bad stream id: {e}")))?,
        stream_version: u64::try_from(version)
            .map_err(|_| corrupt(format!("negative version {version}")))?,
        global_position: u64::try_from(position)
            .map_err(|_| corrupt(format!("negative position {position}")))?,
        partition: u32::try_from(partition)
            .map_err(|_| corrupt(format!("negative partition {partition}")))?,
        event_type,
        schema_version: u32::try_from(schema)
            .map_err(|_| corrupt(format!("schema version {schema} out of range")))?,
        payload: Bytes::from(payload),
        metadata: Metadata::from_json(&meta).map_err(|e| corrupt(format!("bad metadata: {e}")))?,
        recorded_at: at,
    })
}

impl EventArchive for PgEventArchive {
    fn claim<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(timed(self.query_timeout, self.claim_owner(owner)))
    }

    /// One transaction: the events are inserted (`ON CONFLICT DO NOTHING`), then checked to be
    /// the ones stored at their positions and versions, then committed (durable under the
    /// server's `synchronous_commit`, on by default).
    fn store<'a>(&'a self, events: &'a [RecordedEvent]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(timed(self.query_timeout, self.store_events(events)))
    }

    fn read_stream<'a>(
        &'a self,
        stream: &'a StreamId,
        versions: RangeInclusive<u64>,
        direction: Direction,
        limit: u64,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>, StoreError>> {
        Box::pin(timed(
            self.query_timeout,
            self.stream_events(stream, versions, direction, limit),
        ))
    }

    fn read_partition<'a>(
        &'a self,
        partition: u32,
        after: u64,
        up_to: u64,
        filter: &'a EventFilter,
        limit: u64,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>, StoreError>> {
        Box::pin(timed(
            self.query_timeout,
            self.partition_events(partition, after, up_to, filter, limit),
        ))
    }
}
