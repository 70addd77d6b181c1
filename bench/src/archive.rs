//! Archiving on PostgreSQL: a history of 1M events (10,000 streams of 100) archived stream by
//! stream, keeping each stream's last event hot, against the same `DELETE ... RETURNING` into
//! `INSERT` in raw SQL on a copy of the same rows; the hot table's size before and after; and a
//! read of archived events through the store against one raw SELECT of the archive table.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadAll, StreamId};
use es_postgres::PgStore;
use futures::TryStreamExt;
use sqlx::postgres::PgPool;
use sqlx::AssertSqlSafe;

use crate::config::pick;
use crate::report::{Report, Row as ReportRow, Samples};

const GROUP: &str = "es-postgres";
/// Events per stream; every stream keeps its last one hot.
const PER_STREAM: u64 = 100;
/// Tasks that archive (or delete and insert, raw) at once.
const TASKS: usize = 8;

/// A relation's total size (table, indexes, TOAST) in bytes.
async fn size(pool: &PgPool, table: &str) -> anyhow::Result<i64> {
    let sql = format!("SELECT pg_total_relation_size('{table}')");
    Ok(sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await?)
}

async fn execute(pool: &PgPool, sql: String) -> anyhow::Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await?;
    Ok(())
}

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn stream(i: u64) -> anyhow::Result<StreamId> {
    Ok(StreamId::new("account", &format!("a{i}"))?)
}

/// Appends `PER_STREAM` events to each of `streams` streams, one append per stream, from
/// `TASKS` tasks.
async fn fill(store: &PgStore, streams: u64) -> anyhow::Result<()> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (store, next) = (store.clone(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= streams {
                    return anyhow::Ok(());
                }
                let events = (1..=PER_STREAM)
                    .map(|n| {
                        let payload = format!(
                            r#"{{"entry":{n},"amount_cents":{},"currency":"EUR","memo":"monthly statement line {n} of account a{i}"}}"#,
                            n * 137 % 10_000
                        );
                        NewEvent::new("EntryPosted", 1, payload)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                store
                    .append(AppendRequest::new(
                        stream(i)?,
                        ExpectedVersion::NoStream,
                        events,
                    ))
                    .await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Runs `one(i)` for every stream index from `TASKS` tasks; returns the time taken.
async fn per_stream<F, Fut>(streams: u64, one: F) -> anyhow::Result<Duration>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (next, one) = (Arc::clone(&next), one.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= streams {
                    return anyhow::Ok(());
                }
                one(i).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}

pub(crate) async fn run(report: &mut Report, pool: &PgPool, tag: &str) -> anyhow::Result<()> {
    let streams = pick(10_000, 1_000);
    let schema = format!("bench_archive_{tag}");
    let raw = format!("bench_archive_raw_{tag}");
    let result = async {
        let store = PgStore::builder(pool.clone())
            .schema(&schema)
            .build()
            .await?;
        eprintln!(
            "es-bench: archive: appending {} events over {streams} streams",
            streams * PER_STREAM
        );
        fill(&store, streams).await?;
        let hot = format!("\"{schema}\".events");
        let before = copy_for_raw(pool, &hot, &raw).await?;
        archive_history(report, &store, pool, &raw, streams).await?;
        hot_sizes(report, pool, &schema, before, streams * PER_STREAM).await?;
        read_archived(report, &store, pool, &schema, streams).await
    }
    .await;
    for s in [&schema, &raw] {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{s}\" CASCADE")))
            .execute(pool)
            .await;
    }
    result
}

/// Copies the hot table `hot` into schema `raw` (the same rows, columns, constraints and
/// indexes, and an empty archive table) for the raw baseline; returns the hot table's size.
async fn copy_for_raw(pool: &PgPool, hot: &str, raw: &str) -> anyhow::Result<i64> {
    execute(
        pool,
        format!(
            "CREATE SCHEMA \"{raw}\"; \
             CREATE TABLE \"{raw}\".events (LIKE {hot} INCLUDING ALL); \
             CREATE TABLE \"{raw}\".archived_events (LIKE {hot} INCLUDING ALL); \
             INSERT INTO \"{raw}\".events SELECT * FROM {hot}"
        ),
    )
    .await?;
    // One statement each: VACUUM cannot run in the implicit transaction of several.
    for sql in [
        format!("VACUUM ANALYZE {hot}"),
        format!("VACUUM ANALYZE \"{raw}\".events"),
        "CHECKPOINT".to_owned(),
    ] {
        execute(pool, sql).await?;
    }
    size(pool, hot).await
}

/// Archives every stream but its last event, raw first (on the copy), then through the store.
async fn archive_history(
    report: &mut Report,
    store: &PgStore,
    pool: &PgPool,
    raw: &str,
    streams: u64,
) -> anyhow::Result<()> {
    let moved_sql: Arc<str> = format!(
        "WITH moved AS (DELETE FROM \"{raw}\".events WHERE stream_id = $1 \
         AND stream_version < $2 RETURNING *) \
         INSERT INTO \"{raw}\".archived_events SELECT * FROM moved"
    )
    .into();
    let raw_pool = pool.clone();
    let raw_time = per_stream(streams, move |i| {
        let (pool, sql) = (raw_pool.clone(), Arc::clone(&moved_sql));
        async move {
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(stream(i)?.as_str())
                .bind(PER_STREAM as i64)
                .execute(&pool)
                .await?;
            anyhow::ensure!(done.rows_affected() == PER_STREAM - 1, "raw moved {done:?}");
            Ok(())
        }
    })
    .await?;
    execute(pool, "CHECKPOINT".to_owned()).await?;
    let ours_store = store.clone();
    let ours_time = per_stream(streams, move |i| {
        let store = ours_store.clone();
        async move {
            let archived = store.archive_stream(&stream(i)?, PER_STREAM).await?;
            anyhow::ensure!(archived.moved == PER_STREAM - 1, "moved {archived:?}");
            Ok(())
        }
    })
    .await?;
    let moved = (streams * (PER_STREAM - 1)) as f64;
    let mut samples = Samples::default();
    samples.push(
        moved / ours_time.as_secs_f64(),
        moved / raw_time.as_secs_f64(),
    );
    report.push(ReportRow::paired(
        GROUP,
        format!(
            "archive_stream, {}k-event history ({streams} streams of {PER_STREAM}, last event \
             kept hot), {TASKS} tasks vs raw DELETE..RETURNING into INSERT",
            streams * PER_STREAM / 1000
        ),
        &samples,
        "events/s",
        None,
        "one run each (the history is archived once); the raw side runs first on a copy of \
         the same rows",
    ));
    Ok(())
}

/// The hot table's size before archiving, after a plain VACUUM and after VACUUM FULL.
async fn hot_sizes(
    report: &mut Report,
    pool: &PgPool,
    schema: &str,
    before: i64,
    events: u64,
) -> anyhow::Result<()> {
    let hot = format!("\"{schema}\".events");
    execute(pool, format!("VACUUM {hot}")).await?;
    let vacuumed = size(pool, &hot).await?;
    execute(pool, format!("VACUUM FULL {hot}")).await?;
    let compacted = size(pool, &hot).await?;
    let archive = size(pool, &format!("\"{schema}\".archived_events")).await?;
    let row = ReportRow::alone(
        GROUP,
        format!(
            "hot table (events + indexes) of a {}k-event history, before and after archiving \
             all but each stream's last event",
            events / 1000
        ),
        compacted as f64,
        "bytes",
        format!(
            "after VACUUM FULL; after a plain VACUUM the file keeps its size ({}) and later \
             appends reuse its free space; the archive table holds {}",
            mib(vacuumed),
            mib(archive)
        ),
    );
    report.push(row.showing(format!(
        "{} → {} ({:.1}%)",
        mib(before),
        mib(compacted),
        100.0 * compacted as f64 / before as f64
    )));
    Ok(())
}

/// The store's paged `read_all` over the first events of the feed (all archived now) against one
/// raw SELECT of the archive table.
async fn read_archived(
    report: &mut Report,
    store: &PgStore,
    pool: &PgPool,
    schema: &str,
    streams: u64,
) -> anyhow::Result<()> {
    let count = pick(100_000, 20_000).min(streams * (PER_STREAM - 1));
    let sql = format!(
        "SELECT global_position, stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata, recorded_at FROM \"{schema}\".archived_events \
         ORDER BY global_position LIMIT $1"
    );
    let mut samples = Samples::default();
    for _ in 0..3 {
        let raw = crate::postgres::raw_timed(pool, &sql, None, count).await?;
        let start = Instant::now();
        let mut read = store.read_all(ReadAll::after(0).limit(count));
        let mut n = 0;
        while let Some(event) = read.try_next().await? {
            black_box(event);
            n += 1;
        }
        let ours = start.elapsed();
        anyhow::ensure!(n == count, "read_all {n} of {count}");
        samples.push_times(count, ours, raw);
    }
    report.push(ReportRow::paired(
        GROUP,
        format!(
            "read_all of {}k archived events (paged, both tables merged) vs one raw SELECT of \
             the archive table",
            count / 1000
        ),
        &samples,
        "events/s",
        None,
        format!("both decode into RecordedEvent; {}", samples.describe()),
    ));
    Ok(())
}
