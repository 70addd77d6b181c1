//! es-postgres benchmarks against raw sqlx on the same server, in the same run.
//!
//! Raw baselines are plain sqlx statements with no ordering guarantee: single-row and multi-row
//! (UNNEST) INSERTs into a table of the same shape (bigserial position, the same columns, unique
//! event id, unique (stream, version), category index), and a single unpaged SELECT of the same
//! rows of the store's own table, decoded into the same `RecordedEvent`. Durable settings
//! (`synchronous_commit` on). Every workload alternates raw and framework runs (ABBA) after a warm-up
//! and reports medians; a CHECKPOINT runs before every write round.

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

use crate::command::{self, Baseline, Targets};
use crate::config::{pick, Args};
use crate::domain::{self, metadata, Order};
use crate::load::{read_repeats, round, rounds, timed};
use crate::report::{heap_size, rate, Report, Row as ReportRow, Samples};
use crate::PEAK;

const GROUP: &str = "es-postgres";
const READ_EVENTS: u64 = 10_000;
/// Events in the feed that read-all and projection catch-up go over.
const FEED_EVENTS: u64 = 100_000;

const PAYLOAD: &str = r#"{"order_id": "ord_7f3c2a9e-4b1d-4c8e-9a2f-1e5d6c7b8a90", "customer_id": "cus_42a1b3c4", "currency": "EUR", "total_cents": 12999, "items": [{"sku": "SKU-RED-SHIRT-M", "qty": 2}, {"sku": "SKU-JEANS-32", "qty": 1}]}"#;

pub(crate) async fn run(report: &mut Report, args: &Args) -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context(
        "DATABASE_URL is not set: run `cargo xtask bench`, or start PostgreSQL and export it",
    )?;
    // One pool for the framework and the raw baseline alike.
    let pool = bench_pool(&url).await?;
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
    let feed_schema = format!("bench_feed_{tag}");
    let group_schema = format!("bench_group_{tag}");
    let result = async {
        if args.wants("postgres", "personal") {
            crate::personal::run(report, GROUP, store.clone(), store.key_store()).await?;
        }
        if args.wants("postgres", "append") {
            appends(report, &store, &raw, 16, 1, Some(0.7)).await?;
            appends(report, &store, &raw, 16, 100, Some(0.8)).await?;
            appends(report, &store, &raw, 1, 1, None).await?;
            appends(report, &store, &raw, 4, 100, None).await?;
            tls_appends(report).await?;
        }
        if args.wants("postgres", "telemetry") {
            crate::telemetry::run(report, GROUP, store.clone()).await?;
        }
        if args.wants("postgres", "command") {
            let targets = Targets {
                distinct: Some(0.8),
                contended: Some(1000.0),
            };
            command::run(report, GROUP, store.clone(), &raw, targets).await?;
        }
        let (read, catch_up) = (
            args.wants("postgres", "read"),
            args.wants("postgres", "catch-up"),
        );
        if read || catch_up {
            // A store of its own, holding exactly the events read-all and catch-up go over.
            let feed = PgStore::builder(pool.clone())
                .schema(&feed_schema)
                .build()
                .await?;
            let count = pick(FEED_EVENTS, 10_000);
            fill_feed(&feed, count).await?;
            if read {
                read_stream(report, &store, &pool, &schema).await?;
                read_all(report, &feed, &pool, &feed_schema, count).await?;
            }
            if catch_up {
                crate::projection::catch_up(report, GROUP, &feed, count).await?;
            }
        }
        if args.wants("postgres", "group") {
            let partitioning = es_core::Partitioning::new(crate::projection::GROUP_PARTITIONS)?;
            let grouped = PgStore::builder(pool.clone())
                .schema(&group_schema)
                .partitioning(partitioning)
                .build()
                .await?;
            let count = pick(FEED_EVENTS, 10_000);
            crate::projection::fill_partitioned(&grouped, count).await?;
            crate::projection::group_catch_up(report, GROUP, &grouped, count).await?;
        }
        if args.wants("postgres", "rehydrate") {
            rehydrate(report, &store, &pool, &schema).await?;
        }
        if args.wants("postgres", "archive") {
            crate::archive::run(report, &pool, &tag).await?;
        }
        if args.wants("postgres", "processes") {
            crate::pg_processes::run(report, &url, &tag).await?;
        }
        anyhow::Ok(())
    }
    .await;
    for s in [&schema, &raw_schema, &feed_schema, &group_schema] {
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
        let table = create_raw_table(&pool, schema).await?;
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

/// Creates schema `schema` with the raw baseline's table; returns the table's qualified name.
pub(crate) async fn create_raw_table(pool: &PgPool, schema: &str) -> anyhow::Result<String> {
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
    .execute(pool)
    .await?;
    Ok(table)
}

/// The command rows' raw side: the append rows' INSERT transactions.
impl Baseline for Raw {
    fn describe(&self, batch: usize) -> String {
        if batch == 1 {
            "single-row INSERT txns, as in the 1-event append row".to_owned()
        } else {
            format!("{batch}-row (UNNEST) INSERT txns")
        }
    }

    async fn round(&self, tasks: usize, batch: usize) -> anyhow::Result<f64> {
        round_raw(self, tasks, batch).await
    }

    async fn settle(&self) {
        checkpoint(&self.pool).await;
    }
}

async fn checkpoint(pool: &PgPool) {
    // Needs superuser; without it the rounds are merely noisier.
    let _ = sqlx::query("CHECKPOINT").execute(pool).await;
}

async fn appends(
    report: &mut Report,
    store: &PgStore,
    raw: &Raw,
    tasks: usize,
    batch: usize,
    target: Option<f64>,
) -> anyhow::Result<()> {
    let mut samples = Samples::default();
    // Warm-up: connections, plans, caches.
    round_raw(raw, tasks, batch).await?;
    round_ours(store, tasks, batch).await?;
    for i in 0..rounds() {
        let (ours, raw) = if i % 2 == 0 {
            let raw = round_raw(raw, tasks, batch).await?;
            (round_ours(store, tasks, batch).await?, raw)
        } else {
            let ours = round_ours(store, tasks, batch).await?;
            (ours, round_raw(raw, tasks, batch).await?)
        };
        samples.push(ours, raw);
    }
    let what = if batch == 1 {
        "single-row INSERT txn"
    } else {
        "multi-row (UNNEST) INSERT txn"
    };
    report.push(ReportRow::paired(
        GROUP,
        format!("append {batch}-event batches, {tasks} task(s), distinct streams"),
        &samples,
        "events/s",
        target,
        format!(
            "raw = {what} (bigserial, no ordering guarantee); ours = Exact-version appends, \
             never-skip positions; {:.1}s rounds, {}",
            round().as_secs_f64(),
            samples.describe()
        ),
    ));
    Ok(())
}

/// The benchmark's pool on `url`: 40 connections, no ping before each checkout (it would add a
/// round trip to every raw statement and every read page).
async fn bench_pool(url: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(40)
        .test_before_acquire(false)
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// What TLS costs appends: 16 tasks of 1-event appends over `sslmode=verify-full` against the
/// same appends in plaintext, to two schemas of one server of the benchmark's own with `ssl=on`
/// (certificates from a CA made for the run), rounds alternating.
async fn tls_appends(report: &mut Report) -> anyhow::Result<()> {
    let dir = es_test_support::scratch_dir("bench-pg-tls");
    let certs = es_test_support::TestCerts::generate(&dir.join("certs"))
        .map_err(|e| anyhow::anyhow!("cannot make TLS certificates: {e}"))?;
    let server = es_test_support::PgServer::start_tls(
        &dir.join("pg"),
        &certs.server_cert,
        &certs.server_key,
    )
    .map_err(|e| anyhow::anyhow!("cannot start PostgreSQL with TLS: {e}"))?;
    let port = server.port();
    let store = |mode: String, schema: &'static str| async move {
        let url = format!("postgres://postgres@localhost:{port}/postgres?sslmode={mode}");
        let pool = bench_pool(&url).await?;
        anyhow::Ok(PgStore::builder(pool).schema(schema).build().await?)
    };
    let tls = store(
        format!("verify-full&sslrootcert={}", certs.ca_cert.display()),
        "bench_tls",
    )
    .await?;
    let plain = store("disable".to_owned(), "bench_plain").await?;
    anyhow::ensure!(
        tls.server().tls && !plain.server().tls,
        "TLS on one store only"
    );
    let mut samples = Samples::default();
    round_ours(&plain, 16, 1).await?;
    round_ours(&tls, 16, 1).await?;
    for i in 0..rounds() {
        let (ours, raw) = if i % 2 == 0 {
            let raw = round_ours(&plain, 16, 1).await?;
            (round_ours(&tls, 16, 1).await?, raw)
        } else {
            let ours = round_ours(&tls, 16, 1).await?;
            (ours, round_ours(&plain, 16, 1).await?)
        };
        samples.push(ours, raw);
    }
    let version = tls.server().tls_version.clone().unwrap_or_default();
    report.push(ReportRow::paired(
        GROUP,
        "append 1-event batches, 16 task(s), over TLS (verify-full) vs the same appends in \
         plaintext",
        &samples,
        "events/s",
        None,
        format!(
            "{version}, one server with ssl=on, two schemas; raw column = the store in plaintext \
             (sslmode=disable); {:.1}s rounds, {}",
            round().as_secs_f64(),
            samples.describe()
        ),
    ));
    drop((tls, plain));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// One timed round of raw INSERTs; returns events/s.
async fn round_raw(raw: &Raw, tasks: usize, batch: usize) -> anyhow::Result<f64> {
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
    Ok(rate(n * batch as u64, took))
}

/// One timed round of framework appends; returns events/s.
async fn round_ours(store: &PgStore, tasks: usize, batch: usize) -> anyhow::Result<f64> {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    checkpoint(store.pool()).await;
    let template = NewEvent::new("OrderPlaced", 1, PAYLOAD)?;
    let ours_store = store.clone();
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
    Ok(rate(n * batch as u64, took))
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
        partition: 0,
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

/// Reads every event of `stream` through the store; returns the time taken.
async fn ours_stream(store: &PgStore, stream: &StreamId) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut events = store.read_stream(stream, ReadStream::forward());
    let mut n = 0;
    while let Some(e) = events.try_next().await? {
        black_box(e);
        n += 1;
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(n == READ_EVENTS, "read {n} events");
    Ok(elapsed)
}

/// One raw SELECT of `count` rows decoded by hand; returns the time taken.
pub(crate) async fn raw_timed(
    pool: &PgPool,
    sql: &str,
    bind: Option<&str>,
    count: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let n = raw_select(pool, sql, bind, count as i64).await?;
    let elapsed = start.elapsed();
    anyhow::ensure!(n == count, "raw read {n} of {count} events");
    Ok(elapsed)
}

async fn read_stream(
    report: &mut Report,
    store: &PgStore,
    pool: &PgPool,
    schema: &str,
) -> anyhow::Result<()> {
    let stream = StreamId::new("order", "read10k")?;
    fill(store, &stream, READ_EVENTS).await?;
    let table = format!("\"{schema}\".events");
    let sql = format!(
        "SELECT {COLUMNS} FROM {table} WHERE stream_id = $1 ORDER BY stream_version LIMIT $2"
    );
    let raw = || raw_timed(pool, &sql, Some(stream.as_str()), READ_EVENTS);
    raw().await?;
    ours_stream(store, &stream).await?;
    let mut samples = Samples::default();
    for i in 0..read_repeats() {
        let (ours, raw) = if i % 2 == 0 {
            let raw = raw().await?;
            (ours_stream(store, &stream).await?, raw)
        } else {
            let ours = ours_stream(store, &stream).await?;
            (ours, raw().await?)
        };
        samples.push_times(READ_EVENTS, ours, raw);
    }
    report.push(ReportRow::paired(
        GROUP,
        "read a 10k-event stream (paged) vs one raw SELECT",
        &samples,
        "events/s",
        Some(0.8),
        format!("both decode into RecordedEvent; {}", samples.describe()),
    ));
    Ok(())
}

/// Reads the first `count` events of the feed through the store; returns the time taken.
async fn ours_all(store: &PgStore, count: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut events = store.read_all(ReadAll::after(0).limit(count));
    let mut n = 0;
    while let Some(e) = events.try_next().await? {
        black_box(e);
        n += 1;
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(n == count, "read_all {n} of {count} events");
    Ok(elapsed)
}

async fn read_all(
    report: &mut Report,
    feed: &PgStore,
    pool: &PgPool,
    schema: &str,
    count: u64,
) -> anyhow::Result<()> {
    let table = format!("\"{schema}\".events");
    let sql = format!("SELECT {COLUMNS} FROM {table} ORDER BY global_position LIMIT $1");
    let raw = || raw_timed(pool, &sql, None, count);
    raw().await?;
    ours_all(feed, count).await?;
    let mut samples = Samples::default();
    for i in 0..read_repeats() {
        let (ours, raw) = if i % 2 == 0 {
            let raw = raw().await?;
            (ours_all(feed, count).await?, raw)
        } else {
            let ours = ours_all(feed, count).await?;
            (ours, raw().await?)
        };
        samples.push_times(count, ours, raw);
    }
    report.push(ReportRow::paired(
        GROUP,
        format!(
            "read_all from 0, {}k events (paged) vs one raw SELECT",
            count / 1000
        ),
        &samples,
        "events/s",
        Some(0.8),
        format!("both decode into RecordedEvent; {}", samples.describe()),
    ));
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

    // Raw: SELECT type + payload, serde decode by hand, apply by hand (no upcasting needed: the
    // v1 payload decodes with a default currency).
    let raw = || async {
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
        let elapsed = start.elapsed();
        black_box(order);
        anyhow::Ok(elapsed)
    };
    let load = |repo: &Repository<PgStore>, snapshot: Option<u64>| {
        let repo = repo.clone();
        async move {
            let start = Instant::now();
            let loaded = repo.load::<Order>(id).await?;
            let elapsed = start.elapsed();
            anyhow::ensure!(loaded.version == READ_EVENTS && loaded.snapshot_version == snapshot);
            anyhow::Ok(elapsed)
        }
    };
    let (version, _) = snapshotting.snapshot::<Order>(id).await?;
    anyhow::ensure!(version == READ_EVENTS);
    raw().await?;
    load(&plain, None).await?;
    load(&snapshotting, Some(READ_EVENTS)).await?;
    let (mut without, mut with) = (Samples::default(), Samples::default());
    for i in 0..read_repeats() {
        let (raw, plain_time, snap_time) = if i % 2 == 0 {
            let raw = raw().await?;
            let plain_time = load(&plain, None).await?;
            (
                raw,
                plain_time,
                load(&snapshotting, Some(READ_EVENTS)).await?,
            )
        } else {
            let snap_time = load(&snapshotting, Some(READ_EVENTS)).await?;
            let plain_time = load(&plain, None).await?;
            (raw().await?, plain_time, snap_time)
        };
        without.push_times(READ_EVENTS, plain_time, raw);
        with.push_times(READ_EVENTS, snap_time, raw);
    }
    report.push(ReportRow::paired(
        GROUP,
        "rehydrate a 10k-event aggregate, no snapshot",
        &without,
        "events/s",
        Some(0.8),
        format!(
            "raw = SELECT type + payload, serde + match by hand; peak heap during load {}; {}",
            heap_size(peak_heap(&plain, id).await?),
            without.describe()
        ),
    ));
    report.push(ReportRow::paired(
        GROUP,
        "rehydrate a 10k-event aggregate from a snapshot at 10k",
        &with,
        "events/s",
        None,
        format!(
            "aggregate versions per second (snapshot + 0 events), same raw; peak heap during \
             load {}; {}",
            heap_size(peak_heap(&snapshotting, id).await?),
            with.describe()
        ),
    ));
    Ok(())
}

/// The peak heap of one load of `id`, beyond what was in use before.
async fn peak_heap(repo: &Repository<PgStore>, id: &str) -> anyhow::Result<usize> {
    let before = PEAK.current_usage();
    PEAK.reset_peak_usage();
    let loaded = repo.load::<Order>(id).await?;
    let peak = PEAK.peak_usage().saturating_sub(before);
    black_box(loaded);
    Ok(peak)
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

/// Fills a fresh store with `count` of the domain's benchmark events over 100 streams, in
/// appends of 1000, the last stream first so the feed interleaves nothing unusual.
async fn fill_feed(store: &PgStore, count: u64) -> anyhow::Result<()> {
    let streams = 100;
    let per_stream = count / streams;
    for s in 0..streams {
        fill(
            store,
            &StreamId::new("order", &format!("feed{s}"))?,
            per_stream,
        )
        .await?;
    }
    Ok(())
}
