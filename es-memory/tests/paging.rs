//! Reads page through the log: every combination of direction, start, limit and filter returns
//! what a plain scan of everything written returns, across page boundaries.

use std::time::Duration;

use es_core::{
    AppendRequest, EventFilter, EventStore, ExpectedVersion, NewEvent, ReadAll, ReadStream,
    RecordedEvent, StreamId,
};
use es_memory::InMemoryStore;
use futures::{StreamExt, TryStreamExt};

/// 9000 events (more than one filtered scan) over two streams: `a` gets 2 of every 3 (type `A`), `other` the rest (type `B`).
async fn store() -> (InMemoryStore, StreamId) {
    let store = InMemoryStore::new();
    let a = StreamId::parse("order-a").unwrap();
    let other = StreamId::parse("misc-other").unwrap();
    for i in 0..4500u64 {
        let (stream, event_type) = if i % 3 == 2 { (&other, "B") } else { (&a, "A") };
        let events = vec![
            NewEvent::new(event_type, 1, "{}").unwrap(),
            NewEvent::new(event_type, 1, "{}").unwrap(),
        ];
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Any,
                events,
            ))
            .await
            .unwrap();
    }
    (store, a)
}

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.stream_version).collect()
}

#[tokio::test]
async fn stream_reads_cross_pages_in_both_directions() {
    let (store, a) = store().await;
    let len = store.stream_version(&a).await.unwrap();
    assert_eq!(len, 6000);
    for from in [0, 1, 2, 511, 512, 513, 1024, 1999, 2000, 2001, u64::MAX] {
        for limit in [
            None,
            Some(0),
            Some(1),
            Some(511),
            Some(512),
            Some(513),
            Some(1500),
        ] {
            let mut read = ReadStream::forward().from(from);
            if let Some(l) = limit {
                read = read.limit(l);
            }
            let got: Vec<RecordedEvent> = store.read_stream(&a, read).try_collect().await.unwrap();
            let want: Vec<u64> = (from.max(1)..=len)
                .take(limit.unwrap_or(u64::MAX) as usize)
                .collect();
            assert_eq!(versions(&got), want, "forward from {from} limit {limit:?}");

            let mut read = ReadStream::backward().from(from);
            if let Some(l) = limit {
                read = read.limit(l);
            }
            let got: Vec<RecordedEvent> = store.read_stream(&a, read).try_collect().await.unwrap();
            let want: Vec<u64> = (1..=from.min(len))
                .rev()
                .take(limit.unwrap_or(u64::MAX) as usize)
                .collect();
            assert_eq!(versions(&got), want, "backward from {from} limit {limit:?}");
        }
    }
    let missing = StreamId::parse("order-missing").unwrap();
    let none: Vec<RecordedEvent> = store
        .read_stream(&missing, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn read_all_crosses_pages_with_and_without_filters() {
    let (store, _) = store().await;
    let everything: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(everything.len(), 9000);
    let filters = [
        EventFilter::all(),
        EventFilter {
            categories: vec!["misc".into()],
            event_types: Vec::new(),
        },
        EventFilter {
            categories: Vec::new(),
            event_types: vec!["A".into()],
        },
        EventFilter {
            categories: vec!["nothing".into()],
            event_types: Vec::new(),
        },
    ];
    for filter in filters {
        for after in [0, 1, 511, 512, 2999, 8192, 8193, 9000, 9500] {
            for limit in [None, Some(1), Some(513), Some(2500)] {
                let mut read = ReadAll::after(after).filter(filter.clone());
                if let Some(l) = limit {
                    read = read.limit(l);
                }
                let got: Vec<u64> = store
                    .read_all(read)
                    .map_ok(|e| e.global_position)
                    .try_collect()
                    .await
                    .unwrap();
                let want: Vec<u64> = everything
                    .iter()
                    .filter(|e| e.global_position > after && filter.matches(e))
                    .map(|e| e.global_position)
                    .take(limit.unwrap_or(u64::MAX) as usize)
                    .collect();
                assert_eq!(got, want, "after {after} limit {limit:?} filter {filter:?}");
            }
        }
    }
}

#[tokio::test]
async fn filtered_subscription_passes_long_gaps_then_follows_appends() {
    let (store, _) = store().await;
    // Nothing in the log matches: the subscription scans it all, then waits for an append.
    let filter = EventFilter {
        categories: vec!["late".into()],
        event_types: Vec::new(),
    };
    let mut feed = store.subscribe(0, filter);
    let late = StreamId::parse("late-1").unwrap();
    let writer = store.clone();
    let append = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer
            .append(AppendRequest::new(
                late,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("L", 1, "{}").unwrap()],
            ))
            .await
            .unwrap()
    });
    let event = tokio::time::timeout(Duration::from_secs(2), feed.next())
        .await
        .expect("the subscription wakes on the append")
        .unwrap()
        .unwrap();
    let appended = append.await.unwrap();
    assert_eq!(event.global_position, appended.positions[0]);
    assert_eq!(event.global_position, 9001);
}
