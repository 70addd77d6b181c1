//! Feed pages are planned as ordered index range scans whatever the events table's statistics.
//!
//! On a table PostgreSQL has not analyzed yet, a plain page query (`partition = $1 AND
//! global_position > $2 .. ORDER BY global_position LIMIT $3`) was planned as a bitmap scan of
//! every entry after the cursor plus a sort, so every page read the rest of the feed and reading
//! a feed in pages cost the square of its length. The test counts the table entries PostgreSQL
//! reads (`idx_tup_read` of the table's indexes plus `seq_tup_read`) while a fresh, never
//! analyzed store is read page by page, with every kind of filter, in every partition: read in
//! order from the cursor, the pages of a read pass over each entry about once.

mod common;

use std::time::{Duration, Instant};

use es_core::{
    AppendRequest, EventFilter, EventStore, ExpectedVersion, NewEvent, Partitioning, ReadAll,
    RecordedEvent, StreamId,
};
use es_postgres::PgStore;
use futures::TryStreamExt;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::AssertSqlSafe;

const PARTITIONS: u32 = 2;
const STREAMS: u64 = 200;
const EVENTS_PER_STREAM: u64 = 100;
const EVENTS: u64 = STREAMS * EVENTS_PER_STREAM;
/// Small pages, as a subscriber or projection that keeps up reads them.
const PAGE: u64 = 100;

/// A store of its own pool, whose connections carry `application_name`, so that the test can
/// wait until they are gone (a backend flushes its statistics when it exits).
async fn store_as(url: &str, schema: &str, application_name: &str) -> (PgStore, PgPool) {
    let options: PgConnectOptions = url.parse().expect("a valid DATABASE_URL");
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .connect_with(options.application_name(application_name))
        .await
        .expect("connects");
    let store = PgStore::builder(pool.clone())
        .schema(schema)
        .partitioning(Partitioning::new(PARTITIONS).unwrap())
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("builds the store");
    (store, pool)
}

/// Drops the store, closes its pool and waits until its backends have exited, so that their
/// statistics are in the cumulative counters.
async fn shut_down(admin: &PgPool, store: PgStore, pool: PgPool, application_name: &str) {
    drop(store);
    tokio::time::timeout(Duration::from_secs(30), pool.close())
        .await
        .expect("the pool closes");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1",
        )
        .bind(application_name)
        .fetch_one(admin)
        .await
        .unwrap();
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} backend(s) of {application_name} still there"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Entries of the events table read so far: index entries (plain, bitmap and index-only
/// scans) plus rows of sequential scans.
async fn entries_read(admin: &PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT coalesce(sum(idx_tup_read), 0)::bigint FROM pg_catalog.pg_stat_user_indexes \
                  WHERE schemaname = $1 AND relname = 'events') \
              + (SELECT coalesce(seq_tup_read, 0) FROM pg_catalog.pg_stat_user_tables \
                  WHERE schemaname = $1 AND relname = 'events')",
    )
    .bind(schema)
    .fetch_one(admin)
    .await
    .unwrap()
}

async fn statistics_rows(admin: &PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_catalog.pg_stats WHERE schemaname = $1 AND tablename = 'events'",
    )
    .bind(schema)
    .fetch_one(admin)
    .await
    .unwrap()
}

/// Reads partition `partition` from the start in pages of [`PAGE`] events, each page one
/// `read_all` from the last position of the page before.
async fn read_in_pages(
    store: &PgStore,
    partition: u32,
    filter: &EventFilter,
) -> Vec<RecordedEvent> {
    let mut events: Vec<RecordedEvent> = Vec::new();
    loop {
        let after = events.last().map_or(0, |e| e.global_position);
        let page: Vec<RecordedEvent> = store
            .read_all(
                ReadAll::after(after)
                    .partition(partition)
                    .filter(filter.clone())
                    .limit(PAGE),
            )
            .try_collect()
            .await
            .unwrap();
        let full = page.len() as u64 == PAGE;
        events.extend(page);
        if !full {
            return events;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_pages_of_an_unanalyzed_table_read_each_entry_about_once() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("plan");
    let admin = common::pool(&url, 2).await;

    // A fresh schema whose events table autovacuum leaves alone: it is never analyzed.
    let writer_name = format!("{schema}_w");
    let (store, pool) = store_as(&url, &schema, &writer_name).await;
    sqlx::query(AssertSqlSafe(format!(
        "ALTER TABLE \"{schema}\".events SET (autovacuum_enabled = false)"
    )))
    .execute(&admin)
    .await
    .unwrap();
    // Streams of categories `a` and `b`, events of types `X` and `Y`, spread over the partitions.
    for s in 0..STREAMS {
        let category = if s % 2 == 0 { "a" } else { "b" };
        let stream = StreamId::new(category, &format!("s{s}")).unwrap();
        let batch = (0..EVENTS_PER_STREAM)
            .map(|i| {
                let event_type = if i % 2 == 0 { "X" } else { "Y" };
                NewEvent::from_value(event_type, 1, &json!({ "s": s, "i": i }))
            })
            .collect();
        store
            .append(AppendRequest::new(stream, ExpectedVersion::NoStream, batch))
            .await
            .unwrap();
    }
    shut_down(&admin, store, pool, &writer_name).await;
    assert_eq!(
        statistics_rows(&admin, &schema).await,
        0,
        "the events table must not be analyzed for this test to mean anything"
    );

    let variants = [
        ("no filter", EventFilter::all(), EVENTS),
        ("one category", EventFilter::all().category("a"), EVENTS / 2),
        (
            "two categories",
            EventFilter::all().category("a").category("b"),
            EVENTS,
        ),
        (
            "one event type",
            EventFilter::all().event_type("X"),
            EVENTS / 2,
        ),
        (
            "a category and an event type",
            EventFilter::all().category("b").event_type("Y"),
            EVENTS / 4,
        ),
    ];
    let mut report = Vec::new();
    for (i, (name, filter, expected)) in variants.into_iter().enumerate() {
        let reader_name = format!("{schema}_r{i}");
        let before = entries_read(&admin, &schema).await;
        let (store, pool) = store_as(&url, &schema, &reader_name).await;
        let mut delivered = 0;
        for partition in 0..PARTITIONS {
            let events = read_in_pages(&store, partition, &filter).await;
            assert!(
                events
                    .windows(2)
                    .all(|w| w[0].global_position < w[1].global_position),
                "{name}: partition {partition} out of order"
            );
            assert!(
                events
                    .iter()
                    .all(|e| filter.matches(e) && e.partition == partition),
                "{name}: an event of partition {partition} does not match"
            );
            delivered += events.len() as u64;
        }
        shut_down(&admin, store, pool, &reader_name).await;
        let read = entries_read(&admin, &schema).await - before;
        assert_eq!(delivered, expected, "{name}: events delivered");
        report.push((name, read, delivered));
    }
    assert_eq!(
        statistics_rows(&admin, &schema).await,
        0,
        "analyzed meanwhile"
    );
    // Ordered range scans pass over each of the EVENTS entries about once per read (less with
    // one category, whose index holds only its own); a scan of everything after the cursor per
    // page reads about EVENTS^2 / (2 x PAGE x PARTITIONS) = 1,000,000 without a filter.
    let bound = i64::try_from(2 * EVENTS).unwrap();
    eprintln!("entries read, events delivered: {report:?}");
    assert!(
        report.iter().all(|(_, read, _)| *read <= bound),
        "a paged read of the feed ({EVENTS} events) read more than {bound} entries: {report:?}"
    );
}
