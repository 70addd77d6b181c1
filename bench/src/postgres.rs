//! es-postgres benchmarks against raw sqlx on the same server, in the same run.
//!
//! Raw baselines are plain sqlx statements with no ordering guarantee: single-row and multi-row
//! (UNNEST) INSERTs into a table of the same shape (bigserial position, the same columns, unique
//! event id, unique (stream, version), category index), and a single unpaged SELECT of the same
//! rows of the store's own table, decoded into the same `RecordedEvent`. Durable settings
//! (synchronous_commit on). Appends alternate raw and framework rounds and report the best
//! round of each; a CHECKPOINT runs before every write round.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, Metadata, NewEvent, ReadAll, ReadStream,
    RecordedEvent, Repository, SnapshotPolicy, StreamId,
};
use es_postgres::PgStore;
use futures::TryStreamExt;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow, PgValueFormat};
use sqlx::{AssertSqlSafe, Row, ValueRef};
use uuid::Uuid;

use crate::domain::{self, Order};
use crate::report::{rate, Report, Row as ReportRow};
use crate::PEAK;

const GROUP: &str = "es-postgres";
/// Length of one timed append round.
const ROUND: Duration = Duration::from_secs(3);
/// Rounds per append workload (each alternating raw and framework).
const ROUNDS: usize = 5;
const READ_EVENTS: u64 = 10_000;
const READ_ALL_EVENTS: u64 = 100_000;
const READ_REPEATS: usize = 5;

const PAYLOAD: &str = r#"{"order_id": "ord_7f3c2a9e-4b1d-4c8e-9a2f-1e5d6c7b8a90", "customer_id": "cus_42a1b3c4", "currency": "EUR", "total_cents": 12999, "items": [{"sku": "SKU-RED-SHIRT-M", "qty": 2}, {"sku": "SKU-JEANS-32", "qty": 1}]}"#;

pub(crate) async fn run(report: &mut Report) -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context(
        "DATABASE_URL is not set: run `cargo xtask bench`, or start PostgreSQL and export it",
    )?;
    // One pool for the framework and the raw baseline alike. No ping before each checkout: it
    // would add a round trip to every raw statement and every read page.
    let pool = PgPoolOptions::new()
        .max_connections(40)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let tag = format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let schema = format!("bench_{tag}");
    let raw_schema = format!("bench_raw_{tag}");
    let store = PgStore::builder(pool.clone())
        .schema(&schema)
        .build()
        .await?;
    let raw = Raw::create(pool.clone(), &raw_schema).await?;
    let result = async {
        appends(report, &store, &raw, 16, 1, Some(0.7)).await?;
        appends(report, &store, &raw, 16, 100, Some(0.8)).await?;
        appends(report, &store, &raw, 1, 1, None).await?;
        appends(report, &store, &raw, 4, 100, None).await?;
        reads(report, &store, &pool, &schema).await?;
        rehydrate(report, &store, &pool, &schema).await
    }
    .await;
    for s in [&schema, &raw_schema] {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{s}\" CASCADE")))
            .execute(&pool)
            .await;
    }
    result
}

/// The raw baseline's table: the same shape as the store's `events`, with a bigserial position.
struct Raw {
    pool: PgPool,
    table: String,
}

impl Raw {
    async fn create(pool: PgPool, schema: &str) -> anyhow::Result<Self> {
        let table = format!("\"{schema}\".events");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA \"{schema}\";
             CREATE TABLE {table} (
                 global_position bigserial PRIMARY KEY,
                 stream_id text COLLATE \"C\" NOT NULL,
                 category text COLLATE \"C\" NOT NULL,
                 stream_version bigint NOT NULL,
                 event_id uuid NOT NULL UNIQUE,
                 event_type text COLLATE \"C\" NOT NULL,
                 schema_version bigint NOT NULL,
                 payload jsonb NOT NULL,
                 metadata jsonb NOT NULL,
                 recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 UNIQUE (stream_id, stream_version));
             CREATE INDEX ON {table} (category, global_position);"
        )))
        .execute(&pool)
        .await?;
        Ok(Self { pool, table })
    }

    /// One autocommit INSERT of `batch` rows (UNNEST for more than one).
    async fn insert(
        &self,
        stream: &str,
        first_version: i64,
        batch: usize,
        meta: &str,
    ) -> anyhow::Result<()> {
        if batch == 1 {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {} (stream_id, category, stream_version, event_id, event_type, \
                 schema_version, payload, metadata) VALUES ($1, 'order', $2, $3, 'OrderPlaced', 1, \
                 $4::jsonb, $5::jsonb)",
                self.table
            )))
            .bind(stream)
            .bind(first_version)
            .bind(Uuid::now_v7())
            .bind(PAYLOAD)
            .bind(meta)
            .execute(&self.pool)
            .await?;
        } else {
            let versions: Vec<i64> = (0..batch as i64).map(|i| first_version + i).collect();
            let ids: Vec<Uuid> = (0..batch).map(|_| Uuid::now_v7()).collect();
            let payloads = vec![PAYLOAD; batch];
            let metas = vec![meta; batch];
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {} (stream_id, category, stream_version, event_id, event_type, \
                 schema_version, payload, metadata) \
                 SELECT $1, 'order', v, id, 'OrderPlaced', 1, p::jsonb, m::jsonb \
                 FROM unnest($2::bigint[], $3::uuid[], $4::text[], $5::text[]) AS u(v, id, p, m)",
                self.table
            )))
            .bind(stream)
            .bind(versions)
            .bind(ids)
            .bind(payloads)
            .bind(metas)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}

fn metadata() -> Metadata {
    Metadata::new()
        .with_correlation_id(Uuid::now_v7())
        .with_causation_id(Uuid::new_v4())
}

async fn checkpoint(pool: &PgPool) {
    // Needs superuser; without it the rounds are merely noisier.
    let _ = sqlx::query("CHECKPOINT").execute(pool).await;
}

/// Runs `tasks` concurrent loops of `op(task, iteration)` for one round; returns ops completed.
async fn timed<F, Fut>(tasks: usize, op: F) -> anyhow::Result<(u64, Duration)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + ROUND;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let op = Arc::clone(&op);
        let done = Arc::clone(&done);
        handles.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline {
                op(t, i).await?;
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok((done.load(Ordering::Relaxed), start.elapsed()))
}

async fn appends(
    report: &mut Report,
    store: &PgStore,
    raw: &Raw,
    tasks: usize,
    batch: usize,
    target: Option<f64>,
) -> anyhow::Result<()> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let template = NewEvent::new("OrderPlaced", 1, PAYLOAD)?;
    let (mut best_ours, mut best_raw) = (0f64, 0f64);
    for _ in 0..ROUNDS {
        let run = RUN.fetch_add(1, Ordering::Relaxed);

        checkpoint(&raw.pool).await;
        let raw_table = Arc::new((raw.pool.clone(), raw.table.clone()));
        let (n, took) = timed(tasks, move |t, i| {
            let raw = Raw {
                pool: raw_table.0.clone(),
                table: raw_table.1.clone(),
            };
            let meta = String::from_utf8(metadata().to_json()).unwrap_or_default();
            async move {
                let stream = format!("order-r{run}-b{batch}-t{t}");
                raw.insert(&stream, (i as i64) * batch as i64 + 1, batch, &meta)
                    .await
            }
        })
        .await?;
        best_raw = best_raw.max(rate(n * batch as u64, took));

        checkpoint(&raw.pool).await;
        let ours_store = store.clone();
        let template = template.clone();
        let (n, took) = timed(tasks, move |t, i| {
            let store = ours_store.clone();
            // One command's events share its metadata, as the raw rows share theirs.
            let template = template.clone().with_metadata(metadata());
            let events: Vec<NewEvent> = (0..batch)
                .map(|_| template.clone().with_id(Uuid::now_v7()))
                .collect();
            async move {
                let stream = StreamId::new("order", &format!("r{run}-b{batch}-t{t}"))?;
                let expected = ExpectedVersion::Exact(i * batch as u64);
                store
                    .append(AppendRequest::new(stream, expected, events))
                    .await?;
                Ok(())
            }
        })
        .await?;
        best_ours = best_ours.max(rate(n * batch as u64, took));
    }
    let what = if batch == 1 {
        "single-row INSERT txn"
    } else {
        "multi-row (UNNEST) INSERT txn"
    };
    report.push(ReportRow {
        group: GROUP,
        workload: format!("append {batch}-event batches, {tasks} task(s), distinct streams"),
        ours: best_ours,
        raw: Some(best_raw),
        unit: "events/s",
        target,
        note: format!(
            "raw = {what} (bigserial, no ordering guarantee); ours = Exact-version appends, \
             never-skip positions; best of {ROUNDS} x {}s rounds",
            ROUND.as_secs()
        ),
    });
    Ok(())
}

/// The columns the store selects, in its order.
const COLUMNS: &str = "global_position, stream_id, stream_version, event_id, event_type, \
     schema_version, payload, metadata, recorded_at";

/// Decodes a row the way a careful hand-written sqlx reader would, into the same struct.
fn decode(row: &PgRow) -> anyhow::Result<RecordedEvent> {
    let jsonb = |i: usize| -> anyhow::Result<Bytes> {
        let value = row.try_get_raw(i)?;
        let bytes = value.as_bytes().map_err(|e| anyhow::anyhow!(e))?;
        Ok(match (value.format(), bytes.split_first()) {
            (PgValueFormat::Binary, Some((1, text))) => Bytes::copy_from_slice(text),
            _ => Bytes::copy_from_slice(bytes),
        })
    };
    let metadata = jsonb(7)?;
    let _ = row.try_get_raw(0)?.is_null();
    Ok(RecordedEvent {
        global_position: row.try_get::<i64, _>(0)? as u64,
        stream_id: StreamId::parse(row.try_get::<&str, _>(1)?)?,
        stream_version: row.try_get::<i64, _>(2)? as u64,
        event_id: row.try_get(3)?,
        event_type: row.try_get(4)?,
        schema_version: row.try_get::<i64, _>(5)? as u32,
        payload: jsonb(6)?,
        metadata: Metadata::from_json(&metadata)?,
        recorded_at: row.try_get(8)?,
    })
}

async fn raw_select(
    pool: &PgPool,
    sql: &str,
    bind: Option<&str>,
    limit: i64,
) -> anyhow::Result<u64> {
    let mut query = sqlx::query(AssertSqlSafe(sql.to_owned()));
    if let Some(b) = bind {
        query = query.bind(b.to_owned());
    }
    let mut rows = query.bind(limit).fetch(pool);
    let mut n = 0;
    while let Some(row) = rows.try_next().await? {
        black_box(decode(&row)?);
        n += 1;
    }
    Ok(n)
}

async fn reads(
    report: &mut Report,
    store: &PgStore,
    pool: &PgPool,
    schema: &str,
) -> anyhow::Result<()> {
    let stream = StreamId::new("order", "read10k")?;
    fill(store, &stream, READ_EVENTS).await?;
    let table = format!("\"{schema}\".events");

    let stream_sql = format!(
        "SELECT {COLUMNS} FROM {table} WHERE stream_id = $1 ORDER BY stream_version LIMIT $2"
    );
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..READ_REPEATS {
        let start = Instant::now();
        let n = raw_select(pool, &stream_sql, Some(stream.as_str()), i64::MAX).await?;
        raw.push(start.elapsed());
        anyhow::ensure!(n == READ_EVENTS, "raw read {n} events");

        let start = Instant::now();
        let mut events = store.read_stream(&stream, ReadStream::forward());
        let mut n = 0;
        while let Some(e) = events.try_next().await? {
            black_box(e);
            n += 1;
        }
        ours.push(start.elapsed());
        anyhow::ensure!(n == READ_EVENTS, "read {n} events");
    }
    report.push(ReportRow {
        group: GROUP,
        workload: "read a 10k-event stream (paged) vs one raw SELECT".into(),
        ours: rate(READ_EVENTS, best(&ours)),
        raw: Some(rate(READ_EVENTS, best(&raw))),
        unit: "events/s",
        target: Some(0.8),
        note: format!("both decode into RecordedEvent; best of {READ_REPEATS}"),
    });

    let head = store.head_position().await?;
    let count = READ_ALL_EVENTS.min(head);
    let all_sql = format!("SELECT {COLUMNS} FROM {table} ORDER BY global_position LIMIT $1");
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..READ_REPEATS {
        let start = Instant::now();
        let n = raw_select(pool, &all_sql, None, count as i64).await?;
        raw.push(start.elapsed());
        anyhow::ensure!(n == count, "raw read_all {n} events");

        let start = Instant::now();
        let mut events = store.read_all(ReadAll::after(0).limit(count));
        let mut n = 0;
        while let Some(e) = events.try_next().await? {
            black_box(e);
            n += 1;
        }
        ours.push(start.elapsed());
        anyhow::ensure!(n == count, "read_all {n} events");
    }
    report.push(ReportRow {
        group: GROUP,
        workload: format!("read_all from 0, {count} events (paged) vs one raw SELECT"),
        ours: rate(count, best(&ours)),
        raw: Some(rate(count, best(&raw))),
        unit: "events/s",
        target: Some(0.8),
        note: format!("both decode into RecordedEvent; best of {READ_REPEATS}"),
    });
    Ok(())
}

async fn rehydrate(
    report: &mut Report,
    store: &PgStore,
    pool: &PgPool,
    schema: &str,
) -> anyhow::Result<()> {
    let id = "hydrate10k";
    let stream = StreamId::new("order", id)?;
    fill(store, &stream, READ_EVENTS).await?;
    let plain = Repository::builder(store.clone())
        .upcaster::<Order>(domain::item_added_v1())
        .snapshot_policy::<Order>(SnapshotPolicy::Never)
        .build()?;
    let snapshotting = Repository::builder(store.clone())
        .upcaster::<Order>(domain::item_added_v1())
        .snapshot_policy::<Order>(SnapshotPolicy::EveryNEvents(1000))
        .build()?;
    let sql = format!(
        "SELECT event_type, payload FROM \"{schema}\".events WHERE stream_id = $1 ORDER BY stream_version"
    );

    let (mut without, mut raw) = (Vec::new(), Vec::new());
    let mut peak_without = 0;
    for _ in 0..READ_REPEATS {
        // Raw: SELECT type + payload, serde decode by hand, apply by hand (no upcasting needed:
        // the v1 payload decodes with a default currency).
        let start = Instant::now();
        let mut rows = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(stream.as_str())
            .fetch(pool);
        let mut order = Order::default();
        while let Some(row) = rows.try_next().await? {
            let t: &str = row.try_get(0)?;
            let value = row.try_get_raw(1)?;
            let bytes = value.as_bytes().map_err(|e| anyhow::anyhow!(e))?;
            let event = domain::decode_by_hand(t, &bytes[1..])?;
            domain::apply_by_hand(&mut order, &event);
        }
        drop(rows);
        raw.push(start.elapsed());
        black_box(order);

        let before = PEAK.current_usage();
        PEAK.reset_peak_usage();
        let start = Instant::now();
        let loaded = plain.load::<Order>(id).await?;
        without.push(start.elapsed());
        peak_without = peak_without.max(PEAK.peak_usage().saturating_sub(before));
        anyhow::ensure!(loaded.version == READ_EVENTS);
    }
    report.push(ReportRow {
        group: GROUP,
        workload: "rehydrate a 10k-event aggregate, no snapshot".into(),
        ours: rate(READ_EVENTS, best(&without)),
        raw: Some(rate(READ_EVENTS, best(&raw))),
        unit: "events/s",
        target: None,
        note: format!(
            "raw = SELECT + serde + match by hand; peak heap during load {:.0} KiB",
            peak_without as f64 / 1024.0
        ),
    });

    let (version, _) = snapshotting.snapshot::<Order>(id).await?;
    anyhow::ensure!(version == READ_EVENTS);
    let mut with = Vec::new();
    let mut peak_with = 0;
    for _ in 0..READ_REPEATS {
        let before = PEAK.current_usage();
        PEAK.reset_peak_usage();
        let start = Instant::now();
        let loaded = snapshotting.load::<Order>(id).await?;
        with.push(start.elapsed());
        peak_with = peak_with.max(PEAK.peak_usage().saturating_sub(before));
        anyhow::ensure!(loaded.snapshot_version == Some(READ_EVENTS));
    }
    report.push(ReportRow {
        group: GROUP,
        workload: "rehydrate a 10k-event aggregate from a snapshot at 10k".into(),
        ours: rate(READ_EVENTS, best(&with)),
        raw: Some(rate(READ_EVENTS, best(&raw))),
        unit: "events/s",
        target: None,
        note: format!(
            "aggregate versions per second (snapshot + 0 events); peak heap during load {:.0} KiB",
            peak_with as f64 / 1024.0
        ),
    });
    Ok(())
}

/// Fills `stream` with `count` of the domain's benchmark events, in batches of 1000.
async fn fill(store: &PgStore, stream: &StreamId, count: u64) -> anyhow::Result<()> {
    let mut i = 0;
    while i < count {
        let batch: Vec<NewEvent> = (i..(i + 1000).min(count))
            .map(|n| {
                let (t, v, payload) = domain::stored_event(n);
                NewEvent::from_value(t, v, &payload).with_metadata(metadata())
            })
            .collect();
        let n = batch.len() as u64;
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(i),
                batch,
            ))
            .await?;
        i += n;
    }
    Ok(())
}

fn best(times: &[Duration]) -> Duration {
    times.iter().copied().min().unwrap_or_default()
}
