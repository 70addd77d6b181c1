//! Concurrency on a real server (`REDIS_URL`): many writers on one stream, and many writers on
//! 1,000 streams while two subscribers tail the feed.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadAll, ReadStream, RecordedEvent,
    StoreError, StreamId,
};
use es_testkit::support::{check_feed, tail_until_done};
use futures::TryStreamExt;
use serde_json::json;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(120);

fn event(event_type: &str, n: u64) -> NewEvent {
    NewEvent::from_value(event_type, 1, &json!({ "n": n, "pad": "x".repeat(100) }))
}

/// Sixteen writers race with exact expected versions on one stream: every version has exactly
/// one winner, and the stream holds exactly the winners' events in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_on_one_stream() {
    const WRITERS: u64 = 16;
    const PER_WRITER: u64 = 60;
    let store = common::store("one").await;
    let s = StreamId::parse("account-hot").unwrap();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let mut conflicts = 0u64;
            for i in 0..PER_WRITER {
                let e = event("Credited", w * 1000 + i);
                let mut expected = store.stream_version(&s).await.unwrap();
                loop {
                    let request = AppendRequest::new(
                        s.clone(),
                        ExpectedVersion::Exact(expected),
                        vec![e.clone()],
                    );
                    match store.append(request).await {
                        Ok(r) => {
                            assert_eq!(r.stream_version, expected + 1);
                            assert!(!r.duplicate);
                            won.push((r.stream_version, r.positions[0], e.event_id));
                            break;
                        }
                        Err(StoreError::Conflict { actual, .. }) => {
                            assert!(actual > expected, "a conflict means the stream moved on");
                            conflicts += 1;
                            expected = actual;
                        }
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
            }
            (won, conflicts)
        }));
    }
    let mut winners: BTreeMap<u64, (u64, Uuid)> = BTreeMap::new();
    let mut conflicts = 0;
    for t in tasks {
        let (won, c) = tokio::time::timeout(PATIENCE, t).await.unwrap().unwrap();
        conflicts += c;
        for (version, position, id) in won {
            assert!(
                winners.insert(version, (position, id)).is_none(),
                "version {version} had two winners"
            );
        }
    }
    assert!(conflicts > 0, "the writers really raced");
    let total = WRITERS * PER_WRITER;
    assert_eq!(
        winners.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let stored: Vec<RecordedEvent> = store
        .read_stream(&s, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(stored.len() as u64, total);
    for e in &stored {
        assert_eq!(winners[&e.stream_version], (e.global_position, e.event_id));
    }
    assert!(stored
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));
    // Positions are dense within the store's first epoch, which its first write began.
    let first = es_core::contract::position::first_of_epoch(es_core::contract::position::epoch_of(
        stored[0].global_position,
    ));
    assert_eq!(store.head_position().await.unwrap(), first + total - 1);
}

/// Sixteen writers append 20,000+ events to 1,000 streams while two subscribers tail the feed
/// (one from the start, one joining half-way from position 0): neither loses, repeats or
/// reorders an event, and per-stream order holds in the feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_on_a_thousand_streams_with_two_subscribers() {
    const WRITERS: u64 = 16;
    const STREAMS: u64 = 1000;
    const APPENDS_PER_WRITER: u64 = 650;
    let store = common::store("many").await;

    let early = tail_until_done(&store);

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..APPENDS_PER_WRITER {
                let s =
                    StreamId::new("account", &format!("{}", (w * 61 + i * 17) % STREAMS)).unwrap();
                let batch: Vec<NewEvent> = (0..=(i % 3))
                    .map(|j| event("Credited", i * 10 + j))
                    .collect();
                let ids: Vec<Uuid> = batch.iter().map(|e| e.event_id).collect();
                store
                    .append(AppendRequest::new(s, ExpectedVersion::Any, batch))
                    .await
                    .unwrap();
                written.extend(ids);
            }
            written
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = tail_until_done(&store);

    let mut written = HashSet::new();
    for w in writers {
        written.extend(tokio::time::timeout(PATIENCE, w).await.unwrap().unwrap());
    }
    assert!(written.len() >= 20_000, "{} events written", written.len());
    let done = event("Done", 0);
    written.insert(done.event_id);
    store
        .append(AppendRequest::new(
            StreamId::parse("control-1").unwrap(),
            ExpectedVersion::Any,
            vec![done],
        ))
        .await
        .unwrap();

    let feed: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(feed.len(), written.len());
    // Dense and in order within the store's first epoch, which its first write began.
    let first = es_core::contract::position::first_of_epoch(es_core::contract::position::epoch_of(
        feed[0].global_position,
    ));
    assert_eq!(
        feed.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        (first..first + written.len() as u64).collect::<Vec<_>>(),
        "positions are dense and in order"
    );
    for (name, task) in [("early", early), ("late", late)] {
        let seen = tokio::time::timeout(PATIENCE, task)
            .await
            .unwrap_or_else(|_| panic!("{name} subscriber timed out"))
            .unwrap();
        check_feed(name, &seen, &written);
        assert_eq!(
            seen.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            feed.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            "{name}: the feed, in order"
        );
    }
}
