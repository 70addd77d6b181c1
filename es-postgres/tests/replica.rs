//! Reads from a streaming-replication standby (`PgStoreBuilder::read_replica`): a caller reads
//! its own writes, a reader of the feed through the replica never skips a position, a lagging
//! replica (replay paused) and a dead one (kill -9) send reads to the primary.
//!
//! The tests run a primary and a standby of their own (`PgServer::start_standby`).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadAll, ReadStream, StreamId,
};
use es_postgres::PgStore;
use es_test_support::{scratch_dir, PgServer};
use futures::TryStreamExt;
use sqlx::AssertSqlSafe;

struct Pair {
    primary: PgServer,
    standby: PgServer,
}

fn start_pair(name: &str) -> Pair {
    let primary = PgServer::start(&scratch_dir(&format!("{name}-primary")), &[]).unwrap();
    let standby = PgServer::start_standby(
        &primary,
        &scratch_dir(&format!("{name}-standby")),
        &[("hot_standby", "on")],
    )
    .unwrap();
    Pair { primary, standby }
}

async fn store(pair: &Pair, schema: &str, wait: Duration) -> PgStore {
    PgStore::builder_from_url(pair.primary.url("postgres"))
        .schema(schema)
        .read_replica(pair.standby.url("postgres"))
        .replica_wait(wait)
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build a store with a replica: {e}"))
}

fn event(n: u64) -> NewEvent {
    NewEvent::new("Deposited", 1, format!(r#"{{"n":{n}}}"#)).unwrap()
}

/// Appends event `n` to `stream` at version `n` (a new stream for 0), then reads the stream back
/// through the store: every event up to `n` must be there.
async fn append_and_read_back(store: &PgStore, stream: &StreamId, n: u64) {
    let expected = if n == 0 {
        ExpectedVersion::NoStream
    } else {
        ExpectedVersion::Exact(n)
    };
    store
        .append(AppendRequest::new(stream.clone(), expected, vec![event(n)]))
        .await
        .unwrap();
    assert_eq!(
        stream_len(store, stream).await as u64,
        n + 1,
        "append {n} of {stream} not read back"
    );
}

async fn stream_len(store: &PgStore, stream: &StreamId) -> usize {
    store
        .read_stream(stream, ReadStream::forward())
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_read_their_writes_through_the_replica() {
    let pair = start_pair("ryw");
    let store = store(&pair, "ryw", Duration::from_secs(5)).await;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("account", &format!("ryw-{t}")).unwrap();
            for n in 0..40u64 {
                store
                    .append(AppendRequest::new(
                        stream.clone(),
                        ExpectedVersion::Exact(n),
                        vec![event(n)],
                    ))
                    .await
                    .unwrap();
                // Read at once: the append must be there.
                let len = stream_len(&store, &stream).await;
                assert_eq!(len as u64, n + 1, "task {t} did not read its append {n}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let reads = store.replica_reads().unwrap();
    println!("read-your-writes, 320 reads: {reads:?}");
    assert_eq!(reads.replica + reads.primary, 8 * 40);
    assert!(
        reads.replica > reads.primary,
        "most reads should be served by the replica: {reads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_of_the_feed_through_the_replica_never_skips() {
    let pair = start_pair("feed");
    let store = store(&pair, "feed", Duration::from_secs(5)).await;
    let stop = Arc::new(AtomicBool::new(false));
    // A reader following the feed through the store (and so through the replica), page by page.
    let reader = {
        let store = store.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                let done = stop.load(Ordering::Relaxed);
                let page: Vec<_> = store
                    .read_all(ReadAll::after(after).limit(500))
                    .try_collect()
                    .await
                    .unwrap();
                if let Some(last) = page.last() {
                    after = last.global_position;
                }
                seen.extend(page.into_iter().map(|e| (e.global_position, e.event_id)));
                if done {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..60u64 {
                let stream = StreamId::new("account", &format!("feed-{w}-{}", i % 5)).unwrap();
                let events = (0..=(i % 3)).map(|k| event(i * 10 + k)).collect();
                store
                    .append(AppendRequest::new(stream, ExpectedVersion::Any, events))
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let seen = reader.await.unwrap();

    let admin = common::pool(&pair.primary.url("postgres"), 2).await;
    let all: BTreeMap<i64, uuid::Uuid> = sqlx::query_as::<_, (i64, uuid::Uuid)>(AssertSqlSafe(
        "SELECT global_position, event_id FROM feed.events".to_owned(),
    ))
    .fetch_all(&admin)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let expected: Vec<(u64, uuid::Uuid)> = all
        .iter()
        .map(|(p, id)| (u64::try_from(*p).unwrap(), *id))
        .collect();
    // The last read began after every append returned: it reads (its own writes) to the end.
    assert_eq!(
        seen.len(),
        expected.len(),
        "the reader missed or repeated events"
    );
    assert_eq!(seen, expected, "the reader saw the feed out of order");
    let reads = store.replica_reads().unwrap();
    assert!(reads.replica > 0, "{reads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_replica_sends_reads_to_the_primary() {
    let pair = start_pair("lag");
    let store = store(&pair, "lag", Duration::from_millis(300)).await;
    let standby = common::pool(&pair.standby.url("postgres"), 1).await;
    let stream = StreamId::new("account", "lag-1").unwrap();
    append_and_read_back(&store, &stream, 0).await;

    // The standby stops replaying: appends from now on are not there.
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&standby)
        .await
        .unwrap();
    let before = store.replica_reads().unwrap();
    for n in 1..=5u64 {
        append_and_read_back(&store, &stream, n).await;
    }
    let after = store.replica_reads().unwrap();
    assert_eq!(after.primary - before.primary, 5, "{before:?} -> {after:?}");
    let on_standby: i64 = sqlx::query_scalar("SELECT count(*) FROM lag.events")
        .fetch_one(&standby)
        .await
        .unwrap();
    assert_eq!(on_standby, 1, "the paused standby replayed appends");

    // Replay resumes: reads go back to the replica.
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby)
        .await
        .unwrap();
    let resumed = store.replica_reads().unwrap();
    assert_eq!(stream_len(&store, &stream).await, 6);
    let last = store.replica_reads().unwrap();
    assert_eq!(last.replica, resumed.replica + 1, "{resumed:?} -> {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_replica_sends_reads_to_the_primary() {
    let pair = start_pair("dead");
    let store = store(&pair, "dead", Duration::from_millis(500)).await;
    let stream = StreamId::new("account", "dead-1").unwrap();
    append_and_read_back(&store, &stream, 0).await;
    pair.standby.kill9().unwrap();
    let before = store.replica_reads().unwrap();
    for n in 1..=3u64 {
        let started = std::time::Instant::now();
        append_and_read_back(&store, &stream, n).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    let after = store.replica_reads().unwrap();
    assert_eq!(after.primary - before.primary, 3, "{before:?} -> {after:?}");
}
