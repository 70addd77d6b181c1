//! Never-skip ordering and per-stream order under concurrency, with several stores (as separate
//! processes would be) writing to one schema.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadAll, ReadStream, RecordedEvent,
    StoreError, StreamId,
};
use es_testkit::support::{check_feed, poll_until_done, tail_until_done};
use futures::TryStreamExt;
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(180);

fn event(kind: &str, n: u64) -> NewEvent {
    NewEvent::from_value(kind, 1, &json!({ "n": n }))
}

/// Sixteen writers race on one stream through two stores; each version has exactly one winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_on_one_stream() {
    const WRITERS: u64 = 16;
    const PER_WRITER: u64 = 40;
    let url = es_test_support::database_url();
    let schema = common::unique_schema("one");
    let stores = [
        common::store_on(&url, &schema).await,
        common::store_on(&url, &schema).await,
    ];
    let stream = StreamId::new("account", "hot").unwrap();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = stores[(w % 2) as usize].clone();
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for i in 0..PER_WRITER {
                let e = event("Deposited", w * 1000 + i);
                loop {
                    let v = store.stream_version(&stream).await.unwrap();
                    let request = AppendRequest::new(
                        stream.clone(),
                        ExpectedVersion::Exact(v),
                        vec![e.clone()],
                    );
                    match store.append(request).await {
                        Ok(r) => {
                            assert_eq!(r.stream_version, v + 1);
                            won.push((r.stream_version, e.event_id));
                            break;
                        }
                        Err(StoreError::Conflict { actual, .. }) => assert!(actual > v),
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
            }
            won
        }));
    }
    let mut winners = BTreeMap::new();
    for t in tasks {
        for (version, id) in tokio::time::timeout(PATIENCE, t).await.unwrap().unwrap() {
            assert!(
                winners.insert(version, id).is_none(),
                "two winners for {version}"
            );
        }
    }
    let total = WRITERS * PER_WRITER;
    assert_eq!(winners.len() as u64, total);
    let events: Vec<RecordedEvent> = stores[0]
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events.len() as u64, total);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.stream_version, i as u64 + 1);
        assert_eq!(winners[&e.stream_version], e.event_id);
    }
    assert!(events
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));
}

/// Checks a tailing reader's view: strictly increasing positions, nothing twice, nothing missing,
/// per-stream versions in order.
/// Sixteen writers on 1,000 streams through two stores, with two tailing subscribers (one per
/// store, so one of them is woken only by NOTIFY) and a polling reader: at least 20,000 events,
/// none lost, repeated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_thousand_streams_two_subscribers() {
    const WRITERS: u64 = 16;
    const STREAMS: u64 = 1_000;
    const APPENDS_PER_WRITER: u64 = 800;
    let url = es_test_support::database_url();
    let schema = common::unique_schema("many");
    let a = common::store_on(&url, &schema).await;
    let b = common::store_on(&url, &schema).await;

    let subscribers = [tail_until_done(&a), tail_until_done(&b)];
    let poller = poll_until_done(&b, 500);

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = if w % 2 == 0 { a.clone() } else { b.clone() };
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..APPENDS_PER_WRITER {
                let n = (w * 7919 + i * 104_729) % STREAMS;
                let stream =
                    StreamId::new(if n % 3 == 0 { "order" } else { "payment" }, &n.to_string())
                        .unwrap();
                let batch: Vec<NewEvent> = (0..=i % 3).map(|k| event("A", k)).collect();
                written.extend(batch.iter().map(|e| e.event_id));
                store
                    .append(AppendRequest::new(stream, ExpectedVersion::Any, batch))
                    .await
                    .unwrap();
            }
            written
        }));
    }
    let mut written = HashSet::new();
    for w in writers {
        written.extend(tokio::time::timeout(PATIENCE, w).await.unwrap().unwrap());
    }
    assert!(written.len() >= 20_000, "{} events", written.len());
    let done = event("Done", 0);
    written.insert(done.event_id);
    a.append(AppendRequest::new(
        StreamId::new("control", "1").unwrap(),
        ExpectedVersion::Any,
        vec![done],
    ))
    .await
    .unwrap();

    let [sa, sb] = subscribers;
    for (name, task) in [
        ("subscriber a", sa),
        ("subscriber b", sb),
        ("poller", poller),
    ] {
        let seen = tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
        check_feed(name, &seen, &written);
    }
    let all: Vec<RecordedEvent> = a.read_all(ReadAll::after(0)).try_collect().await.unwrap();
    check_feed("read_all", &all, &written);
    assert_eq!(
        a.head_position().await.unwrap(),
        all.last().unwrap().global_position
    );
}

/// Concurrent batches to one stream from two stores land whole and in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_from_two_stores_do_not_interleave() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("batches");
    let a = common::store_on(&url, &schema).await;
    let b = common::store_on(&url, &schema).await;
    let stream = StreamId::new("order", "batches").unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = if t % 2 == 0 { a.clone() } else { b.clone() };
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..10u64 {
                let kind = format!("T{t}R{round}");
                let batch = (0..50).map(|k| event(&kind, k)).collect();
                store
                    .append(AppendRequest::new(
                        stream.clone(),
                        ExpectedVersion::Any,
                        batch,
                    ))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(PATIENCE, t).await.unwrap().unwrap();
    }
    let stored: Vec<RecordedEvent> = a
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(stored.len(), 8 * 10 * 50);
    for chunk in stored.chunks(50) {
        assert!(chunk.iter().all(|e| e.event_type == chunk[0].event_type));
        assert!(chunk
            .windows(2)
            .all(|w| w[1].global_position == w[0].global_position + 1));
    }
}
